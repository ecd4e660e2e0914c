"""semantics §4: ``atten_mask`` and ``sparse_mode`` (shapes, compressed contents, band rules, prefix),
and the take-part rule (``MaskSpec``) each segment gets from them."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..canonical.masks import MaskSpec
from ..errors import invalid, warn_user
from ..limits import MAX_B_VARLEN
from ..params import Names
from .scalars import Scalars
from .tensors import Geometry
from .tnd import Varlen
from .values import as_int_list, as_tensor, readable

__all__ = ["COMPRESSED_MODES", "Masking", "masking", "mask_spec"]

COMPRESSED_MODES = (2, 3, 4, 6, 7, 8)
_warned_no_mask = False
_expected_cache: dict[tuple[int, str], Tensor] = {}
_compressed_seen: dict[int, tuple[weakref.ref, tuple]] = {}  # id -> (tensor, stamp) of masks checked


@dataclass(frozen=True)
class Masking:
    mask: Tensor | None
    prefix: list[int] | None


def _compressed_expected(rows: int, device: torch.device) -> Tensor:
    key = (rows, str(device))
    if key not in _expected_cache:
        tri = torch.triu(torch.ones(2048, 2048, dtype=torch.uint8, device=device), diagonal=1)
        if rows == 3072:
            block = torch.zeros(1024, 2048, dtype=torch.uint8, device=device)
            block[:, 1024:] = 1
            tri = torch.cat([tri, block])
        _expected_cache[key] = tri
    return _expected_cache[key]


def _check_compressed(mask: Tensor, mode: int, name: str) -> None:
    """[fascore] the compressed masks' contents are checked (Ascend silently computes garbage)."""
    rows = 3072 if mode == 6 else 2048
    shape = list(mask.shape)
    if shape not in ([rows, 2048], [1, 1, rows, 2048]):
        make = "torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)" if rows == 2048 else \
            "the 3072-row prefix mask (docs/semantics.md §4)"
        raise invalid(f"{name} shape {shape} with sparse_mode={mode}: must be the compressed "
                      f"[{rows}, 2048] mask (or [1, 1, {rows}, 2048]), the same whatever Sq and Skv: {make}; "
                      "a full [Sq, Skv] mask goes with sparse_mode=0 or 1")
    stamp = (mask._version, mask.data_ptr(), mask.dtype, tuple(mask.stride()))
    seen = _compressed_seen.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == stamp:
        return  # this very tensor, unchanged since it was checked (in-place writes bump _version)
    m = mask.reshape(rows, 2048).to(torch.uint8)
    expected = _compressed_expected(rows, mask.device)
    if torch.equal(m, expected):
        if len(_compressed_seen) >= 64:
            _compressed_seen.pop(next(iter(_compressed_seen)))
        _compressed_seen[id(mask)] = (weakref.ref(mask), stamp)
    else:
        what = "triu(ones(2048, 2048), diagonal=1)" if rows == 2048 else \
            "triu(ones(2048, 2048), 1) over a [1024, 2048] block of 0 (left half) and 1 (right half)"
        raise invalid(f"{name} with sparse_mode={mode}: the compressed mask must equal {what}"
                      + _compressed_hint(m, expected, rows, name))


def _compressed_hint(m: Tensor, expected: Tensor, rows: int, name: str) -> str:
    """What a wrong compressed mask is, when it is a usual near miss."""
    tri = m[:2048]
    if torch.equal(m, 1 - expected):
        return (f" ({name} is its complement, a keep-mask with True = attend as in SDPA: fascore, like Ascend, "
                f"masks where True; pass ~{name} or "
                "torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1))")
    ones = torch.ones(2048, 2048, dtype=torch.uint8, device=m.device)
    if torch.equal(tri, torch.triu(ones, diagonal=0)):
        return " (it is triu(..., diagonal=0), which also masks the diagonal: use diagonal=1)"
    if torch.equal(tri, torch.tril(ones, diagonal=-1)):
        return f" (it is the transpose, tril(..., diagonal=-1): pass {name}.T)"
    if rows == 3072 and m.shape[0] == 3072 and torch.equal(tri, expected[:2048]):
        return " (the triangle is right; the [1024, 2048] block below it must be 0 in its left and 1 in its right half)"
    return ""


