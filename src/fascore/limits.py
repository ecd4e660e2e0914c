"""The numeric constants and limits of semantics §§2, 5 and 8."""
from __future__ import annotations

import torch

__all__ = ["FLT_MAX", "INT32_MIN", "INT32_MAX", "DTYPES", "MAX_B", "MAX_B_VARLEN", "MAX_N", "MAX_S", "MAX_D"]

FLT_MAX = 3.4028234663852886e38  # the invalid-row sentinels are -FLT_MAX / +FLT_MAX
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_B, MAX_B_VARLEN, MAX_N, MAX_S, MAX_D = 2 * 1024 * 1024, 2048, 256, 1024 * 1024, 768
