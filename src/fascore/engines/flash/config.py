"""Choices of the flash engine: GEMM dtypes, tile sizes, batch chunks, fused-kernel use.

Decided by device and shape (never by timing, so every process takes the same path), and
overridable through ``config`` (tests use it to force each code path).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ...canonical.problem import Problem, Segment

__all__ = ["config", "BAND_BQ", "operand_dtype", "gemm", "path_description", "tile_sizes", "batch_chunks",
           "max_run_blocks", "use_fused_backward"]

config: dict = {
    "tiles": None,  # (bq, bk) to force tile sizes
    "fused_backward": True,  # allow PyTorch's fused CPU flash backward where it applies
    "tile_bytes": 8 << 20,  # target size of one forward logits tile (merged key blocks)
    "band": True,  # narrow bands through band.py's batched key windows
}
BAND_BQ = 64  # query rows per block on the band path (window waste ~ (BAND_BQ + band) / band)


@functools.lru_cache(maxsize=None)
def _gemm_out_dtype_supported(device_type: str) -> bool:
    """Does ``torch.bmm(a, b, out_dtype=torch.float32)`` run half operands on this device type?

    It multiplies fp16/bf16 operands into float32 results without rounding them (CUDA in recent
    PyTorch). CPU has no such kernel, so CPU tiles upcast their operands instead.
    """
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def operand_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Dtype the operands of products of *input values* (Q K^T, dy V^T) are held in: the input's
    own where the device multiplies it into float32 results (CUDA), else the compute dtype
    (upcast: exact for fp16/bf16 values). Either way the result is float32 (semantics §3).

    Products with P or dS (P V, P^T dy, dS K, dS^T Q) always take float32 operands: rounding P
    or dS to bf16 first (which semantics §3 permits) breaks semantics §7's 0.5 % golden criterion on
    outputs that cancel, so no path here does it.
    """
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype in (torch.float16, torch.bfloat16) and _gemm_out_dtype_supported(device.type):
        return dtype
    return ct


def gemm(a: Tensor, b: Tensor, ct: torch.dtype) -> Tensor:
    """``a @ b`` (batched) with a ``ct`` result: half operands multiply into float32, never rounded."""
    if a.dtype == ct:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out_dtype=ct)


def path_description(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> str:
    """How the flash engine multiplies ``dtype`` inputs on ``device`` (for benchmark output)."""
    dev = torch.device(device)
    od = operand_dtype(dev, dtype)
    cap = torch.backends.cpu.get_cpu_capability() if dev.type == "cpu" else dev.type
    return (f"{dtype} inputs -> Q K^T and dy V^T on {od} operands, P and dS products on float32 operands, "
            f"float32 results ({cap})")


def tile_sizes(device: torch.device, dtype: torch.dtype, d: int, backward: bool = False) -> tuple[int, int]:
    """(bq, bk): query rows and key columns per tile."""
    if config["tiles"] is not None:
        return config["tiles"]
    if backward:
        return (256, 256)
    return (256, 128)


def batch_chunks(seg: Segment, prob: Problem, backward: bool) -> list[tuple[int, int]]:
    """Batch ranges [b0, b1) the engine runs one after another, so that one tile of a chunk
    (all its batches and heads at once) stays near ``config["tile_bytes"]``: many small problems
    (B = 65536, S = 1; Swin windows) then need memory for a chunk, not for all of them."""
    b, n1, sq, _ = seg.q.shape
    bq, bk = tile_sizes(seg.q.device, prob.dtype, seg.q.shape[-1], backward)
    item = torch.finfo(torch.float64 if prob.dtype == torch.float64 else torch.float32).bits // 8
    per_batch = n1 * min(bq, max(sq, 1)) * min(bk, max(seg.k.shape[2], 1)) * item
    step = max(1, config["tile_bytes"] // per_batch)
    return [(b0, min(b0 + step, b)) for b0 in range(0, b, step)]


def max_run_blocks(rows: int, bk: int, ct: torch.dtype) -> int:
    """Key blocks merged into one forward tile: the logits tile stays near ``config['tile_bytes']``."""
    item = torch.finfo(ct).bits // 8
    return max(1, config["tile_bytes"] // (rows * bk * item))


def use_fused_backward(seg: Segment, prob: Problem, need_dpse: bool) -> bool:
    """PyTorch's fused CPU flash backward applies: CPU, fp32/fp16/bf16 (run on float32 operands),
    no dropout, no dpse, D == Dv."""
    return (config["fused_backward"] and seg.q.device.type == "cpu"
            and prob.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and seg.dropout is None and not need_dpse and seg.k.shape[2] > 0
            and seg.q.shape[-1] == seg.v.shape[-1])
