"""The reference engine: every rule of docs/semantics.md densely, materialising Sq x Skv per segment.

It is the behaviour every faster engine reproduces. ``compute_dtype`` None means semantics §7's
accumulation (float32 for fp16/bf16/fp32 inputs, float64 for float64); tests also run it in
float64 or in the input dtype. Memory is O(B * N1 * Sq * Skv): a reference, not a default for
long sequences.
"""
from __future__ import annotations

import sys
from types import ModuleType

import torch
from torch import Tensor

from ..canonical.problem import Problem, Segment
from ..limits import DTYPES, FLT_MAX
from .base import FEATURES, ModuleEngine

__all__ = ["ReferenceEngine", "default_compute_dtype", "forward", "backward", "workspace_bytes"]


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(seg: Segment, prob: Problem, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(L, allowed, k, v) with k, v repeated over the G query heads of each group."""
    g = prob.g
    q = seg.q.to(ct)
    k = seg.k.to(ct).repeat_interleave(g, 1)
    v = seg.v.to(ct).repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2)
    scale = torch.tensor(prob.scale, dtype=ct)
    if seg.pse is not None:
        bias = seg.pse.tile(0, seg.mask.sq, 0, seg.mask.skv, ct)
        s = (s + bias) * scale if seg.pse.pre_scale else s * scale + bias
    else:
        s = s * scale
    allowed = seg.mask.materialize(s.device).expand(s.shape)
    return s, allowed, k, v


def _keep(seg: Segment, prob: Problem, ct: torch.dtype, device: torch.device) -> Tensor | None:
    """Z / keep_prob over the whole segment, or None without dropout."""
    if seg.dropout is None:
        return None
    z = seg.dropout.keep(prob.n1, 0, seg.mask.sq, 0, seg.mask.skv, device)
    return z.to(ct) / prob.keep_prob


def _group_sum(x: Tensor, g: int) -> Tensor:
    return x if g == 1 else x.unflatten(1, (-1, g)).sum(2)


def forward(seg: Segment, prob: Problem, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B,N1,Sq,Dv], softmax_max [B,N1,Sq], softmax_sum [B,N1,Sq]) in the compute dtype."""
    ct = compute_dtype or default_compute_dtype(prob.dtype)
    L, allowed, _, v = _logits(seg, prob, ct)
    valid = allowed.any(-1)
    lm = L.masked_fill(~allowed, float("-inf"))
    m = lm.amax(-1) if L.shape[-1] else torch.full(L.shape[:-1], float("-inf"), dtype=ct, device=L.device)
    valid = valid & (m != float("-inf"))  # every logit -inf (e.g. a -inf pse row): nothing to average
    sink = prob.sink.to(ct)[None, :, None] if prob.sink is not None else None
    if sink is not None:
        m = torch.maximum(m, sink.expand_as(m))
    live = valid | (sink is not None)
    m_safe = torch.where(live, m, torch.zeros_like(m))
    p = torch.exp(lm - m_safe.unsqueeze(-1))
    l = p.sum(-1)
    if sink is not None:
        l = l + torch.exp(sink - m_safe)
    p = p / torch.where(live, l, torch.ones_like(l)).unsqueeze(-1)
    z = _keep(seg, prob, ct, L.device)
    if z is not None:
        p = p * z
    out = p @ v
    out = out.masked_fill(~valid.unsqueeze(-1), 0)
    if m.dtype in (torch.float16, torch.bfloat16):  # the sentinels need float32's range
        m, l = m.float(), l.float()
    m = torch.where(live, m, torch.full_like(m, -FLT_MAX))
    l = torch.where(live, l, torch.full_like(l, FLT_MAX))
    return out, m, l


def backward(seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
             dpse: Tensor | None, dsink: Tensor | None,
             compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the compute dtype; adds into ``dpse`` / ``dsink`` buffers when given."""
    ct = compute_dtype or default_compute_dtype(prob.dtype)
    L, allowed, k, v = _logits(seg, prob, ct)
    m, l = m.to(ct).unsqueeze(-1), l.to(ct).unsqueeze(-1)
    p = torch.where(allowed, torch.exp(L - m) / l, torch.zeros((), dtype=ct, device=L.device))
    dy = dy.to(ct)
    z = _keep(seg, prob, ct, L.device)
    pd = p if z is None else p * z
    dv = pd.transpose(-1, -2) @ dy
    dpd = dy @ v.transpose(-1, -2)
    if z is not None:
        dpd = dpd * z
    r = (dy * out.to(ct)).sum(-1, keepdim=True)
    ds = p * (dpd - r)
    scale = torch.tensor(prob.scale, dtype=ct)
    dq = (ds @ k) * scale
    dk = (ds.transpose(-1, -2) @ seg.q.to(ct)) * scale
    if dpse is not None and seg.pse is not None:
        seg.pse.add_grad(dpse, 0, seg.mask.sq, 0, seg.mask.skv, ds * scale if seg.pse.pre_scale else ds)
    if dsink is not None and prob.sink is not None:
        p_sink = torch.exp(prob.sink.to(ct)[None, :, None, None] - m) / l
        dsink += (-(p_sink * r)).sum((0, 2, 3)).to(dsink.dtype)
    return dq, _group_sum(dk, prob.g), _group_sum(dv, prob.g)


def workspace_bytes(seg: Segment, prob: Problem, backward: bool) -> int:
    """Scratch bytes: a handful of dense [B, N1, Sq, Skv] matrices in the compute dtype."""
    b = seg.q.shape[0]
    elems = b * prob.n1 * seg.mask.sq * seg.mask.skv
    item = torch.finfo(default_compute_dtype(prob.dtype)).bits // 8
    return elems * item * (8 if backward else 5)


class ReferenceEngine(ModuleEngine):
    """Every feature, on every device and dtype; O(Sq * Skv) memory per segment."""

    name = "reference"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset(DTYPES)
    features = frozenset(FEATURES)

    def implementation(self) -> ModuleType:
        return sys.modules[__name__]
