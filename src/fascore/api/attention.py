"""``fascore.attention``: the operator in flash-attn / SDPA conventions.

One call of ``npu_fusion_attention_v2`` per call, with the arguments mapped exactly (the table
is in docs/attention.md, and ``mapping(...)`` returns it for one call): the result is the
operator's, differentiable with respect to q, k, v and ``attn_bias``, with its statistics
turned into flash-attn's log-sum-exp on request.

Conventions (flash-attn's where it and SDPA differ, each switchable):

* layouts ``"BSND"`` (flash-attn's [B, S, H, D], the default), ``"BNSD"`` (SDPA's [B, H, S, D]),
  ``"TND"`` (flash-attn varlen's packed [T, H, D], with ``cu_seqlens_q`` / ``cu_seqlens_k``);
  ``"BSHD"``, ``"BHSD"`` and ``"THD"`` are accepted as their names.
* ``scale=None`` is 1/sqrt(D); ``dropout_p`` is the drop probability (keep_prob = 1 - dropout_p).
* ``attn_mask`` (bool) is SDPA's: True = attend. A float ``attn_mask`` is an additive bias, as
  in SDPA (the same as ``attn_bias``).
* ``causal_alignment``: ``"bottom_right"`` (flash-attn >= 2.1: the last query sees the last key)
  or ``"top_left"`` (SDPA's ``is_causal``: query i sees keys j <= i). It also aligns ``window``
  and the ALiBi distance. Equal for Sq == Skv.
* ``window=(left, right)``: flash-attn's ``window_size``: query i sees keys
  i + d - left <= j <= i + d + right (d = Skv - Sq bottom-right, 0 top-left); -1 or None is
  unbounded. ``causal=True`` is right = 0.
* ``cu_seqlens_q`` / ``cu_seqlens_k``: flash-attn's cumulative offsets **with** the leading 0
  (B + 1 entries); Ascend's ``actual_seq_qlen`` is ``cu_seqlens_q[1:]``.
* ``return_lse``: also return flash-attn's ``softmax_lse`` (float32 [B, H, Sq]; TND [H, T]),
  -inf for rows where nothing takes part (not differentiable).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import FlashAttentionError, invalid
from ..lint import LintError
from ..limits import INT32_MAX, INT32_MIN
from ..params import ENTRY_POINTS, EntryPoint, Names
from ..spec.values import as_int_list, as_real, plain_number, short
from .functions import _forward

__all__ = ["attention", "mapping"]

FLT_MAX = 3.4028234663852886e38
_LAYOUTS = {"BSND": "BSND", "BSHD": "BSND", "BNSD": "BNSD", "BHSD": "BNSD", "TND": "TND", "THD": "TND"}
_HEAD_AXIS = {"BSND": 2, "BNSD": 1, "TND": 1}
_SEQ_AXIS = {"BSND": 1, "BNSD": 2, "TND": 0}
_V2 = ENTRY_POINTS["npu_fusion_attention_v2"]
_compressed: dict[tuple[int, str], Tensor] = {}


def _entry_point() -> EntryPoint:
    """v2's declaration with fascore.attention's names in messages (the mapped arguments say where they come from)."""
    ep = EntryPoint(_V2.name, _V2.params, _V2.kwonly_from, _V2.returns)
    object.__setattr__(ep, "names", Names({
        "query": "q", "key": "k", "value": "v", "head_num": "head_num (q's head count)", "input_layout": "layout",
        "pse": "attn_bias", "atten_mask": "attn_mask (as ~attn_mask)", "keep_prob": "keep_prob (1 - dropout_p)",
        "pre_tokens": "pre_tokens (from causal/window)", "next_tokens": "next_tokens (from causal/window)",
        "sparse_mode": "sparse_mode (from causal/window)", "actual_seq_qlen": "cu_seqlens_q[1:]",
        "actual_seq_kvlen": "cu_seqlens_k[1:]", "pse_type": "pse_type (from attn_bias/alibi_slopes)"}))
    return ep


_EP = _entry_point()


def _mask(rows: int, device: torch.device) -> Tensor:
    """Ascend's compressed masks: causal [2048, 2048], prefix [3072, 2048] (cached per device)."""
    def make() -> Tensor:
        tri = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
        if rows == 2048:
            return tri
        block = torch.zeros(1024, 2048, dtype=torch.bool, device=device)
        block[:, 1024:] = True
        return torch.cat([tri, block])

    if torch.compiler.is_compiling():
        key = (rows, str(device))
        return _compressed[key] if key in _compressed else make()
    return _compressed.setdefault((rows, str(device)), make())


