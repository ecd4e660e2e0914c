"""``fascore bench``: the flash engine against PyTorch's SDPA and naive attention over sequence lengths.

For each mask (dense, causal) x sequence length x implementation x pass (fwd, fwd+bwd) it times
the median (and the min and max) of ``repeat`` runs after a warm-up, and measures the warm-up's peak memory above what
was in use before it (CPU: peak RSS, see ``PeakMemory``; CUDA: ``torch.cuda.max_memory_allocated``).
It writes

* ``bench.csv``: one row per measurement (median, min and max seconds, dense and effective GFLOP/s
  of the median, peak MiB),
* ``time.png``, ``gflops.png``: one line per implementation (the median) with a shaded min-max band
  over the repeats, log-log axes; ``memory.png``,
* ``machine.json``: the machine, threads, torch version and the matmul path,

and returns the rows for a summary table. GFLOP/s count 4*B*N*Sq*Skv*D per forward (3.5x for
forward+backward); "effective" counts only the pairs that take part (about half for causal).
``benchmarks/bench.py`` is the longer, case-by-case comparison (FlexAttention included).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fascore
from fascore.engines.flash import config as kernels

__all__ = ["Config", "quick_config", "full_config", "run", "plot", "summary", "write_csv", "read_csv", "machine_info",
           "timed", "timed_spread"]

IMPLS = ("fascore", "sdpa", "naive")
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Config:
    seqlens: tuple[int, ...]
    masks: tuple[str, ...]
    b: int = 1
    n: int = 8
    d: int = 64
    dtype: torch.dtype = torch.float32
    repeat: int = 3
    memory: bool = True
    naive_max_bytes: int = 6 << 30  # skip naive where its S x S scores exceed this


def quick_config() -> Config:
    return Config(seqlens=(256, 512, 1024, 2048), masks=("causal",), repeat=2)


def full_config() -> Config:
    return Config(seqlens=(512, 1024, 2048, 4096, 8192, 16384), masks=("dense", "causal"), repeat=3)


def _mask() -> torch.Tensor:
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def make_impls(mask: str, n: int, d: int, device: torch.device) -> dict[str, Callable]:
    causal = mask == "causal"
    scale = d ** -0.5
    kw = dict(atten_mask=_mask().to(device), sparse_mode=2) if causal else {}

    def fas(q, k, v):
        return fascore.npu_fusion_attention_v2(q, k, v, n, "BNSD", scale=scale, **kw)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def naive(q, k, v):
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            sq, skv = s.shape[-2:]
            s = s.masked_fill(torch.ones(sq, skv, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return (torch.softmax(s, -1) @ v.float()).to(q.dtype)

    return {"fascore": fas, "sdpa": sdpa, "naive": naive}


def _naive_fits(cfg: Config, s: int) -> bool:
    return cfg.b * cfg.n * s * s * 4 * 4 <= cfg.naive_max_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_spread(fn: Callable[[], object], repeat: int, device: torch.device,
                 peak: PeakMemory | None = None) -> tuple[float, float, float, float | None]:
    """(median, min, max seconds of ``repeat`` runs, peak MiB of the warm-up run)."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: must be >= 1")
    mib = peak.measure(fn) if peak is not None else None
    if peak is None:
        fn()
    _sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts), mib


def timed(fn: Callable[[], object], repeat: int, device: torch.device,
          peak: PeakMemory | None = None) -> tuple[float, float | None]:
    """(median seconds of ``repeat`` runs, peak MiB of the warm-up run)."""
    med, _, _, mib = timed_spread(fn, repeat, device, peak)
    return med, mib


def _inputs(cfg: Config, s: int, grad: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(cfg.b, cfg.n, s, cfg.d, generator=g).to(device, cfg.dtype).requires_grad_(grad)
                 for _ in range(3))


def _step(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: bool) -> Callable[[], None]:
    def step() -> None:
        if grad:
            for x in (q, k, v):
                x.grad = None
            o = fn(q, k, v)
            o.backward(torch.ones_like(o))
        else:
            with torch.no_grad():
                fn(q, k, v)
    return step


def plan(cfg: Config) -> list[tuple[str, int, str, str]]:
    """The timing measurements: (mask, S, impl, passes)."""
    out = []
    for mask in cfg.masks:
        for s in cfg.seqlens:
            for impl in IMPLS:
                if impl == "naive" and not _naive_fits(cfg, s):
                    continue
                for p in PASSES:
                    out.append((mask, s, impl, p))
    return out


