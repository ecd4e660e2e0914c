"""The flash engine: FlashAttention-2 in PyTorch tile operations (every device, every feature).

``tiles.py`` runs the tiled forward and backward (and PyTorch's fused CPU backward over
rectangles), ``band.py`` narrow bands as strided key windows, ``config.py`` the choices of dtypes,
tile sizes and chunks.
"""
from __future__ import annotations

from types import ModuleType

from ...limits import DTYPES
from ..base import FEATURES, ModuleEngine
from . import tiles

__all__ = ["FlashEngine"]


class FlashEngine(ModuleEngine):
    """Tiled FA2 with float32 logits and statistics; O(S) extra memory; EMPTY tiles skipped."""

    name = "flash"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset(DTYPES)
    features = frozenset(FEATURES)

    def implementation(self) -> ModuleType:
        return tiles