# --------------------------------------------------------------------------- argument readers
def _layout(layout: Any, q: Tensor, cu_q: Any) -> str:
    if not isinstance(layout, str) or layout.upper() not in _LAYOUTS:
        raise invalid(f"layout={short(layout)}: must be one of 'BSND' (flash-attn's [B, S, H, D]), 'BNSD' (SDPA's "
                      "[B, H, S, D]) or 'TND' (packed varlen [T, H, D]); 'BSHD', 'BHSD', 'THD' are the same")
    lay = _LAYOUTS[layout.upper()]
    if cu_q is not None and lay == "BSND" and layout.upper() == "BSND" and isinstance(q, Tensor) and q.dim() == 3:
        return "TND"  # flash_attn_varlen_func's call: 3-D tensors with cu_seqlens
    return lay


def _qkv(q: Any, k: Any, v: Any, lay: str) -> None:
    rank = 3 if lay == "TND" else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise invalid(f"{name}={short(t)}: must be a torch.Tensor")
        if t.dim() != rank:
            raise invalid(f"{name} shape {list(t.shape)}: layout {lay} needs a {rank}-D tensor"
                          + (" (with cu_seqlens, pass packed [T, H, D] tensors)" if rank == 3 else
                             " ([B, S, H, D] for 'BSND', [B, H, S, D] for 'BNSD'; packed varlen is 'TND')"))


def _window(window: Any) -> tuple[int | None, int | None]:
    """(left, right); None for unbounded (flash-attn's -1)."""
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise invalid(f"window={short(window)}: must be (left, right), e.g. (128, 0); -1 or None is unbounded")
    out = []
    for side, x in zip(("left", "right"), window):
        x = plain_number(x)
        if x is None or (isinstance(x, int) and not isinstance(x, bool) and x == -1):
            out.append(None)
        elif isinstance(x, int) and not isinstance(x, bool) and INT32_MIN <= x <= INT32_MAX:
            out.append(x)
        else:
            raise invalid(f"window {side}={short(x)}: must be an int32 number of tokens, or -1 / None for unbounded")
    return out[0], out[1]


def _cu(cu: Any, name: str, total: int, max_seqlen: Any, mname: str) -> list[int]:
    """flash-attn's cu_seqlens (leading 0, B + 1 entries) -> Ascend's cumulative ends (cu[1:])."""
    vals = as_int_list(cu, name)
    if len(vals) < 2:
        raise invalid(f"{name}={short(vals)}: needs B + 1 entries, starting with 0 (flash-attn's cu_seqlens)")
    if vals[0] != 0:
        raise invalid(f"{name}={short(vals)}: flash-attn's cu_seqlens start with 0 (B + 1 entries); for Ascend's "
                      f"offsets without the 0 prepend it, [0] + offsets")
    lens = [b - a for a, b in zip(vals, vals[1:])]
    if any(x < 0 for x in lens):
        k = next(i for i, x in enumerate(lens) if x < 0)
        raise invalid(f"{name}={short(vals)}: must not decrease (entry {k + 1} is {vals[k + 1]} after {vals[k]})")
    if vals[-1] > total:
        raise invalid(f"{name}={short(vals)}: the total {vals[-1]} exceeds the {total} packed rows")
    if max_seqlen is not None:
        ms = plain_number(max_seqlen)
        if isinstance(ms, Tensor):
            ms = int(ms.item())
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < max(lens):
            raise invalid(f"{mname}={short(max_seqlen)}: must be an int >= the longest sequence ({max(lens)})")
    return vals[1:]


