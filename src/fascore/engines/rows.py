"""Row statistics shared by the kernels: finalising (max, sum, acc) and the log-sum-exp."""
from __future__ import annotations

import torch
from torch import Tensor

from ..limits import FLT_MAX

__all__ = ["finalize", "lse"]


def finalize(m: Tensor, l: Tensor, acc: Tensor, sink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(out, softmax_max, softmax_sum) from running max ``m``, sum ``l`` and unnormalised ``acc``.

    ``m`` is -inf on rows where nothing took part: those are invalid (out 0, max -FLT_MAX,
    sum FLT_MAX) unless a ``sink`` (broadcastable to ``m``) joins the normalisation.
    """
    valid = m != float("-inf")
    if sink is not None:
        m_fin = torch.maximum(m, sink)
        a = torch.exp(m - m_fin)
        l = l * a + torch.exp(sink - m_fin)
        acc = acc * a.unsqueeze(-1)
        m = m_fin
    else:
        m = torch.where(valid, m, torch.full_like(m, -FLT_MAX))
        l = torch.where(valid, l, torch.full_like(l, FLT_MAX))
    out = (acc / l.unsqueeze(-1)).masked_fill_(~valid.unsqueeze(-1), 0.0)
    return out, m, l


def lse(m: Tensor, l: Tensor) -> Tensor:
    """log-sum-exp from the statistics; +inf on invalid rows so that P = exp(L - lse) = 0 there."""
    out = m + torch.log(l)
    return out.masked_fill_(m == -FLT_MAX, float("inf"))
