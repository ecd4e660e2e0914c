"""The flash engine: tiled FlashAttention-2 forward and backward, O(S) extra memory.

Per segment, the (query block, key block) tiles are planned EMPTY / PARTIAL / FULL from the mask
(``masks.plan_blocks``): EMPTY tiles are skipped, FULL tiles do no mask work. The G query heads
of a kv head and all batches are processed together ([B*N2, G*bq, ...] batched matmuls), so the
per-tile Python cost is amortised. Logits, softmax statistics, accumulators and every GEMM result
are float32 (float64 for float64 inputs; semantics §3): the operands of Q K^T and dy V^T stay in
their half dtype only where the device multiplies them into float32 results (CUDA) and are
upcast otherwise (CPU); products with P or dS take float32 operands (``cfg.operand_dtype``).

Backward (FA2): P is rebuilt from the forward's statistics (lse = max + log(sum)), tile by tile,
in a fixed order (deterministic); dropout bits are regenerated per tile. On CPU, tiles without
dropout and without a pse gradient go through PyTorch's fused flash backward kernel
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``) fed with the global lse and
output, which makes the per-rectangle results exact partial sums.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...canonical.bias import grad_rows
from ...canonical.problem import Problem, Segment
from ...plan import EMPTY, FULL, plan_blocks, rectangles
from ..reference import default_compute_dtype
from ..rows import finalize
from ..rows import lse as row_lse
from . import band
from . import config as cfg

__all__ = ["forward", "backward", "workspace_bytes"]


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


def _grouped(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``x`` regrouped to ``shape`` (a view where its strides allow) in ``dtype``."""
    return x.reshape(shape).to(dtype)