def _bias4(bias: Tensor, name: str, b: int, n1: int, sq: int, skv: int) -> Tensor:
    """A bias broadcastable to [B, N1, Sq, Skv] as one of the operator's pse shapes (expanded, no copy)."""
    if bias.dim() > 4:
        raise invalid(f"{name} shape {list(bias.shape)}: must broadcast to [B, H, Sq, Skv] = {[b, n1, sq, skv]}")
    t = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    want = [b, n1, sq, skv]
    for axis, (have, w) in enumerate(zip(t.shape, want)):
        if have not in (1, w):
            raise invalid(f"{name} shape {list(bias.shape)}: must broadcast to [B, H, Sq, Skv] = {want} "
                          f"(axis {axis - 4 + bias.dim()} has {have})")
    return t.expand(t.shape[0], n1, t.shape[2], skv)


def _mask4(keep: Tensor, b: int, n1: int, sq: int, skv: int, batch: bool = False) -> Tensor:
    """A keep-mask broadcastable to [B, H, Sq, Skv] as one of the operator's full-mask shapes:
    [Sq, Skv], [B, 1, Sq, Skv] or [B, N1, Sq, Skv] (``batch``: always with the batch axis, mode 5)."""
    if keep.dim() > 4:
        raise invalid(f"attn_mask shape {list(keep.shape)}: must broadcast to [B, H, Sq, Skv] = {[b, n1, sq, skv]}")
    t = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    for axis, (have, w) in enumerate(zip(t.shape, (b, n1, sq, skv))):
        if have not in (1, w):
            raise invalid(f"attn_mask shape {list(keep.shape)}: must broadcast to [B, H, Sq, Skv] = "
                          f"{[b, n1, sq, skv]} (axis {axis - 4 + keep.dim()} has {have})")
    heads = t.shape[1]
    rows = b if (batch and b > 1) or heads > 1 or t.shape[0] > 1 else 1
    t = t.expand(rows, heads, sq, skv)
    return t[0, 0] if rows == 1 and heads == 1 else t


def _alibi_dense(slopes: Tensor, b: int, n1: int, sq: int, skv: int, shift: int, dtype: torch.dtype) -> Tensor:
    """-slope * |j - i - shift| as a [B or 1, N1, Sq, Skv] bias (flash-attn's ALiBi for Sq != Skv)."""
    s = slopes.reshape(-1, n1, 1, 1).to(torch.float32)
    i = torch.arange(sq, device=slopes.device, dtype=torch.float32)[:, None]
    j = torch.arange(skv, device=slopes.device, dtype=torch.float32)[None, :]
    return (-s * (j - i - shift).abs()).to(dtype)


def _lse(smax: Tensor, ssum: Tensor, tnd: bool) -> Tensor:
    m, l = smax[..., 0], ssum[..., 0]
    lse = m + torch.log(l)
    lse = torch.where((m == -FLT_MAX) & (l == FLT_MAX), torch.full_like(lse, -math.inf), lse)
    return lse.transpose(0, 1).contiguous() if tnd else lse


# --------------------------------------------------------------------------- the mapping
def _band(lo: int | None, hi: int | None) -> tuple[int, int]:
    """(pre_tokens, next_tokens) of the band lo <= j - i (- d) <= hi, INT32_MAX for unbounded."""
    pre = INT32_MAX if lo is None else max(INT32_MIN, min(INT32_MAX, -lo))
    nxt = INT32_MAX if hi is None else max(INT32_MIN, min(INT32_MAX, hi))
    return pre, nxt


def _tnd_keep_mask(keep: Tensor | None, cq: list[int], ck: list[int], t1: int, t2: int, lo: int | None,
                   hi: int | None, bottom_right: bool, device: torch.device) -> Tensor:
    """A [T1, T2] keep-mask: the caller's (its [T1, T2] or [maxSq, maxSkv] form) and, per sequence,
    the band lo <= j - i - d_b <= hi (d_b = Skv_b - Sq_b bottom-right, 0 top-left)."""
    out = torch.zeros(t1, t2, dtype=torch.bool, device=device)
    q0 = k0 = 0
    for qe, ke in zip(cq, ck):
        sq, skv = qe - q0, ke - k0
        if sq > 0 and skv > 0:
            if keep is None:
                blk = torch.ones(sq, skv, dtype=torch.bool, device=device)
            elif list(keep.shape) == [t1, t2]:
                blk = keep[q0:qe, k0:ke].clone()
            else:
                blk = keep[:sq, :skv].clone()
            diff = torch.arange(skv, device=device)[None, :] - torch.arange(sq, device=device)[:, None] \
                - ((skv - sq) if bottom_right else 0)
            if lo is not None:
                blk &= diff >= lo
            if hi is not None:
                blk &= diff <= hi
            out[q0:qe, k0:ke] = blk
        q0, k0 = qe, ke
    return out


