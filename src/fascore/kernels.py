"""Run-time choices of the flash engine: matmul dtype, tile sizes, fused-kernel use, rectangles.

Decided once per process by measurement or by device, overridable through ``config`` (tests
use it to force each code path).
"""
from __future__ import annotations

import functools
import time
from typing import Iterator

import torch

from .masks import EMPTY, FULL, MaskSpec, plan_blocks
from .problem import Problem, Segment

config: dict = {
    "tiles": None,  # (bq, bk) to force tile sizes
    "fused_backward": True,  # allow PyTorch's fused CPU flash backward where it applies
    "matmul_dtype": None,  # force the matmul operand dtype for fp16/bf16 inputs
    "tile_bytes": 8 << 20,  # target size of one forward logits tile (merged key blocks)
    "band": True,  # narrow bands through band.py's batched key windows
}
BAND_BQ = 64  # query rows per block on the band path (window waste ~ (BAND_BQ + band) / band)


_FAST_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def _half_is_fast(dtype: torch.dtype) -> bool:
    """Does this CPU multiply ``dtype`` natively (AMX / AVX-512 bf16 or fp16 instructions)?

    Decided from the CPU's feature flags, not by timing, so that every process on one machine
    takes the same path (and gets bitwise the same results). Without /proc/cpuinfo: a probe.
    """
    flags = _cpu_flags()
    if flags:
        return any(f in flags for f in _FAST_FLAGS[dtype])

    def rate(dt: torch.dtype) -> float:
        a, b = torch.randn(8, 256, 128).to(dt), torch.randn(8, 128, 256).to(dt)
        torch.bmm(a, b)
        t0 = time.perf_counter()
        for _ in range(5):
            torch.bmm(a, b)
        return time.perf_counter() - t0
    return rate(dtype) < rate(torch.float32)


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the tile matmuls: the input's own, unless the CPU is slower in it."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if config["matmul_dtype"] is not None:
        return config["matmul_dtype"]
    if device.type != "cpu":
        return dtype
    return dtype if _half_is_fast(dtype) else torch.float32


def path_description(dtype: torch.dtype = torch.bfloat16) -> str:
    """Which matmul path runs on this CPU for ``dtype`` inputs (for benchmark output)."""
    mm = matmul_dtype(torch.device("cpu"), dtype)
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{dtype} inputs -> {mm} tile matmuls (CPU capability {cap})"


def tile_sizes(device: torch.device, dtype: torch.dtype, d: int, backward: bool = False) -> tuple[int, int]:
    """(bq, bk): query rows and key columns per tile."""
    if config["tiles"] is not None:
        return config["tiles"]
    if backward:
        return (256, 256)
    return (256, 128)


def max_run_blocks(rows: int, bk: int, ct: torch.dtype) -> int:
    """Key blocks merged into one forward tile: the logits tile stays near ``config['tile_bytes']``."""
    item = torch.finfo(ct).bits // 8
    return max(1, config["tile_bytes"] // (rows * bk * item))


def use_fused_backward(seg: Segment, prob: Problem, need_dpse: bool) -> bool:
    """PyTorch's fused CPU flash backward applies: CPU, fp32/fp16/bf16, no dropout, no dpse, D == Dv."""
    return (config["fused_backward"] and seg.q.device.type == "cpu"
            and prob.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and seg.dropout is None and not need_dpse and seg.k.shape[2] > 0
            and seg.q.shape[-1] == seg.v.shape[-1]
            # its additive mask has the input dtype: a half-precision ALiBi bias would be rounded
            and (seg.pse is None or prob.dtype == torch.float32))


def _causal_aligned(mask: MaskSpec, i0: int, i1: int, j0: int, j1: int) -> bool:
    """The tile's mask is exactly top-left causal (j - j0 <= i - i0)."""
    return (mask.explicit is None and (mask.prefix is None or j0 >= max(mask.prefix))
            and mask.hi == j0 - i0 and mask.lo <= j0 - (i1 - 1))


def rectangles(mask: MaskSpec, bq: int, bk: int) -> Iterator[tuple[int, int, int, int, str]]:
    """Cover the non-EMPTY tiles with rectangles (i0, i1, j0, j1, how), how in full/causal/masked.

    Adjacent FULL tiles of a block row merge into one rectangle, and block rows with the same
    FULL run merge vertically; PARTIAL tiles stay single ("causal" when top-left causal).
    """
    if mask.explicit is None and (mask.prefix is None or max(mask.prefix) <= 0) and mask.lo <= -(mask.sq - 1):
        yield from _upper_band_rectangles(mask)
        return
    kinds = plan_blocks(mask, bq, bk, torch.device("cpu")).tolist()
    pending: tuple[int, int, int, int] | None = None  # a FULL rectangle that may still grow down
    for qb, row in enumerate(kinds):
        i0, i1 = qb * bq, min((qb + 1) * bq, mask.sq)
        runs, singles, kb = [], [], 0
        while kb < len(row):
            if row[kb] == FULL:
                start = kb
                while kb < len(row) and row[kb] == FULL:
                    kb += 1
                runs.append((start * bk, min(kb * bk, mask.skv)))
                continue
            if row[kb] != EMPTY:
                j0, j1 = kb * bk, min((kb + 1) * bk, mask.skv)
                singles.append((i0, i1, j0, j1, "causal" if _causal_aligned(mask, i0, i1, j0, j1) else "masked"))
            kb += 1
        if pending is not None and len(runs) == 1 and runs[0] == (pending[2], pending[3]):
            pending = (pending[0], i1, pending[2], pending[3])
            runs = []
        else:
            if pending is not None:
                yield (*pending, "full")
                pending = None
            if len(runs) == 1:
                pending = (i0, i1, *runs[0])
                runs = []
        for j0, j1 in runs:
            yield (i0, i1, j0, j1, "full")
        yield from singles
    if pending is not None:
        yield (*pending, "full")


def _upper_band_rectangles(mask: MaskSpec) -> Iterator[tuple[int, int, int, int, str]]:
    """j - i <= hi only (dense, causal modes 2/3): at most one full and one causal rectangle."""
    sq, skv, hi = mask.sq, mask.skv, mask.hi
    if hi >= skv - 1:
        yield (0, sq, 0, skv, "full")
    elif hi >= 0:
        if hi > 0:
            yield (0, sq, 0, hi, "full")
        yield (0, sq, hi, skv, "causal")
    elif -hi < sq:
        yield (-hi, sq, 0, skv, "causal")
