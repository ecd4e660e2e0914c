"""The native engine's declaration for dispatch (``fascore.engines``): what it runs, and why not."""
from __future__ import annotations

from types import ModuleType

import torch

from ...canonical.problem import Problem
from ..base import FEATURES, ModuleEngine

__all__ = ["NativeEngine"]


class NativeEngine(ModuleEngine):
    """One fused C++ pass per forward / backward on CPU (fp16 / bf16 / fp32, every feature)."""

    name = "native"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    features = frozenset(FEATURES)

    def implementation(self) -> ModuleType:
        from .. import native

        return native

    def unavailable(self) -> str | None:
        impl = self.implementation()
        return None if impl.available() else impl.status()

    def extra_reasons(self, prob: Problem, backward: bool) -> list[str]:
        seen: list[str] = []
        for seg in prob.segments:
            seen += [r for r in self.implementation().not_supported_reasons(seg, prob)
                     if r not in seen and not r.startswith(("device ", "dtype "))]  # the base class says those
        return seen
