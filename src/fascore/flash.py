"""The flash engine: tiled FlashAttention-2 forward and backward, O(S) extra memory.

Per segment, the (query block, key block) tiles are planned EMPTY / PARTIAL / FULL from the mask
(``masks.plan_blocks``): EMPTY tiles are skipped, FULL tiles do no mask work. The G query heads
of a kv head and all batches are processed together ([B*N2, G*bq, ...] batched matmuls), so the
per-tile Python cost is amortised. Logits, softmax statistics and accumulators are float32
(float64 for float64 inputs); the matmul operands stay in bf16/fp16 where the machine multiplies
them faster than float32 (``kernels.matmul_dtype``), else are upcast.

Backward (FA2): P is rebuilt from the forward's statistics (lse = max + log(sum)), tile by tile,
in a fixed order (deterministic); dropout bits are regenerated per tile. On CPU, tiles without
dropout and without a pse gradient go through PyTorch's fused flash backward kernel
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``) fed with the global lse and
output, which makes the per-rectangle results exact partial sums.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import band, kernels
from .masks import EMPTY, FULL, plan_blocks
from .problem import Problem, Segment
from .reference import default_compute_dtype
from .rows import finalize
from .rows import lse as row_lse


def _plan(seg: Segment, bq: int, bk: int) -> list[list[tuple[int, int]]]:
    """Per query block: the (key block, kind) pairs that are not EMPTY, in key order."""
    kinds = plan_blocks(seg.mask, bq, bk, seg.q.device).tolist()
    return [[(kb, kd) for kb, kd in enumerate(row) if kd != EMPTY] for row in kinds]


def _runs(row: list[tuple[int, int]], bk: int, skv: int, max_blocks: int) -> list[tuple[int, int, bool]]:
    """Merge adjacent key blocks of one kind into (j0, j1, partial) runs of at most max_blocks.

    Planning at a fine bk wastes little work on masked pairs; running merged runs keeps the
    number of tiles (and Python overhead) low.
    """
    runs: list[tuple[int, int, bool]] = []
    for kb, kind in row:
        j0, j1, partial = kb * bk, min((kb + 1) * bk, skv), kind != FULL
        if runs and runs[-1][1] == j0 and runs[-1][2] == partial and (j1 - runs[-1][0]) <= max_blocks * bk:
            runs[-1] = (runs[-1][0], j1, partial)
        else:
            runs.append((j0, j1, partial))
    return runs


class _Tiles:
    """The segment's operands regrouped for batched tiles: [B*N2, G, S, D] and K^T."""

    def __init__(self, seg: Segment, prob: Problem, mm: torch.dtype) -> None:
        b, n1, sq, d = seg.q.shape
        n2, skv = seg.k.shape[1], seg.k.shape[2]
        self.b, self.n1, self.n2, self.g, self.sq, self.skv = b, n1, n2, n1 // n2, sq, skv
        self.q = seg.q.to(mm).reshape(b * n2, self.g, sq, d)
        self.kt = seg.k.to(mm).reshape(b * n2, skv, d).transpose(1, 2).contiguous()
        self.k = seg.k.to(mm).reshape(b * n2, skv, d)
        self.v = seg.v.to(mm).reshape(b * n2, skv, seg.v.shape[-1])
        self.seg, self.prob, self.mm = seg, prob, mm

    def q_block(self, i0: int, i1: int) -> Tensor:
        return self.q[:, :, i0:i1].reshape(self.b * self.n2, self.g * (i1 - i0), -1)

    def rows(self, x: Tensor, i0: int, i1: int) -> Tensor:
        """[B, N1, Sq, ...] row block as [B*N2, G*rows, ...]."""
        return x[:, :, i0:i1].reshape(self.b * self.n2, self.g * (i1 - i0), *x.shape[3:])

    def logits(self, qt: Tensor, i0: int, i1: int, j0: int, j1: int, partial: bool, ct: torch.dtype,
               masked_out: list | None = None) -> Tensor:
        """Scaled, biased, masked logits [B*N2, G*bq, bk] in ``ct`` (-inf where not taking part).

        With ``masked_out``, the boolean not-taking-part tile (view of [B, N2, G, bq, bk]) is appended.
        """
        kt = self.kt[:, :, j0:j1]
        s = torch.baddbmm(torch.empty((), dtype=qt.dtype, device=qt.device), qt, kt, beta=0, alpha=self.prob.scale)
        s = s.to(ct) if s.dtype != ct else s
        s5 = s.view(self.b, self.n2, self.g, i1 - i0, j1 - j0)
        pse = self.seg.pse
        if pse is not None:
            bias = pse.tile(i0, i1, j0, j1, ct)
            bias = bias.view(bias.shape[0], self.n2, self.g, bias.shape[2], j1 - j0)
            s5.add_(bias, alpha=self.prob.scale if pse.pre_scale else 1.0)
        if partial:
            allowed = self.seg.mask.tile(i0, i1, j0, j1, s.device)
            if allowed is not None:
                masked = ~_split_heads(allowed, self.n2, self.g)
                s5.masked_fill_(masked, float("-inf"))
                if masked_out is not None:
                    masked_out.append(masked)
        return s

    def keep(self, i0: int, i1: int, j0: int, j1: int, ct: torch.dtype) -> Tensor | None:
        """Z / keep_prob tile [B*N2, G*bq, bk], or None without dropout."""
        dr = self.seg.dropout
        if dr is None:
            return None
        z = dr.keep(self.n1, i0, i1, j0, j1, self.q.device)
        return z.reshape(self.b * self.n2, self.g * (i1 - i0), j1 - j0).to(ct).div_(self.prob.keep_prob)