def _grouped_bytes(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes ``_grouped`` allocates: a copy where no view exists, another where the dtype changes."""
    n = math.prod(shape)
    try:
        x.view(shape)
        copied = 0
    except RuntimeError:
        copied = n * x.element_size()
    return copied + (n * (torch.finfo(dtype).bits // 8) if x.dtype != dtype else 0)


def _tile_operands(seg: Segment, od: torch.dtype, ct: torch.dtype) -> list[tuple[Tensor, tuple[int, ...], torch.dtype]]:
    """(tensor, shape, dtype) of every regrouped operand ``_Tiles`` holds: q and k (Q K^T) and
    v (dy V^T) in ``od``; k, v and q (partners of P and dS) in ``ct``."""
    b, n1, sq, d = seg.q.shape
    n2, skv, dv = seg.k.shape[1], seg.k.shape[2], seg.v.shape[-1]
    qs, ks, vs = (b * n2, n1 // n2, sq, d), (b * n2, skv, d), (b * n2, skv, dv)
    ops = [(seg.q, qs, od), (seg.k, ks, od), (seg.v, vs, ct)]
    if od != ct:
        ops += [(seg.k, ks, ct), (seg.v, vs, od), (seg.q, qs, ct)]
    return ops


class _Tiles:
    """The segment's operands regrouped for batched tiles: [B*N2, G, S, D] and K^T.

    ``q``/``kt`` (for Q K^T) and ``v_in`` (for dy V^T) are in ``od``; ``k``, ``v`` and ``q_ct``
    (the partners of P and dS) in the compute dtype.
    """

    def __init__(self, seg: Segment, prob: Problem, ct: torch.dtype) -> None:
        b, n1, sq, d = seg.q.shape
        n2, skv = seg.k.shape[1], seg.k.shape[2]
        self.b, self.n1, self.n2, self.g, self.sq, self.skv = b, n1, n2, n1 // n2, sq, skv
        self.ct = ct
        self.od = od = cfg.operand_dtype(seg.q.device, prob.dtype)
        ops = [_grouped(*op) for op in _tile_operands(seg, od, ct)]
        self.q, k_od, self.v = ops[:3]
        self.kt = k_od.transpose(1, 2)  # a view: the GEMMs read K^T through its strides
        self.k, self.v_in, self.q_ct = ops[3:] if od != ct else (k_od, self.v, self.q)
        self.seg, self.prob = seg, prob

    def q_block(self, i0: int, i1: int) -> Tensor:
        return self.q[:, :, i0:i1].reshape(self.b * self.n2, self.g * (i1 - i0), -1)

    def rows(self, x: Tensor, i0: int, i1: int) -> Tensor:
        """[B, N1, Sq, ...] row block as [B*N2, G*rows, ...]."""
        return x[:, :, i0:i1].reshape(self.b * self.n2, self.g * (i1 - i0), *x.shape[3:])

    def logits(self, qt: Tensor, i0: int, i1: int, j0: int, j1: int, partial: bool,
               masked_out: list | None = None) -> Tensor:
        """Scaled, biased, masked float32 logits [B*N2, G*bq, bk] (-inf where not taking part).

        With ``masked_out``, the boolean not-taking-part tile (view of [B, N2, G, bq, bk]) is appended.
        """
        kt = self.kt[:, :, j0:j1]
        if qt.dtype == self.ct:
            s = torch.baddbmm(torch.empty((), dtype=qt.dtype, device=qt.device), qt, kt, beta=0,
                              alpha=self.prob.scale)
        else:  # half operands, float32 result (never rounded to the input dtype)
            s = cfg.gemm(qt, kt, self.ct).mul_(self.prob.scale)
        s5 = s.view(self.b, self.n2, self.g, i1 - i0, j1 - j0)
        pse = self.seg.pse
        if pse is not None:
            bias = pse.tile(i0, i1, j0, j1, self.ct)
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

    def keep(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """Z / keep_prob tile [B*N2, G*bq, bk], or None without dropout."""
        dr = self.seg.dropout
        if dr is None:
            return None
        z = dr.keep(self.n1, i0, i1, j0, j1, self.q.device)
        return z.reshape(self.b * self.n2, self.g * (i1 - i0), j1 - j0).to(self.ct).div_(self.prob.keep_prob)


def _split_heads(t: Tensor, n2: int, g: int) -> Tensor:
    """[Bx, 1 or N1, r, c] -> [Bx, 1 or N2, 1 or G, r, c] for broadcasting over [B, N2, G, r, c]."""
    if t.shape[1] == 1:
        return t.unsqueeze(1)
    return t.view(t.shape[0], n2, g, *t.shape[2:])


def forward(seg: Segment, prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
    ct = default_compute_dtype(prob.dtype)
    win = band.window(seg, cfg.BAND_BQ) if cfg.config["band"] else None
    if win is not None:
        return band.forward(seg, prob, ct, cfg.BAND_BQ, *win, cfg.config["tile_bytes"])
    b, n1, sq, _ = seg.q.shape
    dev = seg.q.device
    out = torch.empty(b, n1, sq, seg.v.shape[-1], dtype=ct, device=dev)
    m_out = torch.empty(b, n1, sq, dtype=ct, device=dev)
    l_out = torch.empty_like(m_out)
    for b0, b1 in cfg.batch_chunks(seg, prob, backward=False):
        sub = seg if (b0, b1) == (0, b) else seg.batches(b0, b1)
        _forward_tiles(sub, prob, ct, out[b0:b1], m_out[b0:b1], l_out[b0:b1])
    return out, m_out, l_out


def _forward_tiles(seg: Segment, prob: Problem, ct: torch.dtype, out: Tensor, m_out: Tensor, l_out: Tensor) -> None:
    """FA2 forward of one batch chunk, written into ``out`` / ``m_out`` / ``l_out``."""
    bq, bk = cfg.tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1])
    t = _Tiles(seg, prob, ct)
    dev = seg.q.device
    bn, dv = t.b * t.n2, seg.v.shape[-1]
    plan = _plan(seg, bq, bk)
    max_blocks = cfg.max_run_blocks(t.b * t.n1 * min(bq, t.sq), bk, ct)
    sink = prob.sink.to(ct).view(1, t.n2, t.g, 1) if prob.sink is not None else None
    for qb, row in enumerate(plan):
        i0, i1 = qb * bq, min((qb + 1) * bq, t.sq)
        rows = t.g * (i1 - i0)
        qt = t.q_block(i0, i1)
        acc = torch.zeros(bn, rows, dv, dtype=ct, device=dev)
        m = torch.full((bn, rows), float("-inf"), dtype=ct, device=dev)
        l = torch.zeros(bn, rows, dtype=ct, device=dev)
        for j0, j1, partial in _runs(row, bk, t.skv, max_blocks):
            s = t.logits(qt, i0, i1, j0, j1, partial)
            m_new = torch.maximum(m, s.amax(-1))
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
            s.sub_(m_use.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - m_use)
            l.mul_(alpha).add_(s.sum(-1))
            z = t.keep(i0, i1, j0, j1)
            if z is not None:
                s.mul_(z)
            acc.mul_(alpha.unsqueeze(-1))
            acc.baddbmm_(s, t.v[:, j0:j1])
            m = m_new
        m4, l4, acc4 = (x.view(t.b, t.n2, t.g, i1 - i0, *x.shape[2:]) for x in (m, l, acc))
        o4, m4, l4 = finalize(m4, l4, acc4, sink)
        out[:, :, i0:i1] = o4.reshape(t.b, t.n1, i1 - i0, dv)
        m_out[:, :, i0:i1] = m4.reshape(t.b, t.n1, i1 - i0)
        l_out[:, :, i0:i1] = l4.reshape(t.b, t.n1, i1 - i0)


def backward(seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
             dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    ct = default_compute_dtype(prob.dtype)
    win = band.window(seg, cfg.BAND_BQ) if cfg.config["band"] else None
    if win is not None:
        lse, r = _rows_of_backward(prob, dy, out, m, l, dsink, ct)
        return band.backward(seg, prob, dy, lse, r, ct, cfg.BAND_BQ, *win, cfg.config["tile_bytes"])
    b, n1, sq, d = seg.q.shape
    n2, skv = seg.k.shape[1], seg.k.shape[2]
    dev = seg.q.device
    dq = torch.empty(b, n1, sq, d, dtype=ct, device=dev)  # written only with several chunks
    dk = torch.empty(b, n2, skv, d, dtype=ct, device=dev)
    dv = torch.empty(b, n2, skv, seg.v.shape[-1], dtype=ct, device=dev)
    fused = cfg.use_fused_backward(seg, prob, dpse is not None)
    chunks = cfg.batch_chunks(seg, prob, backward=True)
    for b0, b1 in chunks:
        sub = seg if len(chunks) == 1 else seg.batches(b0, b1)
        dy_c, out_c = dy[b0:b1], out[b0:b1]
        lse, r = _rows_of_backward(prob, dy_c, out_c, m[b0:b1], l[b0:b1], dsink, ct)
        if fused:
            g = _backward_fused(sub, prob, dy_c, out_c, lse, ct)
        else:
            g = _backward_tiled(sub, prob, dy_c, lse, r, grad_rows(dpse, b0, b1) if dpse is not None else None, ct)
        if len(chunks) == 1:
            return g
        dq[b0:b1], dk[b0:b1], dv[b0:b1] = g
    return dq, dk, dv


def _rows_of_backward(prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor, dsink: Tensor | None,
                      ct: torch.dtype) -> tuple[Tensor, Tensor]:
    """(lse, R = rowsum(dy * out)) of a batch chunk; adds the chunk's part of dsink."""
    lse = row_lse(m.to(ct), l.to(ct))
    r = (dy.to(ct) * out.to(ct)).sum(-1)  # [B, N1, Sq]
    if dsink is not None and prob.sink is not None:
        p_sink = torch.exp(prob.sink.to(ct)[None, :, None] - lse)
        dsink += (-(p_sink * r)).sum((0, 2)).to(dsink.dtype)
    return lse, r


def _backward_tiled(seg: Segment, prob: Problem, dy: Tensor, lse: Tensor, r: Tensor,
                    dpse: Tensor | None, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    bq, bk = cfg.tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1], backward=True)
    t = _Tiles(seg, prob, ct)
    dev, bn = seg.q.device, t.b * t.n2
    d, dv = seg.q.shape[-1], seg.v.shape[-1]
    dq = torch.zeros(t.b, t.n1, t.sq, d, dtype=ct, device=dev)
    dk = torch.zeros(bn, t.skv, d, dtype=ct, device=dev)
    dvv = torch.zeros(bn, t.skv, dv, dtype=ct, device=dev)
    dy_op, dy_ct = dy.to(t.od), dy.to(ct)
    plan = _plan(seg, bq, bk)
    # Key-block-major order: dk/dv of a key block complete in one pass; dq accumulates in a fixed order.
    by_key: dict[int, list[tuple[int, int]]] = {}
    for qb, row in enumerate(plan):
        for kb, kind in row:
            by_key.setdefault(kb, []).append((qb, kind))
    scale = prob.scale
    for kb in sorted(by_key):
        j0, j1 = kb * bk, min((kb + 1) * bk, t.skv)
        k_blk, v_blk = t.k[:, j0:j1], t.v_in[:, j0:j1]
        for qb, kind in by_key[kb]:
            i0, i1 = qb * bq, min((qb + 1) * bq, t.sq)
            qt = t.q_block(i0, i1)
            q_ct = qt if t.od == ct else t.q_ct[:, :, i0:i1].reshape(qt.shape)
            masked: list[Tensor] = []
            s = t.logits(qt, i0, i1, j0, j1, kind != FULL, masked)
            p = s.sub_(t.rows(lse, i0, i1).unsqueeze(-1)).exp_()
            if masked:  # P = 0 where (i, j) does not take part, even for a NaN/-inf lse
                p.view(t.b, t.n2, t.g, i1 - i0, j1 - j0).masked_fill_(masked[0], 0.0)
            z = t.keep(i0, i1, j0, j1)
            pd = p if z is None else p * z
            dvv[:, j0:j1] += torch.bmm(pd.transpose(1, 2), t.rows(dy_ct, i0, i1))
            dp = cfg.gemm(t.rows(dy_op, i0, i1), v_blk.transpose(1, 2), ct)
            if z is not None:
                dp.mul_(z)
            ds = dp.sub_(t.rows(r, i0, i1).unsqueeze(-1)).mul_(p)
            if dpse is not None and seg.pse is not None:
                g = ds * scale if seg.pse.pre_scale else ds
                seg.pse.add_grad(dpse, i0, i1, j0, j1, g.view(t.b, t.n1, i1 - i0, j1 - j0))
            dq[:, :, i0:i1] += (torch.bmm(ds, k_blk) * scale).view(t.b, t.n1, i1 - i0, d)
            dk[:, j0:j1] += torch.bmm(ds.transpose(1, 2), q_ct) * scale
    return dq, dk.view(t.b, t.n2, t.skv, d), dvv.view(t.b, t.n2, t.skv, dv)