def _dtype_hint(mask: Tensor, name: str) -> str:
    """A float or integer atten_mask: what it probably means and what to pass (reads at most 4M values)."""
    if mask.dtype.is_complex:
        return ""
    flat = readable(mask, name).reshape(-1)[: 1 << 22]
    if mask.dtype.is_floating_point:
        if bool(((flat == 0) | (flat == 1)).all()):
            return (f" (a 0/1 float mask: if 1 means masked out pass {name}.bool(); if 1 means keep "
                    f"(SDPA's polarity) pass {name} == 0; fascore, like Ascend, masks where True)")
        if bool(((flat == 0) | (flat <= torch.finfo(mask.dtype).min / 2)).all()):  # -inf or dtype.min
            return (f" (an additive 0/-inf mask, as SDPA's float attn_mask: pass {name} != 0, True = masked out; "
                    "a general additive bias goes in pse with pse_type=0 of npu_fusion_attention_v2)")
        return (" (a float tensor that is not a 0/1 or 0/-inf mask looks like an additive bias: pass it as pse "
                "with pse_type=0 of npu_fusion_attention_v2, and atten_mask as bool)")
    return f" (an integer mask: pass {name}.bool() or {name}.to(torch.uint8); nonzero = masked out)"


def _shape_hint(shape: list[int], full: list[list[int]], b: int, sq: int, skv: int, name: str, mode_name: str) -> str:
    """A full-mask shape that is one step from an accepted one."""
    if shape in ([2048, 2048], [1, 1, 2048, 2048], [3072, 2048], [1, 1, 3072, 2048]):
        return (f" ({shape[-2]} x 2048 is a compressed mask: those go with {mode_name}=2, 3 or 4 "
                "(6 for the 3072-row prefix mask); modes 0, 1 and 5 read a full [Sq, Skv] mask)")
    if shape == [b, sq, skv]:
        return f" (add the head axis: {name}.unsqueeze(1) -> [B, 1, Sq, Skv])"
    if shape in ([b, 1, 1, skv], [b, skv]):
        return (f" (a key-padding mask: broadcast it over the query rows, "
                f"{name}.reshape({b}, 1, 1, {skv}).expand({b}, 1, {sq}, {skv}))")
    if shape == [skv, sq] and sq != skv:
        return f" (transposed: pass {name}.T, rows are queries and columns keys)"
    if len(shape) == 4 and shape[-2:] == [sq, skv] and [shape[0], 1, sq, skv] in full:
        return f" (one mask for all heads: {name}[:, :1], or one per head [B, N1, Sq, Skv])"
    if len(shape) == 2 and shape == [sq, skv] and [b, 1, sq, skv] in full:
        return f" (expand it over the batch: {name}.expand({b}, 1, {sq}, {skv}))"
    return ""


def _band_rule(pre: int, nxt: int, shift: int, sq: int, skv: int, what: str, names: Names) -> None:
    """semantics §4 band rules on the top-left equivalents pre' = pre - shift, next' = next + shift."""
    p_, n_ = pre - shift, nxt + shift
    p, n = names["pre_tokens"], names["next_tokens"]
    got = f"{what}: {p}={pre} and {n}={nxt}" + (f" (top-left pre'={p_}, next'={n_})" if shift else "")
    if p_ < 0 and n_ < 0:
        raise invalid(f"{got} leave the band empty (not both may be negative)")
    if p_ < 0 and (n_ < -p_ or -p_ >= skv):
        raise invalid(f"{got} leave the band empty (with pre' < 0, next' must be >= |pre'| and |pre'| < Skv={skv})")
    if n_ < 0 and (p_ < -n_ or -n_ >= sq):
        raise invalid(f"{got} leave the band empty (with next' < 0, pre' must be >= |next'| and |next'| < Sq={sq})")


def _mask_tensor(g: Geometry, vl: Varlen, sc: Scalars, atten_mask: Any, nm: Names) -> Tensor | None:
    mode = sc.mode
    if atten_mask is None:
        global _warned_no_mask
        if mode != 0 and not _warned_no_mask:
            _warned_no_mask = True
            warn_user(f"{nm['sparse_mode']}={mode} without {nm['atten_mask']}: nothing is masked "
                      "(Ascend's rule: sparse_mode, pre/next tokens need a mask)")
        return None
    mask = as_tensor(atten_mask, nm["atten_mask"], g.device)
    if mask.dtype not in (torch.bool, torch.uint8):
        raise invalid(f"{nm['atten_mask']} dtype {mask.dtype}: must be bool or uint8"
                      + _dtype_hint(mask, nm["atten_mask"]))
    shape, sq, skv, b = list(mask.shape), g.sq, g.skv, vl.b
    if mode in COMPRESSED_MODES:
        _check_compressed(mask, mode, nm["atten_mask"])
    elif g.layout == "TND":
        if shape not in ([vl.max_sq, vl.max_skv], [sq, skv]):
            raise invalid(f"{nm['atten_mask']} shape {shape} with layout TND: must be [maxSq, maxSkv]="
                          f"{[vl.max_sq, vl.max_skv]} or [T1, T2]={[sq, skv]}"
                          + (" (only these 2-D forms: squeeze the leading unit dimensions)"
                             if len(shape) > 2 and shape[-2:] in ([vl.max_sq, vl.max_skv], [sq, skv])
                             and all(x == 1 for x in shape[:-2]) else ""))
    else:
        full = [[sq, skv], [1, 1, sq, skv], [b, 1, sq, skv], [b, g.n1, sq, skv]]
        if mode == 5 and b > 1:
            full = [[b, 1, sq, skv], [b, g.n1, sq, skv]]
        if shape not in full:
            raise invalid(f"{nm['atten_mask']} shape {shape} with {nm['sparse_mode']}={mode}: must be one of {full}"
                          + _shape_hint(shape, full, b, sq, skv, nm["atten_mask"], nm["sparse_mode"]))
    return mask


