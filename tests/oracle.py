"""Independent brute-force oracle for FlashAttentionScore, written from SPEC.md only.

Everything here is deliberately dense and simple: for every (batch, head) the full [Sq, Skv]
logit matrix is built, an explicit boolean "takes part" matrix is built from SPEC section 4's
table, and the softmax / dropout / output formulas of SPEC section 5 are applied literally.
It is meant for small sizes only.

``attention_oracle(..., dtype=torch.float64)`` is SPEC section 7's ``ref64``;
``attention_oracle(..., dtype=torch.float32)`` rounded to the input dtype is its ``ref_same``.  The oracle is
differentiable (torch.autograd) w.r.t. query, key, value, query_rope, key_rope, pse and sink, so
reference gradients come from autograd and not from any hand-written backward formula.

Statistics are returned as float64 tensors (values computed in ``dtype`` and then upcast, with
SPEC's +-FLT_MAX invalid-row sentinels placed afterwards, because FLT_MAX does not fit fp16).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

FLT_MAX = 3.4028234663852886e38
INT32_MAX = 2147483647

# ----------------------------------------------------------------------------------------------
# Philox4x32 (Random123), pure Python integers, and SPEC section 5's dropout models.
# ----------------------------------------------------------------------------------------------
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox4x32(counter, key, rounds):
    """One Philox4x32 block. counter: 4 uint32 ints (low word first), key: 2 uint32 ints."""
    c0, c1, c2, c3 = (int(x) & _U32 for x in counter)
    k0, k1 = (int(x) & _U32 for x in key)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _U32
            k1 = (k1 + _W1) & _U32
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> 32, p0 & _U32
        hi1, lo1 = p1 >> 32, p1 & _U32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_10(counter, key):
    """Random123's default, 10 rounds (its published known-answer vectors)."""
    return philox4x32(counter, key, 10)


@functools.lru_cache(maxsize=4096)
def _ascend_block(seed, counter):
    """The 16 element bytes of one counter value: Philox4x32-7, key (seed lo, seed hi), counter
    (c lo, c hi, 0, 0); word w's little-endian bytes are elements 4w .. 4w+3."""
    words = philox4x32((counter & _U32, (counter >> 32) & _U32, 0, 0), (seed & _U32, (seed >> 32) & _U32), 7)
    return tuple((w >> (8 * k)) & 0xFF for w in words for k in range(4))


