"""Triton kernels of the fascore engine: one forward, a dK/dV and a dQ backward, dpse, no atomics.

Every kernel reads its operands through strides (any layout view works) and a per-batch
description that is either uniform (a [B, N, S, D] segment: batch ``b`` at ``b * stride_b``) or a
segment table (``VARLEN``: TND batches of one [T, N, D] tensor, row offsets and lengths per batch).
Logits, statistics and accumulators are float32; only P (and dS) are rounded to the input dtype
before their products with V (and K, Q), as semantics §3 allows.

Take-part rule per batch (semantics §4, ``masks.MaskSpec``):
    (lo <= j - i <= hi  or  j < prefix)  and  not explicit[i, j]
Key blocks outside the band and the prefix are never visited; a block entirely inside (and not
cut by an explicit mask or the sequence end) runs without mask work. With an explicit mask the
host passes a compressed block plan (CSR over query blocks for the forward and dQ kernels, over
key blocks for the dK/dV kernel): only its non-empty tiles run, and only PARTIAL ones load mask
bytes.

Bias kinds (``PSE``): 0 none, 1 dense tensor (row stride 0 when broadcast over rows), 2
ALiBi-compressed [., ., 1024, W] (semantics §3), 3 TND-compressed (row 1023), 4 in-kernel ALiBi,
5 in-kernel sqrt ALiBi. Dropout (``DROP``): 0 none, 1 explicit bit-packed mask, 2 Ascend's
Philox model (semantics §5): Philox4x32 with 7 rounds under key (seed lo, seed hi), counter
ceil(offset/16) + e // 16, element e = base[b] + (n*Sq + i)*row + j takes byte e % 16 of the 4
output words, kept iff byte <= floor(keep_prob * 255).
"""
from __future__ import annotations

import triton
import triton.language as tl

FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
NF = 16  # fields per row of the segment table (see ``_seg``)


# --------------------------------------------------------------------------- per-batch description
@triton.jit
def _seg(TAB, b, SQ, SKV, LO, HI, PFX, ADELTA, DBASE0, DSTEP, DROW, HAS_PFX: tl.constexpr,
         VARLEN: tl.constexpr):
    """Batch ``b``: (q_row0, k_row0, sq, skv, lo, hi, prefix, mask offset, unused, alibi (ks - qs),
    dropout base, dropout row, stats offset, stats head stride, plan offset, pse batch).

    Uniform segments take the scalars (q_row0 = k_row0 = 0, batch offsets come from strides, the
    pse / slope batch is ``b``); VARLEN reads row ``b`` of the int64 table, where the mask offset
    and the pse batch are element offsets from the first batch's tensors (their batch strides
    are passed as 0 and 1).
    """
    if VARLEN:
        t = TAB + b.to(tl.int64) * 16
        q_row0 = tl.load(t + 0)
        k_row0 = tl.load(t + 1)
        sq = tl.load(t + 2).to(tl.int32)
        skv = tl.load(t + 3).to(tl.int32)
        lo = tl.load(t + 4).to(tl.int32)
        hi = tl.load(t + 5).to(tl.int32)
        pfx = tl.load(t + 6).to(tl.int32)
        mi0 = tl.load(t + 7)
        mj0 = tl.load(t + 8)
        adelta = tl.load(t + 9)
        dbase = tl.load(t + 10)
        drow = tl.load(t + 11)
        soff = tl.load(t + 12)
        ssn = tl.load(t + 13)
        poff = tl.load(t + 14).to(tl.int32)
        pb = tl.load(t + 15)
    else:
        q_row0 = tl.zeros((), tl.int64)
        k_row0 = tl.zeros((), tl.int64)
        sq = SQ
        skv = SKV
        lo = LO
        hi = HI
        if HAS_PFX:
            pfx = tl.load(PFX + b).to(tl.int32)
        else:
            pfx = 0
        mi0 = tl.zeros((), tl.int64)
        mj0 = tl.zeros((), tl.int64)
        adelta = ADELTA + tl.zeros((), tl.int64)
        dbase = DBASE0 + tl.zeros((), tl.int64) + b.to(tl.int64) * DSTEP
        drow = DROW + tl.zeros((), tl.int64)
        soff = tl.zeros((), tl.int64)
        ssn = tl.zeros((), tl.int64)
        poff = 0
        pb = b
    return q_row0, k_row0, sq, skv, lo, hi, pfx, mi0, mj0, adelta, dbase, drow, soff, ssn, poff, pb


# --------------------------------------------------------------------------- tile pieces
@triton.jit
def _allowed(i0, j0, ri, rj, sq, skv, lo, hi, pfx, MASK, mk_base, smk_i, smk_j, masked, HAS_MASK: tl.constexpr):
    """Take-part tile at rows i0 + ri, columns j0 + rj (ri, rj broadcastable int32 tiles); the
    explicit mask's bytes are read only for a PARTIAL tile (``masked``)."""
    i = i0 + ri
    j = j0 + rj
    d = j - i
    a = ((d >= lo) & (d <= hi)) | (j < pfx)
    a = a & (i < sq) & (j < skv) & (i >= 0) & (j >= 0)
    if HAS_MASK:
        base = MASK + (mk_base + i0.to(tl.int64) * smk_i + j0.to(tl.int64) * smk_j)
        mb = tl.load(base + ri * smk_i + rj * smk_j, mask=a & masked, other=0)
        a = a & (mb == 0)
    return a


@triton.jit
def _bias(PSE, ps_base, sp_i, sp_j, i0, j0, ri, rj, sq, skv, pse_w, pse_thr, adelta, slope,
          PSE_KIND: tl.constexpr):
    """float32 bias tile at rows i0 + ri, columns j0 + rj; out-of-range positions read nothing."""
    i = i0 + ri
    j = j0 + rj
    inb = (i < sq) & (j < skv) & (i >= 0) & (j >= 0)
    if PSE_KIND == 1:
        base = PSE + (ps_base + i0.to(tl.int64) * sp_i + j0.to(tl.int64) * sp_j)
        x = tl.load(base + ri * sp_i + rj * sp_j, mask=inb, other=0.0).to(tl.float32)
    elif PSE_KIND == 2:
        late = i >= pse_thr
        row = tl.where(late, i - pse_thr, i % 1024)
        col = tl.where(late, j, j + pse_w - 1024 + row - i)
        col = tl.minimum(tl.maximum(col, 0), pse_w - 1)
        x = tl.load(PSE + ps_base + row * sp_i + col * sp_j, mask=inb, other=0.0).to(tl.float32)
    elif PSE_KIND == 3:
        col = (pse_w - 1) - (i - j)
        col = tl.minimum(tl.maximum(col, 0), pse_w - 1)
        x = tl.load(PSE + ps_base + 1023 * sp_i + col * sp_j, mask=inb, other=0.0).to(tl.float32)
    else:
        delta = (j0 - i0 + adelta).to(tl.float32)  # exact below 2**24, as the reference's float arange
        dist = tl.abs((rj - ri).to(tl.float32) + delta)
        if PSE_KIND == 5:
            dist = tl.sqrt_rn(dist)
        x = -slope * dist
    return x


