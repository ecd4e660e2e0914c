"""Engines and dispatch: which engine runs a call, and why.

Every call goes to one engine (``select``). Unless one is forced (``use_engine`` for a block on
this thread, ``set_default_engine`` for the process), dispatch walks a fixed priority list per
device (``PRIORITY``) and takes the first registered engine whose ``not_supported_reasons`` is
empty: the same inputs always get the same engine, hence the same bits (never chosen by
timing). A forced engine that cannot run the call raises ``FlashAttentionError`` listing why.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

from ..canonical.problem import Problem
from ..errors import FlashAttentionError, invalid
from .base import FEATURES, Engine, problem_features

__all__ = ["Engine", "FEATURES", "PRIORITY", "problem_features", "register_engine", "unregister_engine",
           "get_engine", "available_engines", "select", "explain", "use_engine", "set_default_engine",
           "current_engine_name", "engine_table"]

PRIORITY: dict[str, list[str]] = {"cpu": ["native", "flash", "reference"],
                                  "cuda": ["triton", "flash", "reference"]}
_ENGINES: dict[str, Engine] = {}
_forced: str | None = None  # set_default_engine
_local = threading.local()  # use_engine


def register_engine(engine: Engine, *, prefer: bool = False) -> None:
    """Register ``engine`` under ``engine.name``. ``prefer`` puts it first in the priority list
    of each of its devices (else it runs only where named in ``PRIORITY`` or forced)."""
    if not isinstance(engine, Engine):
        raise TypeError(f"engine={engine!r}: must be a fascore.engines.Engine")
    _ENGINES[engine.name] = engine
    if prefer:
        for dev in engine.devices:
            order = PRIORITY.setdefault(dev, [])
            if engine.name in order:
                order.remove(engine.name)
            order.insert(0, engine.name)


def unregister_engine(name: str) -> None:
    """Remove an engine (and its priority entries) registered with ``register_engine``."""
    _ENGINES.pop(name, None)
    for order in PRIORITY.values():
        if name in order:
            order.remove(name)


def get_engine(name: str) -> Engine:
    if name not in _ENGINES:
        raise invalid(f"engine={name!r}: must be one of {available_engines()}")
    return _ENGINES[name]


def available_engines() -> list[str]:
    """Names of the registered engines that can run here (built, importable)."""
    return [n for n, e in _ENGINES.items() if e.unavailable() is None]


def _forced_name() -> str | None:
    return getattr(_local, "name", None) or _forced


def explain(prob: Problem, backward: bool = False) -> list[tuple[str, list[str]]]:
    """(engine, reasons it cannot run ``prob``) for the device's priority list, in order."""
    return [(n, _ENGINES[n].not_supported_reasons(prob, backward))
            for n in PRIORITY.get(prob.device.type, []) if n in _ENGINES]


def select(prob: Problem, backward: bool = False) -> Engine:
    """The engine that runs ``prob``: the forced one, or the first of the priority list that can."""
    name = _forced_name()
    if name is not None:
        engine = get_engine(name)
        reasons = engine.not_supported_reasons(prob, backward)
        if reasons:
            raise invalid(f"engine={name!r} cannot run this call: {'; '.join(reasons)}")
        return engine
    tried = explain(prob, backward)
    for n, reasons in tried:
        if not reasons:
            return _ENGINES[n]
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in tried) or "none registered"
    raise FlashAttentionError(f"no engine can run this call on {prob.device.type} ({detail})", 161002)


def current_engine_name(device: str = "cpu") -> str:
    """The forced engine, or the first engine of ``device``'s priority list that is available."""
    name = _forced_name()
    if name is not None:
        return name
    return next(n for n in PRIORITY.get(device, []) if n in _ENGINES and _ENGINES[n].unavailable() is None)


def set_default_engine(name: str | None) -> None:
    """Force engine ``name`` for the whole process (None or "auto": dispatch again)."""
    global _forced
    if name not in (None, "auto"):
        get_engine(name)
    _forced = None if name == "auto" else name


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run the calls in this block (on this thread) with engine ``name``."""
    get_engine(name)
    prev = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = prev


def engine_table() -> list[dict[str, str]]:
    """One row per registered engine (``fascore info``, ``fascore check``), priority order first."""
    order = [n for dev in ("cpu", "cuda") for n in PRIORITY.get(dev, [])] + list(_ENGINES)
    seen: list[str] = []
    for n in order:
        if n in _ENGINES and n not in seen:
            seen.append(n)
    return [_ENGINES[n].describe() for n in seen]


def _register_builtin() -> None:
    from .flash import FlashEngine
    from .native.engine import NativeEngine  # declaration only: the C++ build starts on first use
    from .reference import ReferenceEngine

    register_engine(ReferenceEngine())
    register_engine(FlashEngine())
    register_engine(NativeEngine())
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        from .triton.engine import TritonEngine  # imports triton: only where it can run

        register_engine(TritonEngine())


_register_builtin()
