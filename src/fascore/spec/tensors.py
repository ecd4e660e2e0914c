"""semantics §2 and §8: query/key/value, the layout, head counts, head dims and the rope tensors.

``geometry`` reads B, Sq, Skv, N1, N2, D, Dv (and rope's Dr) from the shapes of one call and
checks every shape, dtype and limit rule on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..canonical.layouts import LAYOUTS
from ..errors import invalid, nullptr
from ..limits import DTYPES, MAX_B, MAX_D, MAX_N, MAX_S
from ..params import Names
from .values import as_int, as_tensor, readable, short

__all__ = ["Geometry", "geometry", "layout_hint", "LAYOUT_ALIASES"]


@dataclass(frozen=True)
class Geometry:
    query: Tensor
    key: Tensor
    value: Tensor
    layout: str
    b: int  # batches (TND: 1; the batch list comes from actual_seq_*len)
    sq: int  # TND: T1
    skv: int  # TND: T2
    n1: int
    n2: int
    d: int
    dv: int
    query_rope: Tensor | None = None
    key_rope: Tensor | None = None
    dr: int = 0

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def rank(self) -> int:
        return 3 if self.layout in ("BSH", "SBH", "TND") else 4


def _qkv(query: Any, key: Any, value: Any, nm: Names) -> None:
    for n_, t in (("query", query), ("key", key), ("value", value)):
        if t is None:
            raise nullptr(nm[n_])
        if not isinstance(t, Tensor):
            raise invalid(f"{nm[n_]}={short(t)}: must be a torch.Tensor")
    readable(query, nm["query"])
    for n_, t in (("key", key), ("value", value)):
        as_tensor(t, nm[n_], query.device)
    if query.dtype not in DTYPES:
        raise invalid(f"{nm['query']} dtype {query.dtype}: must be one of float16, bfloat16, float32, float64"
                      + (f" (e.g. {nm['query']}.float())" if not query.dtype.is_floating_point else ""))
    for n_, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise invalid(f"{nm[n_]} dtype {t.dtype} differs from {nm['query']} dtype {query.dtype}: they must match "
                          f"(e.g. {nm[n_]}.to({query.dtype}))")


# Other libraries' names of the same layouts (flash-attn, SDPA, xformers write H for heads, L for
# the sequence; Ascend writes N for heads and H for the folded hidden size N*D).
LAYOUT_ALIASES = {
    "BHSD": ("BNSD", "SDPA's [B, H, S, D] is Ascend's BNSD: N is the head axis"),
    "BHLD": ("BNSD", "[B, H, L, D] is Ascend's BNSD: N is the head axis, S the sequence"),
    "BNLD": ("BNSD", "[B, N, L, D] is Ascend's BNSD: S is the sequence"),
    "BSHD": ("BSND", "flash-attn's [B, S, H, D] is Ascend's BSND: N is the head axis (H is the folded N*D)"),
    "BLHD": ("BSND", "[B, L, H, D] is Ascend's BSND: N is the head axis, S the sequence"),
    "BLND": ("BSND", "[B, L, N, D] is Ascend's BSND: S is the sequence"),
    "NHD": ("TND", "packed varlen tokens [total, H, D] are Ascend's TND"),
    "THD": ("TND", "flash-attn varlen's [total_tokens, H, D] is Ascend's TND: N is the head axis"),
    "TNHD": ("TND", "packed varlen tokens [total, H, D] are Ascend's TND"),
    "SBHD": ("SBH", "there is no 4-D sequence-first layout: fold the heads, x.flatten(2) -> [S, B, N*D]"),
    "SBND": ("SBH", "there is no 4-D sequence-first layout: fold the heads, x.flatten(2) -> [S, B, N*D]"),
    "BSE": ("BSH", "[B, S, hidden] is Ascend's BSH: H is the folded hidden size N*D"),
    "BLH": ("BSH", "[B, L, hidden] is Ascend's BSH: S is the sequence"),
    "SBE": ("SBH", "[S, B, hidden] is Ascend's SBH: H is the folded hidden size N*D"),
}


def layout_hint(layout: Any) -> str:
    """'; did you mean ...' for a layout another library spells differently, else ''."""
    if not isinstance(layout, str):
        return ""
    key = "".join(ch for ch in layout.upper() if ch.isalpha())
    if key in LAYOUTS and key != layout.upper():
        return f"; did you mean {key!r}?"
    if key in LAYOUT_ALIASES:
        to, why = LAYOUT_ALIASES[key]
        return f"; did you mean {to!r}? ({why})"
    return ""


def _layout(input_layout: Any, allow_tnd: bool, nm: Names) -> str:
    if not isinstance(input_layout, str) or input_layout.upper() not in LAYOUTS:
        raise invalid(f"{nm['input_layout']}={short(input_layout)}: must be one of {', '.join(LAYOUTS)}"
                      + layout_hint(input_layout))
    layout = input_layout.upper()
    if layout == "TND" and not allow_tnd:
        raise invalid(f"{nm['input_layout']}='TND': this entry point takes only BSH, SBH, BSND, BNSD")
    return layout


def _rank_hint(dim: int, nm: Names) -> str:
    if dim == 4:
        return f" (a 4-D tensor is {nm['input_layout']}='BSND' [B, S, N, D] or 'BNSD' [B, N, S, D])"
    if dim == 3:
        return f" (a 3-D tensor is {nm['input_layout']}='BSH' [B, S, N*D], 'SBH' [S, B, N*D] or 'TND' [T, N, D])"
    if dim == 2:
        return " (a 2-D tensor has no batch or head axis: e.g. x[None] for BSH with one batch)"
    return ""


def _ranks(query: Tensor, key: Tensor, value: Tensor, layout: str, nm: Names) -> None:
    rank = 3 if layout in ("BSH", "SBH", "TND") else 4
    for n_, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != rank:
            raise invalid(f"{nm[n_]} shape {list(t.shape)}: layout {layout} needs a {rank}-D tensor"
                          + _rank_hint(t.dim(), nm))
        if t.numel() == 0:
            raise invalid(f"{nm[n_]} shape {list(t.shape)}: zero-size dimensions are not allowed")
    if list(key.shape[:-1]) != list(value.shape[:-1]):
        raise invalid(f"{nm['key']} shape {list(key.shape)} and {nm['value']} shape {list(value.shape)} "
                      "must agree in every dimension but the last")


def _kv_heads_hint(hq: int, hk: int, head_num: int, nm: Names) -> str:
    """BSH / SBH: the head count passed may be the key/value one."""
    if hk % head_num == 0 and hq % (hk // head_num) == 0 and hq // (hk // head_num) > head_num:
        n1 = hq // (hk // head_num)
        return (f"; if {head_num} is the key/value head count N2, pass the query head count: "
                f"{nm['head_num']}={n1} (D={hk // head_num})")
    return ""


def _hidden_heads(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str,
                  nm: Names) -> tuple[int, ...]:
    """(b, sq, skv, bk, n1, n2, d, dv) of BSH / SBH, where heads are folded into H."""
    hq, hk, hv = query.shape[2], key.shape[2], value.shape[2]
    if hq % head_num:
        raise invalid(f"{nm['head_num']}={head_num}: must divide {nm['query']}'s hidden size H={hq} "
                      f"({nm['head_num']} is the number of query heads N1; the head dim is D = H / N1)")
    n1, d = head_num, hq // head_num
    if hk % d:
        raise invalid(f"{nm['key']} hidden size {hk} is not a multiple of the head dim D={d} "
                      f"(= {nm['query']}'s H={hq} / {nm['head_num']}={head_num})" + _kv_heads_hint(hq, hk, head_num, nm))
    n2 = hk // d
    if hv % n2:
        raise invalid(f"{nm['value']} hidden size {hv} is not a multiple of N2={n2} kv heads")
    bi, si = (0, 1) if layout == "BSH" else (1, 0)
    return query.shape[bi], query.shape[si], key.shape[si], key.shape[bi], n1, n2, d, hv // n2


def _head_axis_hint(query: Tensor, key: Tensor, head_num: int, layout: str, nm: Names) -> str:
    ni = {"BSND": 2, "BNSD": 1, "TND": 1}[layout]
    if head_num == key.shape[ni] and key.shape[ni] != query.shape[ni]:
        return (f" ({head_num} is {nm['key']}'s head count N2: {nm['head_num']} is the query head count, "
                f"{nm['head_num']}={query.shape[ni]})")
    other = {"BSND": ("BNSD", 1), "BNSD": ("BSND", 2)}.get(layout)
    if other is not None and query.shape[other[1]] == head_num:
        return (f" ({nm['query']} shape {list(query.shape)} looks like {other[0]}: pass "
                f"{nm['input_layout']}={other[0]!r}, or permute it, e.g. x.transpose(1, 2))")
    return f" ({nm['head_num']} is the number of query heads, {nm['query']}.shape[{ni}] for {layout})"


def _head_axis(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str,
               nm: Names) -> tuple[int, ...]:
    """(b, sq, skv, bk, n1, n2, d, dv) of BSND / BNSD / TND, where heads have their own axis."""
    ni = {"BSND": 2, "BNSD": 1, "TND": 1}[layout]
    n1, n2 = query.shape[ni], key.shape[ni]
    if head_num != n1:
        raise invalid(f"{nm['head_num']}={head_num}: must equal {nm['query']}'s N axis ({n1}) for layout {layout}"
                      + _head_axis_hint(query, key, head_num, layout, nm))
    d, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != d:
        raise invalid(f"{nm['key']} head dim {key.shape[-1]} differs from {nm['query']} head dim {d}: "
                      "qD == kD is required")
    if layout == "TND":
        return 1, query.shape[0], key.shape[0], 1, n1, n2, d, dv
    si = 1 if layout == "BSND" else 2
    return query.shape[0], query.shape[si], key.shape[si], key.shape[0], n1, n2, d, dv


def _limits(b: int, sq: int, skv: int, bk: int, n1: int, n2: int, d: int, dv: int, nm: Names) -> None:
    if b != bk:
        raise invalid(f"{nm['key']} batch {bk} differs from {nm['query']} batch {b}: batch sizes must agree")
    if n1 % n2:
        raise invalid(f"{nm['head_num']}={n1}: query heads must be a multiple of the {n2} key/value heads"
                      + (f" (key/value have more heads than query: were {nm['query']} and {nm['key']} swapped?)"
                         if n2 > n1 and n2 % n1 == 0 else ""))
    if dv > d:
        raise invalid(f"{nm['value']} head dim Dv={dv} exceeds key head dim D={d}: kD >= vD is required")
    if not 1 <= n1 <= MAX_N:
        raise invalid(f"{nm['head_num']}={n1}: N1 must be in [1, {MAX_N}]")
    if d > MAX_D or dv > MAX_D:
        raise invalid(f"{nm['query']} head dim D={d}, {nm['value']} head dim Dv={dv}: must be in [1, {MAX_D}]")
    if b > MAX_B:
        raise invalid(f"{nm['query']} batch B={b}: must be in [1, {MAX_B}]")
    if sq > MAX_S or skv > MAX_S:
        raise invalid(f"{nm['query']} sequence {sq} / {nm['key']} sequence {skv}: must be in [1, {MAX_S}]")


def _rope(g: Geometry, query_rope: Any, key_rope: Any, nm: Names) -> Geometry:
    """semantics §3: both or neither; query's / key's layout and dtype with their own last dim."""
    if (query_rope is None) != (key_rope is None):
        raise invalid(f"{nm['query_rope']}/{nm['key_rope']}: give both or neither")
    if query_rope is None:
        return g
    for n_, t, ref, nh in (("query_rope", query_rope, g.query, g.n1), ("key_rope", key_rope, g.key, g.n2)):
        t = as_tensor(t, nm[n_], g.device)
        if t.dtype != g.dtype:
            raise invalid(f"{nm[n_]} dtype {t.dtype}: must be {nm['query']}'s dtype {g.dtype}")
        if t.dim() != g.rank or list(t.shape[:-1]) != list(ref.shape[:-1]) or t.shape[-1] == 0:
            raise invalid(f"{nm[n_]} shape {list(t.shape)}: must match {list(ref.shape[:-1])} but the last dimension")
        if g.layout in ("BSH", "SBH") and t.shape[-1] % nh:
            raise invalid(f"{nm[n_]} hidden size {t.shape[-1]} is not a multiple of its {nh} heads")
    folded = g.layout in ("BSH", "SBH")
    drq = query_rope.shape[-1] // (g.n1 if folded else 1)
    drk = key_rope.shape[-1] // (g.n2 if folded else 1)
    if drq != drk:
        raise invalid(f"{nm['query_rope']} head dim {drq} differs from {nm['key_rope']} head dim {drk}")
    return Geometry(g.query, g.key, g.value, g.layout, g.b, g.sq, g.skv, g.n1, g.n2, g.d, g.dv,
                    query_rope, key_rope, drq)


def geometry(query: Any, key: Any, value: Any, head_num: Any, input_layout: Any, query_rope: Any,
             key_rope: Any, nm: Names, allow_tnd: bool = True) -> Geometry:
    """The call's tensors and shapes, every rule of semantics §2 on them checked."""
    _qkv(query, key, value, nm)
    layout = _layout(input_layout, allow_tnd, nm)
    heads = as_int(head_num, nm["head_num"])
    if heads < 1:
        raise invalid(f"{nm['head_num']}={heads}: must be >= 1")
    _ranks(query, key, value, layout, nm)
    read = _hidden_heads if layout in ("BSH", "SBH") else _head_axis
    b, sq, skv, bk, n1, n2, d, dv = read(query, key, value, heads, layout, nm)
    _limits(b, sq, skv, bk, n1, n2, d, dv, nm)
    return _rope(Geometry(query, key, value, layout, b, sq, skv, n1, n2, d, dv), query_rope, key_rope, nm)
