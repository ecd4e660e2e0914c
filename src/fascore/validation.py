"""Every rule of SPEC §§2-9, and the construction of the canonical ``Problem``.

``build_problem`` checks the arguments of one forward or backward call and turns them into
segments of uniform geometry (see ``problem.py``). Each broken rule raises
``FlashAttentionError`` naming the parameter (as the caller spelled it), the value and the rule.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Mapping

import torch
from torch import Tensor

from .dropout import Dropout, pad16
from .errors import invalid, nullptr
from .generator import default_generator
from .layouts import LAYOUTS, Batch, tnd_batches, tnd_rows, to_bnsd
from .masks import MaskSpec
from .problem import Problem, Segment
from .pse import AlibiPse, CompressedPse, DensePse, Pse

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_B, MAX_B_VARLEN, MAX_N, MAX_S, MAX_D = 2 * 1024 * 1024, 2048, 256, 1024 * 1024, 768
COMPRESSED_MODES = (2, 3, 4, 6, 7, 8)
_warned_no_mask = False


class Names:
    """Maps internal parameter names to the caller's spelling (v1 ``pre_tockens``, aclnn ...)."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self._o = dict(overrides or {})

    def __getitem__(self, key: str) -> str:
        return self._o.get(key, key)


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _readable(value: Tensor, name: str) -> Tensor:
    """A tensor whose data can be read: strided (dense) and not on the data-less meta device."""
    if value.layout != torch.strided:
        raise invalid(f"{name} has layout {value.layout}: must be a dense (strided) tensor")
    if value.device.type == "meta":
        raise invalid(f"{name} is on the meta device: tensors must hold data (cpu or cuda)")
    return value


def _int(value: Any, name: str, lo: int | None = None, hi: int | None = None, any_size: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                and not value.dtype.is_complex and value.dtype != torch.bool:
            value = int(_readable(value, name).item())
        else:
            raise invalid(f"{name}={_short(value)}: must be an integer")
    if not any_size and not -(2**64) < value < 2**64:  # (and too long to print)
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(f"{name}={value}: must be in [{lo}, {hi}]")
    return value


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name}={_short(value)}: must be a real number")
    try:
        return float(value)
    except OverflowError:
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range") from None


def _int_list(value: Any, name: str) -> list[int]:
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise invalid(f"{name}={_short(value)}: must be a 1-D integer tensor or a list of ints")
        return [int(x) for x in _readable(value, name).tolist()]
    if not isinstance(value, (list, tuple)):
        raise invalid(f"{name}={_short(value)}: must be a list of ints")
    return [_int(x, name) for x in value]


def _tensor(value: Any, name: str, device: torch.device) -> Tensor:
    if not isinstance(value, Tensor):
        raise invalid(f"{name}={_short(value)}: must be a torch.Tensor")
    if value.device != device:
        raise invalid(f"{name} is on {value.device} but query is on {device}: all tensors must share one device")
    return _readable(value, name)


def _band_rule(pre: int, nxt: int, shift: int, sq: int, skv: int, what: str, names: Names) -> None:
    """SPEC §4 band rules on the top-left equivalents pre' = pre - shift, next' = next + shift."""
    p_, n_ = pre - shift, nxt + shift
    p, n = names["pre_tokens"], names["next_tokens"]
    got = f"{what}: {p}={pre} and {n}={nxt}" + (f" (top-left pre'={p_}, next'={n_})" if shift else "")
    if p_ < 0 and n_ < 0:
        raise invalid(f"{got} leave the band empty (not both may be negative)")
    if p_ < 0 and (n_ < -p_ or -p_ >= skv):
        raise invalid(f"{got} leave the band empty (with pre' < 0, next' must be >= |pre'| and |pre'| < Skv={skv})")
    if n_ < 0 and (p_ < -n_ or -n_ >= sq):
        raise invalid(f"{got} leave the band empty (with next' < 0, pre' must be >= |next'| and |next'| < Sq={sq})")


