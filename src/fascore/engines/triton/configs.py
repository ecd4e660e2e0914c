"""Fixed kernel configurations: one per (arch, dtype class, padded head dim), no autotuning.

Autotuning picks a configuration by timing, which changes the reduction order (and so the bits)
from one process to the next; a fixed table keeps every result bitwise repeatable on a given
machine and software stack. Entries are (BM, BN, num_warps, num_stages[, DC]): BM query rows and
BN key columns per tile; DC (dpse kernel only) the head-dim slice of its two products, so that
large head dims do not hold whole [BM, 256] operands in registers. ``tests/test_triton_aot.py``
compiles every GPU entry for sm_80 and sm_90 and fails on register spills.

Keys: arch "sm80" (A100 class, sm_80..sm_89), "sm90" (H100/H200 and newer), "interp"
(``TRITON_INTERPRET=1`` on CPU tensors: small tiles, so that small test problems span several
tiles); dtype class "half" (float16, bfloat16) or "f32" (float32, IEEE products); BD = head dim
padded to a power of two (32..256). The dpse kernel needs BM == BN (its TND mode reads
[BM, BM + BN] tiles) and a DC of 16 or more that divides BD (``check_table`` enforces both).
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
    dc: int = 0  # dpse kernel: head-dim slice of its Q K^T and dY V^T products (0: the whole padded dim)

    def dim_chunk(self, bd: int) -> int:
        """The dpse head-dim slice for padded head dim ``bd``."""
        return min(self.dc, bd) if self.dc else bd


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

# Chosen with the AOT compiles (``aot.py``): every kernel of every entry compiles without register
# spills with both Triton 3.6 and 3.7 (their LLVM and ptxas flags differ, and tiles at the edge
# spill with one of them; see docs/engines-triton.md for the table). Columns: forward, dK/dV, dQ,
# dpse (its fifth field: the head-dim slice), row preprocessing.
_GPU = {
    ("sm80", "half", 32): _c((128, 32, 8, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm80", "half", 64): _c((128, 32, 8, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm80", "half", 128): _c((32, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm80", "half", 256): _c((32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1, 64), (16, 0, 4, 1)),
    ("sm80", "f32", 32): _c((32, 32, 8, 2), (16, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (32, 0, 4, 1)),
    ("sm80", "f32", 64): _c((32, 32, 8, 2), (16, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (32, 0, 4, 1)),
    ("sm80", "f32", 128): _c((16, 32, 4, 2), (16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm80", "f32", 256): _c((16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1, 64), (16, 0, 4, 1)),
    ("sm90", "half", 32): _c((128, 32, 8, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm90", "half", 64): _c((128, 32, 8, 2), (32, 32, 4, 1), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm90", "half", 128): _c((128, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm90", "half", 256): _c((32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 8, 1, 64), (16, 0, 4, 1)),
    ("sm90", "f32", 32): _c((32, 32, 8, 2), (16, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (32, 0, 4, 1)),
    ("sm90", "f32", 64): _c((32, 32, 8, 2), (16, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (32, 0, 4, 1)),
    ("sm90", "f32", 128): _c((16, 32, 4, 2), (16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1), (32, 0, 4, 1)),
    ("sm90", "f32", 256): _c((16, 32, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 8, 1, 64), (16, 0, 4, 1)),
}
TABLE: dict[tuple[str, str, int], Config] = dict(_GPU)
# The interpreter: tiles of 16 and 32 (forward and dQ 16 x 32, dK/dV 32 keys x 16 query rows: BM !=
# BN is exercised) and a dpse head-dim slice of 16, so that small test problems span several tiles
# and the dpse products take several slices.
for _bd in HEAD_DIMS:
    for _dt in ("half", "f32"):
        TABLE[("interp", _dt, _bd)] = _c((16, 32, 1, 1), (16, 32, 1, 1), (16, 32, 1, 1), (16, 16, 1, 1, 16),
                                         (16, 0, 1, 1))


def check_table(table: dict[tuple[str, str, int], Config] | None = None) -> list[str]:
    """Entries that break the kernels' shape rules (empty: none): tl.dot needs every dimension
    >= 16 and powers of two; the dpse kernel BM == BN and a head-dim slice dividing BD."""
    bad = []
    for key, cfg in (TABLE if table is None else table).items():
        bd = key[2]
        for name in ("fwd", "kv", "q", "pse", "pre"):
            t = getattr(cfg, name)
            dims = [t.bm] if name == "pre" else [t.bm, t.bn]
            if any(x < 16 or x & (x - 1) for x in dims) or t.warps not in (1, 2, 4, 8, 16) or t.stages < 1:
                bad.append(f"{key} {name}: {t}")
        dc = cfg.pse.dim_chunk(bd)
        if cfg.pse.bm != cfg.pse.bn or dc < 16 or bd % dc or dc & (dc - 1):
            bad.append(f"{key} pse: {cfg.pse} (BM == BN and a power-of-two slice >= 16 dividing BD={bd})")
    return bad


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
