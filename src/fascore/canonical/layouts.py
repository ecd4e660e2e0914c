"""Layouts (semantics §2): views to and from the canonical [B, N, S, D] form, and TND batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "to_bnsd", "from_bnsd", "from_bnsd_copies", "Batch", "tnd_batches", "tnd_rows", "tnd_stats_view"]

LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def to_bnsd(x: Tensor, layout: str, n: int) -> Tensor:
    """View of ``x`` (BSH/SBH/BSND/BNSD) as [B, N, S, D]; ``n`` heads for the H layouts."""
    if layout == "BSH":
        return x.unflatten(-1, (n, -1)).permute(0, 2, 1, 3)
    if layout == "SBH":
        return x.unflatten(-1, (n, -1)).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    return x


def from_bnsd(y: Tensor, layout: str) -> Tensor:
    """``y`` [B, N, S, D] in ``layout`` (BSH/SBH/BSND/BNSD), contiguous."""
    if layout == "BSH":
        return y.permute(0, 2, 1, 3).flatten(2).contiguous()
    if layout == "SBH":
        return y.permute(2, 0, 1, 3).flatten(2).contiguous()
    if layout == "BSND":
        return y.permute(0, 2, 1, 3).contiguous()
    return y.contiguous()


def from_bnsd_copies(shape: tuple[int, ...], layout: str) -> bool:
    """Does ``from_bnsd`` copy a contiguous [B, N, S, D] tensor of ``shape``? (Not when the
    permutation only moves size-1 axes.)"""
    x = torch.empty(shape, device="meta")
    if layout in ("BSH", "BSND"):
        return not x.permute(0, 2, 1, 3).is_contiguous()
    if layout == "SBH":
        return not x.permute(2, 0, 1, 3).is_contiguous()
    return False


@dataclass(frozen=True)
class Batch:
    """One TND batch: query rows [q0, q0 + sq), key rows [k0, k0 + skv)."""

    index: int
    q0: int
    sq: int
    k0: int
    skv: int


def tnd_batches(cum_q: list[int], cum_kv: list[int]) -> list[Batch]:
    """Batches from validated cumulative lengths (trailing zeros already stripped)."""
    out, pq, pk = [], 0, 0
    for b, (eq, ek) in enumerate(zip(cum_q, cum_kv)):
        out.append(Batch(b, pq, eq - pq, pk, ek - pk))
        pq, pk = eq, ek
    return out


def tnd_rows(x: Tensor, start: int, length: int) -> Tensor:
    """Rows [start, start + length) of a [T, N, D] tensor as [1, N, length, D]."""
    return x[start:start + length].permute(1, 0, 2).unsqueeze(0)


def tnd_stats_view(buf: Tensor, batch: Batch, n1: int, softmax_layout: str) -> Tensor:
    """The [N1, Sq_b, 8] part of a TND statistics tensor [T1, N1, 8] that holds ``batch``."""
    if softmax_layout == "TND":
        return buf[batch.q0:batch.q0 + batch.sq].permute(1, 0, 2)
    start = n1 * 8 * batch.q0
    return buf.view(-1)[start:start + n1 * batch.sq * 8].view(n1, batch.sq, 8)