def _flops(cfg: Config, s: int, mask: str) -> tuple[float, float]:
    dense = 4.0 * cfg.b * cfg.n * s * s * cfg.d
    eff = dense if mask == "dense" else 4.0 * cfg.b * cfg.n * (s * (s + 1) // 2) * cfg.d
    return dense, eff


def run_timings(cfg: Config, device: torch.device, progress: Callable[[str], None] | None = None) -> list[dict]:
    peak = PeakMemory(device) if cfg.memory else None
    for impl, fn in make_impls("causal", cfg.n, cfg.d, device).items():  # one-time initialisation
        q, k, v = _inputs(replace(cfg, b=1), 128, True, device)
        _step(fn, q, k, v, True)()
    rows = []
    for mask, s, impl, passes in plan(cfg):
        if progress:
            progress(f"{mask} S={s} {impl} {passes}")
        grad = passes == "fwd+bwd"
        fn = make_impls(mask, cfg.n, cfg.d, device)[impl]
        q, k, v = _inputs(cfg, s, grad, device)
        try:
            t, t_min, t_max, mib = timed_spread(_step(fn, q, k, v, grad), cfg.repeat, device, peak)
        except Exception as e:  # noqa: BLE001 - report, keep going
            print(f"  {impl} {passes} {mask} S={s} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        mult = 3.5 if grad else 1.0
        dense, eff = _flops(cfg, s, mask)
        rows.append(dict(impl=impl, mask=mask, passes=passes, dtype=str(cfg.dtype).replace("torch.", ""),
                         device=device.type, B=cfg.b, N=cfg.n, S=s, D=cfg.d, seconds=t, seconds_min=t_min,
                         seconds_max=t_max, gflops_dense=mult * dense / t / 1e9, gflops_effective=mult * eff / t / 1e9,
                         peak_mib=mib))
    return rows


class PeakMemory:
    """Peak memory of one call above the memory in use before it, in MiB.

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs) above its RSS before the call, with glibc told to serve every
    allocation of 64 KiB or more by mmap and to return freed memory at once during the call, so
    that memory freed by earlier calls cannot hide new use. ``available`` is False elsewhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        if device.type == "cuda":
            self.available = True
            return
        try:
            import ctypes
            self.libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = self._status()[0] > 0
        except (OSError, AttributeError, IndexError, ValueError):
            self.available = False

    @staticmethod
    def _status() -> tuple[int, int]:
        hwm = rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return hwm, rss

    def measure(self, fn: Callable[[], object]) -> float | None:
        """Run ``fn`` once; its peak MiB (None where not measurable)."""
        if not self.available:
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        libc = self.libc
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _, before = self._status()
            fn()
            peak, _ = self._status()
        finally:
            libc.mallopt(-3, 32 << 20)
            libc.mallopt(-1, 64 << 20)
        return max(0.0, (peak - before) / 1024)


def machine_info(device: torch.device) -> dict:
    info = dict(fascore=fascore.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
                engine=fascore.current_engine_name(), cpu=_cpu_name(),
                capability=torch.backends.cpu.get_cpu_capability(), path=kernels.path_description())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


FIELDS = ("impl", "mask", "passes", "dtype", "device", "B", "N", "S", "D", "seconds", "seconds_min", "seconds_max",
          "gflops_dense", "gflops_effective", "peak_mib")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else ("" if r.get(k) is None else r[k]))
                        for k in FIELDS})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            for k in ("B", "N", "S", "D"):
                r[k] = int(r[k])
            for k in ("seconds", "seconds_min", "seconds_max", "gflops_dense", "gflops_effective", "peak_mib"):
                r[k] = float(r[k]) if r.get(k) not in ("", None) else None
            rows.append(r)
    return rows


_STYLE = {"fascore": dict(color="tab:red", marker="o"), "sdpa": dict(color="tab:blue", marker="s"),
          "naive": dict(color="tab:gray", marker="^"), "flex": dict(color="tab:green", marker="D")}


def _band(sel: list[dict], metric: str) -> tuple[list[float], list[float]] | None:
    """(low, high) of ``metric`` over the repeats, from seconds_min / seconds_max (GFLOP/s: inverted)."""
    if not all(r.get("seconds_min") and r.get("seconds_max") for r in sel):
        return None
    if metric == "seconds":
        return [r["seconds_min"] for r in sel], [r["seconds_max"] for r in sel]
    return ([r[metric] * r["seconds"] / r["seconds_max"] for r in sel],
            [r[metric] * r["seconds"] / r["seconds_min"] for r in sel])


def plot(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    """time.png, gflops.png (per mask x pass: the median, and a band from the fastest to the slowest
    repeat) and memory.png (if measured); returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = sorted({r["mask"] for r in rows}, key=lambda m: (m != "dense", m))
    impls = [i for i in list(IMPLS) + ["flex"] if any(r["impl"] == i for r in rows)]
    paths = []
    for metric, ylabel, fname, logy in (("seconds", "time per call (s)", "time.png", True),
                                        ("gflops_effective", "effective GFLOP/s", "gflops.png", False)):
        fig, axes = plt.subplots(len(masks), len(PASSES), figsize=(11, 4.2 * len(masks)), squeeze=False)
        for mi, mask in enumerate(masks):
            for pi, passes in enumerate(PASSES):
                ax = axes[mi][pi]
                for impl in impls:
                    sel = sorted((r for r in rows if r["impl"] == impl and r["mask"] == mask and r["passes"] == passes),
                                 key=lambda r: r["S"])
                    if sel:
                        ax.plot([r["S"] for r in sel], [r[metric] for r in sel], label=impl, **_STYLE.get(impl, {}))
                        band = _band(sel, metric)
                        if band is not None:  # min-max over the timed repeats
                            ax.fill_between([r["S"] for r in sel], *band, alpha=0.2, linewidth=0,
                                            color=_STYLE.get(impl, {}).get("color"))
                ax.set_xscale("log", base=2)
                if logy:
                    ax.set_yscale("log")
                ax.set_xlabel("sequence length S (Sq = Skv)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{mask}, {passes}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
        fig.suptitle(title or "fascore vs SDPA vs naive attention")
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    mem = [r for r in rows if r.get("peak_mib") is not None and r["mask"] == "causal"]
    if mem:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for impl in impls:
            for passes, ls in zip(PASSES, ("-", "--")):
                pts = sorted((r["S"], max(r["peak_mib"], 1e-3)) for r in mem
                             if r["impl"] == impl and r["passes"] == passes)
                if pts:
                    ax.plot(*zip(*pts), linestyle=ls, label=f"{impl} {passes}", **_STYLE.get(impl, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S (Sq = Skv, causal)")
        ax.set_ylabel("peak memory above baseline (MiB)")
        ax.set_title("peak memory, causal")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / "memory.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def run(cfg: Config, out: Path, device: str | torch.device = "cpu",
        progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[Path]]:
    """Time, measure memory, write the CSV, plots and machine.json; returns (rows, paths)."""
    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_timings(cfg, dev, progress)
    info = machine_info(dev)
    write_csv(rows, out / "bench.csv")
    (out / "machine.json").write_text(json.dumps(info, indent=1))
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    paths = plot(rows, out, title=f"B={cfg.b} N={cfg.n} D={cfg.d} {str(cfg.dtype).replace('torch.', '')} "
                                  f"on {where}")
    return rows, [out / "bench.csv"] + paths


def n_steps(cfg: Config) -> int:
    return len(plan(cfg))


def summary(rows: list[dict]) -> list[dict]:
    """Per (mask, S): each implementation's fwd / fwd+bwd ms and fascore's time over SDPA's."""
    by = {(r["mask"], r["S"], r["impl"], r["passes"]): r for r in rows}
    out = []
    for mask, s in sorted({(r["mask"], r["S"]) for r in rows}, key=lambda x: (x[0] != "dense", x[0], x[1])):
        for impl in IMPLS:
            f, fb = by.get((mask, s, impl, "fwd")), by.get((mask, s, impl, "fwd+bwd"))
            if not f and not fb:
                continue
            sd = by.get((mask, s, "sdpa", "fwd+bwd"))
            out.append(dict(mask=mask, S=s, impl=impl, fwd_ms=f and 1e3 * f["seconds"],
                            fwdbwd_ms=fb and 1e3 * fb["seconds"], gflops=fb and fb["gflops_effective"],
                            peak_mib=fb and fb["peak_mib"],
                            vs_sdpa=(fb["seconds"] / sd["seconds"]) if fb and sd else None))
    return out