def _masking(kw: dict[str, Any], keep: Tensor | None, lay: str, geo: dict[str, Any], causal: bool, bottom_right: bool,
             lo: int | None, hi: int | None, prefix: Any) -> None:
    """sparse_mode, atten_mask, pre/next tokens and prefix of the mapped call (docs/attention.md)."""
    dev, b, n1, sq, skv = geo["device"], geo["b"], geo["n1"], geo["sq"], geo["skv"]
    tnd = lay == "TND"
    if prefix is not None:
        if not causal or lo is not None or hi != 0:
            raise invalid("prefix: a prefix-LM call is causal=True without window (every query sees the keys "
                          "j < prefix[b] and its causal past)")
        if not bottom_right and any(gq != gk for gq, gk in geo["geoms"]):
            raise invalid("prefix with causal_alignment='top_left' and Sq != Skv: the operator's prefix modes are "
                          "bottom-right causal; use causal_alignment='bottom_right'")
        pfx = as_int_list(prefix, "prefix")
        if len(pfx) != len(geo["geoms"]):
            raise invalid(f"prefix has {len(pfx)} entries: must have one per batch ({len(geo['geoms'])})")
        for x, (gq, gk) in zip(pfx, geo["geoms"]):
            if not 0 <= x <= gk:
                raise invalid(f"prefix={short(pfx)}: each entry must be in [0, Skv] ({x} with Skv={gk})")
        # entries below Skv - Sq add nothing to the bottom-right causal part: the operator's range starts there
        kw["prefix"] = [max(x, gk - gq, 0) if keep is None else x for x, (gq, gk) in zip(pfx, geo["geoms"])]
        if keep is None:
            kw.update(sparse_mode=6, atten_mask=_mask(3072, dev))
        else:
            if tnd:
                raise invalid("prefix with attn_mask and layout TND: the operator's full-mask prefix mode (5) is "
                              "not for varlen; pass the prefix inside attn_mask with causal=False")
            kw.update(sparse_mode=5, atten_mask=~_mask4(keep, b, n1, sq, skv, batch=True))
        return
    unbounded = lo is None and hi is None
    if keep is None:
        if unbounded:
            return
        if lo is None and hi == 0:
            kw.update(sparse_mode=3 if bottom_right else 2, atten_mask=_mask(2048, dev))
            return
        same = all(gq == gk for gq, gk in geo["geoms"])
        if bottom_right or not tnd or same:  # mode 4: -pre <= j - i - d <= next; top-left shifts by d
            shift = 0 if (bottom_right or same) else skv - sq
            pre, nxt = _band(None if lo is None else lo - shift, None if hi is None else hi - shift)
            kw.update(sparse_mode=4, atten_mask=_mask(2048, dev), pre_tokens=pre, next_tokens=nxt)
            return
        pre, nxt = _band(lo, hi)  # TND top-left band with Sq_b != Skv_b: mode 0's band is top-left
        kw.update(sparse_mode=0, atten_mask=torch.zeros(geo["max_sq"], geo["max_skv"], dtype=torch.bool, device=dev),
                  pre_tokens=pre, next_tokens=nxt)
        return
    if tnd:
        shifts = {gk - gq for gq, gk in geo["geoms"]} if bottom_right else {0}
        if len(shifts) == 1 or unbounded:
            d = shifts.pop() if len(shifts) == 1 else 0
            pre, nxt = _band(None if lo is None else lo + d, None if hi is None else hi + d)
            kw.update(sparse_mode=0, atten_mask=~keep, pre_tokens=pre, next_tokens=nxt)
        else:  # bottom-right bands that differ per sequence: folded into one [T1, T2] mask
            folded = _tnd_keep_mask(keep, geo["cq"], geo["ck"], sq, skv, lo, hi, True, dev)
            kw.update(sparse_mode=0, atten_mask=~folded)
        return
    d = skv - sq if bottom_right else 0
    pre, nxt = _band(None if lo is None else lo + d, None if hi is None else hi + d)
    kw.update(sparse_mode=0, atten_mask=~_mask4(keep, b, n1, sq, skv), pre_tokens=pre, next_tokens=nxt)


