"""Every import of fascore internals used by the Triton engine, in one place.

When the package is reorganised, only this file changes.
"""
from __future__ import annotations

from ...dropout import Dropout, counter_base, keep_threshold  # noqa: F401
from ...layouts import from_bnsd, tnd_rows, tnd_stats_view, to_bnsd  # noqa: F401
from ...masks import EMPTY, FULL, PARTIAL, UNBOUNDED, MaskSpec, plan_blocks  # noqa: F401
from ...problem import Problem, Segment  # noqa: F401
from ...pse import AlibiPse, CompressedPse, DensePse  # noqa: F401
from ...rows import FLT_MAX  # noqa: F401
from ...validation import build_problem  # noqa: F401  (tests and the GPU check)