def _split_heads(t: Tensor, n2: int, g: int) -> Tensor:
    """[Bx, 1 or N1, r, c] -> [Bx, 1 or N2, 1 or G, r, c] for broadcasting over [B, N2, G, r, c]."""
    if t.shape[1] == 1:
        return t.unsqueeze(1)
    return t.view(t.shape[0], n2, g, *t.shape[2:])


def forward(seg: Segment, prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
    ct = default_compute_dtype(prob.dtype)
    mm = kernels.matmul_dtype(seg.q.device, prob.dtype)
    bq, bk = kernels.tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1])
    win = band.window(seg, kernels.BAND_BQ) if kernels.config["band"] else None
    if win is not None:
        return band.forward(seg, prob, mm, ct, kernels.BAND_BQ, *win, kernels.config["tile_bytes"])
    t = _Tiles(seg, prob, mm)
    dev = seg.q.device
    bn, dv = t.b * t.n2, seg.v.shape[-1]
    out = torch.empty(t.b, t.n1, t.sq, dv, dtype=ct, device=dev)
    m_out = torch.empty(t.b, t.n1, t.sq, dtype=ct, device=dev)
    l_out = torch.empty_like(m_out)
    plan = _plan(seg, bq, bk)
    max_blocks = kernels.max_run_blocks(t.b * t.n1 * bq, bk, ct)
    sink = prob.sink.to(ct).view(1, t.n2, t.g, 1) if prob.sink is not None else None
    for qb, row in enumerate(plan):
        i0, i1 = qb * bq, min((qb + 1) * bq, t.sq)
        rows = t.g * (i1 - i0)
        qt = t.q_block(i0, i1)
        acc = torch.zeros(bn, rows, dv, dtype=ct, device=dev)
        m = torch.full((bn, rows), float("-inf"), dtype=ct, device=dev)
        l = torch.zeros(bn, rows, dtype=ct, device=dev)
        for j0, j1, partial in _runs(row, bk, t.skv, max_blocks):
            s = t.logits(qt, i0, i1, j0, j1, partial, ct)
            m_new = torch.maximum(m, s.amax(-1))
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
            s.sub_(m_use.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - m_use)
            l.mul_(alpha).add_(s.sum(-1))
            z = t.keep(i0, i1, j0, j1, ct)
            if z is not None:
                s.mul_(z)
            acc.mul_(alpha.unsqueeze(-1))
            if mm == ct:
                acc.baddbmm_(s, t.v[:, j0:j1])
            else:
                acc.add_(torch.bmm(s.to(mm), t.v[:, j0:j1]))
            m = m_new
        m4, l4, acc4 = (x.view(t.b, t.n2, t.g, i1 - i0, *x.shape[2:]) for x in (m, l, acc))
        o4, m4, l4 = finalize(m4, l4, acc4, sink)
        out[:, :, i0:i1] = o4.reshape(t.b, t.n1, i1 - i0, dv)
        m_out[:, :, i0:i1] = m4.reshape(t.b, t.n1, i1 - i0)
        l_out[:, :, i0:i1] = l4.reshape(t.b, t.n1, i1 - i0)
    return out, m_out, l_out


