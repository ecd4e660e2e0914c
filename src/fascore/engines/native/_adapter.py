"""The only module of the native engine that imports fascore internals.

It turns a ``Segment`` / ``Problem`` into the flat arguments of the C++ passes. When fascore's
modules move, only the imports below change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fascore.canonical.bias import AlibiPse, CompressedPse, DensePse
from fascore.canonical.problem import Problem, Segment  # noqa: F401
from fascore.rng.philox import counter_base

PSE_NONE, PSE_DENSE, PSE_COMP, PSE_COMP_TND, PSE_ALIBI = range(5)
DROP_NONE, DROP_PHILOX, DROP_BITS = range(3)
_I64 = 1 << 64
_FAST = (torch.float32, torch.float16, torch.bfloat16)


def fallback():
    """The PyTorch tile engine, which runs what this engine does not support."""
    from fascore.engines.flash import tiles  # lazy: fascore may import this package while initialising

    return tiles


def forced_tiles() -> tuple[int, int] | None:
    """The flash engine's forced tile sizes, if a test set them (tiny-tile runs)."""
    from fascore.engines.flash import config

    return config.config.get("tiles")


def _i64(x: int) -> int:
    """x mod 2^64 as a signed 64-bit number (how the C++ side receives uint64 values)."""
    x %= _I64
    return x - _I64 if x >= 1 << 63 else x


def _clip(x: int) -> int:
    return max(-(1 << 62), min(1 << 62, int(x)))


def reasons(seg: Segment, prob: Problem) -> list[str]:
    out = []
    dev = seg.q.device
    if dev.type != "cpu":
        out.append(f"device {dev.type}")
    if prob.dtype not in _FAST:
        out.append(f"dtype {str(prob.dtype).replace('torch.', '')}")
    for name, t in (("k", seg.k), ("v", seg.v)):
        if t.dtype != seg.q.dtype:
            out.append(f"{name} dtype {t.dtype} differs from q")
    if isinstance(seg.pse, (DensePse, CompressedPse)) and seg.pse.t.dtype not in _FAST:
        out.append(f"pse dtype {seg.pse.t.dtype}")
    ex = seg.mask.explicit
    if ex is not None and ex.dtype not in (torch.bool, torch.uint8):
        out.append(f"explicit mask dtype {ex.dtype}")
    if seg.pse is not None and not isinstance(seg.pse, (DensePse, CompressedPse, AlibiPse)):
        out.append(f"pse form {type(seg.pse).__name__}")
    return out


@dataclass
class Packed:
    """Tensors and parameter vectors of one pass."""

    ex: Tensor | None
    pse: Tensor | None
    slopes: Tensor | None
    sink: Tensor | None
    bits: Tensor | None
    prefix: Tensor | None
    dbase: Tensor | None
    ip: list[int]
    fp: list[float]


def pack(seg: Segment, prob: Problem, bq: int, bk: int) -> Packed:
    mask = seg.mask
    pse_kind, pre, csq, aq, ak, asqrt = PSE_NONE, 0, 0, 0, 0, 0
    pse_t = slopes = None
    p = seg.pse
    if isinstance(p, DensePse):
        pse_kind, pre, pse_t = PSE_DENSE, int(p.pre_scale), p.t
    elif isinstance(p, CompressedPse):
        pse_kind, pre, pse_t, csq = (PSE_COMP_TND if p.tnd else PSE_COMP), int(p.pre_scale), p.t, p.sq
    elif isinstance(p, AlibiPse):
        pse_kind, aq, ak, asqrt = PSE_ALIBI, int(p.qs), int(p.ks), int(p.sqrt)
        slopes = p.slopes.to(torch.float32)
        slopes = slopes.reshape(-1, slopes.shape[-1]) if slopes.dim() != 2 else slopes
    drop, drow, dsq, cbase, key0, key1, thresh = DROP_NONE, 0, 0, 0, 0, 0, 255
    bits = dbase = None
    d = seg.dropout
    if d is not None:
        drow, dsq = int(d.row), int(d.sq)
        dbase = torch.tensor([int(x) for x in d.base], dtype=torch.int64)
        if d.bits is not None:
            drop = DROP_BITS
            bits = d.bits.reshape(-1)
            bits = bits if bits.dtype == torch.uint8 else bits.to(torch.uint8)
            bits = bits.contiguous()
        else:
            drop = DROP_PHILOX
            seed = int(d.seed) % _I64
            key0, key1 = seed & 0xFFFFFFFF, seed >> 32
            cbase = _i64(counter_base(int(d.offset)))
            thresh = int(d.threshold)
    prefix = torch.tensor([int(x) for x in mask.prefix], dtype=torch.int64) if mask.prefix is not None else None
    sink = prob.sink.to(torch.float32).contiguous() if prob.sink is not None else None
    ip = [_clip(mask.lo), _clip(mask.hi), pse_kind, pre, int(csq), aq, ak, asqrt, drop, drow, dsq, cbase,
          key0, key1, thresh, int(bq), int(bk)]
    fp = [float(prob.scale), float(prob.keep_prob)]
    return Packed(mask.explicit, pse_t, slopes, sink, bits, prefix, dbase, ip, fp)
