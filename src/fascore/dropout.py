"""Dropout keep masks: Philox4x32-10 (Random123) bits and bit-packed explicit masks (SPEC §5).

Bit ``f`` of the keep mask is a pure function of (seed, offset, f) or of the explicit mask's
bytes, so any tile of it can be produced on its own, on any device, in any order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of m * x for 32-bit values held in int64.

    The unsigned 64-bit product's bits survive int64's two's-complement wrap-around, so the
    halves are a shift and two masks away.
    """
    p = x * m
    return (p >> 32) & _M32, p & _M32


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of ``counter`` ([..., 4] int64 holding uint32 words) under ``key``."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key[0] & _M32, key[1] & _M32
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), -1)


@dataclass(frozen=True)
class Dropout:
    """Keep mask of one segment: element (b, n, i, j) has index base[b] + (n*Sq + i)*Skv + j.

    Exactly one source: ``bits`` (flat uint8, bit f % 8 of byte f // 8, 1 = keep) or Philox
    (``seed``, ``offset``; keep iff word < floor(keep_prob * 2**32)).
    """

    keep_prob: float
    base: tuple[int, ...]  # element index of (b, 0, 0, 0) for each batch of the segment
    sq: int
    skv: int
    bits: Tensor | None = None
    seed: int = 0
    offset: int = 0

    def keep(self, n1: int, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor:
        """Boolean keep tile [B, n1, i1 - i0, j1 - j0]."""
        base = torch.tensor(self.base, dtype=torch.int64, device=device)
        n = torch.arange(n1, dtype=torch.int64, device=device)
        i = torch.arange(i0, i1, dtype=torch.int64, device=device)
        row0 = base[:, None, None] + (n[None, :, None] * self.sq + i[None, None, :]) * self.skv + j0
        w = j1 - j0
        cols = torch.arange(w, dtype=torch.int64, device=device)
        if self.bits is not None:
            f = row0.unsqueeze(-1) + cols
            byte = self.bits[f >> 3].to(torch.int64)
            return ((byte >> (f & 7)) & 1).bool()
        # One Philox call yields the words of 4 consecutive elements: run it once per counter
        # that the row touches, then pick each element's word.
        k = (w + 6) // 4
        c = self.offset + (row0 >> 2).unsqueeze(-1) + torch.arange(k, dtype=torch.int64, device=device)
        zero = torch.zeros_like(c)
        words = philox4x32_10(torch.stack((c & _M32, (c >> 32) & _M32, zero, zero), -1), (self.seed, self.seed >> 32))
        words = words.flatten(-2)
        words = words.gather(-1, (row0 & 3).unsqueeze(-1) + cols)
        return words < threshold(self.keep_prob)


def threshold(keep_prob: float) -> int:
    return int(keep_prob * 2**32)


def draw_seed() -> int:
    """A seed from torch's default CPU generator (torch.manual_seed makes it repeatable)."""
    return int(torch.randint(1, 2**63 - 1, (1,), dtype=torch.int64).item())
