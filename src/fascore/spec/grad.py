"""semantics §1.3 / §6: the grad ops' extra inputs (dy, the forward's statistics and output, numels)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..canonical.problem import Problem
from ..errors import invalid, nullptr
from ..params import Names

__all__ = ["check_grad_inputs", "check_numels"]


def check_grad_inputs(prob: Problem, dy: Any, attention_in: Any, softmax_max: Any, softmax_sum: Any,
                      nm: Names) -> None:
    """dy / attention_in in the forward output's shape and dtype, the statistics float32 as returned."""
    for name, t in (("dy", dy), ("softmax_max", softmax_max), ("softmax_sum", softmax_sum),
                    ("attention_in", attention_in)):
        if t is None:
            raise nullptr(nm[name])
        if not isinstance(t, Tensor):
            raise invalid(f"{nm[name]}={t!r}: must be a torch.Tensor")
        if t.device != prob.device:
            raise invalid(f"{nm[name]} is on {t.device} but query is on {prob.device}")
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        if tuple(t.shape) != prob.out_shape or t.dtype != prob.dtype:
            raise invalid(f"{nm[name]} shape {list(t.shape)} dtype {t.dtype}: must be the forward output's "
                          f"shape {list(prob.out_shape)} and dtype {prob.dtype}")
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if tuple(t.shape) != prob.stats_shape or t.dtype != torch.float32:
            raise invalid(f"{nm[name]} shape {list(t.shape)} dtype {t.dtype}: must be float32 "
                          f"{list(prob.stats_shape)} as the forward returns it")


def check_numels(prob: Problem, numels: Any) -> None:
    if isinstance(numels, bool) or not isinstance(numels, int) or (numels != 0 and numels != prob.numels):
        raise invalid(f"numels={numels!r}: must be 0 or the forward's mask size {prob.numels}")
