"""Readers of argument values: ints, reals, int lists and tensors, each with a message naming the parameter.

They accept Python numbers (integers also as one-element integer tensors) and name the parameter
as the caller spelled it (``fascore.params.Names``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import invalid

__all__ = ["short", "readable", "as_int", "as_real", "as_int_list", "as_tensor"]


def short(value: Any) -> str:
    """``value`` for a message: tensors by shape/dtype/device, anything else by a clipped repr."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def readable(value: Tensor, name: str) -> Tensor:
    """A tensor whose data can be read: strided (dense) and not on the data-less meta device."""
    if value.layout != torch.strided:
        raise invalid(f"{name} has layout {value.layout}: must be a dense (strided) tensor")
    if value.device.type == "meta":
        raise invalid(f"{name} is on the meta device: tensors must hold data (cpu or cuda)")
    return value


def as_int(value: Any, name: str, lo: int | None = None, hi: int | None = None, any_size: bool = False) -> int:
    """An integer in [lo, hi]; 0-d (or one-element) integer tensors are read."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                and not value.dtype.is_complex and value.dtype != torch.bool:
            value = int(readable(value, name).item())
        else:
            raise invalid(f"{name}={short(value)}: must be an integer")
    if not any_size and not -(2**64) < value < 2**64:  # (and too long to print)
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(f"{name}={value}: must be in [{lo}, {hi}]")
    return value


def as_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name}={short(value)}: must be a real number")
    try:
        return float(value)
    except OverflowError:
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range") from None


def as_int_list(value: Any, name: str) -> list[int]:
    """A list of ints from a list/tuple of ints or a 1-D integer tensor."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise invalid(f"{name}={short(value)}: must be a 1-D integer tensor or a list of ints")
        return [int(x) for x in readable(value, name).tolist()]
    if not isinstance(value, (list, tuple)):
        raise invalid(f"{name}={short(value)}: must be a list of ints")
    return [as_int(x, name) for x in value]


def as_tensor(value: Any, name: str, device: torch.device) -> Tensor:
    """A readable tensor on ``device``."""
    if not isinstance(value, Tensor):
        raise invalid(f"{name}={short(value)}: must be a torch.Tensor")
    if value.device != device:
        raise invalid(f"{name} is on {value.device} but query is on {device}: all tensors must share one device")
    return readable(value, name)