_expected_cache: dict[tuple[int, str], Tensor] = {}
_compressed_seen: dict[int, tuple[weakref.ref, tuple]] = {}  # id -> (tensor, stamp) of masks checked


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
    rows = 3072 if mode == 6 else 2048
    shape = list(mask.shape)
    if shape not in ([rows, 2048], [1, 1, rows, 2048]):
        raise invalid(f"{name} shape {shape} with sparse_mode={mode}: must be the compressed "
                      f"[{rows}, 2048] mask (or [1, 1, {rows}, 2048])")
    stamp = (mask._version, mask.data_ptr(), mask.dtype, tuple(mask.stride()))
    seen = _compressed_seen.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == stamp:
        return  # this very tensor, unchanged since it was checked (in-place writes bump _version)
    m = mask.reshape(rows, 2048).to(torch.uint8)
    if torch.equal(m, _compressed_expected(rows, mask.device)):
        if len(_compressed_seen) >= 64:
            _compressed_seen.pop(next(iter(_compressed_seen)))
        _compressed_seen[id(mask)] = (weakref.ref(mask), stamp)
    else:
        what = "triu(ones(2048, 2048), diagonal=1)" if rows == 2048 else \
            "triu(ones(2048, 2048), 1) over a [1024, 2048] block of 0 (left half) and 1 (right half)"
        raise invalid(f"{name} with sparse_mode={mode}: the compressed mask must equal {what}")


def _seq_lens(value: Any, name: str, total: int, tname: str) -> list[int]:
    """Cumulative lengths with trailing-zero padding stripped; checks SPEC §2's TND rules."""
    cum = _int_list(value, name)
    if not 1 <= len(cum) <= MAX_B_VARLEN:
        raise invalid(f"{name} has {len(cum)} entries: the batch count must be in [1, {MAX_B_VARLEN}]")
    end = len(cum)
    while end > 0 and cum[end - 1] == 0 and any(x > 0 for x in cum[:end - 1]):
        end -= 1
    body = cum[:end]
    prev = 0
    for k, x in enumerate(body):
        if x < prev:
            raise invalid(f"{name}={_short(cum)}: cumulative lengths must not decrease "
                          f"(entry {k} is {x} after {prev}); only trailing zeros may pad")
        prev = x
    if body and body[-1] > total:
        raise invalid(f"{name}={_short(cum)}: the total {body[-1]} exceeds {tname}={total}")
    return cum[:end] + [-1] * (len(cum) - end)  # -1 marks padding


