"""The canonical problem: what validation produces and every engine runs.

A call becomes a ``Problem`` of ``Segment``s of uniform geometry in [B, N, S, D] form (views of
the caller's tensors, ``layouts``), each with its take-part rule (``masks.MaskSpec``), its
position bias (``bias``) and its dropout keep mask (``dropout.Dropout``), all as data that any
tile can be read from.
"""
from .bias import AlibiPse, CompressedPse, DensePse, Pse
from .dropout import Dropout
from .layouts import LAYOUTS, Batch
from .masks import UNBOUNDED, MaskSpec
from .problem import Problem, Segment

__all__ = ["Problem", "Segment", "MaskSpec", "UNBOUNDED", "DensePse", "CompressedPse", "AlibiPse", "Pse",
           "Dropout", "Batch", "LAYOUTS"]