def backward(seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
             dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    ct = default_compute_dtype(prob.dtype)
    lse = row_lse(m.to(ct), l.to(ct))
    r = (dy.to(ct) * out.to(ct)).sum(-1)  # [B, N1, Sq]
    if dsink is not None and prob.sink is not None:
        p_sink = torch.exp(prob.sink.to(ct)[None, :, None] - lse)
        dsink += (-(p_sink * r)).sum((0, 2)).to(dsink.dtype)
    win = band.window(seg, kernels.BAND_BQ) if kernels.config["band"] else None
    if win is not None:
        mm = kernels.matmul_dtype(seg.q.device, prob.dtype)
        return band.backward(seg, prob, dy, lse, r, mm, ct, kernels.BAND_BQ, *win, kernels.config["tile_bytes"])
    if kernels.use_fused_backward(seg, prob, dpse is not None):
        return _backward_fused(seg, prob, dy, out, lse, ct)
    return _backward_tiled(seg, prob, dy, lse, r, dpse, ct)


def _backward_tiled(seg: Segment, prob: Problem, dy: Tensor, lse: Tensor, r: Tensor,
                    dpse: Tensor | None, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    mm = kernels.matmul_dtype(seg.q.device, prob.dtype)
    bq, bk = kernels.tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1], backward=True)
    t = _Tiles(seg, prob, mm)
    dev, bn = seg.q.device, t.b * t.n2
    d, dv = seg.q.shape[-1], seg.v.shape[-1]
    dq = torch.zeros(t.b, t.n1, t.sq, d, dtype=ct, device=dev)
    dk = torch.zeros(bn, t.skv, d, dtype=ct, device=dev)
    dvv = torch.zeros(bn, t.skv, dv, dtype=ct, device=dev)
    dy_mm = dy.to(mm)
    plan = _plan(seg, bq, bk)
    # Key-block-major order: dk/dv of a key block complete in one pass; dq accumulates in a fixed order.
    by_key: dict[int, list[tuple[int, int]]] = {}
    for qb, row in enumerate(plan):
        for kb, kind in row:
            by_key.setdefault(kb, []).append((qb, kind))
    scale = prob.scale
    for kb in sorted(by_key):
        j0, j1 = kb * bk, min((kb + 1) * bk, t.skv)
        kt_blk, v_blk = t.k[:, j0:j1], t.v[:, j0:j1]
        for qb, kind in by_key[kb]:
            i0, i1 = qb * bq, min((qb + 1) * bq, t.sq)
            qt = t.q_block(i0, i1)
            masked: list[Tensor] = []
            s = t.logits(qt, i0, i1, j0, j1, kind != FULL, ct, masked)
            p = s.sub_(t.rows(lse, i0, i1).unsqueeze(-1)).exp_()
            if masked:  # P = 0 where (i, j) does not take part, even for a NaN/-inf lse
                p.view(t.b, t.n2, t.g, i1 - i0, j1 - j0).masked_fill_(masked[0], 0.0)
            z = t.keep(i0, i1, j0, j1, ct)
            dyt = t.rows(dy_mm, i0, i1)
            pd = p if z is None else p * z
            dvv[:, j0:j1] += torch.bmm(pd.transpose(1, 2).to(mm), dyt).to(ct)
            dp = torch.bmm(dyt, v_blk.transpose(1, 2)).to(ct)
            if z is not None:
                dp.mul_(z)
            ds = dp.sub_(t.rows(r, i0, i1).unsqueeze(-1)).mul_(p)
            if dpse is not None and seg.pse is not None:
                g = ds * scale if seg.pse.pre_scale else ds
                seg.pse.add_grad(dpse, i0, i1, j0, j1, g.view(t.b, t.n1, i1 - i0, j1 - j0))
            ds_mm = ds.to(mm)
            dq[:, :, i0:i1] += (torch.bmm(ds_mm, kt_blk).to(ct) * scale).view(t.b, t.n1, i1 - i0, d)
            dk[:, j0:j1] += torch.bmm(ds_mm.transpose(1, 2), qt).to(ct) * scale
    return dq, dk.view(t.b, t.n2, t.skv, d), dvv.view(t.b, t.n2, t.skv, dv)


