"""semantics §3: the position bias (pse tensors of types 0/1, ALiBi slopes of types 2/3, start indices)
and the sink, and the bias form (``fascore.canonical.bias``) each segment reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..canonical.bias import AlibiPse, CompressedPse, DensePse, Pse
from ..errors import invalid
from ..limits import INT32_MAX, INT32_MIN
from ..params import Names
from .masks import Masking
from .scalars import Scalars
from .tensors import Geometry
from .tnd import Varlen
from .values import as_int, as_int_list, as_tensor, short

__all__ = ["Bias", "bias", "pse_for"]

_CAUSAL_HINT = "a causal pattern ({} 2/3 with a mask, or 0 with a mask, pre >= Sq, next == 0)"


@dataclass(frozen=True)
class Bias:
    pse: Tensor | None  # types 0 / 1
    slopes: Tensor | None  # types 2 / 3
    qs: int
    ks: int
    sink: Tensor | None


def _pse_shape_hint(shape: list[int], b: int, n1: int, sq: int, skv: int, sc: Scalars, nm: Names) -> str:
    p = nm["pse"]
    if shape in ([n1], [b, n1]) and sc.pse_type in (0, 1):
        return (f" (a [{', '.join(map(str, shape))}] pse looks like ALiBi slopes: pass {nm['pse_type']}=2 or 3 "
                "with npu_fusion_attention_v2)")
    if shape == [sq, skv]:
        return f" (one bias for every batch and head: {p}[None, None].expand(1, {n1}, {sq}, {skv}))"
    if shape == [n1, sq, skv]:
        return f" (add the batch axis: {p}.unsqueeze(0))"
    if len(shape) == 4 and shape[1] == 1 and shape[2:] in ([sq, skv], [1, skv]) and shape[0] in (1, b):
        return f" (one bias for all heads: {p}.expand({shape[0]}, {n1}, {shape[2]}, {skv}))"
    if len(shape) == 4 and shape[:2] in ([b, n1], [1, n1]) and shape[2:] == [skv, sq] and sq != skv:
        return f" (transposed: rows are queries, columns keys: {p}.transpose(-1, -2))"
    return ""


def _pse_tensor(g: Geometry, vl: Varlen, sc: Scalars, mk: Masking, pse: Any, nm: Names) -> Tensor:
    t = as_tensor(pse, nm["pse"], g.device)
    if t.dtype != g.dtype:
        raise invalid(f"{nm['pse']} dtype {t.dtype}: must equal {nm['query']} dtype {g.dtype} "
                      f"(e.g. {nm['pse']}.to({g.dtype}))")
    shape, b, n1, sq, skv = list(t.shape), vl.b, g.n1, g.sq, g.skv
    causal = mk.mask is not None and (sc.mode in (2, 3) or (sc.mode == 0 and sc.pre >= vl.max_sq and sc.nxt == 0))
    hint = _CAUSAL_HINT.format(nm["sparse_mode"])
    if g.layout == "TND":
        if t.dim() != 4 or shape[0] not in (1, b) or shape[1:] != [n1, 1024, vl.max_skv]:
            raise invalid(f"{nm['pse']} shape {shape} with layout TND: must be the compressed "
                          f"[B or 1, N1, 1024, maxSkv] = [{b} or 1, {n1}, 1024, {vl.max_skv}]")
        if not causal or any(x.sq != x.skv for x in vl.live):
            raise invalid(f"{nm['pse']} with layout TND needs Sq_b == Skv_b for every batch and {hint}")
        return t
    full = [[b, n1, sq, skv], [1, n1, sq, skv], [b, n1, 1, skv], [1, n1, 1, skv]]
    compressed = sq > 1024 and t.dim() == 4 and shape[0] in (1, b) and shape[1:] == [n1, 1024, skv]
    if compressed:
        if sq != skv or not causal:
            raise invalid(f"{nm['pse']} shape {shape} is the ALiBi-compressed form: it needs Sq == Skv "
                          f"(got {sq}, {skv}) and {hint}")
    elif shape not in full:
        raise invalid(f"{nm['pse']} shape {shape}: must be one of {full}"
                      + (" or the compressed [B or 1, N1, 1024, Skv]" if sq > 1024 else "")
                      + _pse_shape_hint(shape, b, n1, sq, skv, sc, nm))
    return t


def _slopes(g: Geometry, vl: Varlen, sc: Scalars, pse: Any, nm: Names) -> Tensor:
    ptype = sc.pse_type
    if pse is None:
        raise invalid(f"{nm['pse']}=None: {nm['pse_type']}={ptype} needs ALiBi slopes")
    slopes = as_tensor(pse, nm["pse"], g.device)
    if slopes.dtype != torch.float32 or list(slopes.shape) not in ([vl.b, g.n1], [g.n1]):
        hint = ""
        if slopes.dtype != torch.float32 and list(slopes.shape) in ([vl.b, g.n1], [g.n1]):
            hint = f" (e.g. {nm['pse']}.float(), whatever the query dtype)"
        elif slopes.dim() == 4:
            hint = f" (a 4-D pse is a bias tensor: that is {nm['pse_type']}=0 or 1)"
        raise invalid(f"{nm['pse']} {short(slopes)} with {nm['pse_type']}={ptype}: slopes must be float32 "
                      f"[B, N1]={[vl.b, g.n1]} or [N1]={[g.n1]}" + hint)
    if any(gq != gk for gq, gk in vl.geoms):
        raise invalid(f"{nm['pse_type']}={ptype} (in-kernel ALiBi) needs Sq == Skv"
                      + (" in every batch" if g.layout == "TND" else f", got {g.sq} and {g.skv}")
                      + ("" if g.layout == "TND" else
                         f"; for Sq != Skv pass the bias itself as a [B, N1, Sq, Skv] pse with {nm['pse_type']}=0 "
                         "(fascore.attention(alibi_slopes=...) builds it)"))
    return slopes


def _starts(q_start_idx: Any, kv_start_idx: Any, nm: Names) -> tuple[int, int]:
    starts = []
    for n_, v_ in (("q_start_idx", q_start_idx), ("kv_start_idx", kv_start_idx)):
        lst = [0] if v_ is None else as_int_list(v_, nm[n_])
        if not lst:
            raise invalid(f"{nm[n_]}=[]: give at least one start index or None")
        starts.append(as_int(lst[0], nm[n_], INT32_MIN, INT32_MAX))
    return starts[0], starts[1]


def _mode8_alibi_rule(vl: Varlen, sc: Scalars, qs: int, ks: int, nm: Names) -> None:
    """Mode 8 with in-kernel ALiBi: actual_seq_qlen[0] - actual_seq_kvlen[0] + qs - ks == 0."""
    cq, ck = vl.cum_q[0], vl.cum_kv[0]
    if cq - ck + qs - ks != 0:
        raise invalid(f"{nm['sparse_mode']}=8 with {nm['pse_type']}={sc.pse_type}: {nm['actual_seq_qlen']}[0] - "
                      f"{nm['actual_seq_kvlen']}[0] + {nm['q_start_idx']}[0] - {nm['kv_start_idx']}[0] = "
                      f"{cq} - {ck} + {qs} - {ks} = {cq - ck + qs - ks}: must be 0 "
                      "(the first batch's ALiBi diagonal must be the main one)")


def bias(g: Geometry, vl: Varlen, sc: Scalars, mk: Masking, pse: Any, q_start_idx: Any, kv_start_idx: Any,
         sink: Any, nm: Names) -> Bias:
    pse_t = _pse_tensor(g, vl, sc, mk, pse, nm) if sc.pse_type in (0, 1) and pse is not None else None
    slopes = _slopes(g, vl, sc, pse, nm) if sc.pse_type in (2, 3) else None
    qs, ks = _starts(q_start_idx, kv_start_idx, nm)
    if slopes is not None and g.layout == "TND" and sc.mode == 8:
        _mode8_alibi_rule(vl, sc, qs, ks, nm)
    if sink is not None:
        sink = as_tensor(sink, nm["sink"], g.device)
        if sink.dtype != torch.float32 or list(sink.shape) != [g.n1]:
            raise invalid(f"{nm['sink']} {short(sink)}: must be float32 of shape [N1]=[{g.n1}]"
                          + (f" (e.g. {nm['sink']}.float())" if list(sink.shape) == [g.n1] else ""))
    return Bias(pse_t, slopes, qs, ks, sink)


def pse_for(bi: Bias, g: Geometry, sc: Scalars, bsel: slice, gq: int, batch_idx: int) -> Pse | None:
    """The bias form of one segment (batches ``bsel`` of the pse / slopes)."""
    if bi.pse is not None:
        t = bi.pse[bsel] if bi.pse.shape[0] > 1 else bi.pse
        if g.layout == "TND":
            return CompressedPse(t, sc.pse_type == 1, gq, tnd=True)
        if bi.pse.shape[2] == 1024 and g.sq > 1024:
            return CompressedPse(t, sc.pse_type == 1, gq, tnd=False)
        return DensePse(t, sc.pse_type == 1)
    if bi.slopes is not None:
        s = bi.slopes.view(-1, g.n1)
        s = s[bsel] if s.shape[0] > 1 else s
        first_only = g.layout == "TND" and sc.mode == 8 and batch_idx >= 1  # later batches start at 0
        return AlibiPse(s, 0 if first_only else bi.qs, 0 if first_only else bi.ks, sc.pse_type == 3)
    return None
