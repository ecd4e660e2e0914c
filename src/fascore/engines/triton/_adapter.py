"""Every import of fascore internals used by the Triton engine, in one place.

When the package is reorganised, only this file changes.
"""
from __future__ import annotations

from ...canonical.bias import AlibiPse, CompressedPse, DensePse  # noqa: F401
from ...canonical.dropout import Dropout  # noqa: F401
from ...canonical.layouts import from_bnsd, tnd_rows, tnd_stats_view, to_bnsd  # noqa: F401
from ...canonical.masks import UNBOUNDED, MaskSpec  # noqa: F401
from ...canonical.problem import Problem, Segment  # noqa: F401
from ...limits import FLT_MAX  # noqa: F401
from ...plan import EMPTY, FULL, PARTIAL, plan_blocks  # noqa: F401
from ...rng.philox import counter_base, keep_threshold  # noqa: F401
from ...spec import build_problem  # noqa: F401  (tests and the GPU check)
