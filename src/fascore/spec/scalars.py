"""semantics §3-§5's scalar parameters: scale, keep_prob, pre/next tokens, inner_precise, sparse_mode,
pse_type, softmax_layout, the reserved padding_mask, seed and offset."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import invalid
from ..limits import INT32_MAX, INT32_MIN
from ..params import Names
from .values import as_int, as_real, short

__all__ = ["Scalars", "scalars", "sparse_modes"]


@dataclass(frozen=True)
class Scalars:
    scale: float  # rounded to float32, as the kernel uses it
    keep_prob: float
    pre: int
    nxt: int
    mode: int
    pse_type: int
    softmax_layout: str
    seed: int
    offset: int


def sparse_modes(layout: str) -> tuple[int, ...]:
    """semantics §4: the sparse modes a layout takes."""
    return (0, 1, 2, 3, 4, 6, 7, 8) if layout == "TND" else (0, 1, 2, 3, 4, 5, 6)


def _scale(scale: Any, nm: Names) -> float:
    value = as_real(scale, nm["scale"])
    scale32 = float(torch.tensor(value, dtype=torch.float32))  # the kernel's float32 scale
    if not math.isfinite(scale32):
        raise invalid(f"{nm['scale']}={value}: must be finite as a float32 (|scale| <= 3.4028235e38)")
    return scale32


def _keep_prob_hint(kp: float, nm: Names) -> str:
    k = nm["keep_prob"]
    if kp == 0.0:
        return f" ({k} is the probability to keep an element, 1 - dropout_p: for no dropout pass {k}=1.0)"
    if kp > 1.0 and kp <= 100.0:
        return f" ({k} is a probability, not a percentage; 1.0 means no dropout)"
    if kp < 0.0:
        return f" ({k} is the probability to keep an element, 1 - dropout_p)"
    return ""


def _mode_hint(mode: int, layout: str, nm: Names) -> str:
    if layout != "TND" and mode in (7, 8):
        return (f" (7 and 8 are TND's varlen modes; with {layout} use {3 if mode == 7 else 2} "
                f"({'bottom-right' if mode == 7 else 'top-left'} causal) or 4 (band))")
    if layout == "TND" and mode == 5:
        return f" (mode 5's full prefix mask is not for TND; sparse_mode=6 is the compressed prefix mode)"
    return ""


def _band_int(value: Any, name: str) -> int:
    """pre_tokens / next_tokens: int32; 2147483647 (INT32_MAX) is the default, unbounded band."""
    v = as_int(value, name)
    if not INT32_MIN <= v <= INT32_MAX:
        raise invalid(f"{name}={v}: must be in [{INT32_MIN}, {INT32_MAX}] (an int32; "
                      f"{INT32_MAX}, the default, leaves that side of the band unbounded)")
    return v


def scalars(layout: str, scale: Any, keep_prob: Any, pre_tokens: Any, next_tokens: Any, inner_precise: Any,
            sparse_mode: Any, pse_type: Any, softmax_layout: Any, padding_mask: Any, seed: Any, offset: Any,
            nm: Names) -> Scalars:
    scale_f = _scale(scale, nm)
    kp = as_real(keep_prob, nm["keep_prob"])
    if not 0.0 < kp <= 1.0:  # also rejects NaN
        raise invalid(f"{nm['keep_prob']}={kp}: must be in (0, 1]" + _keep_prob_hint(kp, nm))
    pre = _band_int(pre_tokens, nm["pre_tokens"])
    nxt = _band_int(next_tokens, nm["next_tokens"])
    as_int(inner_precise, nm["inner_precise"], 0, 3)
    mode = as_int(sparse_mode, nm["sparse_mode"])
    if mode not in sparse_modes(layout):
        raise invalid(f"{nm['sparse_mode']}={mode}: with layout {layout} it must be one of {sparse_modes(layout)}"
                      + _mode_hint(mode, layout, nm))
    ptype = as_int(pse_type, nm["pse_type"])
    if not 0 <= ptype <= 3:
        raise invalid(f"{nm['pse_type']}={ptype}: must be in [0, 3]")
    if not isinstance(softmax_layout, str) or softmax_layout.upper() not in ("", "TND"):
        raise invalid(f"{nm['softmax_layout']}={short(softmax_layout)}: must be '' or 'TND'")
    sm_layout = softmax_layout.upper()
    if sm_layout == "TND" and layout != "TND":
        raise invalid(f"{nm['softmax_layout']}='TND' needs {nm['input_layout']}='TND', got {layout!r}")
    if padding_mask is not None:
        raise invalid(f"{nm['padding_mask']}={short(padding_mask)}: reserved, must be None (as on Ascend); "
                      f"mask padded keys with {nm['atten_mask']} (True = masked out), or pack the sequences "
                      f"with {nm['input_layout']}='TND'")
    seed_i = as_int(seed, nm["seed"], any_size=True)  # Philox reads seed mod 2**64
    off_i = as_int(offset, nm["offset"], 0, 2**63 - 1)
    return Scalars(scale_f, kp, pre, nxt, mode, ptype, sm_layout, seed_i, off_i)