def _band_rules(vl: Varlen, sc: Scalars, nm: Names) -> None:
    """Where a band is in effect (with a mask): mode 0, mode 4, and the band batch of 7 / 8."""
    mode, pre, nxt = sc.mode, sc.pre, sc.nxt
    if mode == 0:
        for gq, gk in vl.geoms:
            _band_rule(pre, nxt, 0, gq, gk, f"{nm['sparse_mode']}=0", nm)
    elif mode == 4:
        for gq, gk in vl.geoms:
            _band_rule(pre, nxt, gk - gq, gq, gk, f"{nm['sparse_mode']}=4", nm)
    elif mode in (7, 8) and vl.live:
        bb = vl.live[-1] if mode == 7 else vl.live[0]
        _band_rule(pre, nxt, bb.skv - bb.sq, bb.sq, bb.skv, f"{nm['sparse_mode']}={mode} (band batch {bb.index})", nm)


def _prefix(g: Geometry, vl: Varlen, sc: Scalars, prefix: Any, nm: Names) -> list[int]:
    """Modes 5 / 6: one prefix per batch, each in semantics §4's range."""
    mode, b = sc.mode, vl.b
    if prefix is None:
        raise invalid(f"{nm['prefix']}=None: required with {nm['sparse_mode']}={mode}: one prefix length per batch "
                      f"(B={b}), e.g. {nm['prefix']}=[P] * {b}")
    values = as_int_list(prefix, nm["prefix"])
    if b > MAX_B_VARLEN:
        raise invalid(f"{nm['query']} batch B={b}: with {nm['prefix']} B must be <= {MAX_B_VARLEN}")
    if len(values) != b:
        raise invalid(f"{nm['prefix']} has {len(values)} entries: must have one per batch (B={b})")
    for k, p in enumerate(values):
        if g.layout == "TND" and k >= len(vl.batches):
            continue  # a padded batch
        gq, gk = (vl.batches[k].sq, vl.batches[k].skv) if g.layout == "TND" else (g.sq, g.skv)
        lo = max(0, gk - gq) if mode == 6 else 0
        if not lo <= p <= gk:
            raise invalid(f"{nm['prefix']}[{k}]={p}: with {nm['sparse_mode']}={mode} it must be in [{lo}, {gk}]")
    return values


def masking(g: Geometry, vl: Varlen, sc: Scalars, atten_mask: Any, prefix: Any, nm: Names) -> Masking:
    mask = _mask_tensor(g, vl, sc, atten_mask, nm)
    if mask is None:
        return Masking(None, None)
    if sc.mode in (0, 4, 7, 8):
        _band_rules(vl, sc, nm)
    return Masking(mask, _prefix(g, vl, sc, prefix, nm) if sc.mode in (5, 6) else None)


def mask_spec(mk: Masking, sc: Scalars, gq: int, gk: int, mode: int, explicit: Tensor | None,
              prefix: tuple[int, ...] | None) -> MaskSpec:
    """Every sparse mode as one rule (lo <= j - i <= hi or j < prefix) and not explicit."""
    if mk.mask is None:
        return MaskSpec(gq, gk)
    dd = gk - gq
    if mode == 0:
        return MaskSpec(gq, gk, -sc.pre, sc.nxt, explicit=explicit)
    if mode == 1:
        return MaskSpec(gq, gk, explicit=explicit)
    if mode == 2:
        return MaskSpec(gq, gk, hi=0)
    if mode == 3:
        return MaskSpec(gq, gk, hi=dd)
    if mode == 4:
        return MaskSpec(gq, gk, dd - sc.pre, dd + sc.nxt)
    return MaskSpec(gq, gk, hi=dd, prefix=prefix, explicit=explicit if mode == 5 else None)