@triton.jit
def _keep(i, j, j0, n, sq, dbase, drow, BITS, ctr0, seed, thr, DROP: tl.constexpr, BM: tl.constexpr,
          BN: tl.constexpr, ALIGNED: tl.constexpr):
    """Dropout keep tile [BM, BN] for rows ``i`` [BM, 1] and columns ``j`` [1, BN] of head ``n``.

    ALIGNED (generated masks only): the tile's columns are j0 + arange(BN) with j0 % 16 == 0 and
    every row starts at a multiple of 16, so one Philox call serves 16 consecutive elements.
    """
    row_e = dbase + (n.to(tl.int64) * sq + i.to(tl.int64)) * drow  # [BM, 1] element number of (i, 0)
    if DROP == 1:
        e = row_e + j.to(tl.int64)
        byte = tl.load(BITS + (e >> 3), mask=(i < sq) & (j < drow), other=0)
        k = ((byte.to(tl.int32) >> (e & 7).to(tl.int32)) & 1) != 0
    elif ALIGNED:
        c = ctr0 + ((row_e + j0) >> 4) + tl.arange(0, BN // 16).to(tl.int64)[None, :]  # [BM, BN/16]
        w0, w1, w2, w3 = tl.randint4x(seed, c, 7)
        w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [BM, BN/16, 2, 2]: word 2*a + b at [a, b]
        sh = (tl.arange(0, 4) * 8).to(tl.uint32)
        by = (w.to(tl.uint32, bitcast=True)[:, :, :, :, None] >> sh[None, None, None, None, :]) & 0xFF
        k = tl.reshape(by.to(tl.int32), (BM, BN)) <= thr
    else:
        e = tl.broadcast_to(row_e + j.to(tl.int64), (BM, BN))
        w0, w1, w2, w3 = tl.randint4x(seed, ctr0 + (e >> 4), 7)
        q = ((e >> 2) & 3).to(tl.int32)
        w = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
        by = (w.to(tl.uint32, bitcast=True) >> ((e & 3).to(tl.uint32) * 8)) & 0xFF
        k = by.to(tl.int32) <= thr
    return k


@triton.jit
def _logits(s, i0, j0, ri, rj, scale, PSE, ps_base, sp_i, sp_j, sq, skv, pse_w, pse_thr, adelta, slope,
            PSE_KIND: tl.constexpr, PRE_SCALE: tl.constexpr):
    if PSE_KIND == 0:
        return s * scale
    bias = _bias(PSE, ps_base, sp_i, sp_j, i0, j0, ri, rj, sq, skv, pse_w, pse_thr, adelta, slope, PSE_KIND)
    if PRE_SCALE:
        return (s + bias) * scale
    return s * scale + bias


@triton.jit
def _bh(N, NBH):
    """(b, n, in range) of this program from grid axes 1 and 2 (axis 1 is capped at 32768)."""
    bh = tl.program_id(2) * 32768 + tl.program_id(1)
    ok = bh < NBH
    bh = tl.minimum(bh, NBH - 1)
    return bh // N, bh % N, ok


@triton.jit
def _key_range(i0, i1, skv, lo, hi, pfx, BN: tl.constexpr):
    """Key blocks that can take part for rows [i0, i1): prefix blocks [0, n1) then band blocks
    [s2, s2 + n2), disjoint."""
    pc = tl.minimum(pfx, skv)
    n1 = tl.cdiv(tl.maximum(pc, 0), BN)
    a0 = tl.maximum(i0 + lo, 0)
    a1 = tl.minimum(i1 - 1 + hi + 1, skv)
    kb0 = a0 // BN
    kb1 = tl.cdiv(tl.maximum(a1, 0), BN)
    s2 = tl.maximum(kb0, n1)
    n2 = tl.maximum(kb1 - s2, 0)
    n2 = tl.where(a1 > a0, n2, 0)
    return n1, s2, n2


@triton.jit
def _query_range(j0, j1, sq, lo, hi, pfx, BM: tl.constexpr):
    """Query blocks that can take part for columns [j0, j1): all if the prefix covers j0."""
    r0 = tl.maximum(j0 - hi, 0)
    r1 = tl.minimum(j1 - 1 - lo + 1, sq)
    ib0 = r0 // BM
    ib1 = tl.cdiv(tl.maximum(r1, 0), BM)
    ib1 = tl.where(r1 > r0, ib1, ib0)
    allr = j0 < pfx
    ib0 = tl.where(allr, 0, ib0)
    ib1 = tl.where(allr, tl.cdiv(sq, BM), ib1)
    return ib0, ib1


@triton.jit
def _pick(t, l0, s0, l1, s1, l2, s2, l3, s3):
    """Block of the t-th entry of the concatenated ranges [s_k, s_k + l_k)."""
    kb = s0 + t
    kb = tl.where(t >= l0, s1 + (t - l0), kb)
    kb = tl.where(t >= l0 + l1, s2 + (t - l0 - l1), kb)
    kb = tl.where(t >= l0 + l1 + l2, s3 + (t - l0 - l1 - l2), kb)
    return kb


@triton.jit
def _key_sets(i0, i1, skv, lo, hi, pfx, BN: tl.constexpr):
    """Key blocks of rows [i0, i1) as FULL ranges (2) and PARTIAL ranges (4), (length, start) each.

    Non-empty: prefix blocks [0, c1) and band blocks [s2, e2). FULL: blocks inside the prefix
    [0, pf) and blocks inside the band for every row [h0, h1), both within the sequence.
    """
    c1, s2, n2 = _key_range(i0, i1, skv, lo, hi, pfx, BN)
    e2 = s2 + n2
    nfull = skv // BN
    pf = tl.minimum(tl.minimum(tl.maximum(tl.minimum(pfx, skv), 0) // BN, c1), nfull)
    g0 = tl.cdiv(tl.maximum(i1 - 1 + lo, 0), BN)
    g1 = tl.minimum(tl.maximum(i0 + hi + 1, 0) // BN, nfull)
    h0 = tl.maximum(g0, pf)
    h1 = tl.maximum(g1, h0)
    fl0 = pf
    fl1 = h1 - h0
    pl0 = tl.maximum(tl.minimum(c1, h0) - pf, 0)
    ps1 = tl.maximum(pf, h1)
    pl1 = tl.maximum(c1 - ps1, 0)
    pl2 = tl.maximum(tl.minimum(e2, h0) - s2, 0)
    ps3 = tl.maximum(s2, h1)
    pl3 = tl.maximum(e2 - ps3, 0)
    return fl0, fl1, h0, pl0, pf, pl1, ps1, pl2, s2, pl3, ps3


@triton.jit
def _query_sets(j0, sq, skv, lo, hi, pfx, BM: tl.constexpr, BN: tl.constexpr):
    """Query blocks of key block [j0, j0 + BN) as one FULL range and two PARTIAL ranges."""
    j1 = tl.minimum(j0 + BN, skv)
    n0, n1 = _query_range(j0, j1, sq, lo, hi, pfx, BM)
    nfull = sq // BM
    in_seq = j0 + BN <= skv
    b0 = tl.cdiv(tl.maximum(j0 + BN - 1 - hi, 0), BM)
    b1 = tl.minimum(tl.maximum(j0 - lo + 1, 0) // BM, nfull)
    allp = j0 + BN <= pfx
    f0 = tl.where(allp, 0, b0)
    f1 = tl.where(allp, nfull, b1)
    f1 = tl.where(in_seq, f1, f0)
    f0 = tl.minimum(tl.maximum(f0, n0), n1)
    f1 = tl.minimum(tl.maximum(f1, f0), n1)
    return f0, f1 - f0, n0, f0 - n0, f1, n1 - f1


@triton.jit
def _fwd_tile(q, kb, m_i, l_i, acc, i0, n, sq, skv, lo, hi, pfx, k_base, v_base, sk_s, sk_d, sv_s, sv_d, D, DV,
              scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr, adelta, slope, MASK, mk_base, smk_i, smk_j,
              dbase, drow, BITS, ctr0, seed, thr,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PSE_KIND: tl.constexpr,
              PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr,
              SPLIT_P: tl.constexpr, masked):
    """One key block of the online softmax. The take-part rule and the bounds are applied to
    every tile (a predicate, no branch: a per-tile branch or a second loop makes ptxas spill);
    ``masked`` (a PARTIAL tile) also reads the explicit mask's bytes."""
    ri = tl.arange(0, BM)
    rj = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    j0 = kb * BN
    kt = tl.load(k_base + j0.to(tl.int64) * sk_s + rj[None, :] * sk_s + rd[:, None] * sk_d,
                 mask=((j0 + rj[None, :]) < skv) & (rd[:, None] < D), other=0.0)  # [BD, BN]
    v = tl.load(v_base + j0.to(tl.int64) * sv_s + rj[:, None] * sv_s + rdv[None, :] * sv_d,
                mask=((j0 + rj[:, None]) < skv) & (rdv[None, :] < DV), other=0.0)  # [BN, BDV]
    s = tl.dot(q, kt, input_precision=PREC)
    s = _logits(s, i0, j0, ri[:, None], rj[None, :], scale, PSE, ps_base, sp_i, sp_j, sq, skv, pse_w,
                pse_thr, adelta, slope, PSE_KIND, PRE_SCALE)
    a = _allowed(i0, j0, ri[:, None], rj[None, :], sq, skv, lo, hi, pfx, MASK, mk_base, smk_i, smk_j, masked,
                 HAS_MASK)
    s = tl.where(a, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROP != 0:
        kp = _keep(i0 + ri[:, None], j0 + rj[None, :], j0, n, sq, dbase, drow, BITS, ctr0, seed, thr, DROP, BM, BN,
                   True)
        p = tl.where(kp, p, 0.0)
    p_hi = p.to(v.dtype)
    acc = tl.dot(p_hi, v, acc, input_precision=PREC)
    if SPLIT_P:
        acc = tl.dot((p - p_hi.to(tl.float32)).to(v.dtype), v, acc, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _dq_tile(q, dy, mrow, irow, rrow, kb, dq, i0, n, sq, skv, lo, hi, pfx, k_base, v_base, sk_s, sk_d, sv_s, sv_d,
             D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr, adelta, slope, MASK, mk_base, smk_i, smk_j,
             dbase, drow, BITS, ctr0, seed, thr, inv_keep,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PSE_KIND: tl.constexpr,
             PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr,
             masked):
    ri = tl.arange(0, BM)
    rj = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    j0 = kb * BN
    kt = tl.load(k_base + j0.to(tl.int64) * sk_s + rj[None, :] * sk_s + rd[:, None] * sk_d,
                 mask=((j0 + rj[None, :]) < skv) & (rd[:, None] < D), other=0.0)  # [BD, BN]
    vt = tl.load(v_base + j0.to(tl.int64) * sv_s + rj[None, :] * sv_s + rdv[:, None] * sv_d,
                 mask=((j0 + rj[None, :]) < skv) & (rdv[:, None] < DV), other=0.0)  # [BDV, BN]
    s = tl.dot(q, kt, input_precision=PREC)
    s = _logits(s, i0, j0, ri[:, None], rj[None, :], scale, PSE, ps_base, sp_i, sp_j, sq, skv, pse_w,
                pse_thr, adelta, slope, PSE_KIND, PRE_SCALE)
    p = tl.exp(s - mrow[:, None]) * irow[:, None]
    a = _allowed(i0, j0, ri[:, None], rj[None, :], sq, skv, lo, hi, pfx, MASK, mk_base, smk_i, smk_j, masked,
                 HAS_MASK)
    p = tl.where(a, p, 0.0)
    dp = tl.dot(dy, vt, input_precision=PREC)
    if DROP != 0:
        kp = _keep(i0 + ri[:, None], j0 + rj[None, :], j0, n, sq, dbase, drow, BITS, ctr0, seed, thr, DROP, BM, BN,
                   True)
        dp = tl.where(kp, dp * inv_keep, 0.0)
    ds = p * (dp - rrow[:, None])
    return tl.dot(ds.to(q.dtype), tl.trans(kt), dq, input_precision=PREC)


@triton.jit
def _dkdv_tile(k, v, qb, dk, dv, j0, n, sq, skv, lo, hi, pfx, q_base, y_base, sq_s, sq_d, sy_s, sy_d, RM, RI, RR,
               r_base, D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr, adelta, slope, MASK, mk_base, smk_i,
               smk_j, dbase, drow, BITS, ctr0, seed, thr, inv_keep,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PSE_KIND: tl.constexpr,
               PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, DROP: tl.constexpr, PREC: tl.constexpr,
               masked):
    """One query block's contribution to dK, dV of a key block (transposed tiles [BN, BM])."""
    ri = tl.arange(0, BM)
    rj = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    i0 = qb * BM
    rmask = (i0 + ri) < sq
    q = tl.load(q_base + i0.to(tl.int64) * sq_s + ri[:, None] * sq_s + rd[None, :] * sq_d,
                mask=rmask[:, None] & (rd[None, :] < D), other=0.0)  # [BM, BD]
    dy = tl.load(y_base + i0.to(tl.int64) * sy_s + ri[:, None] * sy_s + rdv[None, :] * sy_d,
                 mask=rmask[:, None] & (rdv[None, :] < DV), other=0.0)  # [BM, BDV]
    mrow = tl.load(RM + r_base + i0 + ri, mask=rmask, other=float("inf"))
    irow = tl.load(RI + r_base + i0 + ri, mask=rmask, other=0.0)
    rrow = tl.load(RR + r_base + i0 + ri, mask=rmask, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PREC)  # [BN, BM]
    st = _logits(st, i0, j0, ri[None, :], rj[:, None], scale, PSE, ps_base, sp_i, sp_j, sq, skv,
                 pse_w, pse_thr, adelta, slope, PSE_KIND, PRE_SCALE)
    pt = tl.exp(st - mrow[None, :]) * irow[None, :]
    a = _allowed(i0, j0, ri[None, :], rj[:, None], sq, skv, lo, hi, pfx, MASK, mk_base, smk_i, smk_j, masked,
                 HAS_MASK)
    pt = tl.where(a, pt, 0.0)
    dpt = tl.dot(v, tl.trans(dy), input_precision=PREC)  # [BN, BM]
    if DROP != 0:
        kp = tl.trans(_keep(i0 + ri[:, None], j0 + rj[None, :], j0, n, sq, dbase, drow, BITS, ctr0, seed, thr, DROP,
                            BM, BN, True))
        pdt = tl.where(kp, pt * inv_keep, 0.0)
        dpt = tl.where(kp, dpt * inv_keep, 0.0)
    else:
        pdt = pt
    dv = tl.dot(pdt.to(dy.dtype), dy, dv, input_precision=PREC)
    dst = pt * (dpt - rrow[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


# --------------------------------------------------------------------------- forward
# Over 80 lines for a reason: a third of it is the signature (strides of every operand, the
# constexpr feature switches) and the rest is one fused tile loop whose steps (_logits, _allowed,
# _keep, _fwd_tile) are already jit helpers; splitting the loop further would pass its whole
# state through more helper signatures without making any step clearer.
@triton.jit
def fwd_kernel(
    Q, K, V, O, M, L, TAB, PFX, MASK, PLAN_PTR, PLAN_KB, PSE, SLOPE, SINK, BITS,
    sq_b, sq_n, sq_s, sq_d, sk_b, sk_n, sk_s, sk_d, sv_b, sv_n, sv_s, sv_d,
    so_b, so_n, so_s, so_d, sm_b, sm_n, sm_s,
    smk_b, smk_n, smk_i, smk_j, sp_b, sp_n, sp_i, sp_j, ssl_b, ssl_n,
    NBH, N1, G, SQ, SKV, D, DV, LO, HI, ADELTA, DBASE0, DSTEP, DROW,
    pse_w, pse_thr, ctr0, seed, thr, inv_keep, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    PSE_KIND: tl.constexpr, PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PFX: tl.constexpr,
    HAS_SINK: tl.constexpr, DROP: tl.constexpr, VARLEN: tl.constexpr, COPIES: tl.constexpr,
    PREC: tl.constexpr, REVERSE: tl.constexpr, SPLIT_P: tl.constexpr,
):
    b, n, ok = _bh(N1, NBH)
    q_row0, k_row0, sq, skv, lo, hi, pfx, mi0, mj0, adelta, dbase, drow, soff, ssn, poff, pb = _seg(
        TAB, b, SQ, SKV, LO, HI, PFX, ADELTA, DBASE0, DSTEP, DROW, HAS_PFX, VARLEN)
    pid = tl.program_id(0)
    if REVERSE:  # long (causal) rows first
        pid = tl.cdiv(sq, BM) - 1 - pid
    i0 = pid * BM
    if ok & (i0 < sq) & (i0 >= 0):
        n2 = n // G
        b64 = b.to(tl.int64)
        n64 = n.to(tl.int64)
        ri = tl.arange(0, BM)
        rj = tl.arange(0, BN)
        rd = tl.arange(0, BD)
        rdv = tl.arange(0, BDV)
        i = i0 + ri[:, None]  # [BM, 1]
        i1 = tl.minimum(i0 + BM, sq)
        q_base = Q + b64 * sq_b + n64 * sq_n + (q_row0 + i0) * sq_s
        q = tl.load(q_base + ri[:, None] * sq_s + rd[None, :] * sq_d,
                    mask=(i < sq) & (rd[None, :] < D), other=0.0)
        k_base = K + b64 * sk_b + n2.to(tl.int64) * sk_n + k_row0 * sk_s
        v_base = V + b64 * sv_b + n2.to(tl.int64) * sv_n + k_row0 * sv_s
        mk_base = b64 * smk_b + n64 * smk_n + mi0
        ps_base = pb.to(tl.int64) * sp_b + n64 * sp_n
        slope = 0.0
        if PSE_KIND >= 4:
            slope = tl.load(SLOPE + pb.to(tl.int64) * ssl_b + n64 * ssl_n)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BDV), tl.float32)
        if HAS_MASK:  # block plan: FULL tiles at [p0, p1), PARTIAL at [p1, p2)
            pp = PLAN_PTR + poff + 2 * pid
            p0 = tl.load(pp)
            p1 = tl.load(pp + 1)
            p2 = tl.load(pp + 2)
        else:
            fl0, fl1, h0, pl0, pf, pl1, ps1, pl2, s2, pl3, ps3 = _key_sets(i0, i1, skv, lo, hi, pfx, BN)
            p0 = 0
            p1 = fl0 + fl1
            p2 = p1 + pl0 + pl1 + pl2 + pl3
        for t in range(p0, p2):
            if HAS_MASK:
                kb = tl.load(PLAN_KB + t)
            else:
                kb = tl.where(t < p1, _pick(t, fl0, 0, fl1, h0, 0, 0, 0, 0),
                              _pick(t - p1, pl0, pf, pl1, ps1, pl2, s2, pl3, ps3))
            m_i, l_i, acc = _fwd_tile(
                q, kb, m_i, l_i, acc, i0, n, sq, skv, lo, hi, pfx, k_base, v_base, sk_s, sk_d,
                sv_s, sv_d, D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr, adelta, slope, MASK, mk_base,
                smk_i, smk_j, dbase, drow, BITS, ctr0, seed, thr, BM, BN, BD, BDV, PSE_KIND, PRE_SCALE, HAS_MASK,
                DROP, PREC, SPLIT_P, t >= p1)
        valid = m_i != float("-inf")
        if HAS_SINK:
            sk = tl.load(SINK + n)
            m_fin = tl.maximum(m_i, sk)
            a = tl.exp(m_i - m_fin)
            l_i = l_i * a + tl.exp(sk - m_fin)
            acc = acc * a[:, None]
            m_out = m_fin
            l_out = l_i
        else:
            m_out = tl.where(valid, m_i, -FLT_MAX)
            l_out = tl.where(valid, l_i, FLT_MAX)
        out = acc / l_out[:, None]
        if DROP != 0:
            out = out * inv_keep
        out = tl.where(valid[:, None], out, 0.0)
        o_base = O + b64 * so_b + n64 * so_n + (q_row0 + i0) * so_s
        tl.store(o_base + ri[:, None] * so_s + rdv[None, :] * so_d, out,
                 mask=(i < sq) & (rdv[None, :] < DV))
        rc = tl.arange(0, COPIES)
        st = (b64 * sm_b + n64 * sm_n + soff + n64 * ssn + i0.to(tl.int64) * sm_s) + ri[:, None] * sm_s + rc[None, :]
        smask = (i < sq) & (rc[None, :] < COPIES)
        tl.store(M + st, tl.broadcast_to(m_out[:, None], (BM, COPIES)), mask=smask)
        tl.store(L + st, tl.broadcast_to(l_out[:, None], (BM, COPIES)), mask=smask)


# --------------------------------------------------------------------------- backward: rows
@triton.jit
def bwd_pre_kernel(
    DY, O, M, L, RM, RI, RR, TAB,
    sy_b, sy_n, sy_s, sy_d, so_b, so_n, so_s, so_d, sm_b, sm_n, sm_s,
    NBH, N1, SQ, DV, r_n, r_b, HAS_SINK: tl.constexpr, VARLEN: tl.constexpr, BM: tl.constexpr,
    BDV: tl.constexpr,
):
    """Per row: R = sum(dy * out) (float32), the max to subtract and 1/sum; rows with the invalid
    sentinel (no sink) get max = +inf and 1/sum = 0, so that every P of theirs is 0."""
    b, n, ok = _bh(N1, NBH)
    if VARLEN:
        t = TAB + b.to(tl.int64) * 16
        q_row0 = tl.load(t + 0)
        sq = tl.load(t + 2).to(tl.int32)
        soff = tl.load(t + 12)
        ssn = tl.load(t + 13)
    else:
        q_row0 = tl.zeros((), tl.int64)
        sq = SQ
        soff = tl.zeros((), tl.int64)
        ssn = tl.zeros((), tl.int64)
    i0 = tl.program_id(0) * BM
    if ok & (i0 < sq):
        b64 = b.to(tl.int64)
        n64 = n.to(tl.int64)
        ri = tl.arange(0, BM)
        rd = tl.arange(0, BDV)
        rmask = (i0 + ri) < sq
        msk = rmask[:, None] & (rd[None, :] < DV)
        dy = tl.load(DY + b64 * sy_b + n64 * sy_n + (q_row0 + i0) * sy_s + ri[:, None] * sy_s + rd[None, :] * sy_d,
                     mask=msk, other=0.0).to(tl.float32)
        o = tl.load(O + b64 * so_b + n64 * so_n + (q_row0 + i0) * so_s + ri[:, None] * so_s + rd[None, :] * so_d,
                    mask=msk, other=0.0).to(tl.float32)
        r = tl.sum(dy * o, 1)
        st = (b64 * sm_b + n64 * sm_n + soff + n64 * ssn + i0.to(tl.int64) * sm_s) + ri * sm_s
        m = tl.load(M + st, mask=rmask, other=0.0)
        lsum = tl.load(L + st, mask=rmask, other=1.0)
        inv = 1.0 / lsum
        if not HAS_SINK:
            bad = m == -FLT_MAX
            m = tl.where(bad, float("inf"), m)
            inv = tl.where(bad, 0.0, inv)
        ro = n64 * r_n + b64 * r_b + q_row0 + i0 + ri
        tl.store(RM + ro, m, mask=rmask)
        tl.store(RI + ro, inv, mask=rmask)
        tl.store(RR + ro, r, mask=rmask)


# --------------------------------------------------------------------------- backward: dK, dV
@triton.jit
def bwd_kv_kernel(
    Q, K, V, DY, DK, DV_, RM, RI, RR, TAB, PFX, MASK, PLAN_PTR, PLAN_QB, PSE, SLOPE, BITS,
    sq_b, sq_n, sq_s, sq_d, sk_b, sk_n, sk_s, sk_d, sv_b, sv_n, sv_s, sv_d,
    sy_b, sy_n, sy_s, sy_d, sdk_b, sdk_n, sdk_s, sdk_d, sdv_b, sdv_n, sdv_s, sdv_d, r_n, r_b,
    smk_b, smk_n, smk_i, smk_j, sp_b, sp_n, sp_i, sp_j, ssl_b, ssl_n,
    NBH, N1, N2, G, SQ, SKV, D, DV, LO, HI, ADELTA, DBASE0, DSTEP, DROW,
    pse_w, pse_thr, ctr0, seed, thr, inv_keep, scale, plan_nq,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    PSE_KIND: tl.constexpr, PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PFX: tl.constexpr,
    DROP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """dK, dV of one key block of one kv head: loops over the G query heads and the query blocks
    in a fixed order (deterministic GQA sum, no atomics)."""
    b, n2, ok = _bh(N2, NBH)
    q_row0, k_row0, sq, skv, lo, hi, pfx, mi0, mj0, adelta, dbase, drow, soff, ssn, poff, pb = _seg(
        TAB, b, SQ, SKV, LO, HI, PFX, ADELTA, DBASE0, DSTEP, DROW, HAS_PFX, VARLEN)
    kbi = tl.program_id(0)
    j0 = kbi * BN
    if ok & (j0 < skv):
        b64 = b.to(tl.int64)
        ri = tl.arange(0, BM)
        rj = tl.arange(0, BN)
        rd = tl.arange(0, BD)
        rdv = tl.arange(0, BDV)
        jc = j0 + rj[:, None]  # [BN, 1] absolute columns
        j1 = tl.minimum(j0 + BN, skv)
        k = tl.load(K + b64 * sk_b + n2.to(tl.int64) * sk_n + (k_row0 + j0) * sk_s + rj[:, None] * sk_s
                    + rd[None, :] * sk_d, mask=(jc < skv) & (rd[None, :] < D), other=0.0)  # [BN, BD]
        v = tl.load(V + b64 * sv_b + n2.to(tl.int64) * sv_n + (k_row0 + j0) * sv_s + rj[:, None] * sv_s
                    + rdv[None, :] * sv_d, mask=(jc < skv) & (rdv[None, :] < DV), other=0.0)  # [BN, BDV]
        dk = tl.zeros((BN, BD), tl.float32)
        dv = tl.zeros((BN, BDV), tl.float32)
        if HAS_MASK:
            pp = PLAN_PTR + poff + 2 * kbi
            p0 = tl.load(pp)
            p1 = tl.load(pp + 1)
            p2 = tl.load(pp + 2)
        else:
            f0, fl, n0, pl0, ps1, pl1 = _query_sets(j0, sq, skv, lo, hi, pfx, BM, BN)
        for g in range(0, G):
            n = n2 * G + g
            n64 = n.to(tl.int64)
            q_base = Q + b64 * sq_b + n64 * sq_n + q_row0 * sq_s
            y_base = DY + b64 * sy_b + n64 * sy_n + q_row0 * sy_s
            r_base = n64 * r_n + b64 * r_b + q_row0
            mk_base = b64 * smk_b + n64 * smk_n + mi0
            ps_base = pb.to(tl.int64) * sp_b + n64 * sp_n
            slope = 0.0
            if PSE_KIND >= 4:
                slope = tl.load(SLOPE + pb.to(tl.int64) * ssl_b + n64 * ssl_n)
            if HAS_MASK:
                for t in range(p0, p2):
                    dk, dv = _dkdv_tile(
                        k, v, tl.load(PLAN_QB + t), dk, dv, j0, n, sq, skv, lo, hi, pfx, q_base, y_base, sq_s, sq_d,
                        sy_s, sy_d, RM, RI, RR, r_base, D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr,
                        adelta, slope, MASK, mk_base, smk_i, smk_j, dbase, drow, BITS, ctr0, seed, thr, inv_keep,
                        BM, BN, BD, BDV, PSE_KIND, PRE_SCALE, HAS_MASK, DROP, PREC, t >= p1)
            else:
                for t in range(0, fl + pl0 + pl1):
                    qb = tl.where(t < fl, f0 + t, tl.where(t < fl + pl0, n0 + (t - fl), ps1 + (t - fl - pl0)))
                    dk, dv = _dkdv_tile(
                        k, v, qb, dk, dv, j0, n, sq, skv, lo, hi, pfx, q_base, y_base, sq_s, sq_d,
                        sy_s, sy_d, RM, RI, RR, r_base, D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr,
                        adelta, slope, MASK, mk_base, smk_i, smk_j, dbase, drow, BITS, ctr0, seed, thr, inv_keep,
                        BM, BN, BD, BDV, PSE_KIND, PRE_SCALE, HAS_MASK, DROP, PREC, t >= fl)
        dk = dk * scale
        n2_64 = n2.to(tl.int64)
        tl.store(DK + b64 * sdk_b + n2_64 * sdk_n + (k_row0 + j0) * sdk_s + rj[:, None] * sdk_s + rd[None, :] * sdk_d,
                 dk, mask=(jc < skv) & (rd[None, :] < D))
        tl.store(DV_ + b64 * sdv_b + n2_64 * sdv_n + (k_row0 + j0) * sdv_s + rj[:, None] * sdv_s + rdv[None, :] * sdv_d,
                 dv, mask=(jc < skv) & (rdv[None, :] < DV))


# --------------------------------------------------------------------------- backward: dQ
@triton.jit
def bwd_q_kernel(
    Q, K, V, DY, DQ, RM, RI, RR, TAB, PFX, MASK, PLAN_PTR, PLAN_KB, PSE, SLOPE, BITS,
    sq_b, sq_n, sq_s, sq_d, sk_b, sk_n, sk_s, sk_d, sv_b, sv_n, sv_s, sv_d,
    sy_b, sy_n, sy_s, sy_d, sdq_b, sdq_n, sdq_s, sdq_d, r_n, r_b,
    smk_b, smk_n, smk_i, smk_j, sp_b, sp_n, sp_i, sp_j, ssl_b, ssl_n,
    NBH, N1, G, SQ, SKV, D, DV, LO, HI, ADELTA, DBASE0, DSTEP, DROW,
    pse_w, pse_thr, ctr0, seed, thr, inv_keep, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    PSE_KIND: tl.constexpr, PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PFX: tl.constexpr,
    DROP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, REVERSE: tl.constexpr,
):
    b, n, ok = _bh(N1, NBH)
    q_row0, k_row0, sq, skv, lo, hi, pfx, mi0, mj0, adelta, dbase, drow, soff, ssn, poff, pb = _seg(
        TAB, b, SQ, SKV, LO, HI, PFX, ADELTA, DBASE0, DSTEP, DROW, HAS_PFX, VARLEN)
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.cdiv(sq, BM) - 1 - pid
    i0 = pid * BM
    if ok & (i0 < sq) & (i0 >= 0):
        n2 = n // G
        b64 = b.to(tl.int64)
        n64 = n.to(tl.int64)
        ri = tl.arange(0, BM)
        rj = tl.arange(0, BN)
        rd = tl.arange(0, BD)
        rdv = tl.arange(0, BDV)
        i = i0 + ri[:, None]
        i1 = tl.minimum(i0 + BM, sq)
        rmask = (i0 + ri) < sq
        q = tl.load(Q + b64 * sq_b + n64 * sq_n + (q_row0 + i0) * sq_s + ri[:, None] * sq_s + rd[None, :] * sq_d,
                    mask=(i < sq) & (rd[None, :] < D), other=0.0)
        dy = tl.load(DY + b64 * sy_b + n64 * sy_n + (q_row0 + i0) * sy_s + ri[:, None] * sy_s + rdv[None, :] * sy_d,
                     mask=(i < sq) & (rdv[None, :] < DV), other=0.0)
        r_base = n64 * r_n + b64 * r_b + q_row0 + i0
        mrow = tl.load(RM + r_base + ri, mask=rmask, other=float("inf"))
        irow = tl.load(RI + r_base + ri, mask=rmask, other=0.0)
        rrow = tl.load(RR + r_base + ri, mask=rmask, other=0.0)
        k_base = K + b64 * sk_b + n2.to(tl.int64) * sk_n + k_row0 * sk_s
        v_base = V + b64 * sv_b + n2.to(tl.int64) * sv_n + k_row0 * sv_s
        mk_base = b64 * smk_b + n64 * smk_n + mi0
        ps_base = pb.to(tl.int64) * sp_b + n64 * sp_n
        slope = 0.0
        if PSE_KIND >= 4:
            slope = tl.load(SLOPE + pb.to(tl.int64) * ssl_b + n64 * ssl_n)
        dq = tl.zeros((BM, BD), tl.float32)
        if HAS_MASK:
            pp = PLAN_PTR + poff + 2 * pid
            p0 = tl.load(pp)
            p1 = tl.load(pp + 1)
            p2 = tl.load(pp + 2)
        else:
            fl0, fl1, h0, pl0, pf, pl1, ps1, pl2, s2, pl3, ps3 = _key_sets(i0, i1, skv, lo, hi, pfx, BN)
            p0 = 0
            p1 = fl0 + fl1
            p2 = p1 + pl0 + pl1 + pl2 + pl3
        for t in range(p0, p2):
            if HAS_MASK:
                kb = tl.load(PLAN_KB + t)
            else:
                kb = tl.where(t < p1, _pick(t, fl0, 0, fl1, h0, 0, 0, 0, 0),
                              _pick(t - p1, pl0, pf, pl1, ps1, pl2, s2, pl3, ps3))
            dq = _dq_tile(q, dy, mrow, irow, rrow, kb, dq, i0, n, sq, skv, lo, hi, pfx, k_base,
                          v_base, sk_s, sk_d, sv_s, sv_d, D, DV, scale, PSE, ps_base, sp_i, sp_j, pse_w, pse_thr,
                          adelta, slope, MASK, mk_base, smk_i, smk_j, dbase, drow, BITS, ctr0, seed, thr, inv_keep,
                          BM, BN, BD, BDV, PSE_KIND, PRE_SCALE, HAS_MASK, DROP, PREC, t >= p1)
        dq = dq * scale
        tl.store(DQ + b64 * sdq_b + n64 * sdq_n + (q_row0 + i0) * sdq_s + ri[:, None] * sdq_s + rd[None, :] * sdq_d,
                 dq, mask=(i < sq) & (rd[None, :] < D))


# --------------------------------------------------------------------------- backward: dpse
# Over 80 lines for a reason: the signature is a third of it, and the body is one fixed-order
# reduction over the source tiles of four pse forms (MODE); the per-tile math is shared with the
# other kernels (_logits, _allowed, _keep), and the MODE branches select only which tiles feed a
# pse tile, so they stay next to each other to make the summation order readable.
@triton.jit
def bwd_pse_kernel(
    Q, K, V, DY, DP, RM, RI, RR, PFX, MASK, PSE, BITS,
    sq_b, sq_n, sq_s, sq_d, sk_b, sk_n, sk_s, sk_d, sv_b, sv_n, sv_s, sv_d,
    sy_b, sy_n, sy_s, sy_d, sdp_b, sdp_n, sdp_i, sdp_j, r_n, r_b,
    smk_b, smk_n, smk_i, smk_j, sp_b, sp_n, sp_i, sp_j,
    NB, N1, G, SQ, SKV, D, DV, LO, HI, DBASE0, DSTEP, DROW,
    pse_w, pse_thr, n_chain, ctr0, seed, thr, inv_keep, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    PSE_KIND: tl.constexpr, PRE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PFX: tl.constexpr,
    DROP: tl.constexpr, PREC: tl.constexpr, MODE: tl.constexpr, BATCH_SUM: tl.constexpr, BJ: tl.constexpr,
    DC: tl.constexpr, DCV: tl.constexpr,
):
    """dpse for one tile of the pse buffer, summed in a fixed order over every position that reads
    it (no atomics): MODE 0 dense rows (one source tile), 1 rows broadcast (every query block of
    the column block), 2 ALiBi-compressed (the 1024-periodic chain of source tiles), 3
    TND-compressed (row 1023; diagonals of a [BM, BM + BN] source tile). BATCH_SUM: the pse
    broadcasts over batches, so the program also sums over every batch of the segment. DC / DCV:
    head-dim slices of the Q K^T and dY V^T products (less than BD / BDV where whole operands
    would not fit in registers; the products accumulate slice by slice)."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    pn = tl.program_id(2)
    pb = pn // N1
    n = pn % N1
    n64 = n.to(tl.int64)
    n2 = n // G
    ri = tl.arange(0, BM)
    rj = tl.arange(0, BN)
    r0 = rb * BM
    c0 = cb * BN
    rjj = tl.arange(0, BJ)
    acc = tl.zeros((BM, BN), tl.float32)
    colacc = tl.zeros((BN,), tl.float32)
    if BATCH_SUM:
        nb = NB
    else:
        nb = 1
    for bi in range(0, nb):
        if BATCH_SUM:
            b = bi
        else:
            b = pb
        b64 = b.to(tl.int64)
        if HAS_PFX:
            pfx = tl.load(PFX + b).to(tl.int32)
        else:
            pfx = 0
        dbase = DBASE0 + tl.zeros((), tl.int64) + b64 * DSTEP
        mk_base = b64 * smk_b + n64 * smk_n
        ps_base = pb.to(tl.int64) * sp_b + n64 * sp_n
        for t in range(0, n_chain):
            # Source tile: rows [i0, i0 + BM), columns [jb, jb + BJ); row validity bound ilim.
            if MODE == 0:
                i0 = r0
                jb = c0
                ilim = SQ
            elif MODE == 1:
                i0 = t * BM
                jb = c0
                ilim = SQ
            elif MODE == 2:
                last = t == n_chain - 1
                i0 = tl.where(last, r0 + pse_thr, r0 + 1024 * t)
                jb = tl.where(last, c0, c0 - pse_w + 1024 * (t + 1))
                ilim = tl.where(last, SQ, pse_thr)
            else:
                i0 = t * BM
                jb = i0 - (pse_w - 1) + c0
                ilim = SQ
            iv = i0 + ri[:, None]  # [BM, 1]
            jv = jb + rjj[None, :]  # [1, BJ]
            i1 = tl.minimum(i0 + BM, tl.minimum(ilim, SQ))
            j1 = tl.minimum(jb + BJ, SKV)
            # Skip tiles the band and the prefix leave empty.
            nonempty = (i1 > i0) & (j1 > tl.maximum(jb, 0))
            nonempty = nonempty & (((jb + BJ - 1 - i0 >= LO) & (jb - (i1 - 1) <= HI)) | (jb < pfx))
            if nonempty:
                rok = (iv < ilim) & (iv < SQ) & (iv >= 0)
                cok = (jv >= 0) & (jv < SKV)
                q_ptr = Q + (b64 * sq_b + n64 * sq_n + i0.to(tl.int64) * sq_s) + ri[:, None] * sq_s
                k_ptr = K + (b64 * sk_b + n2.to(tl.int64) * sk_n + jb.to(tl.int64) * sk_s) + rjj[None, :] * sk_s
                y_ptr = DY + (b64 * sy_b + n64 * sy_n + i0.to(tl.int64) * sy_s) + ri[:, None] * sy_s
                v_ptr = V + (b64 * sv_b + n2.to(tl.int64) * sv_n + jb.to(tl.int64) * sv_s) + rjj[None, :] * sv_s
                # S = Q K^T and dP = dY V^T over head-dim slices of DC (DC < BD: fewer live operand registers).
                s = tl.zeros((BM, BJ), tl.float32)
                for dc in range(0, BD, DC):
                    rd = dc + tl.arange(0, DC)
                    q = tl.load(q_ptr + rd[None, :] * sq_d, mask=rok & (rd[None, :] < D), other=0.0)
                    kt = tl.load(k_ptr + rd[:, None] * sk_d, mask=cok & (rd[:, None] < D), other=0.0)  # [DC, BJ]
                    s = tl.dot(q, kt, s, input_precision=PREC)
                dp = tl.zeros((BM, BJ), tl.float32)
                for dc in range(0, BDV, DCV):
                    rdv = dc + tl.arange(0, DCV)
                    dy = tl.load(y_ptr + rdv[None, :] * sy_d, mask=rok & (rdv[None, :] < DV), other=0.0)
                    vt = tl.load(v_ptr + rdv[:, None] * sv_d, mask=cok & (rdv[:, None] < DV), other=0.0)  # [DCV, BJ]
                    dp = tl.dot(dy, vt, dp, input_precision=PREC)
                ro = n64 * r_n + b64 * r_b + i0 + ri
                rm1 = ((i0 + ri) < ilim) & ((i0 + ri) < SQ) & ((i0 + ri) >= 0)
                mrow = tl.load(RM + ro, mask=rm1, other=float("inf"))
                irow = tl.load(RI + ro, mask=rm1, other=0.0)
                rrow = tl.load(RR + ro, mask=rm1, other=0.0)
                s = _logits(s, i0, jb, ri[:, None], rjj[None, :], scale, PSE, ps_base, sp_i, sp_j, SQ, SKV, pse_w,
                            pse_thr, 0, 0.0, PSE_KIND, PRE_SCALE)
                a = _allowed(i0, jb, ri[:, None], rjj[None, :], SQ, SKV, LO, HI, pfx, MASK, mk_base, smk_i, smk_j,
                             True, HAS_MASK)
                a = a & rok & (jv >= 0)
                p = tl.where(a, tl.exp(s - mrow[:, None]) * irow[:, None], 0.0)
                if DROP != 0:
                    kp = _keep(iv, tl.maximum(jv, 0), 0, n, SQ, dbase, DROW + tl.zeros((), tl.int64), BITS, ctr0, seed, thr,
                                DROP, BM, BJ, False)
                    dp = tl.where(kp, dp * inv_keep, 0.0)
                ds = p * (dp - rrow[:, None])
                if PRE_SCALE:
                    ds = ds * scale
                if MODE == 1:
                    colacc += tl.sum(ds, 0)
                elif MODE == 3:
                    idx = ri[:, None] + rj[None, :]  # column of diagonal c0 + rj in row ri
                    colacc += tl.sum(tl.gather(ds, idx, 1), 0)
                else:
                    acc += ds
    # Accumulate into the caller's buffer (each element is owned by exactly one program).
    dp_base = DP + pb.to(tl.int64) * sdp_b + n64 * sdp_n
    cj = c0 + rj
    if MODE == 0 or MODE == 2:
        rows = r0 + ri[:, None]
        nrows = tl.where(MODE == 2, 1024, SQ)
        om = (rows < nrows) & (cj[None, :] < pse_w)
        ptr = dp_base + r0.to(tl.int64) * sdp_i + c0.to(tl.int64) * sdp_j + ri[:, None] * sdp_i + rj[None, :] * sdp_j
        old = tl.load(ptr, mask=om, other=0.0)
        tl.store(ptr, old + acc, mask=om)
    else:
        row = tl.where(MODE == 3, 1023, 0)
        om = cj < pse_w
        ptr = dp_base + row * sdp_i + c0.to(tl.int64) * sdp_j + rj * sdp_j
        old = tl.load(ptr, mask=om, other=0.0)
        tl.store(ptr, old + colacc, mask=om)
