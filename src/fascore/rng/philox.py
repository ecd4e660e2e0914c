"""Ascend's dropout stream (semantics §5): Philox4x32-7 bytes and the keep threshold.

Philox4x32 with 7 rounds under key (seed lo, seed hi); the 128-bit counter starts at
ceil(offset / 16) and grows by one per 16 stream elements; the 16 little-endian bytes of a
counter's 4 output words are the bytes of 16 consecutive elements, and an element is kept iff
its byte <= keep_prob * 255. Any range of the stream is a pure function of (seed, offset,
element), so it can be produced on its own, on any device, in any order.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["ROUNDS", "philox4x32", "keep_threshold", "counter_base", "stream_keep", "pad16"]

ROUNDS = 7  # Ascend's Philox rounds (Random123's default is 10)
_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_BYTE_SHIFTS = (0, 8, 16, 24)


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of m * x for 32-bit values held in int64.

    The unsigned 64-bit product's bits survive int64's two's-complement wrap-around, so the
    halves are a shift and two masks away.
    """
    p = x * m
    return (p >> 32) & _M32, p & _M32


def philox4x32(counter: Tensor, key: tuple[int, int], rounds: int = ROUNDS) -> Tensor:
    """Philox4x32 (Random123's round function and key schedule) of ``counter`` ([..., 4] int64
    holding uint32 words, low word first) under ``key``; ``rounds`` rounds."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key[0] & _M32, key[1] & _M32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), -1)


def keep_threshold(keep_prob: float) -> int:
    """The largest byte that is kept: floor(keep_prob * 255), computed exactly."""
    return math.floor(Fraction(keep_prob) * 255)


def counter_base(offset: int) -> int:
    """The Philox counter of element 0: ceil(offset / 16)."""
    return -(-offset // 16)


def pad16(n: int) -> int:
    """Row length of the generated numbering: ``n`` rounded up to a multiple of 16."""
    return -(-n // 16) * 16


def stream_keep(seed: int, offset: int, keep_prob: float, first: Tensor, width: int) -> Tensor:
    """Keep bits of elements ``first[..., None] + arange(width)`` of the stream (bool [..., width])."""
    dev = first.device
    seed %= 1 << 64
    c_first = counter_base(offset) + (first >> 4)
    n_ctr = (width + 15) // 16 + 1  # counters a row of ``width`` elements can touch
    c = c_first.unsqueeze(-1) + torch.arange(n_ctr, dtype=torch.int64, device=dev)
    zero = torch.zeros_like(c)
    words = philox4x32(torch.stack((c & _M32, (c >> 32) & _M32, zero, zero), -1), (seed, seed >> 32))
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=dev)
    data = ((words.unsqueeze(-1) >> shifts) & 0xFF).flatten(-3)  # [..., n_ctr * 16] bytes in element order
    idx = (first & 15).unsqueeze(-1) + torch.arange(width, dtype=torch.int64, device=dev)
    return data.gather(-1, idx) <= keep_threshold(keep_prob)
