"""Engine -> restore: run a canonical problem on the engine dispatch picks, and put the results
back into the caller's layout and dtype.

``run_forward`` returns ``(attention_out, softmax_max, softmax_sum)`` and ``run_backward``
``(dq, dk, dv, dpse, dsink, dq_rope, dk_rope)``, exactly what the entry points hand out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..canonical.layouts import from_bnsd, tnd_rows, tnd_stats_view, to_bnsd
from ..canonical.problem import Problem, Segment
from ..engines import Engine, select
from .memory import check_memory

__all__ = ["run_forward", "run_backward", "prepare"]

Grads = tuple[Tensor, Tensor, Tensor, "Tensor | None", Tensor, "Tensor | None", "Tensor | None"]


def prepare(prob: Problem, backward: bool) -> Engine:
    """The engine for ``prob`` (dispatch), after the memory guard accepted the call on it."""
    engine = select(prob, backward)
    check_memory(prob, backward, engine)
    return engine


def run_forward(prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """(attention_out, softmax_max, softmax_sum) in the caller's layout."""
    engine = prepare(prob, backward=False)
    whole = engine.forward_all(prob)
    if whole is not None:
        return whole
    dev = prob.device
    if prob.layout != "TND":
        (seg,) = prob.segments
        o, m, l = engine.forward(seg, prob)
        out = from_bnsd(o.to(prob.dtype), prob.layout)
        smax = m.float().unsqueeze(-1).expand(*m.shape, 8).contiguous()
        ssum = l.float().unsqueeze(-1).expand(*l.shape, 8).contiguous()
        return out, smax, ssum
    out = torch.zeros(prob.out_shape, dtype=prob.dtype, device=dev)
    smax = torch.zeros(prob.stats_shape, dtype=torch.float32, device=dev)
    ssum = torch.zeros(prob.stats_shape, dtype=torch.float32, device=dev)
    for seg in prob.segments:
        bt = seg.batch
        o, m, l = engine.forward(seg, prob)
        out[bt.q0:bt.q0 + bt.sq] = o[0].permute(1, 0, 2).to(prob.dtype)
        tnd_stats_view(smax, bt, prob.n1, prob.softmax_layout)[...] = m[0].float().unsqueeze(-1)
        tnd_stats_view(ssum, bt, prob.n1, prob.softmax_layout)[...] = l[0].float().unsqueeze(-1)
    return out, smax, ssum


def _segment_inputs(prob: Problem, seg: Segment, dy: Tensor, attention_in: Tensor, softmax_max: Tensor,
                    softmax_sum: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dy, out, max, sum) of one segment in [B, N1, Sq, ...] form."""
    if prob.layout != "TND":
        return (to_bnsd(dy, prob.layout, prob.n1), to_bnsd(attention_in, prob.layout, prob.n1),
                softmax_max[..., 0], softmax_sum[..., 0])
    bt = seg.batch
    m = tnd_stats_view(softmax_max, bt, prob.n1, prob.softmax_layout)[..., 0].unsqueeze(0)
    l = tnd_stats_view(softmax_sum, bt, prob.n1, prob.softmax_layout)[..., 0].unsqueeze(0)
    return tnd_rows(dy, bt.q0, bt.sq), tnd_rows(attention_in, bt.q0, bt.sq), m, l


def _restore(prob: Problem, results: list, idx: int, cols: slice, like: Tensor, rows: str) -> Tensor:
    """Gradient ``idx`` (columns ``cols``: rope's share of D) of every segment in ``like``'s layout."""
    if prob.layout != "TND":
        return from_bnsd(results[0][1][idx][..., cols].to(prob.dtype), prob.layout)
    buf = torch.zeros_like(like)
    for seg, g in results:
        bt = seg.batch
        r0, n = (bt.q0, bt.sq) if rows == "q" else (bt.k0, bt.skv)
        buf[r0:r0 + n] = g[idx][0, :, :, cols].permute(1, 0, 2).to(prob.dtype)
    return buf


def run_backward(prob: Problem, dy: Tensor, attention_in: Tensor, softmax_max: Tensor,
                 softmax_sum: Tensor) -> Grads:
    """(dq, dk, dv, dpse, dsink, dq_rope, dk_rope) in the caller's layout and dtypes."""
    engine = prepare(prob, backward=True)
    whole = engine.backward_all(prob, dy, attention_in, softmax_max, softmax_sum)
    if whole is not None:
        return whole
    dev, d = prob.device, prob.d
    acc = torch.float64 if prob.dtype == torch.float64 else torch.float32
    dpse = torch.zeros(prob.pse.shape, dtype=acc, device=dev) if prob.pse is not None else None
    dsink = torch.zeros(prob.n1, dtype=torch.float32, device=dev) if prob.sink is not None else None
    results = []
    for seg in prob.segments:
        dy4, o4, m, l = _segment_inputs(prob, seg, dy, attention_in, softmax_max, softmax_sum)
        dpse_seg = dpse[seg.pse_rows] if dpse is not None else None
        results.append((seg, engine.backward(seg, prob, dy4, o4, m, l, dpse_seg, dsink)))
    q, k, v = prob.inputs
    dq = _restore(prob, results, 0, slice(0, d), q, "q")
    dk = _restore(prob, results, 1, slice(0, d), k, "k")
    dv = _restore(prob, results, 2, slice(None), v, "k")
    dqr = dkr = None
    if prob.rope is not None:
        dqr = _restore(prob, results, 0, slice(d, None), prob.rope[0], "q")
        dkr = _restore(prob, results, 1, slice(d, None), prob.rope[1], "k")
    dpse_out = dpse.to(prob.pse.dtype) if dpse is not None else None
    dsink_out = dsink if dsink is not None else torch.empty(0, dtype=torch.float32, device=dev)
    return dq, dk, dv, dpse_out, dsink_out, dqr, dkr
