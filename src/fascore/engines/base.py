"""What an engine is: the contract every engine implements and the capabilities it declares.

An engine computes one segment of a canonical ``Problem`` (``fascore.canonical``):

* ``forward(seg, prob) -> (out [B, N1, Sq, Dv], softmax_max [B, N1, Sq], softmax_sum [B, N1, Sq])``
  in the compute dtype (float32; float64 for float64 inputs), invalid rows as semantics §5 says;
* ``backward(seg, prob, dy, out, m, l, dpse, dsink) -> (dq, dk, dv)`` in the compute dtype, with P
  rebuilt from the statistics ``m``/``l``; adds into the ``dpse`` (pse-shaped) and ``dsink``
  ([N1]) buffers when they are given;
* ``workspace_bytes(seg, prob, backward)``: the bytes it allocates for that (the memory guard and
  aclnn's workspace size use it).

It declares what it can run in the xformers style: ``devices``, ``dtypes`` and ``features``
(``FEATURES``), plus ``unavailable()`` (why it cannot run at all, e.g. not built) and
``extra_reasons()`` (limits of its own, e.g. head dim). ``not_supported_reasons(prob, backward)``
turns them into a list of reasons; an empty list means it can run the call. Dispatch
(``fascore.engines.select``) takes the first engine of a fixed priority list with no reasons.
An engine may also offer ``forward_all`` / ``backward_all`` to run a whole problem (all TND
batches) in one call; the default returns None (run segment by segment).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..canonical.bias import AlibiPse, CompressedPse, DensePse
from ..canonical.problem import Problem, Segment

__all__ = ["FEATURES", "Engine", "ModuleEngine", "problem_features"]

FEATURES = ("backward", "dropout", "dropout_mask", "explicit_mask", "prefix", "pse", "compressed_pse",
            "alibi", "sink", "rope", "tnd", "gqa", "dv_ne_d")


def problem_features(prob: Problem, backward: bool = False) -> frozenset[str]:
    """The features of ``FEATURES`` that running ``prob`` (forward, or backward) needs."""
    f: set[str] = set()
    if backward:
        f.add("backward")
    if prob.layout == "TND":
        f.add("tnd")
    if prob.sink is not None:
        f.add("sink")
    if prob.rope is not None:
        f.add("rope")
    if prob.n1 != prob.n2:
        f.add("gqa")
    if prob.dv != prob.d + prob.dr:
        f.add("dv_ne_d")
    for seg in prob.segments:
        if seg.dropout is not None:
            f.add("dropout_mask" if seg.dropout.bits is not None else "dropout")
        if seg.mask.explicit is not None:
            f.add("explicit_mask")
        if seg.mask.prefix is not None:
            f.add("prefix")
        if isinstance(seg.pse, DensePse):
            f.add("pse")
        elif isinstance(seg.pse, CompressedPse):
            f.add("compressed_pse")
        elif isinstance(seg.pse, AlibiPse):
            f.add("alibi")
    return frozenset(f)


class Engine:
    """Base class: subclasses set the declarations and implement the three methods."""

    name: str = ""
    devices: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = frozenset()
    features: frozenset[str] = frozenset()
    deterministic: bool = True  # bitwise-repeatable results for the same inputs and thread count

    def unavailable(self) -> str | None:
        """Why this engine cannot run anything here (None: it can)."""
        return None

    def extra_reasons(self, prob: Problem, backward: bool) -> list[str]:
        """Limits of this engine beyond devices, dtypes and features."""
        return []

    def not_supported_reasons(self, prob: Problem, backward: bool = False) -> list[str]:
        """Why this engine cannot run ``prob`` (its backward with ``backward``); empty if it can."""
        why = self.unavailable()
        if why:
            return [why]
        reasons = []
        if prob.device.type not in self.devices:
            reasons.append(f"device {prob.device.type} (runs on {', '.join(sorted(self.devices))})")
        if prob.dtype not in self.dtypes:
            reasons.append(f"dtype {str(prob.dtype).replace('torch.', '')}")
        reasons += [f"{f} not supported" for f in sorted(problem_features(prob, backward) - self.features)]
        return reasons + self.extra_reasons(prob, backward)

    def forward(self, seg: Segment, prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
                 dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def workspace_bytes(self, seg: Segment, prob: Problem, backward: bool) -> int:
        raise NotImplementedError

    def forward_all(self, prob: Problem) -> tuple[Tensor, Tensor, Tensor] | None:
        """The whole problem at once in the caller's layout, or None to run segment by segment."""
        return None

    def backward_all(self, prob: Problem, dy: Tensor, attention_in: Tensor, softmax_max: Tensor,
                     softmax_sum: Tensor) -> Any:
        """(dq, dk, dv, dpse, dsink, dq_rope, dk_rope) of the whole problem, or None."""
        return None

    def describe(self) -> dict[str, str]:
        """One row of ``fascore info``'s engine table."""
        return {"engine": self.name, "devices": ", ".join(sorted(self.devices)),
                "dtypes": ", ".join(str(d).replace("torch.", "") for d in sorted(self.dtypes, key=str)),
                "features": ", ".join(f for f in FEATURES if f in self.features),
                "status": self.unavailable() or "available"}


class ModuleEngine(Engine):
    """An engine whose three methods are the functions of a module (``implementation()``)."""

    def implementation(self) -> Any:
        raise NotImplementedError

    def forward(self, seg: Segment, prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
        return self.implementation().forward(seg, prob)

    def backward(self, seg: Segment, prob: Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
                 dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.implementation().backward(seg, prob, dy, out, m, l, dpse, dsink)

    def workspace_bytes(self, seg: Segment, prob: Problem, backward: bool) -> int:
        return self.implementation().workspace_bytes(seg, prob, backward)
