"""Readers of argument values: ints, reals, int lists and tensors, each with a message naming the parameter.

They accept Python numbers and numpy scalars (``np.int64(8)``, ``np.float32(0.125)``; integers
also as one-element integer tensors, int lists also as 1-D numpy integer arrays) and name the
parameter as the caller spelled it (``fascore.params.Names``). Where a rejected value has an
obvious fix, the message says it.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ..errors import invalid

__all__ = ["short", "readable", "as_int", "as_real", "as_int_list", "as_tensor", "plain_number"]


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy"


def plain_number(value: Any) -> Any:
    """A numpy integer / float scalar as the Python int / float it holds; anything else unchanged."""
    if _is_numpy(value) and isinstance(value, numbers.Number) and not isinstance(value, (bool, complex)):
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
    return value


def _number_hint(value: Any, want: str) -> str:
    """What to pass instead of ``value`` where a Python number of kind ``want`` ("int"/"float") belongs."""
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f" (a one-element tensor: pass {want}(x), e.g. {want}({value.reshape(-1)[0].item()!r}))"
        return " (a tensor with several elements: pass one number)"
    if _is_numpy(value) and hasattr(value, "shape"):
        return f" (a numpy array: pass a number, e.g. {want}(x.item()))" if getattr(value, "size", 0) == 1 \
            else " (a numpy array: pass one number)"
    if want == "int" and isinstance(value, float) and value.is_integer():
        return f" (pass int({value!r}) = {int(value)})"
    if isinstance(value, str):
        try:
            (int if want == "int" else float)(value)
            return f" (a string: pass the number {value} itself)"
        except ValueError:
            return ""
    return ""


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
    """An integer in [lo, hi]; numpy integers and 0-d (or one-element) integer tensors are read."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
                and not value.dtype.is_complex and value.dtype != torch.bool:
            value = int(readable(value, name).item())
        else:
            raise invalid(f"{name}={short(value)}: must be an integer{_number_hint(value, 'int')}")
    if not any_size and not -(2**64) < value < 2**64:  # (and too long to print)
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(f"{name}={value}: must be in [{lo}, {hi}]")
    return value


def as_real(value: Any, name: str) -> float:
    """A Python or numpy real number as a float."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name}={short(value)}: must be a real number{_number_hint(value, 'float')}")
    try:
        return float(value)
    except OverflowError:
        raise invalid(f"{name}: an integer of {value.bit_length()} bits is out of range") from None


def as_int_list(value: Any, name: str) -> list[int]:
    """A list of ints from a list/tuple of ints, a 1-D integer tensor or a 1-D numpy integer array."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            hint = ""
            if value.dim() == 1 and value.dtype.is_floating_point:
                hint = f" (a float tensor: pass {name}.long() or {name}.tolist() of ints)"
            elif value.dim() == 0:
                hint = f" (a 0-d tensor: pass {name}.reshape(1) or a list)"
            raise invalid(f"{name}={short(value)}: must be a 1-D integer tensor or a list of ints{hint}")
        return [int(x) for x in readable(value, name).tolist()]
    if _is_numpy(value) and hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1 \
            and getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u"):
        return [int(x) for x in value.tolist()]
    if not isinstance(value, (list, tuple)):
        raise invalid(f"{name}={short(value)}: must be a list of ints"
                      + (" (one number: pass a list, e.g. [x])" if isinstance(plain_number(value), int) else ""))
    return [as_int(x, name) for x in value]


def as_tensor(value: Any, name: str, device: torch.device) -> Tensor:
    """A readable tensor on ``device``."""
    if not isinstance(value, Tensor):
        raise invalid(f"{name}={short(value)}: must be a torch.Tensor")
    if value.device != device:
        raise invalid(f"{name} is on {value.device} but query is on {device}: all tensors must share one device")
    return readable(value, name)
