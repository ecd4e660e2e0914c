"""Merging partial attention results through their (max, sum) statistics.

``npu_ring_attention_update`` is the PyTorch equivalent of Ascend's ``npu_ring_attention_update``
(MindSpeed / MindSpore ``ring_attention_update``): two FlashAttention results over disjoint key
sets of the same query rows, each with its ``softmax_max`` m and ``softmax_sum`` l, combine into
the result over the union of the keys:

    m = max(m1, m2),  a1 = l1 * exp(m1 - m),  a2 = l2 * exp(m2 - m),  l = a1 + a2,
    out = out1 * (a1 / l) + out2 * (a2 / l).

Rows that are invalid on one side (m = -FLT_MAX, l = +FLT_MAX, out = 0: semantics §5) contribute
nothing; rows invalid on both sides stay (-FLT_MAX, +FLT_MAX) with output 0, never inf or NaN.
``merge_partials`` is the layout-free core that ``fascore.distributed`` uses between ring steps.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import invalid
from ..limits import FLT_MAX

__all__ = ["merge_partials", "npu_ring_attention_update", "ring_attention_update"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def merge_partials(out1: Tensor, m1: Tensor, l1: Tensor, out2: Tensor, m2: Tensor,
                   l2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two partial results of the same query rows (layout-free core).

    ``m*``/``l*``: row statistics of one shape, e.g. [B, N, S], in the dtype to compute in;
    ``out*``: the rows' outputs with one more trailing axis (the head dim), e.g. [B, N, S, D].
    Returns ``(out, m, l)``.
    """
    m, w1, w2, l = _weights(m1, l1, m2, l2)
    return out1 * w1.unsqueeze(-1) + out2 * w2.unsqueeze(-1), m, l