def _geometry(q: Tensor, k: Tensor, lay: str, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any) -> dict[str, Any]:
    n1 = q.shape[_HEAD_AXIS[lay]]
    geo: dict[str, Any] = dict(device=q.device, n1=n1, d=q.shape[-1], sq=q.shape[_SEQ_AXIS[lay]],
                               skv=k.shape[_SEQ_AXIS[lay]], b=1 if lay == "TND" else q.shape[0])
    if lay == "TND":
        if cu_q is None or cu_k is None:
            raise invalid("layout TND needs cu_seqlens_q and cu_seqlens_k (flash-attn's cumulative offsets, "
                          "starting with 0)")
        cq = _cu(cu_q, "cu_seqlens_q", geo["sq"], max_q, "max_seqlen_q")
        ck = _cu(cu_k, "cu_seqlens_k", geo["skv"], max_k, "max_seqlen_k")
        if len(cq) != len(ck):
            raise invalid(f"cu_seqlens_q has {len(cq) + 1} entries, cu_seqlens_k {len(ck) + 1}: one batch each")
        lq = [b - a for a, b in zip([0] + cq, cq)]
        lk = [b - a for a, b in zip([0] + ck, ck)]
        geo.update(cq=cq, ck=ck, geoms=list(zip(lq, lk)), max_sq=max(lq), max_skv=max(lk), b=len(cq))
    else:
        for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"):
            if {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": max_q, "max_seqlen_k": max_k}[name] \
                    is not None:
                raise invalid(f"{name} is for packed varlen tensors: pass layout='TND' with [T, H, D] tensors")
        geo["geoms"] = [(geo["sq"], geo["skv"])] * geo["b"]
    return geo


def _bias(kw: dict[str, Any], q: Tensor, lay: str, geo: dict[str, Any], attn_bias: Any, alibi: Any,
          bottom_right: bool) -> None:
    """pse / pse_type: attn_bias -> pse_type 0; ALiBi slopes -> pse_type 2, or a dense bias where Sq != Skv."""
    b, n1, sq, skv = geo["b"], geo["n1"], geo["sq"], geo["skv"]
    bias = None
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor) or not attn_bias.is_floating_point():
            raise invalid(f"attn_bias={short(attn_bias)}: must be a float tensor broadcastable to [B, H, Sq, Skv] "
                          "(a boolean mask goes in attn_mask)")
        if attn_bias.dtype != q.dtype:
            raise invalid(f"attn_bias dtype {attn_bias.dtype}: must be q's dtype {q.dtype} "
                          f"(e.g. attn_bias.to({q.dtype}))")
        if lay == "TND":
            raise invalid("attn_bias with layout TND: the operator takes no dense bias for packed sequences "
                          "(only ALiBi: alibi_slopes); use BSND / BNSD with padding masked by attn_mask")
        bias = _bias4(attn_bias, "attn_bias", b, n1, sq, skv)
    if alibi is not None:
        if not isinstance(alibi, Tensor) or alibi.dtype != torch.float32 or list(alibi.shape) not in ([n1], [b, n1]):
            raise invalid(f"alibi_slopes={short(alibi)}: must be float32 [H]={[n1]} or [B, H]={[b, n1]}")
        square = all(gq == gk for gq, gk in geo["geoms"])
        if square and bias is None:
            kw.update(pse=alibi, pse_type=2)
            return
        if lay == "TND":
            raise invalid("alibi_slopes with layout TND needs Sq == Skv in every sequence (the operator's "
                          "in-kernel ALiBi); other varlen ALiBi has no operator form")
        dense = _alibi_dense(alibi, b, n1, sq, skv, skv - sq if bottom_right else 0, q.dtype)
        bias = dense if bias is None else bias + dense
    if bias is not None:
        kw.update(pse=bias, pse_type=0)


