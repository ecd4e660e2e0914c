"""Which global rows each rank holds: chunking, pieces, ``shard`` / ``unshard``.

A sequence axis (dense layouts: one sequence shared by all B batches; TND: the packed token axis
with its documents) is split across the W ranks of a group:

- ``"zigzag"``: every sequence (each TND document, and the rows after the last document as one
  more) is cut into 2W chunks with bounds ``c * n // (2W)`` (equal when 2W divides n, differing
  by at most one row otherwise) and rank r holds chunks r and 2W-1-r, in that order; documents
  follow each other. This balances causal work.
- ``"contiguous"``: rank r holds one range of rows; ``shard`` cuts at ``r * n // W``, and the
  ring accepts any per-rank lengths (they are all-gathered once per call). TND documents may
  straddle ranks.

A rank's rows are a list of ``Piece``s: a run of consecutive rows of one document, its start
inside the document and its first row in the rank's tensor. Every rank computes every rank's
pieces from the same global lengths.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import invalid

__all__ = ["LOAD_BALANCES", "SEQ_DIM", "Piece", "chunk_bounds", "parse_cum", "tnd_docs", "rank_pieces",
           "all_pieces", "doc_cum", "shard", "unshard", "shard_seq_lens", "layout_name", "load_balance_name"]

LOAD_BALANCES = ("zigzag", "contiguous")
SEQ_DIM = {"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2, "TND": 0}
TAIL = -1  # the document index of rows after the last TND document (no batch covers them)


@dataclass(frozen=True)
class Piece:
    doc: int    # TND batch index (0 for dense layouts; TAIL for rows no batch covers)
    start: int  # first row inside the document
    n: int      # rows
    local: int  # first row in the rank's tensor

    @property
    def stop(self) -> int:
        return self.start + self.n


def layout_name(input_layout: Any, what: str = "input_layout") -> str:
    if not isinstance(input_layout, str) or input_layout.upper() not in SEQ_DIM:
        raise invalid(f"{what}={input_layout!r}: must be one of BSH, SBH, BSND, BNSD, TND")
    return input_layout.upper()


def load_balance_name(load_balance: Any) -> str:
    if load_balance not in LOAD_BALANCES:
        raise invalid(f"load_balance={load_balance!r}: must be 'zigzag' or 'contiguous'")
    return load_balance


def chunk_bounds(n: int, c: int) -> list[int]:
    """Bounds of ``c`` chunks of ``n`` rows: chunk k is rows [b[k], b[k+1]), b[k] = k * n // c."""
    return [k * n // c for k in range(c + 1)]


def parse_cum(value: Any, name: str) -> list[int]:
    """Cumulative lengths as ints, trailing zero padding removed (semantics §2)."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype == torch.bool or value.dtype.is_floating_point:
            raise invalid(f"{name}: must be a 1-D integer tensor or a list of ints")
        lst = [int(x) for x in value.tolist()]
    elif isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        lst = [int(x) for x in value]
    else:
        raise invalid(f"{name}={value!r}: must be a list of ints or a 1-D integer tensor (cumulative lengths)")
    if not lst:
        raise invalid(f"{name}=[]: needs at least one cumulative length")
    end = len(lst)
    while end > 0 and lst[end - 1] == 0 and any(x > 0 for x in lst[:end - 1]):
        end -= 1
    prev = 0
    for x in lst[:end]:
        if x < prev:
            raise invalid(f"{name}={lst}: cumulative lengths must not decrease (only trailing zeros may pad)")
        prev = x
    return lst[:end]


def tnd_docs(cum: Sequence[int], total: int, name: str = "actual_seq_len") -> tuple[list[int], int]:
    """(document lengths, rows after the last document) of a packed axis of ``total`` rows."""
    lens, prev = [], 0
    for x in cum:
        lens.append(x - prev)
        prev = x
    if prev > total:
        raise invalid(f"{name}: the last cumulative length {prev} exceeds the {total} rows of the packed tensor")
    return lens, total - prev


def rank_pieces(doc_lens: Sequence[int], tail: int, rank: int, world: int, lb: str,
                rank_lengths: Sequence[int] | None = None) -> list[Piece]:
    """The pieces rank ``rank`` holds, in the order of its rows."""
    docs = list(enumerate(doc_lens)) + ([(TAIL, tail)] if tail else [])
    out: list[Piece] = []
    local = 0
    if lb == "zigzag":
        c = 2 * world
        for d, n in docs:
            b = chunk_bounds(n, c)
            for k in (rank, c - 1 - rank):
                size = b[k + 1] - b[k]
                if size:
                    out.append(Piece(d, b[k], size, local))
                    local += size
        return out
    total = sum(n for _, n in docs)
    if rank_lengths is None:
        bounds = chunk_bounds(total, world)
    else:
        bounds = [0]
        for x in rank_lengths:
            bounds.append(bounds[-1] + x)
    lo, hi = bounds[rank], bounds[rank + 1]
    g0 = 0
    for d, n in docs:
        a, b_ = max(lo, g0), min(hi, g0 + n)
        if a < b_:
            out.append(Piece(d, a - g0, b_ - a, local))
            local += b_ - a
        g0 += n
    return out


def all_pieces(doc_lens: Sequence[int], tail: int, world: int, lb: str,
               rank_lengths: Sequence[int] | None = None) -> list[list[Piece]]:
    return [rank_pieces(doc_lens, tail, r, world, lb, rank_lengths) for r in range(world)]


def _rank_args(rank: Any, world_size: Any) -> None:
    for name, v in (("world_size", world_size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{name}={v!r}: must be an int")
    if world_size < 1:
        raise invalid(f"world_size={world_size}: must be >= 1")
    if not 0 <= rank < world_size:
        raise invalid(f"rank={rank}: must be in [0, world_size={world_size})")


def _docs_for(lay: str, n: int, actual_seq_len: Any) -> tuple[list[int], int]:
    if lay == "TND":
        if actual_seq_len is None:
            raise invalid("actual_seq_len=None: layout TND needs the global cumulative lengths of this tensor's "
                          "rows (actual_seq_qlen for query-like tensors, actual_seq_kvlen for key/value)")
        return tnd_docs(parse_cum(actual_seq_len, "actual_seq_len"), n)
    if actual_seq_len is not None:
        raise invalid(f"actual_seq_len is only for layout TND (got {lay})")
    return [n], 0


def shard(x: Tensor, input_layout: str, rank: int, world_size: int, load_balance: str = "zigzag", *,
          actual_seq_len: Any = None) -> Tensor:
    """This rank's part of a full-sequence tensor ``x`` in ``input_layout`` (a new tensor).

    The sequence axis (BSH/BSND: 1, SBH: 0, BNSD: 2, TND: 0; statistics [B, N, S, 8]: use "BNSD",
    row-major TND statistics [T, N, 8]: "TND") is cut as the module docstring says; any length
    works (chunks differ by at most one row). TND needs ``actual_seq_len``, the global cumulative
    lengths of ``x``'s rows (zigzag cuts every document).
    """
    lay = layout_name(input_layout)
    lb = load_balance_name(load_balance)
    if not isinstance(x, Tensor):
        raise invalid(f"x={type(x).__name__}: must be a torch.Tensor")
    _rank_args(rank, world_size)
    dim = SEQ_DIM[lay]
    if x.dim() <= dim:
        raise invalid(f"x shape {list(x.shape)}: layout {lay} has its sequence on axis {dim}")
    lens, tail = _docs_for(lay, x.shape[dim], actual_seq_len)
    pieces = rank_pieces(lens, tail, rank, world_size, lb)
    starts = _doc_starts(lens)
    rows = [x.narrow(dim, starts[p.doc] + p.start, p.n) for p in pieces]
    if not rows:
        return x.narrow(dim, 0, 0).clone()
    return torch.cat(rows, dim)


def _doc_starts(lens: Sequence[int]) -> dict[int, int]:
    starts, acc = {}, 0
    for d, n in enumerate(lens):
        starts[d] = acc
        acc += n
    starts[TAIL] = acc
    return starts


def unshard(shards: Any, input_layout: str, load_balance: str = "zigzag", *, actual_seq_len: Any = None) -> Tensor:
    """The full-sequence tensor from the W shards ``shards[r]`` (``shard(x, ..., r, W)``, or any
    per-rank lengths with ``"contiguous"``)."""
    lay = layout_name(input_layout)
    lb = load_balance_name(load_balance)
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(t, Tensor) for t in shards):
        raise invalid("shards: must be a non-empty list of tensors, one per rank")
    w, dim = len(shards), SEQ_DIM[lay]
    shape = list(shards[0].shape)
    for t in shards:
        other = list(t.shape)
        same = len(other) == len(shape) > dim and other[:dim] + other[dim + 1:] == shape[:dim] + shape[dim + 1:]
        if not same:
            raise invalid(f"shards: all W={w} shards must agree in every axis but the sequence axis {dim} ({lay}); "
                          f"got {[list(s.shape) for s in shards]}")
    lengths = [t.shape[dim] for t in shards]
    if lb == "contiguous":
        if lay == "TND" and actual_seq_len is not None:
            tnd_docs(parse_cum(actual_seq_len, "actual_seq_len"), sum(lengths))
        return torch.cat(list(shards), dim)
    lens, tail = _docs_for(lay, sum(lengths), actual_seq_len)
    starts = _doc_starts(lens)
    out = shards[0].new_empty(shape[:dim] + [sum(lengths)] + shape[dim + 1:])
    for r, t in enumerate(shards):
        pieces = rank_pieces(lens, tail, r, w, lb)
        if sum(p.n for p in pieces) != lengths[r]:
            raise invalid(f"shards: rank {r} holds {lengths[r]} rows, but zigzag over {sum(lengths)} rows gives it "
                          f"{sum(p.n for p in pieces)} (chunks {r} and {2 * w - 1 - r} of {2 * w})")
        for p in pieces:
            out.narrow(dim, starts[p.doc] + p.start, p.n).copy_(t.narrow(dim, p.local, p.n))
    return out


def shard_seq_lens(actual_seq_len: Any, rank: int, world_size: int, load_balance: str = "zigzag", *,
                   total: int | None = None, lengths: Sequence[int] | None = None) -> list[int]:
    """The cumulative lengths of this rank's part of every TND document (one entry per document).

    ``total``: the rows of the global packed tensor (default: the last cumulative length; rows
    after it belong to no document). ``lengths``: per-rank row counts for a ``"contiguous"``
    split that is not ``shard``'s. These are the lengths of the local statistics' blocks
    (``softmax_layout=""``) that ``ring_attention`` / ``ulysses_attention`` return.
    """
    lb = load_balance_name(load_balance)
    _rank_args(rank, world_size)
    cum = parse_cum(actual_seq_len, "actual_seq_len")
    lens, tail = tnd_docs(cum, cum[-1] if total is None else total)
    if lengths is not None and lb != "contiguous":
        raise invalid("lengths: only for load_balance='contiguous'")
    return doc_cum(rank_pieces(lens, tail, rank, world_size, lb, lengths), len(lens))


def doc_cum(pieces: Sequence[Piece], docs: int) -> list[int]:
    """Cumulative per-document row counts of one rank's pieces (its local TND lengths)."""
    per_doc = [0] * docs
    for p in pieces:
        if p.doc >= 0:
            per_doc[p.doc] += p.n
    return list(itertools.accumulate(per_doc))
