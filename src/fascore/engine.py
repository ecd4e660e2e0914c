"""The engine seam: the API runs every segment through the current engine.

An engine has ``forward(seg, prob)``, ``backward(seg, prob, dy, out, m, l, dpse, dsink)`` and
``workspace_bytes(seg, prob, backward)`` with the reference's contract (``reference.py``).
Engines register by name; ``use_engine`` switches for a block, ``set_default_engine`` for good.
"""
from __future__ import annotations

import contextlib
import threading
from types import ModuleType
from typing import Iterator, Protocol

from torch import Tensor

from . import reference
from .problem import Problem, Segment


class Engine(Protocol):
    def forward(self, seg: Segment, prob: Problem) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward(self, seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
                 dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]: ...

    def workspace_bytes(self, seg: Segment, prob: Problem, backward: bool) -> int: ...


_ENGINES: dict[str, Engine | ModuleType] = {"reference": reference}
_default = "reference"
_local = threading.local()


def register_engine(name: str, engine: Engine | ModuleType, default: bool = False) -> None:
    global _default
    _ENGINES[name] = engine
    if default:
        _default = name


def available_engines() -> list[str]:
    return list(_ENGINES)


def set_default_engine(name: str) -> None:
    global _default
    if name not in _ENGINES:
        raise ValueError(f"engine={name!r}: must be one of {available_engines()}")
    _default = name


def current_engine_name() -> str:
    return getattr(_local, "name", None) or _default


def get_engine() -> Engine:
    return _ENGINES[current_engine_name()]  # type: ignore[return-value]


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run the calls in this block (on this thread) with engine ``name``."""
    if name not in _ENGINES:
        raise ValueError(f"engine={name!r}: must be one of {available_engines()}")
    prev = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = prev


def _register_builtin() -> None:
    from . import flash

    register_engine("flash", flash, default=True)


_register_builtin()