def _call_args(q: Tensor, k: Tensor, v: Tensor, layout: Any, causal: Any, causal_alignment: Any, window: Any,
               attn_mask: Any, attn_bias: Any, alibi_slopes: Any, dropout_p: Any, scale: Any, cu_seqlens_q: Any,
               cu_seqlens_k: Any, max_seqlen_q: Any, max_seqlen_k: Any, prefix: Any, seed: Any,
               offset: Any) -> tuple[dict[str, Any], str]:
    """The mapped npu_fusion_attention_v2 keywords (canonical names) and the layout."""
    lay = _layout(layout, q, cu_seqlens_q)
    _qkv(q, k, v, lay)
    if not isinstance(causal, bool):
        raise invalid(f"causal={short(causal)}: must be True or False")
    if causal_alignment not in ("bottom_right", "top_left"):
        raise invalid(f"causal_alignment={short(causal_alignment)}: must be 'bottom_right' (flash-attn) or "
                      "'top_left' (SDPA's is_causal)")
    bottom_right = causal_alignment == "bottom_right"
    wl, wr = _window(window)
    lo, hi = (None if wl is None else -wl), wr  # keys with lo <= j - i - d <= hi take part
    if causal:
        if hi is not None and hi > 0:
            raise invalid(f"window=({wl}, {wr}) with causal=True: causal already means right = 0; pass "
                          f"causal=False, window=({wl}, {wr}) for a band that looks ahead")
        hi = 0 if hi is None else hi
    geo = _geometry(q, k, lay, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    p = as_real(dropout_p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise invalid(f"dropout_p={p}: must be in [0, 1) (the probability to drop)")
    sc = geo["d"] ** -0.5 if scale is None else as_real(scale, "scale")
    kw = {prm.name: prm.default for prm in _V2.params}
    kw.update(query=q, key=k, value=v, head_num=geo["n1"], input_layout=lay, scale=sc, keep_prob=1.0 - p)
    if lay == "TND":
        kw.update(actual_seq_qlen=geo["cq"], actual_seq_kvlen=geo["ck"], softmax_layout="TND")
    if p > 0.0:
        kw.update(seed=0 if seed is None else seed, offset=offset)
    keep = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise invalid(f"attn_mask={short(attn_mask)}: must be a bool tensor (True = attend) or a float bias")
        if attn_mask.is_floating_point():  # SDPA: a float attn_mask is added to the scores
            attn_bias = attn_mask if attn_bias is None else attn_bias + attn_mask
        elif attn_mask.dtype != torch.bool:
            raise invalid(f"attn_mask dtype {attn_mask.dtype}: must be bool (True = attend, SDPA's polarity) or float "
                          "(additive); an Ascend-style mask (nonzero = masked out) is ~mask.bool()")
        else:
            keep = attn_mask
            if lay == "TND" and list(keep.shape) not in ([geo["sq"], geo["skv"]], [geo["max_sq"], geo["max_skv"]]):
                raise invalid(f"attn_mask shape {list(keep.shape)} with layout TND: must be [T_q, T_k]="
                              f"{[geo['sq'], geo['skv']]} or [max_seqlen_q, max_seqlen_k]="
                              f"{[geo['max_sq'], geo['max_skv']]} (each sequence reads its top-left corner)")
    _masking(kw, keep, lay, geo, causal, bottom_right, lo, hi, prefix)
    _bias(kw, q, lay, geo, attn_bias, alibi_slopes, bottom_right)
    return kw, lay


def mapping(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> dict[str, Any]:
    """The ``npu_fusion_attention_v2`` keywords ``attention(q, k, v, **kwargs)`` calls (v2's names;
    tensors as they are passed). For reading and tests: ``fascore.npu_fusion_attention_v2(**m)[0]``
    is the attention output."""
    names = ("layout", "causal", "causal_alignment", "window", "attn_mask", "attn_bias", "alibi_slopes", "dropout_p",
             "scale", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "prefix", "seed", "offset")
    defaults = dict(layout="BSND", causal=False, causal_alignment="bottom_right", window=None, attn_mask=None,
                    attn_bias=None, alibi_slopes=None, dropout_p=0.0, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, prefix=None, seed=None, offset=0)
    extra = set(kwargs) - set(names) - {"return_lse", "deterministic"}
    if extra:
        raise TypeError(f"mapping() got unexpected keyword arguments {sorted(extra)}")
    a = dict(defaults, **{n: kwargs[n] for n in names if n in kwargs})
    kw, _ = _call_args(q, k, v, *(a[n] for n in names))
    defaults_v2 = {prm.name: prm.default for prm in _V2.params}

    def given(n: str, x: Any) -> bool:
        dflt = defaults_v2[n]
        return x is not dflt and (isinstance(x, Tensor) or isinstance(dflt, Tensor) or x != dflt)
    return {n: x for n, x in kw.items() if n in ("query", "key", "value", "head_num", "input_layout") or given(n, x)}


def attention(q: Tensor, k: Tensor, v: Tensor, *, layout: str = "BSND", causal: bool = False,
              causal_alignment: str = "bottom_right", window: Sequence[int | None] | None = None,
              attn_mask: Tensor | None = None, attn_bias: Tensor | None = None, alibi_slopes: Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None, cu_seqlens_q: Any = None, cu_seqlens_k: Any = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, return_lse: bool = False,
              deterministic: bool = True, prefix: Sequence[int] | None = None, seed: int | None = None,
              offset: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    """Attention in flash-attn / SDPA conventions, computed by FlashAttentionScore (exactly one
    ``npu_fusion_attention_v2`` call; docs/attention.md has the mapping table).

    q [B, Sq, H, D] (``layout="BSND"``), [B, H, Sq, D] (``"BNSD"``) or packed [Tq, H, D] (``"TND"``
    with ``cu_seqlens_q`` / ``cu_seqlens_k``, flash-attn's offsets with the leading 0); k, v the same
    with Skv and Hkv heads (H % Hkv == 0: GQA / MQA); v's head dim may be smaller than D.

    * ``causal`` / ``causal_alignment`` ("bottom_right": flash-attn; "top_left": SDPA's is_causal).
    * ``window=(left, right)``: flash-attn's sliding window, aligned as ``causal_alignment`` says;
      -1 / None unbounded; ``causal=True`` means right = 0.
    * ``attn_mask``: bool, True = attend (SDPA's polarity), broadcastable to [B, H, Sq, Skv]
      (TND: [Tq, Tk] or [max_seqlen_q, max_seqlen_k], each sequence its top-left corner); a float
      attn_mask is added to the scores like ``attn_bias``.
    * ``attn_bias``: float, q's dtype, broadcastable to [B, H, Sq, Skv], added to scale * q k^T;
      differentiable (its gradient has its shape).
    * ``alibi_slopes``: float32 [H] or [B, H]: bias -slope * |j - i - d| (d as the alignment).
    * ``prefix``: one length per batch, with ``causal=True``: keys j < prefix[b] are visible to
      every query (prefix LM).
    * ``dropout_p``: drop probability (keep_prob = 1 - dropout_p); bits from Ascend's Philox
      model; ``seed`` (None: drawn from fascore's emulated NPU generator; required under
      torch.compile) and ``offset`` pick them.
    * ``scale``: None is 1 / sqrt(D).
    * ``return_lse``: also return the float32 log-sum-exp of the scaled scores, [B, H, Sq] (TND
      [H, Tq]), -inf where a row has nothing to attend to.
    * ``deterministic``: accepted for flash-attn's signature; fascore is always deterministic.

    Returns the output in q's layout and dtype ([.., Dv]), or ``(out, lse)``. Raises
    ``FlashAttentionError`` naming the argument (mapped ones say where they come from).
    """
    if not isinstance(return_lse, bool) or not isinstance(deterministic, bool):
        raise invalid(f"return_lse={short(return_lse)}, deterministic={short(deterministic)}: must be bools")
    kw, lay = _call_args(q, k, v, layout, causal, causal_alignment, window, attn_mask, attn_bias, alibi_slopes,
                         dropout_p, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix, seed, offset)
    try:
        res = _forward(_EP, kw)
    except LintError:
        raise
    except FlashAttentionError as e:
        raise FlashAttentionError(f"fascore.attention: {e}", e.status) from e
    out = res[0]
    if return_lse:
        return out, _lse(res[1], res[2], lay == "TND")
    return out