def _weights(m1: Tensor, l1: Tensor, m2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(m, w1, w2, l): merged statistics and the output weights of each side.

    Rows invalid on a side (m == -FLT_MAX) get weight 0 there; rows invalid on both sides keep
    the sentinels (-FLT_MAX, FLT_MAX); rows whose sums are 0 on both sides (TND rows outside
    every batch: statistics 0) stay 0 with weights 0.
    """
    inv1 = m1 <= -FLT_MAX
    inv2 = m2 <= -FLT_MAX
    m = torch.maximum(m1, m2)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    a1 = torch.where(inv1, zero, l1 * torch.exp(m1 - m))
    a2 = torch.where(inv2, zero, l2 * torch.exp(m2 - m))
    l = a1 + a2
    pos = l > 0
    denom = torch.where(pos, l, torch.ones_like(l))
    w1 = torch.where(pos, a1 / denom, zero)
    w2 = torch.where(pos, a2 / denom, zero)
    both = inv1 & inv2
    m = torch.where(both, torch.full_like(m, -FLT_MAX), m)
    l = torch.where(both, torch.full_like(l, FLT_MAX), l)
    return m, w1, w2, l


def _stats_and_weights(m1: Tensor, l1: Tensor, m2: Tensor, l2: Tensor,
                       ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """_weights computed in ``ct``; the statistics come back float32."""
    m, w1, w2, l = _weights(m1.to(ct), l1.to(ct), m2.to(ct), l2.to(ct))
    return m.float(), w1, w2, l.float()


def _check_tensor(t: Any, name: str) -> Tensor:
    if t is None:
        raise invalid(f"{name}=None: {name} is required")
    if not isinstance(t, Tensor):
        raise invalid(f"{name}={type(t).__name__}: must be a torch.Tensor")
    return t


def _cum_lengths(value: Any, t: int) -> list[int]:
    """actual_seq_qlen as non-decreasing cumulative ends (a leading 0 is allowed, Ascend's form)."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype in (torch.bool,) or value.dtype.is_floating_point or value.is_complex():
            raise invalid(f"actual_seq_qlen {list(value.shape)} {value.dtype}: must be a 1-D integer tensor or list")
        lst = [int(x) for x in value.tolist()]
    elif isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        lst = [int(x) for x in value]
    else:
        raise invalid(f"actual_seq_qlen={value!r}: must be a list of ints or a 1-D integer tensor")
    if not lst:
        raise invalid("actual_seq_qlen=[]: needs at least one cumulative length")
    # trailing zeros are padding (semantics §2, [fascore]); a leading 0 is an empty first batch
    while len(lst) > 1 and lst[-1] == 0:
        lst.pop()
    prev = 0
    for x in lst:
        if x < prev:
            raise invalid(f"actual_seq_qlen={lst}: cumulative lengths must be non-decreasing and >= 0")
        prev = x
    if lst[-1] > t:
        raise invalid(f"actual_seq_qlen={lst}: last cumulative length {lst[-1]} exceeds T={t}")
    return lst


def _tnd_row_index(cum: list[int], t: int, n: int, softmax_layout: str, device: torch.device) -> Tensor:
    """Flat element index (of copy 0) of row (t, n) in a [T, N, 8] statistics tensor: [T, N] int64.

    softmax_layout "": batch b's block [N, Sq_b, 8] starts at element N*8*q0_b (semantics §2); rows
    after the last batch are laid out row-major. "TND": plain row-major [T, N, 8].
    """
    tt = torch.arange(t, device=device)
    nn = torch.arange(n, device=device)
    rowmajor = (tt[:, None] * n + nn[None, :]) * 8
    if softmax_layout == "TND":
        return rowmajor
    ends = torch.tensor(cum, dtype=torch.int64, device=device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    b = torch.searchsorted(ends, tt, right=True).clamp(max=len(cum) - 1)
    q0, sq = starts[b], ends[b] - starts[b]
    idx = (n * q0[:, None] + nn[None, :] * sq[:, None] + (tt - q0)[:, None]) * 8
    covered = (tt < ends[-1])[:, None]
    return torch.where(covered, idx, rowmajor)


def npu_ring_attention_update(prev_attn_out: Tensor, prev_softmax_max: Tensor, prev_softmax_sum: Tensor,
                              cur_attn_out: Tensor, cur_softmax_max: Tensor, cur_softmax_sum: Tensor, *,
                              actual_seq_qlen: Any = None, input_layout: str = "SBH",
                              input_softmax_layout: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Merge two FlashAttention results of the same queries over disjoint keys: torch_npu's
    ``npu_ring_attention_update`` (its keywords). Returns ``(attn_out, softmax_max, softmax_sum)``.

    input_layout "SBH": attn_out [S, B, H] (H = N*D), statistics float32 [B, N, S, 8].
    input_layout "TND": attn_out [T, N, D], statistics float32 [T, N, 8]; ``actual_seq_qlen``
    (cumulative query lengths, with or without Ascend's leading 0; list or integer tensor) is
    required. ``input_softmax_layout`` (only read with TND): "" or "SBH" (**[fascore]**: the same
    thing), the statistics in semantics §2's memory order, one [N, Sq_b, 8] block per batch, as
    ``npu_fusion_attention`` returns them; "TND": plain row-major [T, N, 8].

    m = max(m1, m2), l = l1*exp(m1 - m) + l2*exp(m2 - m),
    out = (out1*l1*exp(m1 - m) + out2*l2*exp(m2 - m)) / l, computed in float32 (float64 for
    float64 outputs) and returned in attn_out's dtype. A row invalid on one side (max -FLT_MAX,
    sum +FLT_MAX) takes the other side; invalid on both it stays (-FLT_MAX, +FLT_MAX) with output 0.
    Raises ``FlashAttentionError`` (161002) on inconsistent inputs. Inputs are not modified.
    """
    return _update((prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
                    cur_softmax_sum), actual_seq_qlen, input_layout, input_softmax_layout,
                   ("input_layout", "input_softmax_layout"))


_UNSET: Any = object()


def ring_attention_update(prev_attn_out: Tensor, prev_softmax_max: Tensor, prev_softmax_sum: Tensor,
                          cur_attn_out: Tensor, cur_softmax_max: Tensor, cur_softmax_sum: Tensor,
                          *legacy: Any, actual_seq_qlen: Any = None, input_layout: Any = _UNSET,
                          input_softmax_layout: Any = _UNSET, layout: Any = _UNSET,
                          softmax_layout: Any = _UNSET) -> tuple[Tensor, Tensor, Tensor]:
    """``npu_ring_attention_update`` under fascore's older name. It takes torch_npu's keywords;
    the old spellings (``actual_seq_qlen`` and ``layout`` positionally, ``layout=``,
    ``softmax_layout=``) still work and give a ``DeprecationWarning``."""
    old = []
    if legacy:
        if len(legacy) > 2:
            raise invalid(f"ring_attention_update takes 6 tensors and at most 2 more positional arguments "
                          f"(actual_seq_qlen, layout), got {6 + len(legacy)}")
        old.append("positional actual_seq_qlen / layout")
        if actual_seq_qlen is not None:
            raise invalid("actual_seq_qlen given both positionally and by keyword")
        actual_seq_qlen = legacy[0]
        if len(legacy) == 2:
            layout = legacy[1]
    names = ["input_layout", "input_softmax_layout"]
    if layout is not _UNSET:
        if input_layout is not _UNSET:
            raise invalid("layout and input_layout: give input_layout only (layout is its old spelling)")
        old.append("layout=")
        input_layout, names[0] = layout, "layout"
    if softmax_layout is not _UNSET:
        if input_softmax_layout is not _UNSET:
            raise invalid("softmax_layout and input_softmax_layout: give input_softmax_layout only")
        old.append("softmax_layout=")
        input_softmax_layout, names[1] = softmax_layout, "softmax_layout"
    if old:
        warnings.warn(f"ring_attention_update: {', '.join(old)} is deprecated; use torch_npu's keywords "
                      "actual_seq_qlen=, input_layout=, input_softmax_layout= (fascore.npu_ring_attention_update)",
                      DeprecationWarning, stacklevel=2)
    return _update((prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
                    cur_softmax_sum), actual_seq_qlen, "SBH" if input_layout is _UNSET else input_layout,
                   "" if input_softmax_layout is _UNSET else input_softmax_layout, tuple(names))


_NAMES = ("prev_attn_out", "prev_softmax_max", "prev_softmax_sum", "cur_attn_out", "cur_softmax_max",
          "cur_softmax_sum")


def _check_inputs(tensors: tuple, layout: Any, softmax_layout: Any, names: tuple) -> tuple[str, str]:
    for t, name in zip(tensors, _NAMES):
        _check_tensor(t, name)
    o1, m1, l1, o2, m2, l2 = tensors
    if not isinstance(layout, str) or layout.upper() not in ("SBH", "TND"):
        raise invalid(f"{names[0]}={layout!r}: must be 'SBH' or 'TND'")
    if not isinstance(softmax_layout, str) or softmax_layout.upper() not in ("", "SBH", "TND"):
        raise invalid(f"{names[1]}={softmax_layout!r}: must be '', 'SBH' or 'TND'")
    device = o1.device
    for t, name in zip(tensors, _NAMES):
        if t.device != device:
            raise invalid(f"{name} is on {t.device} but prev_attn_out is on {device}")
    if o1.dtype not in _OUT_DTYPES:
        raise invalid(f"prev_attn_out dtype {o1.dtype}: must be float16, bfloat16, float32 (or float64)")
    if o2.dtype != o1.dtype or tuple(o2.shape) != tuple(o1.shape):
        raise invalid(f"cur_attn_out {list(o2.shape)} {o2.dtype}: must match prev_attn_out "
                      f"{list(o1.shape)} {o1.dtype}")
    for t, name in zip((m1, l1, m2, l2), _NAMES[1:3] + _NAMES[4:]):
        if t.dtype != torch.float32:
            raise invalid(f"{name} dtype {t.dtype}: statistics must be float32")
        if tuple(t.shape) != tuple(m1.shape):
            raise invalid(f"{name} shape {list(t.shape)}: must match prev_softmax_max {list(m1.shape)}")
    if o1.dim() != 3:
        raise invalid(f"prev_attn_out shape {list(o1.shape)}: {names[0]} {layout.upper()} needs a 3-D tensor")
    sl = softmax_layout.upper()
    return layout.upper(), ("TND" if sl == "TND" else "")


def _update(tensors: tuple, actual_seq_qlen: Any, layout: Any, softmax_layout: Any,
            names: tuple) -> tuple[Tensor, Tensor, Tensor]:
    layout, softmax_layout = _check_inputs(tensors, layout, softmax_layout, names)
    o1, m1, l1, o2, m2, l2 = tensors
    ct = torch.float64 if o1.dtype == torch.float64 else torch.float32
    if layout == "SBH":
        if actual_seq_qlen is not None:
            raise invalid(f"actual_seq_qlen is only for {names[0]} 'TND'")
        s, b, h = o1.shape
        if m1.dim() != 4 or m1.shape[0] != b or m1.shape[2] != s or m1.shape[3] != 8:
            raise invalid(f"prev_softmax_max shape {list(m1.shape)}: must be [B, N, S, 8] with B={b}, S={s}")
        n = m1.shape[1]
        if n < 1 or h % n:
            raise invalid(f"prev_softmax_max has N={n} heads, which must divide the hidden size H={h}")
        m, w1, w2, l = _stats_and_weights(m1, l1, m2, l2, ct)
        # weights of copy 0, [B, N, S] -> [S, B, N, 1] to scale [S, B, N, D]
        w1o = w1[..., 0].permute(2, 0, 1).unsqueeze(-1)
        w2o = w2[..., 0].permute(2, 0, 1).unsqueeze(-1)
        out = o1.to(ct).unflatten(-1, (n, h // n)) * w1o + o2.to(ct).unflatten(-1, (n, h // n)) * w2o
        return out.flatten(-2).to(o1.dtype), m, l
    t, n, _d = o1.shape
    if tuple(m1.shape) != (t, n, 8):
        raise invalid(f"prev_softmax_max shape {list(m1.shape)}: must be [T, N, 8]={[t, n, 8]}")
    if actual_seq_qlen is None:
        raise invalid(f"actual_seq_qlen=None: required with {names[0]} 'TND'")
    cum = _cum_lengths(actual_seq_qlen, t)
    m, w1, w2, l = _stats_and_weights(m1, l1, m2, l2, ct)
    idx = _tnd_row_index(cum, t, n, softmax_layout, o1.device)
    w1o = w1.reshape(-1)[idx].unsqueeze(-1)
    w2o = w2.reshape(-1)[idx].unsqueeze(-1)
    out = o1.to(ct) * w1o + o2.to(ct) * w2o
    return out.to(o1.dtype), m, l
