"""semantics §2's varlen rules: ``actual_seq_qlen`` / ``actual_seq_kvlen`` and the TND batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..canonical.layouts import Batch, tnd_batches
from ..errors import invalid
from ..limits import MAX_B_VARLEN
from ..params import Names
from .tensors import Geometry
from .values import as_int_list, short

__all__ = ["Varlen", "varlen", "cumsum"]


@dataclass(frozen=True)
class Varlen:
    """The batches of a call: TND's from the lengths, one [Sq, Skv] geometry otherwise."""

    b: int  # batch count (TND: the list length, padding included)
    batches: tuple[Batch, ...]  # TND only
    cum_q: tuple[int, ...]  # TND: cumulative query ends (-1 marks trailing padding)
    cum_kv: tuple[int, ...]
    max_sq: int
    max_skv: int
    geoms: tuple[tuple[int, int], ...]  # (Sq_b, Skv_b) of every batch with queries

    @property
    def live(self) -> list[Batch]:
        return [x for x in self.batches if x.sq > 0]


def cumsum(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def _cumsum_hint(cum: list[int], total: int, tname: str) -> str:
    """Per-sequence lengths passed where cumulative offsets belong: say what the offsets are."""
    if all(x >= 0 for x in cum) and sum(cum) <= total:
        c = cumsum(cum)
        return (f"; these look like per-sequence lengths: pass their cumulative sums {short(c)} "
                f"(itertools.accumulate(lengths), or torch.cumsum(lengths, 0); {tname}={total})")
    return ""


def _seq_lens(value: Any, name: str, total: int, tname: str, other: str = "", other_total: int = -1) -> list[int]:
    """Cumulative lengths with trailing-zero padding marked -1; checks semantics §2's TND rules."""
    cum = as_int_list(value, name)
    if not 1 <= len(cum) <= MAX_B_VARLEN:
        raise invalid(f"{name} has {len(cum)} entries: the batch count must be in [1, {MAX_B_VARLEN}]"
                      + (" (cumulative end offsets, one per sequence)" if not cum else ""))
    end = len(cum)
    while end > 0 and cum[end - 1] == 0 and any(x > 0 for x in cum[:end - 1]):
        end -= 1
    body = cum[:end]
    prev = 0
    for k, x in enumerate(body):
        if x < prev:
            raise invalid(f"{name}={short(cum)}: cumulative lengths must not decrease "
                          f"(entry {k} is {x} after {prev}); only trailing zeros may pad"
                          + _cumsum_hint(cum, total, tname))
        prev = x
    if body and body[-1] > total:
        hint = ""
        if other and body[-1] == other_total:
            hint = f"; {body[-1]} is the row count of {other}: were the query and key/value lengths swapped?"
        raise invalid(f"{name}={short(cum)}: the total {body[-1]} exceeds {tname}={total} (the rows of the packed "
                      f"tensor; the last offset is the number of rows used)" + hint)
    return cum[:end] + [-1] * (len(cum) - end)


def varlen(g: Geometry, actual_seq_qlen: Any, actual_seq_kvlen: Any, nm: Names) -> Varlen:
    if g.layout != "TND":
        for n_, v in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
            if v is not None:
                raise invalid(f"{nm[n_]} is only for layout TND (got layout {g.layout}); for padded batches "
                              f"mask the padding with {nm['atten_mask']}, or pack the sequences into "
                              f"[T, N, D] tensors with {nm['input_layout']}='TND'")
        return Varlen(g.b, (), (), (), g.sq, g.skv, ((g.sq, g.skv),))
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise invalid(f"{nm['actual_seq_qlen']}/{nm['actual_seq_kvlen']}=None: required with layout TND: the "
                      "cumulative end offset of each packed sequence, e.g. lengths [3, 5] -> [3, 8] "
                      "(flash-attn's cu_seqlens[1:]; with its leading 0 the first batch is an empty one)")
    cq = _seq_lens(actual_seq_qlen, nm["actual_seq_qlen"], g.sq, "T1", nm["key"], g.skv)
    ck = _seq_lens(actual_seq_kvlen, nm["actual_seq_kvlen"], g.skv, "T2", nm["query"], g.sq)
    if len(cq) != len(ck):
        hint = ""
        if abs(len(cq) - len(ck)) == 1 and (cq[:1] == [0]) != (ck[:1] == [0]):
            hint = (" (one starts with flash-attn's leading 0: drop it, cu_seqlens[1:], "
                    "or give it to both)")
        raise invalid(f"{nm['actual_seq_qlen']} has {len(cq)} entries, {nm['actual_seq_kvlen']} {len(ck)}: "
                      "they must have the same length, one entry per batch" + hint)
    n_eff = min((cq + [-1]).index(-1), (ck + [-1]).index(-1))
    batches = tuple(tnd_batches(cq[:n_eff], ck[:n_eff]))
    live = [x for x in batches if x.sq > 0]
    return Varlen(len(cq), batches, tuple(cq), tuple(ck), max((x.sq for x in batches), default=0),
                  max((x.skv for x in batches), default=0), tuple((x.sq, x.skv) for x in live))
