"""The Triton engine's declaration for dispatch (``fascore.engines``): what it runs, and why not.

Importing this package imports triton, so ``fascore.engines`` registers the engine only where
it can run (a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ...canonical.problem import Problem
from ..base import FEATURES, ModuleEngine

__all__ = ["TritonEngine"]


class TritonEngine(ModuleEngine):
    """FA2 kernels in Triton for CUDA (CPU tensors only under ``TRITON_INTERPRET=1``)."""

    name = "triton"
    devices = frozenset({"cuda", "cpu"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    features = frozenset(FEATURES)

    def implementation(self) -> ModuleType:
        from .. import triton

        return triton

    def unavailable(self) -> str | None:
        if self.implementation().available():
            return None
        return "triton not importable, or no CUDA device of sm_80+ (CPU tensors: TRITON_INTERPRET=1)"

    def extra_reasons(self, prob: Problem, backward: bool) -> list[str]:
        seen: list[str] = []
        for seg in prob.segments:
            seen += [r for r in self.implementation().not_supported_reasons(seg, prob) if r not in seen]
        return seen

    def forward_all(self, prob: Problem) -> tuple[Tensor, Tensor, Tensor] | None:
        impl = self.implementation()
        return impl.forward_all(prob) if impl.supports_all(prob) else None

    def backward_all(self, prob: Problem, dy: Tensor, attention_in: Tensor, softmax_max: Tensor,
                     softmax_sum: Tensor) -> Any:
        impl = self.implementation()
        return impl.backward_all(prob, dy, attention_in, softmax_max, softmax_sum) if impl.supports_all(prob) else None
