"""The memory guard: a call's bytes estimated before it starts, refused (361001) if they cannot fit.

The estimate is what the API allocates around the engine (results in the caller's dtype and
layout) plus the chosen engine's own ``workspace_bytes``, which models its allocations.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..canonical.layouts import from_bnsd_copies
from ..canonical.problem import Problem
from ..engines import Engine
from ..errors import runtime

__all__ = ["available_memory", "check_memory"]


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without a limit."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CPU: MemAvailable, capped by the cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    if have is None:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cg = _cgroup_headroom()
    return have if cg is None else min(have, cg)


def _restore_bytes(prob: Problem, backward: bool) -> int:
    """Bytes the API allocates around the engine: results in the caller's dtype and layout
    (a copy where the dtype or the layout differs from the engine's [B, N, S, D] float32), the
    [.., 8] statistics, the dpse buffer."""
    item = torch.finfo(prob.dtype).bits // 8
    conv = prob.dtype not in (torch.float32, torch.float64)

    def copies(t: Tensor | None) -> int:  # of one result with the shape of ``t`` [B, N, S, D]
        if prob.layout == "TND":
            return 1 + conv
        return conv + from_bnsd_copies(tuple(t.shape), prob.layout) if t is not None else conv

    if backward:
        (seg,) = prob.segments if prob.layout != "TND" else (None,)
        per = [(seg.q if seg else None, prob.inputs[0]), (seg.k if seg else None, prob.inputs[1]),
               (seg.v if seg else None, prob.inputs[2])]
        need = sum(x.numel() * item * (copies(s4) + (prob.rope is not None)) for s4, x in per)
        need += sum(t.numel() * item * 2 for t in prob.rope) if prob.rope is not None else 0
        return need + (prob.pse.numel() * (4 + item) if prob.pse is not None else 0)
    (seg,) = prob.segments if prob.layout != "TND" else (None,)
    shape = (seg.q.shape[0], prob.n1, seg.q.shape[2], prob.dv) if seg is not None else None
    outs = math.prod(prob.out_shape)
    n = copies(torch.empty(shape, device="meta") if shape else None)
    return outs * item * n + 2 * math.prod(prob.stats_shape) * 4


def check_memory(prob: Problem, backward: bool, engine: Engine) -> int:
    """Estimated bytes of a run (what the API allocates around the engine, and the engine's own
    allocations for its largest segment); 361001 if they cannot fit, before any work starts."""
    need = _restore_bytes(prob, backward)
    need += max((engine.workspace_bytes(s, prob, backward) for s in prob.segments), default=0)
    have = available_memory(prob.device)
    if need > have:
        raise runtime(f"memory: this call needs about {need / 2**30:.2f} GiB on {prob.device} "
                      f"but only {have / 2**30:.2f} GiB is available")
    return need
