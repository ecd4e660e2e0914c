"""Fixed kernel configurations: one per (arch, dtype class, padded head dim), no autotuning.

Autotuning picks a configuration by timing, which changes the reduction order (and so the bits)
from one process to the next; a fixed table keeps every result bitwise repeatable on a given
machine and software stack. Entries are (BM, BN, num_warps, num_stages): BM query rows and BN key
columns per tile. ``tests/test_triton_aot.py`` compiles every GPU entry for sm_80 and sm_90 and
fails on register spills.

Keys: arch "sm80" (A100 class, sm_80..sm_89), "sm90" (H100/H200 and newer), "interp"
(``TRITON_INTERPRET=1`` on CPU tensors: small tiles, so that small test problems span several
tiles); dtype class "half" (float16, bfloat16) or "f32" (float32, IEEE products); BD = head dim
padded to a power of two (32..256). The dpse kernel needs BM == BN (its TND mode reads
[BM, BM + BN] tiles).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Tile:
    bm: int
    bn: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Config:
    fwd: Tile
    kv: Tile  # dK/dV kernel: BN keys per program, BM query rows per inner step
    q: Tile  # dQ kernel
    pse: Tile  # dpse kernel (bm == bn)
    pre: Tile  # row preprocessing (bn unused)


def _c(fwd, kv, q, pse, pre=(64, 0, 4, 1)) -> Config:
    return Config(Tile(*fwd), Tile(*kv), Tile(*q), Tile(*pse), Tile(*pre))


HEAD_DIMS = (32, 64, 128, 256)

_HALF_SMALL = _c((128, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1))
_HALF_256 = _c((32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1), (16, 0, 4, 1))
_F32_SMALL = _c((32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (32, 0, 4, 1))
_F32_128 = _c((16, 32, 4, 2), (16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1), (32, 0, 4, 1))
_F32_256 = _c((16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1), (16, 0, 4, 1))

# Chosen with the AOT compiles (``aot.py``, Triton 3.7's ptxas): tiles measured (or, after a
# spill, shrunk) so that the feature-free kernels compile without register spills.
TABLE: dict[tuple[str, str, int], Config] = {}
for _arch in ("sm80", "sm90"):
    for _bd in HEAD_DIMS:
        half = _HALF_256 if _bd == 256 else _HALF_SMALL
        TABLE[(_arch, "half", _bd)] = half
        TABLE[(_arch, "f32", _bd)] = _F32_256 if _bd == 256 else _F32_128 if _bd == 128 else _F32_SMALL
# sm_80 entries whose sm_90 tiles spill there.
TABLE[("sm80", "half", 128)] = _c((32, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1))
TABLE[("sm80", "half", 256)] = _c((32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1), (16, 0, 4, 1))
TABLE[("sm80", "f32", 256)] = _c((16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1), (16, 0, 4, 1))
# The interpreter: tiles of 16 (forward and dQ 16 x 32, dK/dV 32 x 16: BM != BN is exercised).
for _bd in HEAD_DIMS:
    for _dt in ("half", "f32"):
        TABLE[("interp", _dt, _bd)] = _c((16, 32, 1, 1), (16, 32, 1, 1), (16, 32, 1, 1), (16, 16, 1, 1),
                                         (16, 0, 1, 1))


def padded_dim(d: int) -> int:
    p = 32
    while p < d:
        p *= 2
    return p


def arch_of(capability: tuple[int, int] | None) -> str | None:
    """Table arch for a CUDA compute capability (None: the interpreter); None if unsupported."""
    if capability is None:
        return "interp"
    major, minor = capability
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return None


def lookup(arch: str, half: bool, d: int) -> Config | None:
    bd = padded_dim(d)
    return TABLE.get((arch, "half" if half else "f32", bd))


_override: list[Config] = []


@contextlib.contextmanager
def override(cfg: Config) -> Iterator[None]:
    """Use ``cfg`` for every launch in this block (tests and experiments; not thread-safe)."""
    _override.append(cfg)
    try:
        yield
    finally:
        _override.pop()


def current_override() -> Config | None:
    return _override[-1] if _override else None