def build_problem(
    query: Any, key: Any, value: Any, head_num: Any, input_layout: Any, *,
    pse: Any = None, padding_mask: Any = None, atten_mask: Any = None,
    query_rope: Any = None, key_rope: Any = None, scale: Any = 1.0, keep_prob: Any = 1.0,
    pre_tokens: Any = INT32_MAX, next_tokens: Any = INT32_MAX, inner_precise: Any = 0,
    prefix: Any = None, actual_seq_qlen: Any = None, actual_seq_kvlen: Any = None,
    sparse_mode: Any = 0, pse_type: Any = 1, q_start_idx: Any = None, kv_start_idx: Any = None,
    softmax_layout: Any = "", sink: Any = None, dropout_mask: Any = None, seed: Any = 0,
    offset: Any = 0, draw_missing_seed: bool = True, names: Names | None = None,
    allow_tnd: bool = True,
) -> Problem:
    """Validate one call's arguments and build its canonical problem."""
    nm = names or Names()
    for n_, t in (("query", query), ("key", key), ("value", value)):
        if t is None:
            raise nullptr(nm[n_])
        if not isinstance(t, Tensor):
            raise invalid(f"{nm[n_]}={_short(t)}: must be a torch.Tensor")
    device = query.device
    _readable(query, nm["query"])
    for n_, t in (("key", key), ("value", value)):
        _tensor(t, nm[n_], device)
    if query.dtype not in DTYPES:
        raise invalid(f"{nm['query']} dtype {query.dtype}: must be one of float16, bfloat16, float32, float64")
    for n_, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise invalid(f"{nm[n_]} dtype {t.dtype} differs from {nm['query']} dtype {query.dtype}: they must match")

    if not isinstance(input_layout, str) or input_layout.upper() not in LAYOUTS:
        raise invalid(f"{nm['input_layout']}={_short(input_layout)}: must be one of {', '.join(LAYOUTS)}")
    layout = input_layout.upper()
    if layout == "TND" and not allow_tnd:
        raise invalid(f"{nm['input_layout']}='TND': this entry point takes only BSH, SBH, BSND, BNSD")
    head_num = _int(head_num, nm["head_num"])
    if head_num < 1:
        raise invalid(f"{nm['head_num']}={head_num}: must be >= 1")

    rank = 3 if layout in ("BSH", "SBH", "TND") else 4
    for n_, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != rank:
            raise invalid(f"{nm[n_]} shape {list(t.shape)}: layout {layout} needs a {rank}-D tensor")
        if t.numel() == 0:
            raise invalid(f"{nm[n_]} shape {list(t.shape)}: zero-size dimensions are not allowed")
    if list(key.shape[:-1]) != list(value.shape[:-1]):
        raise invalid(f"{nm['key']} shape {list(key.shape)} and {nm['value']} shape {list(value.shape)} "
                      "must agree in every dimension but the last")

    # Geometry: B, Sq, Skv, N1, N2, D, Dv.
    if layout in ("BSH", "SBH"):
        hq, hk, hv = query.shape[2], key.shape[2], value.shape[2]
        if hq % head_num:
            raise invalid(f"{nm['head_num']}={head_num}: must divide {nm['query']}'s hidden size H={hq}")
        n1, d = head_num, hq // head_num
        if hk % d:
            raise invalid(f"{nm['key']} hidden size {hk} is not a multiple of the head dim D={d}")
        n2 = hk // d
        if hv % n2:
            raise invalid(f"{nm['value']} hidden size {hv} is not a multiple of N2={n2} kv heads")
        dv = hv // n2
        bi, si = (0, 1) if layout == "BSH" else (1, 0)
        b, sq, skv, bk = query.shape[bi], query.shape[si], key.shape[si], key.shape[bi]
    else:
        ni = {"BSND": 2, "BNSD": 1, "TND": 1}[layout]
        n1, n2 = query.shape[ni], key.shape[ni]
        if head_num != n1:
            raise invalid(f"{nm['head_num']}={head_num}: must equal {nm['query']}'s N axis ({n1}) for layout {layout}")
        d, dv = query.shape[-1], value.shape[-1]
        if key.shape[-1] != d:
            raise invalid(f"{nm['key']} head dim {key.shape[-1]} differs from {nm['query']} head dim {d}: qD == kD is required")
        if layout == "TND":
            b, sq, skv, bk = 1, query.shape[0], key.shape[0], 1
        else:
            si = 1 if layout == "BSND" else 2
            b, sq, skv, bk = query.shape[0], query.shape[si], key.shape[si], key.shape[0]
    if b != bk:
        raise invalid(f"{nm['key']} batch {bk} differs from {nm['query']} batch {b}: batch sizes must agree")
    if n1 % n2:
        raise invalid(f"{nm['head_num']}={n1}: query heads must be a multiple of the {n2} key/value heads")
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

    # Rope (v2): both or neither, query's layout and dtype with their own last dim.
    dr = 0
    if (query_rope is None) != (key_rope is None):
        raise invalid(f"{nm['query_rope']}/{nm['key_rope']}: give both or neither")
    if query_rope is not None:
        for n_, t, ref, nh in (("query_rope", query_rope, query, n1), ("key_rope", key_rope, key, n2)):
            t = _tensor(t, nm[n_], device)
            if t.dtype != query.dtype:
                raise invalid(f"{nm[n_]} dtype {t.dtype}: must be {nm['query']}'s dtype {query.dtype}")
            if t.dim() != rank or list(t.shape[:-1]) != list(ref.shape[:-1]) or t.shape[-1] == 0:
                raise invalid(f"{nm[n_]} shape {list(t.shape)}: must match {list(ref.shape[:-1])} but the last dimension")
            if layout in ("BSH", "SBH") and t.shape[-1] % nh:
                raise invalid(f"{nm[n_]} hidden size {t.shape[-1]} is not a multiple of its {nh} heads")
        drq = query_rope.shape[-1] // (n1 if layout in ("BSH", "SBH") else 1)
        drk = key_rope.shape[-1] // (n2 if layout in ("BSH", "SBH") else 1)
        if drq != drk:
            raise invalid(f"{nm['query_rope']} head dim {drq} differs from {nm['key_rope']} head dim {drk}")
        dr = drq

    # Scalars.
    scale_f = _real(scale, nm["scale"])
    scale32 = float(torch.tensor(scale_f, dtype=torch.float32))  # the kernel's float32 scale
    if not math.isfinite(scale32):
        raise invalid(f"{nm['scale']}={scale_f}: must be finite as a float32 (|scale| <= 3.4028235e38)")
    scale_f = scale32
    kp = _real(keep_prob, nm["keep_prob"])
    if not 0.0 < kp <= 1.0:  # also rejects NaN
        raise invalid(f"{nm['keep_prob']}={kp}: must be in (0, 1]")
    pre = _int(pre_tokens, nm["pre_tokens"], INT32_MIN, INT32_MAX)
    nxt = _int(next_tokens, nm["next_tokens"], INT32_MIN, INT32_MAX)
    _int(inner_precise, nm["inner_precise"], 0, 3)
    mode = _int(sparse_mode, nm["sparse_mode"])
    allowed_modes = (0, 1, 2, 3, 4, 6, 7, 8) if layout == "TND" else (0, 1, 2, 3, 4, 5, 6)
    if mode not in allowed_modes:
        raise invalid(f"{nm['sparse_mode']}={mode}: with layout {layout} it must be one of {allowed_modes}")
    ptype = _int(pse_type, nm["pse_type"])
    if not 0 <= ptype <= 3:
        raise invalid(f"{nm['pse_type']}={ptype}: must be in [0, 3]")
    if not isinstance(softmax_layout, str) or softmax_layout.upper() not in ("", "TND"):
        raise invalid(f"{nm['softmax_layout']}={_short(softmax_layout)}: must be '' or 'TND'")
    sm_layout = softmax_layout.upper()
    if sm_layout == "TND" and layout != "TND":
        raise invalid(f"{nm['softmax_layout']}='TND' needs {nm['input_layout']}='TND', got {layout!r}")
    if padding_mask is not None:
        raise invalid(f"{nm['padding_mask']}={_short(padding_mask)}: reserved, must be None")
    seed_i = _int(seed, nm["seed"], any_size=True)  # Philox reads seed mod 2**64
    off_i = _int(offset, nm["offset"], 0, 2**63 - 1)

    # TND batches.
    batches: list[Batch] = []
    if layout == "TND":
        if actual_seq_qlen is None or actual_seq_kvlen is None:
            raise invalid(f"{nm['actual_seq_qlen']}/{nm['actual_seq_kvlen']}=None: required with layout TND")
        cq = _seq_lens(actual_seq_qlen, nm["actual_seq_qlen"], sq, "T1")
        ck = _seq_lens(actual_seq_kvlen, nm["actual_seq_kvlen"], skv, "T2")
        if len(cq) != len(ck):
            raise invalid(f"{nm['actual_seq_qlen']} has {len(cq)} entries, {nm['actual_seq_kvlen']} {len(ck)}: "
                          "they must have the same length")
        n_eff = min((cq + [-1]).index(-1), (ck + [-1]).index(-1))
        batches = tnd_batches(cq[:n_eff], ck[:n_eff])
        b = len(cq)
    else:
        for n_ in ("actual_seq_qlen", "actual_seq_kvlen"):
            if locals()[n_] is not None:
                raise invalid(f"{nm[n_]} is only for layout TND (got layout {layout})")
    live = [x for x in batches if x.sq > 0]
    max_sq = max((x.sq for x in batches), default=0) if layout == "TND" else sq
    max_skv = max((x.skv for x in batches), default=0) if layout == "TND" else skv
    geoms = [(x.sq, x.skv) for x in live] if layout == "TND" else [(sq, skv)]

    # atten_mask and sparse mode.
    mask = None
    if atten_mask is not None:
        mask = _tensor(atten_mask, nm["atten_mask"], device)
        if mask.dtype not in (torch.bool, torch.uint8):
            raise invalid(f"{nm['atten_mask']} dtype {mask.dtype}: must be bool or uint8")
    elif mode != 0:
        global _warned_no_mask
        if not _warned_no_mask:
            _warned_no_mask = True
            warnings.warn(f"{nm['sparse_mode']}={mode} without {nm['atten_mask']}: nothing is masked "
                          "(Ascend's rule: sparse_mode, pre/next tokens need a mask)", UserWarning, stacklevel=3)
    band_mode = mode in (0, 4, 7, 8) and mask is not None
    if mask is not None:
        shape = list(mask.shape)
        if mode in COMPRESSED_MODES:
            _check_compressed(mask, mode, nm["atten_mask"])
        elif layout == "TND":
            if shape not in ([max_sq, max_skv], [sq, skv]):
                raise invalid(f"{nm['atten_mask']} shape {shape} with layout TND: must be [maxSq, maxSkv]="
                              f"{[max_sq, max_skv]} or [T1, T2]={[sq, skv]}")
        else:
            full = [[sq, skv], [1, 1, sq, skv], [b, 1, sq, skv], [b, n1, sq, skv]]
            if mode == 5 and b > 1:
                full = [[b, 1, sq, skv], [b, n1, sq, skv]]
            if shape not in full:
                raise invalid(f"{nm['atten_mask']} shape {shape} with {nm['sparse_mode']}={mode}: must be one of {full}")
    if band_mode:
        if mode == 0:
            for gq, gk in geoms:
                _band_rule(pre, nxt, 0, gq, gk, f"{nm['sparse_mode']}=0", nm)
        elif mode == 4:
            for gq, gk in geoms:
                _band_rule(pre, nxt, gk - gq, gq, gk, f"{nm['sparse_mode']}=4", nm)
        elif live:
            bb = live[-1] if mode == 7 else live[0]
            _band_rule(pre, nxt, bb.skv - bb.sq, bb.sq, bb.skv,
                       f"{nm['sparse_mode']}={mode} (band batch {bb.index})", nm)

    prefix_l: list[int] | None = None
    if mode in (5, 6) and mask is not None:
        if prefix is None:
            raise invalid(f"{nm['prefix']}=None: required with {nm['sparse_mode']}={mode}")
        prefix_l = _int_list(prefix, nm["prefix"])
        if b > MAX_B_VARLEN:
            raise invalid(f"{nm['query']} batch B={b}: with {nm['prefix']} B must be <= {MAX_B_VARLEN}")
        if len(prefix_l) != b:
            raise invalid(f"{nm['prefix']} has {len(prefix_l)} entries: must have one per batch (B={b})")
        for k, p in enumerate(prefix_l):
            if layout == "TND" and k >= len(batches):
                continue  # a padded batch
            gq, gk = (batches[k].sq, batches[k].skv) if layout == "TND" else (sq, skv)
            lo = max(0, gk - gq) if mode == 6 else 0
            if not lo <= p <= gk:
                raise invalid(f"{nm['prefix']}[{k}]={p}: with {nm['sparse_mode']}={mode} it must be in [{lo}, {gk}]")

    # pse.
    pse_t: Tensor | None = None
    slopes: Tensor | None = None
    if ptype in (0, 1) and pse is not None:
        pse_t = _tensor(pse, nm["pse"], device)
        if pse_t.dtype != query.dtype:
            raise invalid(f"{nm['pse']} dtype {pse_t.dtype}: must equal {nm['query']} dtype {query.dtype}")
        shape = list(pse_t.shape)
        causal = mask is not None and (mode in (2, 3) or (mode == 0 and pre >= max_sq and nxt == 0))
        if layout == "TND":
            if pse_t.dim() != 4 or shape[0] not in (1, b) or shape[1:] != [n1, 1024, max_skv]:
                raise invalid(f"{nm['pse']} shape {shape} with layout TND: must be the compressed "
                              f"[B or 1, N1, 1024, maxSkv] = [{b} or 1, {n1}, 1024, {max_skv}]")
            if not causal or any(x.sq != x.skv for x in live):
                raise invalid(f"{nm['pse']} with layout TND needs Sq_b == Skv_b for every batch and a causal "
                              f"pattern ({nm['sparse_mode']} 2/3 with a mask, or 0 with a mask, pre >= Sq, next == 0)")
        else:
            full = [[b, n1, sq, skv], [1, n1, sq, skv], [b, n1, 1, skv], [1, n1, 1, skv]]
            compressed = sq > 1024 and pse_t.dim() == 4 and shape[0] in (1, b) and shape[1:] == [n1, 1024, skv]
            if compressed:
                if sq != skv or not causal:
                    raise invalid(f"{nm['pse']} shape {shape} is the ALiBi-compressed form: it needs Sq == Skv "
                                  f"(got {sq}, {skv}) and a causal pattern ({nm['sparse_mode']} 2/3 with a "
                                  "mask, or 0 with a mask, pre >= Sq, next == 0)")
            elif shape not in full:
                raise invalid(f"{nm['pse']} shape {shape}: must be one of {full}"
                              + (" or the compressed [B or 1, N1, 1024, Skv]" if sq > 1024 else ""))
    elif ptype in (2, 3):
        if pse is None:
            raise invalid(f"{nm['pse']}=None: {nm['pse_type']}={ptype} needs ALiBi slopes")
        slopes = _tensor(pse, nm["pse"], device)
        if slopes.dtype != torch.float32 or list(slopes.shape) not in ([b, n1], [n1]):
            raise invalid(f"{nm['pse']} {_short(slopes)} with {nm['pse_type']}={ptype}: slopes must be float32 "
                          f"[B, N1]={[b, n1]} or [N1]={[n1]}")
        if any(gq != gk for gq, gk in geoms):
            raise invalid(f"{nm['pse_type']}={ptype} (in-kernel ALiBi) needs Sq == Skv"
                          + (" in every batch" if layout == "TND" else f", got {sq} and {skv}"))
    starts = []
    for n_, v_ in (("q_start_idx", q_start_idx), ("kv_start_idx", kv_start_idx)):
        lst = [0] if v_ is None else _int_list(v_, nm[n_])
        if not lst:
            raise invalid(f"{nm[n_]}=[]: give at least one start index or None")
        starts.append(_int(lst[0], nm[n_], INT32_MIN, INT32_MAX))
    qs, ks = starts
    if slopes is not None and layout == "TND" and mode == 8 and cq[0] - ck[0] + qs - ks != 0:
        raise invalid(f"{nm['sparse_mode']}=8 with {nm['pse_type']}={ptype}: {nm['actual_seq_qlen']}[0] - "
                      f"{nm['actual_seq_kvlen']}[0] + {nm['q_start_idx']}[0] - {nm['kv_start_idx']}[0] = "
                      f"{cq[0]} - {ck[0]} + {qs} - {ks} = {cq[0] - ck[0] + qs - ks}: must be 0 "
                      "(the first batch's ALiBi diagonal must be the main one)")

    if sink is not None:
        sink = _tensor(sink, nm["sink"], device)
        if sink.dtype != torch.float32 or list(sink.shape) != [n1]:
            raise invalid(f"{nm['sink']} {_short(sink)}: must be float32 of shape [N1]=[{n1}]")

    # Dropout.
    numels = n1 * sum(x.sq * x.skv for x in batches) if layout == "TND" else b * n1 * sq * skv
    bits: Tensor | None = None
    if kp < 1.0:
        if dropout_mask is not None:
            bits = _tensor(dropout_mask, nm["dropout_mask"], device)
            if bits.dtype != torch.uint8:
                raise invalid(f"{nm['dropout_mask']} dtype {bits.dtype}: must be uint8 (bit-packed, 1 = keep)")
            need = -(-numels // 8)
            if bits.numel() < need:
                raise invalid(f"{nm['dropout_mask']} has {bits.numel()} bytes: needs at least ceil({numels}/8)={need}")
            bits = bits.reshape(-1)
        elif seed_i == 0 and draw_missing_seed:  # torch_npu: the device's generator supplies both
            seed_i, off_i = default_generator(device).philox_engine_inputs(10)

    # Segments.
    def mask_spec(gq: int, gk: int, m: int, explicit: Tensor | None, pfx: tuple[int, ...] | None) -> MaskSpec:
        if mask is None:
            return MaskSpec(gq, gk)
        dd = gk - gq
        if m == 0:
            return MaskSpec(gq, gk, -pre, nxt, explicit=explicit)
        if m == 1:
            return MaskSpec(gq, gk, explicit=explicit)
        if m == 2:
            return MaskSpec(gq, gk, hi=0)
        if m == 3:
            return MaskSpec(gq, gk, hi=dd)
        if m == 4:
            return MaskSpec(gq, gk, dd - pre, dd + nxt)
        return MaskSpec(gq, gk, hi=dd, prefix=pfx, explicit=explicit if m == 5 else None)

    def pse_for(bsel: slice, gq: int, batch_idx: int) -> Pse | None:
        if pse_t is not None:
            t = pse_t[bsel] if pse_t.shape[0] > 1 else pse_t
            if layout == "TND":
                return CompressedPse(t, ptype == 1, gq, tnd=True)
            if pse_t.shape[2] == 1024 and sq > 1024:
                return CompressedPse(t, ptype == 1, gq, tnd=False)
            return DensePse(t, ptype == 1)
        if slopes is not None:
            s = slopes.view(-1, n1)
            s = s[bsel] if s.shape[0] > 1 else s
            use0 = layout == "TND" and mode == 8 and batch_idx >= 1
            return AlibiPse(s, 0 if use0 else qs, 0 if use0 else ks, ptype == 3)
        return None

    def row_len(gk: int) -> int:  # explicit masks number rows of Skv; generated ones pad rows to 16
        return gk if bits is not None else pad16(gk)

    def dropout_for(base: tuple[int, ...], gq: int, gk: int) -> Dropout | None:
        if kp >= 1.0:
            return None
        return Dropout(kp, base, gq, row_len(gk), bits=bits, seed=seed_i, offset=off_i)

    segments: list[Segment] = []
    if layout != "TND":
        q4 = to_bnsd(query, layout, n1)
        k4 = to_bnsd(key, layout, n2)
        v4 = to_bnsd(value, layout, n2)
        if query_rope is not None:
            q4 = torch.cat([q4, to_bnsd(query_rope, layout, n1)], -1)
            k4 = torch.cat([k4, to_bnsd(key_rope, layout, n2)], -1)
        explicit = None
        if mask is not None and mode in (0, 1, 5):
            explicit = mask if mask.dim() == 4 else mask.view(1, 1, sq, skv)
        spec = mask_spec(sq, skv, mode, explicit, tuple(prefix_l) if prefix_l else None)
        segments.append(Segment(q4, k4, v4, spec, pse_for(slice(None), sq, 0), slice(None),
                                dropout_for(tuple(x * n1 * sq * row_len(skv) for x in range(b)), sq, skv)))
        out_shape = list(query.shape[:-1]) + [n1 * dv if layout in ("BSH", "SBH") else dv]
        stats_shape = (b, n1, sq, 8)
    else:
        base = 0
        band_b = (live[-1].index if mode == 7 else live[0].index) if live and mode in (7, 8) else -1
        for x in batches:
            if x.sq > 0:
                q4, k4, v4 = tnd_rows(query, x.q0, x.sq), tnd_rows(key, x.k0, x.skv), tnd_rows(value, x.k0, x.skv)
                if query_rope is not None:
                    q4 = torch.cat([q4, tnd_rows(query_rope, x.q0, x.sq)], -1)
                    k4 = torch.cat([k4, tnd_rows(key_rope, x.k0, x.skv)], -1)
                m = mode
                if mode in (7, 8):
                    m = 4 if x.index == band_b else (3 if mode == 7 else 2)
                explicit = None
                if mask is not None and mode in (0, 1):
                    if list(mask.shape) == [max_sq, max_skv]:
                        explicit = mask[:x.sq, :x.skv]
                    else:
                        explicit = mask[x.q0:x.q0 + x.sq, x.k0:x.k0 + x.skv]
                    explicit = explicit.view(1, 1, x.sq, x.skv) if explicit.is_contiguous() else explicit[None, None]
                pfx = (prefix_l[x.index],) if prefix_l else None
                bsel = slice(x.index, x.index + 1)
                segments.append(Segment(q4, k4, v4, mask_spec(x.sq, x.skv, m, explicit, pfx),
                                        pse_for(bsel, x.sq, x.index), bsel if pse_t is not None and pse_t.shape[0] > 1 else slice(None),
                                        dropout_for((base,), x.sq, x.skv), x))
            base += n1 * x.sq * row_len(x.skv)
        out_shape = [sq, n1, dv]
        stats_shape = (sq, n1, 8)
    return Problem(layout, n1, n2, d, dr, dv, scale_f, kp, sink, query.dtype, device, segments,
                   tuple(out_shape), stats_shape, sm_layout, numels, seed_i, off_i, pse=pse_t,
                   rope=(query_rope, key_rope) if query_rope is not None else None,
                   inputs=(query, key, value))
