"""torch.distributed plumbing: groups, the one all-gather per call, point-to-point batches and
all-to-all. Without an initialised process group everything runs as a group of one."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import invalid
from ..rng.generator import default_generator

__all__ = ["Group", "group_of", "signature", "exchange", "P2P", "all_to_all", "pack", "unpack"]


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    pg: Any  # the process group (None for a group of one)

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.pg, r) if self.pg is not None else 0

    @property
    def nxt(self) -> int:
        return self.global_rank((self.rank + 1) % self.world)

    @property
    def prv(self) -> int:
        return self.global_rank((self.rank - 1) % self.world)


def group_of(group: Any, what: str = "group") -> Group:
    """(rank in group, size, group); a group of one when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise invalid(f"{what} is given but torch.distributed is not initialised")
        return Group(0, 1, None)
    g = group if group is not None else dist.group.WORLD
    try:
        w, r = dist.get_world_size(g), dist.get_rank(g)
    except Exception as e:  # noqa: BLE001 - not a process group
        raise invalid(f"{what}={group!r}: not a torch.distributed process group ({e})") from None
    if r < 0:
        raise invalid(f"this process is not a member of {what}")
    return Group(r, w, g if w > 1 else None) if w > 1 else Group(0, 1, None)


def _describe(v: Any) -> Any:
    if isinstance(v, Tensor):
        small = v.numel() <= 4096 and not v.dtype.is_floating_point
        return ("T", str(v.dtype), tuple(v.shape), tuple(v.reshape(-1).tolist()) if small else None)
    if isinstance(v, dict):
        return tuple((k, _describe(x)) for k, x in sorted(v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_describe(x) for x in v)
    if isinstance(v, float):
        return ("f", v.hex())
    return repr(v)


def signature(*parts: Any) -> int:
    """A 63-bit hash of arguments (tensors by dtype and shape, small integer tensors by value),
    equal on every process for equal arguments."""
    h = hashlib.sha1(repr(tuple(_describe(p) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def exchange(grp: Group, values: Sequence[int], device: torch.device) -> list[list[int]]:
    """All-gather a few int64 values per rank (one collective)."""
    if grp.world == 1:
        return [list(values)]
    dev = device if device.type == "cuda" else torch.device("cpu")
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    allv = [torch.empty_like(mine) for _ in range(grp.world)]
    dist.all_gather(allv, mine, group=grp.pg)
    return [t.tolist() for t in allv]


def draw_seed(device: torch.device) -> tuple[int, int]:
    """(seed, offset) from the emulated NPU generator, as the local op draws them (semantics §5)."""
    return default_generator(device).philox_engine_inputs(10)


def to_i64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


class P2P:
    """Batches of sends to the next rank and receives from the previous one."""

    def __init__(self, grp: Group) -> None:
        self.grp = grp

    def post(self, sends: Sequence[tuple[Tensor, int]], recvs: Sequence[tuple[Tensor, int]]) -> list[Any]:
        """Post (tensor, tag) sends to the next rank and receives from the previous one as one batch."""
        if self.grp.world == 1 or not (sends or recvs):
            return []
        ops = [dist.P2POp(dist.isend, t, self.grp.nxt, self.grp.pg, tag) for t, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.grp.prv, self.grp.pg, tag) for t, tag in recvs]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs: Sequence[Any]) -> None:
        for r in reqs:
            r.wait()


def all_to_all(grp: Group, sends: list[Tensor], recv_shapes: list[Sequence[int]], dtype: torch.dtype,
               device: torch.device) -> list[Tensor]:
    """sends[u] goes to rank u; returns the tensors received from each rank (given shapes). Sizes
    may differ by rank (one ``all_to_all_single`` on flat buffers with split sizes)."""
    if grp.world == 1:
        return [sends[0]]
    flat_in = torch.cat([s.reshape(-1) for s in sends])
    out_sizes = [math.prod(s) for s in recv_shapes]
    flat_out = torch.empty(sum(out_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(flat_out, flat_in, out_sizes, [s.numel() for s in sends], group=grp.pg)
    return unpack(flat_out, recv_shapes)


def pack(*ts: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in ts])


def unpack(buf: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    out, o = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[o:o + n].view(tuple(s)))
        o += n
    return out
