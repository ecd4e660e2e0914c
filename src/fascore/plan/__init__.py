"""Plan: which tiles of a segment take part (EMPTY / PARTIAL / FULL) and how they merge."""
from .blocks import EMPTY, FULL, PARTIAL, plan_blocks
from .rectangles import rectangles

__all__ = ["EMPTY", "PARTIAL", "FULL", "plan_blocks", "rectangles"]
