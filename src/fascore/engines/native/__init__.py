"""The native CPU engine: one fused C++ pass per forward / backward (FlashAttention-2).

Engine contract as ``fascore.reference``: ``forward(seg, prob)``, ``backward(seg, prob, dy, out,
m, l, dpse, dsink)``, ``workspace_bytes(seg, prob, backward)``; plus ``not_supported_reasons``,
``available``, ``build`` and ``status`` for the dispatcher and the CLI.

What runs (``csrc/``): per segment one pass over (batch, kv head, query block) work items
(forward) or (batch, kv head) items (backward), on ``at::parallel_for``. Operands of any layout
are read through their strides and converted to float32 per tile; those that every tile pass
re-reads (K/V in forward, Q/dY in backward) are first copied with each head's rows adjacent when
the layout interleaves heads (BSH, SBH, BSND, TND); logits, statistics and
accumulators are float32 (semantics §3). The block plan skips EMPTY tiles and does no mask work on FULL
ones (band / prefix analytic, explicit masks summarised per tile); every pse form, sink, invalid
rows and semantics §5's Philox (7 rounds, Ascend's byte model) are computed inside the kernel. The GEMMs
are the engine's own register-blocked float32 micro-kernels (AVX2 + FMA where the CPU has them,
detected at run time; a portable build otherwise), single-threaded inside a work item, so results
are bitwise identical for any thread count. What the engine does not support (float64, CUDA) runs
on the PyTorch tile engine (``fascore.flash``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _adapter, _build
from .engine import NativeEngine  # the dispatcher's declaration (fascore.engines)

__all__ = ["NativeEngine", "available", "build", "status", "not_supported_reasons", "forward", "backward",
           "workspace_bytes", "config"]

# Tile sizes (query rows per head, keys); None = chosen per problem. Tests force tiny tiles here
# or through the flash engine's ``config.config["tiles"]`` (fascore.engines.flash).
config: dict = {"tiles": None, "bwd_tiles": None}

_FWD_ROWS = 64  # target rows (G heads x query rows) of a forward work item
_BWD_ROWS = 64
# An operand that this many tile passes re-read is first copied with each head's rows adjacent.
_REREADS = 4


def available() -> bool:
    """Is the C++ extension built (building it now if needed) and enabled?"""
    return _build.extension() is not None


def build(verbose: bool = False) -> bool:
    """Compile ahead of first use; True when the extension is available."""
    return _build.extension(verbose=verbose) is not None


def status() -> str:
    """One line: what runs, or why the PyTorch engine runs instead."""
    ext = _build.extension()
    if ext is None:
        return f"fallback to the PyTorch engine: {_build.error() or 'not built'}"
    return f"built ({ext.isa()} kernels, torch {torch.__version__}, {ext.num_threads()} threads)"


def not_supported_reasons(seg, prob) -> list[str]:
    """Why this engine cannot run ``seg`` (empty: it can)."""
    out = _adapter.reasons(seg, prob)
    if not out and _build.extension() is None:
        out.append(f"native extension unavailable ({_build.error() or 'not built'})")
    return out


_scratch_held = 0  # bytes of per-thread scratch the largest call so far left allocated


def _scratch(ext, seg, prob, backward: bool) -> int:
    """Per-thread tile buffers of a call, over all threads."""
    bq, bk = _tiles(seg, prob, backward)
    per_thread = int(ext.scratch_bytes(prob.g, bq, bk, seg.q.shape[-1], seg.v.shape[-1], backward))
    return max(1, torch.get_num_threads()) * per_thread


def _ran(ext, seg, prob, backward: bool) -> None:
    global _scratch_held
    _scratch_held = max(_scratch_held, _scratch(ext, seg, prob, backward))


def _tiles(seg, prob, backward: bool) -> tuple[int, int]:
    forced = config["bwd_tiles" if backward else "tiles"] or config["tiles"] or _adapter.forced_tiles()
    if forced is not None:
        return int(forced[0]), int(forced[1])
    g, sq, skv = prob.g, seg.mask.sq, seg.mask.skv
    rows = _BWD_ROWS if backward else _FWD_ROWS
    bq = max(1, min(max(sq, 1), -(-rows // g)))
    if sq * g <= 4:  # decode-like: few rows, long key tiles
        return bq, 256 if backward else 512
    if backward:
        return bq, 64
    return bq, 128


def _passes(seg, bq: int, bk: int, backward: bool) -> int:
    """How often the kernel reads the re-read operands with tiles (bq, bk): K/V once per query
    block (forward), Q/dY once per key block (backward)."""
    return -(-seg.mask.skv // bk) if backward else -(-seg.mask.sq // bq)


def _regroup(t: Tensor, passes: int) -> bool:
    """Copy ``t`` ([B, N, S, D]) with each head's rows adjacent? When tile passes re-read it and its
    rows are interleaved with other heads' (BSH, SBH, BSND, TND): strided re-reads made the backward
    1.45x slower (B1 N4 S8192 D64, BSH against BNSD); the copy is one read and one write. Never
    for a broadcast (zero-stride) operand: the copy would materialise every repeat."""
    if passes < _REREADS or t.is_contiguous():
        return False
    return all(st != 0 for st, n in zip(t.stride(), t.shape) if n > 1)


def _heads_adjacent(t: Tensor, passes: int) -> Tensor:
    return t.contiguous() if _regroup(t, passes) else t


def forward(seg, prob) -> tuple[Tensor, Tensor, Tensor]:
    if not_supported_reasons(seg, prob):
        return _adapter.fallback().forward(seg, prob)
    ext = _build.extension()
    bq, bk = _tiles(seg, prob, False)
    p = _adapter.pack(seg, prob, bq, bk)
    n = _passes(seg, bq, bk, False)
    out, m, l = ext.forward(seg.q, _heads_adjacent(seg.k, n), _heads_adjacent(seg.v, n), p.ex, p.pse, p.slopes,
                            p.sink, p.bits, p.prefix, p.dbase, p.ip, p.fp)
    _ran(ext, seg, prob, False)
    return out[..., :seg.v.shape[-1]], m, l


def backward(seg, prob, dy: Tensor, out: Tensor, m: Tensor, l: Tensor, dpse: Tensor | None,
             dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if not_supported_reasons(seg, prob) or (dpse is not None and dpse.dtype != torch.float32):
        return _adapter.fallback().backward(seg, prob, dy, out, m, l, dpse, dsink)
    ext = _build.extension()
    bq, bk = _tiles(seg, prob, True)
    p = _adapter.pack(seg, prob, bq, bk)
    if dy.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dy = dy.to(torch.float32)
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        out = out.to(torch.float32)
    m, l = m.to(torch.float32), l.to(torch.float32)
    n = _passes(seg, bq, bk, True)
    q, dy = _heads_adjacent(seg.q, n), _heads_adjacent(dy, n)
    dq, dk, dv = ext.backward(q, seg.k, seg.v, dy, out, m, l, p.ex, p.pse, p.slopes, p.sink, p.bits, p.prefix,
                              p.dbase, dpse if seg.pse is not None else None, dsink, p.ip, p.fp)
    _ran(ext, seg, prob, True)
    d, dvd = seg.q.shape[-1], seg.v.shape[-1]
    return dq[..., :d], dk[..., :d], dv[..., :dvd]


def workspace_bytes(seg, prob, backward: bool) -> int:
    """Bytes a call allocates: padded float32 outputs, row statistics, tile summaries and dQ
    partials, plus the per-thread tile buffers beyond those earlier calls left (the kernels keep
    them between calls and only grow them: ``_scratch_held``)."""
    if _adapter.reasons(seg, prob) or _build.extension() is None:
        return _adapter.fallback().workspace_bytes(seg, prob, backward)
    ext = _build.extension()
    b, n1, sq, d = seg.q.shape
    n2, skv, dv = seg.k.shape[1], seg.k.shape[2], seg.v.shape[-1]
    bq, bk = _tiles(seg, prob, backward)
    scratch = max(0, _scratch(ext, seg, prob, backward) - _scratch_held)
    r8 = lambda x: -(-x // 8) * 8  # noqa: E731
    nq, nk = -(-sq // bq), -(-skv // bk)
    ex = seg.mask.explicit
    summary = (ex.shape[0] * ex.shape[1] * nq * nk) if ex is not None else 0
    n = _passes(seg, bq, bk, backward)
    if not backward:
        copies = sum(t.numel() * t.element_size() for t in (seg.k, seg.v) if _regroup(t, n))
        return scratch + summary + copies + 4 * b * n1 * sq * (r8(dv) + 2)
    grads = 4 * (b * n1 * sq * r8(d) + b * n2 * skv * (r8(d) + r8(dv)) + 3 * b * n1 * sq)
    shared = seg.pse is not None and hasattr(seg.pse, "t") and not isinstance(seg.pse, _adapter.DensePse)
    chunks = int(ext.bwd_chunks(b, n1, n2, sq, skv, bk, d, shared))
    grads += 4 * (chunks - 1) * b * n1 * sq * r8(d)  # dQ partials of key chunks
    dpse = 0
    if seg.pse is not None and hasattr(seg.pse, "t") and seg.pse.t.shape[0] == 1 and b > 1:
        dpse = 4 * b * seg.pse.t[0].numel()
    copies = b * n1 * sq * (d + dv) * seg.q.element_size() if _regroup(seg.q, n) else 0  # Q and dY
    return scratch + summary + grads + dpse + copies

