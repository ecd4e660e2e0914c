"""torch_npu's dropout-mask generators (semantics §1.3c): packed uint8 keep masks from the flat model.

Element f of a ``size`` tensor (row-major, no row padding) reads byte f % 16 of Philox counter
ceil(offset / 16) + f // 16 (semantics §5's stream) and is kept iff that byte <= (1 - p) * 255; it is
bit f % 8 (least significant first) of byte f // 8 of the result, which has
ceil(numel / 128) * 16 bytes, torch_npu's size. Fed to ``npu_fusion_attention(dropout_mask=...)``
with the same seed and offset it reproduces the generated mask wherever the flat and the padded
numberings agree (Skv a multiple of 16). **[fascore]**: Ascend's own DropOutGenMask algorithm
is not public; this is fascore's assumption (semantics §5).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .philox import stream_keep
from ..errors import invalid
from .generator import default_generator

__all__ = ["_npu_dropout_gen_mask", "npu_dropout_gen_mask"]

_CHUNK = 1 << 20  # elements generated per step (bounds the int64 scratch)
_BIT_WEIGHTS = tuple(1 << k for k in range(8))


def _numel(size: Any) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size,)
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not isinstance(size, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                 for s in size):
        raise invalid(f"size={size!r}: must be a list of non-negative ints")
    return math.prod(size)


def _prob(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise invalid(f"p={p!r}: the drop probability must be a number in [0, 1]")
    return float(p)


def _packed(numel: int, p: float, seed: int, offset: int, device: torch.device) -> Tensor:
    nbytes = -(-numel // 128) * 16
    out = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int64, device=device)
    for f0 in range(0, numel, _CHUNK):
        n = min(_CHUNK, numel - f0)
        first = torch.tensor([f0], dtype=torch.int64, device=device)
        keep = stream_keep(seed, offset, 1.0 - p, first, n)[0].to(torch.int64)
        keep = torch.nn.functional.pad(keep, (0, -n % 8))
        out[f0 // 8:f0 // 8 + keep.numel() // 8] = (keep.view(-1, 8) * weights).sum(-1).to(torch.uint8)
    return out


def _npu_dropout_gen_mask(self: Tensor, size: Sequence[int], p: float, seed: int, offset: int, *,
                          parallel: bool | None = True, sync: bool | None = None) -> Tensor:
    """torch_npu's ``_npu_dropout_gen_mask``: the packed keep mask of ``size`` (p = drop
    probability) for the given ``seed``/``offset``, on ``self``'s device. ``parallel`` and
    ``sync`` only schedule work on Ascend and are accepted for compatibility."""
    if not isinstance(self, Tensor):
        raise invalid(f"self={self!r}: must be a torch.Tensor (it gives the device)")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{name}={v!r}: must be an int")
    if offset < 0:
        raise invalid(f"offset={offset}: must be >= 0")
    return _packed(_numel(size), _prob(p), seed, offset, self.device)


def npu_dropout_gen_mask(size: Sequence[int], p: float, *, dtype: torch.dtype | None = None,
                         layout: torch.layout | None = None, device: torch.device | str | None = None,
                         pin_memory: bool | None = None) -> Tensor:
    """torch_npu's ``npu_dropout_gen_mask``: as ``_npu_dropout_gen_mask`` with (seed, offset) from
    the device's emulated NPU generator (``philox_engine_inputs(10)``). ``dtype``, ``layout`` and
    ``pin_memory`` are accepted for compatibility; the result is always uint8."""
    dev = torch.device("cpu" if device is None else device)
    numel, prob = _numel(size), _prob(p)
    seed, offset = default_generator(dev).philox_engine_inputs(10)
    return _packed(numel, prob, seed, offset, dev)