def _dense_ct(x: Tensor, ct: torch.dtype) -> Tensor:
    return x.to(ct).contiguous()


def _dense_ct_bytes(x: Tensor, ct: torch.dtype) -> int:
    """Bytes ``_dense_ct`` allocates (0 when ``x`` is already a dense ``ct`` tensor)."""
    return 0 if x.dtype == ct and x.is_contiguous() else x.numel() * (torch.finfo(ct).bits // 8)


def _backward_fused(seg: Segment, prob: Problem, dy: Tensor, out: Tensor, lse: Tensor,
                    ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's fused CPU flash backward over the plan's rectangles (no dropout, no dpse)."""
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    b, n1, sq, d = seg.q.shape
    n2, skv = seg.k.shape[1], seg.k.shape[2]
    g = n1 // n2
    # Float32 operands (exact for fp16/bf16 values), so that its logits and partial gradients are
    # float32 (semantics §3); dense, because it silently misreads a non-unit last-dim stride.
    k = _dense_ct(seg.k.repeat_interleave(g, 1) if g > 1 else seg.k, ct)
    v = _dense_ct(seg.v.repeat_interleave(g, 1) if g > 1 else seg.v, ct)
    q, dy_, out_ = _dense_ct(seg.q, ct), _dense_ct(dy, ct), _dense_ct(out, ct)
    lse32 = lse.float()
    rects = list(rectangles(seg.mask, *cfg.tile_sizes(q.device, prob.dtype, d, backward=True)))
    whole = len(rects) == 1 and rects[0][:4] == (0, sq, 0, skv)
    if not whole:
        dq = torch.zeros(b, n1, sq, d, dtype=ct, device=q.device)
        dk = torch.zeros(b, n1, skv, d, dtype=ct, device=q.device)
        dv = torch.zeros(b, n1, skv, seg.v.shape[-1], dtype=ct, device=q.device)
    for i0, i1, j0, j1, how in rects:
        mask = None
        causal = how == "causal"
        if seg.pse is not None:
            bias = seg.pse.tile(i0, i1, j0, j1, torch.float32)
            mask = bias * prob.scale if seg.pse.pre_scale else bias
        if how == "masked":
            # An additive float mask: this kernel mishandles boolean masks in backward.
            allowed = seg.mask.tile(i0, i1, j0, j1, q.device)
            base = mask if mask is not None else torch.zeros((), dtype=q.dtype, device=q.device)
            mask = base.masked_fill(~allowed, float("-inf"))
        gq, gk, gv = bwd(dy_[:, :, i0:i1], q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], out_[:, :, i0:i1],
                         lse32[:, :, i0:i1], 0.0, causal, attn_mask=mask, scale=prob.scale)
        if whole:  # one rectangle: its results are the gradients
            dq, dk, dv = gq, gk, gv
            continue
        dq[:, :, i0:i1] += gq
        dk[:, :, j0:j1] += gk
        dv[:, :, j0:j1] += gv
    if g > 1:
        dk = dk.unflatten(1, (n2, g)).sum(2)
        dv = dv.unflatten(1, (n2, g)).sum(2)
    return dq, dk, dv


def _fused_bytes(seg: Segment, prob: Problem, ct: torch.dtype) -> int:
    """Bytes of ``_backward_fused`` on one chunk: dense float32 operands (copies only where the
    input is not one), the kernel's results, and the accumulators of a multi-rectangle plan."""
    it = torch.finfo(ct).bits // 8
    b, n1, sq, d = seg.q.shape
    skv, dv = seg.k.shape[2], seg.v.shape[-1]
    g = n1 // seg.k.shape[1]
    kv = b * n1 * skv * (d + dv) * it
    copies = (kv if g > 1 else _dense_ct_bytes(seg.k, ct) + _dense_ct_bytes(seg.v, ct)) + _dense_ct_bytes(seg.q, ct)
    copies += 2 * b * n1 * sq * dv * it * (prob.dtype != ct)  # dy and out
    grads = b * n1 * sq * d * it + kv
    rects = list(rectangles(seg.mask, *cfg.tile_sizes(seg.q.device, prob.dtype, d, backward=True)))
    whole = len(rects) == 1 and rects[0][:4] == (0, sq, 0, skv)
    return copies + grads * (1 if whole else 2) + (kv // g if g > 1 else 0)


def workspace_bytes(seg: Segment, prob: Problem, backward: bool) -> int:
    """Bytes the engine allocates for one segment: its float32 results, the regrouped operand
    copies and tiles of the largest batch chunk (``cfg.batch_chunks``), tiles clipped to
    Sq / Skv. A model of the code paths above, checked against measured peaks in the tests."""
    ct = default_compute_dtype(prob.dtype)
    it = torch.finfo(ct).bits // 8
    b, n1, sq, d = seg.q.shape
    n2, skv, dv = seg.k.shape[1], seg.k.shape[2], seg.v.shape[-1]
    win = band.window(seg, cfg.BAND_BQ) if cfg.config["band"] else None
    if win is not None:
        return band.workspace_bytes(seg, prob, it, cfg.BAND_BQ, *win, cfg.config["tile_bytes"], backward)
    b0, b1 = cfg.batch_chunks(seg, prob, backward)[0]
    chunk = seg.batches(b0, b1)
    cb = b1 - b0
    bq, bk = cfg.tile_sizes(seg.q.device, prob.dtype, d, backward)
    bq, bk = max(1, min(bq, sq)), max(1, min(bk, skv))
    od = cfg.operand_dtype(seg.q.device, prob.dtype)
    operands = sum(_grouped_bytes(*op) for op in _tile_operands(chunk, od, ct))
    # per tile: logits plus a temporary; a bias tile; mask tiles; Philox's int64 words (~10 tiles)
    extra_tiles = (seg.pse is not None) + (seg.mask.explicit is not None) + 10 * (seg.dropout is not None)
    if not backward:
        cols = min(skv, cfg.max_run_blocks(cb * n1 * bq, bk, ct) * bk)
        tile = cb * n1 * bq * cols * it
        return b * n1 * sq * (dv + 2) * it + operands + tile * (1 + extra_tiles) + 2 * cb * n1 * bq * dv * it
    grads = b * (n1 * sq * d + n2 * skv * (d + dv)) * it  # the engine's float32 dq, dk, dv
    rows = cb * n1 * sq * (dv + 2) * it  # lse, R and dy * out of a chunk
    per_chunk = 0 if b == cb else grads * cb // b  # a chunk's results, copied into the whole
    if cfg.use_fused_backward(seg, prob, prob.pse is not None):
        return grads + rows + per_chunk + _fused_bytes(chunk, prob, ct)
    tile = cb * n1 * bq * bk * it
    dy_copies = cb * n1 * sq * dv * it * (1 + (od != ct)) * (prob.dtype != ct)
    return grads + rows + per_chunk + operands + dy_copies + tile * (5 + extra_tiles)