def ascend_byte(seed, offset, e):
    """Byte of stream element e: counter ceil(offset / 16) + e // 16, byte e % 16."""
    seed %= 1 << 64
    return _ascend_block(seed, -(-offset // 16) + e // 16)[e % 16]


def keeps(byte, keep_prob):
    """Element kept iff byte <= keep_prob * 255, compared as real numbers."""
    return Fraction(byte) <= Fraction(keep_prob) * 255


def ascend_keep_bits(seed, offset, keep_prob, geoms, N1):
    """SPEC section 5's generated mask, in explicit-mask order f (bool [N1 * sum Sq_b*Skv_b]).

    geoms: per batch (Sq_b, Skv_b). Element (b, n, i, j) is stream element
    base_b + (n*Sq_b + i)*Skv16_b + j with rows padded to Skv16_b = 16*ceil(Skv_b/16) and
    base_b = sum over earlier batches of N1*Sq_b'*Skv16_b'.
    """
    out, base = [], 0
    for sq, skv in geoms:
        row = -(-skv // 16) * 16
        for n in range(N1):
            for i in range(sq):
                e0 = base + (n * sq + i) * row
                out.extend(keeps(ascend_byte(seed, offset, e0 + j), keep_prob) for j in range(skv))
        base += N1 * sq * row
    return torch.tensor(out, dtype=torch.bool)


def flat_keep_bits(seed, offset, numels, keep_prob):
    """The flat model of _npu_dropout_gen_mask: stream element e = f (bool [numels])."""
    return torch.tensor([keeps(ascend_byte(seed, offset, f), keep_prob) for f in range(numels)],
                        dtype=torch.bool)


def unpack_dropout_mask(mask, numels):
    """SPEC section 5 explicit mask: bit f % 8 (LSB first) of byte f // 8; 1 = keep."""
    flat = mask.reshape(-1).to(torch.int64).cpu()
    f = torch.arange(numels)
    return ((flat[f // 8] >> (f % 8)) & 1).bool()


def pack_bits(keep):
    """Inverse of unpack_dropout_mask (LSB first), used to build explicit masks in tests."""
    keep = keep.reshape(-1).to(torch.int64)
    n = keep.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.int64)
    padded[:n] = keep
    weights = 2 ** torch.arange(8)
    return (padded.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def dropout_keep(geoms, N1, keep_prob, dropout_mask=None, seed=0, offset=0):
    """The keep pattern Z (bool, order f) a torch-style call uses. keep_prob == 1: all ones."""
    numels = N1 * sum(sq * skv for sq, skv in geoms)
    if keep_prob >= 1.0:
        return torch.ones(numels, dtype=torch.bool)
    if dropout_mask is not None:
        return unpack_dropout_mask(dropout_mask, numels)
    return ascend_keep_bits(seed, offset, keep_prob, geoms, N1)


# ----------------------------------------------------------------------------------------------
# Compressed masks (SPEC section 4)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _causal_2048():
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@functools.lru_cache(maxsize=1)
def _prefix_3072():
    tail = torch.zeros(1024, 2048, dtype=torch.bool)
    tail[:, 1024:] = True
    return torch.cat([_causal_2048(), tail], 0)


def compressed_causal_mask(dtype=torch.bool):
    """[2048, 2048] triu(ones, diagonal=1) (modes 2, 3, 4, 7, 8)."""
    return _causal_2048().to(dtype).clone()


def compressed_prefix_mask(dtype=torch.bool):
    """[3072, 2048] mode-6 mask."""
    return _prefix_3072().to(dtype).clone()


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------
def _cum_to_lengths(cum):
    cum = [int(x) for x in (cum.tolist() if torch.is_tensor(cum) else cum)]
    return cum


def tnd_batches(actual_seq_qlen, actual_seq_kvlen):
    """[(q_start, Sq_b, kv_start, Skv_b)] for the effective batches (trailing zeros = padding)."""
    cq = _cum_to_lengths(actual_seq_qlen)
    ck = _cum_to_lengths(actual_seq_kvlen)

    def effective(c):
        n = len(c)
        while n > 0 and c[n - 1] == 0:
            n -= 1
        return n

    nb = min(effective(cq), effective(ck))
    out = []
    pq = pk = 0
    for b in range(nb):
        out.append((pq, cq[b] - pq, pk, ck[b] - pk))
        pq, pk = cq[b], ck[b]
    return out


def _split_heads_bnsd(x, layout, heads):
    """Non-TND tensor in `layout` -> [B, heads, S, d] (differentiable view ops only)."""
    if layout == "BSH":
        B, S, H = x.shape
        return x.reshape(B, S, heads, H // heads).permute(0, 2, 1, 3)
    if layout == "SBH":
        S, B, H = x.shape
        return x.reshape(S, B, heads, H // heads).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return x
    raise ValueError(layout)


def _merge_heads(x, layout):
    """[B, N, S, d] -> layout."""
    B, N, S, d = x.shape
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(B, S, N * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(S, B, N * d)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BNSD":
        return x
    raise ValueError(layout)


def _heads_of(x, layout, head_dim):
    """Number of heads of a key/value-like tensor given its per-head dim."""
    if layout in ("BSH", "SBH"):
        return x.shape[-1] // head_dim
    if layout == "BNSD":
        return x.shape[1]
    return x.shape[-2]  # BSND, TND


# ----------------------------------------------------------------------------------------------
# The "takes part" matrix (SPEC section 4), per batch
# ----------------------------------------------------------------------------------------------
def band_matrix(Sq, Skv, pre, nxt):
    """-pre <= j - i <= next."""
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Skv).view(1, -1)
    return (j - i >= -pre) & (j - i <= nxt)


def takes_part(mode, Sq, Skv, user_mask, pre, nxt, prefix_b=None, band_batch=False):
    """bool [Nm, Sq, Skv]. user_mask: bool [Nm, Sq, Skv] (True = masked out) or None.

    Implements the SPEC table literally.  Caller handles "no atten_mask => nothing masked".
    """
    i = torch.arange(Sq).view(1, -1, 1)
    j = torch.arange(Skv).view(1, 1, -1)
    d = Skv - Sq
    if mode == 0:
        return (~user_mask) & (j - i >= -pre) & (j - i <= nxt)
    if mode == 1:
        return ~user_mask
    if mode == 2:
        return j <= i
    if mode == 3:
        return j <= i + d
    if mode == 4:
        return (j - i - d >= -pre) & (j - i - d <= nxt)
    if mode == 5:
        return (~user_mask) & ((j <= i + d) | (j < prefix_b))
    if mode == 6:
        return (j <= i + d) | (j < prefix_b)
    if mode == 7:
        if band_batch:
            return takes_part(4, Sq, Skv, None, pre, nxt)
        return takes_part(3, Sq, Skv, None, pre, nxt)
    if mode == 8:
        if band_batch:
            return takes_part(4, Sq, Skv, None, pre, nxt)
        return takes_part(2, Sq, Skv, None, pre, nxt)
    raise ValueError(f"sparse_mode {mode}")


def _user_mask_for_batch(atten_mask, b, Sq, Skv, tnd, qoff=0, koff=0, maxSq=0, maxSkv=0,
                         T1=0, T2=0):
    """The full user mask slice for batch b as bool [Nm, Sq, Skv] (True = masked)."""
    m = atten_mask != 0
    if tnd:
        assert m.dim() == 2, "TND full masks are 2-D"
        if tuple(m.shape) == (maxSq, maxSkv):
            return m[:Sq, :Skv].unsqueeze(0)
        assert tuple(m.shape) == (T1, T2), m.shape
        return m[qoff:qoff + Sq, koff:koff + Skv].unsqueeze(0)
    if m.dim() == 2:
        return m.unsqueeze(0)
    assert m.dim() == 4
    return m[b if m.shape[0] > 1 else 0]


# ----------------------------------------------------------------------------------------------
# Bias terms (SPEC section 3), per batch, already in the compute dtype
# ----------------------------------------------------------------------------------------------
def _compressed_alibi_bias(C, Sq, Skv):
    """Non-TND compressed pse C [N, 1024, Skv], Sq == Skv > 1024 -> bias [N, Sq, Skv].

    Entries with j > i are never used (causal) and are set to 0.
    """
    thr = Sq - 1024
    i = torch.arange(Sq).view(-1, 1).expand(Sq, Skv)
    j = torch.arange(Skv).view(1, -1).expand(Sq, Skv)
    m = i % 1024
    rows = torch.where(i >= thr, i - thr, m)
    cols = torch.where(i >= thr, j, j + Skv - 1024 + m - i)
    used = (i >= thr) | (j <= i)
    cols = torch.where(used, cols, torch.zeros_like(cols)).clamp(0, Skv - 1)
    g = C[:, rows, cols]
    return torch.where(used.unsqueeze(0), g, torch.zeros_like(g))


def _tnd_compressed_bias(C, Sq, Skv, maxSkv):
    """TND compressed pse C [N, 1024, maxSkv]: bias[i, j] = C[1023, maxSkv-1-(i-j)], j <= i."""
    i = torch.arange(Sq).view(-1, 1).expand(Sq, Skv)
    j = torch.arange(Skv).view(1, -1).expand(Sq, Skv)
    used = j <= i
    cols = torch.where(used, (maxSkv - 1) - (i - j), torch.zeros_like(i)).clamp(0, maxSkv - 1)
    g = C[:, 1023, :][:, cols]
    return torch.where(used.unsqueeze(0), g, torch.zeros_like(g))


def _alibi(slope_b, Sq, Skv, qs, ks, sqrt, dtype):
    i = torch.arange(Sq, dtype=torch.float64).view(1, -1, 1)
    j = torch.arange(Skv, dtype=torch.float64).view(1, 1, -1)
    dist = ((j + ks) - (i + qs)).abs().to(dtype)
    if sqrt:
        dist = dist.sqrt()
    return -slope_b.to(dtype).view(-1, 1, 1) * dist


# ----------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------
def attention_oracle(query, key, value, head_num, input_layout, *, dtype=torch.float64,
                     pse=None, padding_mask=None, atten_mask=None, query_rope=None,
                     key_rope=None, scale=1.0, keep_prob=1.0, pre_tokens=INT32_MAX,
                     next_tokens=INT32_MAX, inner_precise=0, prefix=None,
                     actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                     gen_mask_parallel=True, sync=False, pse_type=1, q_start_idx=None,
                     kv_start_idx=None, softmax_layout="", sink=None, dropout_mask=None,
                     seed=0, offset=0, pre_tockens=None, next_tockens=None,
                     return_keep=False):
    """Dense FlashAttentionScore forward, computed entirely in ``dtype``.

    Returns (attention_out [layout, dtype], softmax_max, softmax_sum) with the statistics in
    SPEC's shapes ([B, N1, Sq, 8] or TND [T1, N1, 8] in the requested softmax_layout), float64.
    With return_keep=True also returns the flat bool keep pattern Z that was used.
    ``seed``/``offset`` are used literally (pass the values the library returned).
    """
    if pre_tockens is not None:
        pre_tokens = pre_tockens
    if next_tockens is not None:
        next_tokens = next_tockens
    assert padding_mask is None
    layout = input_layout.upper()
    tnd = layout == "TND"
    N1 = int(head_num)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731

    # ---- per-batch views [N, S, d] -------------------------------------------------------
    if tnd:
        T1, _, D = query.shape
        batches = tnd_batches(actual_seq_qlen, actual_seq_kvlen)

        def qpart(x, s, n):
            return x[s:s + n].permute(1, 0, 2)
        qb = [qpart(query, bq[0], bq[1]) for bq in batches]
        kb = [qpart(key, bq[2], bq[3]) for bq in batches]
        vb = [qpart(value, bq[2], bq[3]) for bq in batches]
        qrb = krb = None
        if query_rope is not None:
            qrb = [qpart(query_rope, bq[0], bq[1]) for bq in batches]
            krb = [qpart(key_rope, bq[2], bq[3]) for bq in batches]
        N2 = key.shape[1]
        Dv = value.shape[-1]
    else:
        q4 = _split_heads_bnsd(query, layout, N1)
        D = q4.shape[-1]
        N2 = _heads_of(key, layout, D)
        k4 = _split_heads_bnsd(key, layout, N2)
        Dv = value.shape[-1] // N2 if layout in ("BSH", "SBH") else value.shape[-1]
        v4 = _split_heads_bnsd(value, layout, N2)
        B, _, Sq, _ = q4.shape
        Skv = k4.shape[2]
        batches = [(0, Sq, 0, Skv)] * B
        qb = list(q4.unbind(0))
        kb = list(k4.unbind(0))
        vb = list(v4.unbind(0))
        qrb = krb = None
        if query_rope is not None:
            qrb = list(_split_heads_bnsd(query_rope, layout, N1).unbind(0))
            krb = list(_split_heads_bnsd(key_rope, layout, N2).unbind(0))
    G = N1 // N2
    assert N1 == G * N2
    nb = len(batches)
    maxSq = max([bq[1] for bq in batches], default=0)
    maxSkv = max([bq[3] for bq in batches], default=0)

    # ---- dropout keep pattern ------------------------------------------------------------
    keep = dropout_keep([(bq[1], bq[3]) for bq in batches], N1, keep_prob, dropout_mask, seed, offset)

    # band batch of modes 7 / 8
    nonempty = [b for b in range(nb) if batches[b][1] > 0]
    band_b = None
    if sparse_mode == 7 and nonempty:
        band_b = nonempty[-1]
    if sparse_mode == 8 and nonempty:
        band_b = nonempty[0]

    sink_d = cast(sink)
    outs, maxs, sums = [], [], []
    fbase = 0
    for b, (qo, Sq_b, ko, Skv_b) in enumerate(batches):
        q = cast(qb[b])
        k = cast(kb[b]).repeat_interleave(G, dim=0)
        v = cast(vb[b]).repeat_interleave(G, dim=0)
        S0 = q @ k.transpose(-1, -2)
        if qrb is not None:
            S0 = S0 + cast(qrb[b]) @ cast(krb[b]).repeat_interleave(G, dim=0).transpose(-1, -2)

        # bias
        if pse_type in (0, 1) and pse is not None:
            P_ = cast(pse)
            Cb = P_[b if P_.shape[0] > 1 else 0]  # [N1, Sp, Skv']
            if tnd:
                bias = _tnd_compressed_bias(Cb, Sq_b, Skv_b, P_.shape[-1])
            elif Cb.shape[1] == Sq_b or Cb.shape[1] == 1:
                bias = Cb.expand(N1, Sq_b, Skv_b)
            else:
                assert Cb.shape[1] == 1024 and Sq_b > 1024 and Sq_b == Skv_b, Cb.shape
                bias = _compressed_alibi_bias(Cb, Sq_b, Skv_b)
            L = (S0 + bias) * scale32 if pse_type == 1 else S0 * scale32 + bias
        elif pse_type in (2, 3):
            slopes = pse
            slope_b = slopes[b] if slopes.dim() == 2 else slopes
            qs = int(q_start_idx[0]) if q_start_idx is not None else 0
            ks = int(kv_start_idx[0]) if kv_start_idx is not None else 0
            if tnd and sparse_mode == 8 and b >= 1:
                qs = ks = 0
            L = S0 * scale32 + _alibi(slope_b, Sq_b, Skv_b, qs, ks, pse_type == 3, dtype)
        else:
            L = S0 * scale32

        # takes part
        if atten_mask is None:
            allowed = torch.ones(1, Sq_b, Skv_b, dtype=torch.bool)
        else:
            um = None
            if sparse_mode in (0, 1, 5):
                um = _user_mask_for_batch(atten_mask, b, Sq_b, Skv_b, tnd, qo, ko, maxSq,
                                          maxSkv, query.shape[0], key.shape[0])
            pb = int(prefix[b]) if prefix is not None and sparse_mode in (5, 6) else None
            allowed = takes_part(sparse_mode, Sq_b, Skv_b, um, pre_tokens, next_tokens, pb,
                                 band_batch=(b == band_b))
        allowed = allowed.expand(N1, Sq_b, Skv_b)

        # softmax over positions that take part (+ sink)
        Lm = L.masked_fill(~allowed, float("-inf"))
        m = Lm.amax(-1) if Skv_b > 0 else torch.full((N1, Sq_b), float("-inf"), dtype=dtype)
        if sink_d is not None:
            m = torch.maximum(m, sink_d.view(-1, 1).expand_as(m))
        valid = allowed.any(-1)
        has_norm = valid | (sink_d is not None)
        m_use = torch.where(has_norm, m, torch.zeros_like(m)).detach()
        e = torch.exp(Lm - m_use.unsqueeze(-1))
        l = e.sum(-1)
        if sink_d is not None:
            l = l + torch.exp(sink_d.view(-1, 1) - m_use)
        l_safe = torch.where(has_norm, l, torch.ones_like(l))
        P = e / l_safe.unsqueeze(-1)

        n_b = N1 * Sq_b * Skv_b
        Z = keep[fbase:fbase + n_b].view(N1, Sq_b, Skv_b)
        fbase += n_b
        if keep_prob < 1.0:
            P = P * Z.to(dtype) / keep_prob
        o = P @ v  # [N1, Sq_b, Dv]
        outs.append(o)

        m64 = m.detach().to(torch.float64)
        l64 = l.detach().to(torch.float64)
        m64 = torch.where(has_norm, m64, torch.full_like(m64, -FLT_MAX))
        l64 = torch.where(has_norm, l64, torch.full_like(l64, FLT_MAX))
        maxs.append(m64)
        sums.append(l64)

    # ---- assemble ------------------------------------------------------------------------
    if not tnd:
        out = _merge_heads(torch.stack(outs, 0), layout)
        smax = torch.stack(maxs, 0).unsqueeze(-1).expand(-1, -1, -1, 8).contiguous()
        ssum = torch.stack(sums, 0).unsqueeze(-1).expand(-1, -1, -1, 8).contiguous()
    else:
        covered = sum(bq[1] for bq in batches)
        pieces = [o.permute(1, 0, 2) for o in outs]
        pieces.append(torch.zeros(T1 - covered, N1, Dv, dtype=dtype))
        out = torch.cat(pieces, 0)

        def stats_tnd(lst):
            if softmax_layout == "TND":
                parts = [x.permute(1, 0) for x in lst]
                parts.append(torch.zeros(T1 - covered, N1, dtype=torch.float64))
                return torch.cat(parts, 0).unsqueeze(-1).expand(-1, -1, 8).contiguous()
            assert softmax_layout == ""
            flat = [x.unsqueeze(-1).expand(-1, -1, 8).reshape(-1) for x in lst]
            flat.append(torch.zeros((T1 - covered) * N1 * 8, dtype=torch.float64))
            return torch.cat(flat).view(T1, N1, 8)

        smax, ssum = stats_tnd(maxs), stats_tnd(sums)
    if return_keep:
        return out, smax, ssum, keep
    return out, smax, ssum


def oracle_numels(query, key, head_num, input_layout, actual_seq_qlen=None,
                  actual_seq_kvlen=None):
    """SPEC's numels: B*N1*Sq*Skv (TND: N1*sum Sq_b*Skv_b)."""
    layout = input_layout.upper()
    if layout == "TND":
        return head_num * sum(b[1] * b[3] for b in tnd_batches(actual_seq_qlen,
                                                              actual_seq_kvlen))
    q4 = _split_heads_bnsd(query, layout, head_num)
    D = q4.shape[-1]
    k4 = _split_heads_bnsd(key, layout, _heads_of(key, layout, D))
    return q4.shape[0] * head_num * q4.shape[2] * k4.shape[2]