def _backward_fused(seg: Segment, prob: Problem, dy: Tensor, out: Tensor, lse: Tensor,
                    ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's fused CPU flash backward over the plan's rectangles (no dropout, no dpse)."""
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    b, n1, sq, d = seg.q.shape
    n2, skv = seg.k.shape[1], seg.k.shape[2]
    g = n1 // n2
    # The fused kernel needs dense operands (it silently misreads a non-unit last-dim stride).
    k = (seg.k.repeat_interleave(g, 1) if g > 1 else seg.k).contiguous()
    v = (seg.v.repeat_interleave(g, 1) if g > 1 else seg.v).contiguous()
    q, dy_, out_ = seg.q.contiguous(), dy.to(seg.q.dtype).contiguous(), out.to(seg.q.dtype).contiguous()
    lse32 = lse.float()
    dq = torch.zeros(b, n1, sq, d, dtype=ct, device=q.device)
    dk = torch.zeros(b, n1, skv, d, dtype=ct, device=q.device)
    dv = torch.zeros(b, n1, skv, seg.v.shape[-1], dtype=ct, device=q.device)
    for i0, i1, j0, j1, how in kernels.rectangles(seg.mask, *kernels.tile_sizes(q.device, prob.dtype, d, backward=True)):
        mask = None
        causal = how == "causal"
        if seg.pse is not None:
            bias = seg.pse.tile(i0, i1, j0, j1, torch.float32)
            mask = (bias * prob.scale if seg.pse.pre_scale else bias).to(q.dtype)
        if how == "masked":
            # An additive float mask: this kernel mishandles boolean masks in backward.
            allowed = seg.mask.tile(i0, i1, j0, j1, q.device)
            base = mask if mask is not None else torch.zeros((), dtype=q.dtype, device=q.device)
            mask = base.masked_fill(~allowed, float("-inf"))
        gq, gk, gv = bwd(dy_[:, :, i0:i1], q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], out_[:, :, i0:i1],
                         lse32[:, :, i0:i1], 0.0, causal, attn_mask=mask, scale=prob.scale)
        dq[:, :, i0:i1] += gq
        dk[:, :, j0:j1] += gk
        dv[:, :, j0:j1] += gv
    if g > 1:
        dk = dk.unflatten(1, (n2, g)).sum(2)
        dv = dv.unflatten(1, (n2, g)).sum(2)
    return dq, dk, dv


def workspace_bytes(seg: Segment, prob: Problem, backward: bool) -> int:
    """Scratch bytes: a few tiles, plus O(S) regrouped copies of q, k, v (and dq/dk/dv)."""
    ct_item = torch.finfo(default_compute_dtype(prob.dtype)).bits // 8
    bq, bk = kernels.tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1], backward)
    b, n1, sq, d = seg.q.shape
    tile = b * n1 * bq * bk * ct_item * (6 if backward else 4)
    operands = (seg.q.numel() + 2 * seg.k.numel() + seg.v.numel()) * ct_item
    rows = b * n1 * sq * (seg.v.shape[-1] + 4) * ct_item
    if backward:
        g = n1 // seg.k.shape[1]
        operands += (seg.q.numel() + g * (seg.k.numel() + seg.v.numel())) * ct_item * 2
    return tile + operands + rows
