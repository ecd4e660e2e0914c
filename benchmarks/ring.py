"""Context parallelism on one machine: 1, 2 and 4 processes, every strategy, forward + backward.

    python benchmarks/ring.py                        # S=16384, B=1, N=4, D=64, float32, causal, procs 1 2 4
    python benchmarks/ring.py --seq 4096 --procs 2   # smaller
    python benchmarks/ring.py --baseline b0bbe68     # also the ring of that commit ("ring@b0bbe68")
    python benchmarks/ring.py --device cuda --backend nccl --procs 1 2   # one GPU per rank

"1 process" is single-process ``npu_fusion_attention_v2`` on the full sequence. With W > 1 each
strategy runs in the same W processes (gloo on CPU, nccl on CUDA), interleaved repeat by repeat
so that load changes hit them alike: ``ring`` (``fascore.distributed.ring_attention``, zigzag),
``ulysses`` (``ulysses_attention``), ``hybrid`` (Ulysses groups of 2 inside rings; W >= 4) and,
with ``--baseline REV``, the ring of commit REV loaded from git (``src/fascore/distributed/ring.py``
at REV), the implementation this one is compared with. Each rank creates only its shard; every
strategy warms up on a short sequence first.

Reported per strategy: forward and backward wall time (slowest rank after a barrier; the median of
``--repeat`` repeats; against the baseline ring: the median of per-repeat ratios), the ring's
backward time spent waiting for transfers that compute did not hide (``bwd wait``, including the
dK/dV hop home), and the per-rank peak memory of one forward + backward above the memory in use
before it (CPU: peak RSS, ``fascore.tools.bench.PeakMemory``; CUDA: the caching allocator's peak).
Threads per process: cores // W (at least 1). Results go to
stdout as a markdown table and, with --out, as CSV.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_baseline(rev: str):
    """The ring module of commit ``rev``, imported as fascore.distributed._ring_<rev>."""
    src = subprocess.check_output(["git", "show", f"{rev}:src/fascore/distributed/ring.py"], cwd=REPO, text=True)
    name = f"fascore.distributed._ring_{rev.replace('-', '_').replace('.', '_')}"
    mod = types.ModuleType(name)
    mod.__package__ = "fascore.distributed"
    mod.__file__ = f"<git {rev}:src/fascore/distributed/ring.py>"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - this repository's own history
    return mod


def _strategies(world: int, args: argparse.Namespace) -> list[str]:
    if world == 1:
        return ["single"]
    out = [f"ring@{args.baseline}"] if args.baseline else []
    for s in args.strategies:
        if s == "hybrid" and (world < 4 or world % 2):
            continue
        if s == "ulysses" and args.heads % world:
            continue
        out.append(s)
    return out


def _runner(name: str, world: int, args: argparse.Namespace, kw: dict, groups: tuple):
    import fascore
    from fascore import distributed as fd

    if name == "single":
        return lambda q, k, v: fascore.npu_fusion_attention_v2(q, k, v, args.heads, "BSH", **kw)[0]
    if name.startswith("ring@"):
        old = load_baseline(name[5:])
        return lambda q, k, v: old.ring_attention(q, k, v, args.heads, "BSH", **kw)[0]
    if name == "ring":
        return lambda q, k, v: fd.ring_attention(q, k, v, args.heads, "BSH", **kw)[0]
    if name == "ulysses":
        return lambda q, k, v: fd.ulysses_attention(q, k, v, args.heads, "BSH", **kw)[0]
    return lambda q, k, v: fd.context_parallel_attention(q, k, v, args.heads, "BSH", strategy="hybrid",
                                                         ulysses_group=groups[0], ring_group=groups[1], **kw)[0]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    from fascore import distributed as fd
    from fascore.tools.bench import PeakMemory

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.threads == 0 else args.threads)
    dev = torch.device(args.device if args.device == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    groups = (None, None)
    if world > 1:
        dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=3600))
        if world >= 4 and world % 2 == 0 and "hybrid" in args.strategies:
            groups = fd.hybrid_groups(2)
    dtype = getattr(torch, args.dtype)
    s_local = args.seq // world
    g = torch.Generator().manual_seed(rank)
    shape = lambda n: (args.batch, s_local, n * args.dim)  # noqa: E731  BSH
    q = torch.randn(*shape(args.heads), generator=g).to(dev, dtype)
    k = torch.randn(*shape(args.kv_heads), generator=g).to(dev, dtype)
    v = torch.randn(*shape(args.kv_heads), generator=g).to(dev, dtype)
    dy = torch.randn(*shape(args.heads), generator=g).to(dev, dtype)
    kw = dict(scale=args.dim ** -0.5)
    if args.mask == "causal":
        kw.update(atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=dev), diagonal=1),
                  sparse_mode=3)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if world > 1:
            dist.barrier()

    names = _strategies(world, args)
    runs = {n: _runner(n, world, args, kw, groups) for n in names}
    n = min(s_local, 128)  # warm-up on a short sequence: the engine's path probe, gloo connections
    for fn in runs.values():
        small = [t[:, :n].clone().requires_grad_(True) for t in (q, k, v)]
        fn(*small).backward(dy[:, :n])
    sync()
    mem = PeakMemory(dev)
    rows = []
    for rep in range(args.repeat):
        for name, fn in runs.items():
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            times = {}

            def once() -> None:
                sync()
                t0 = time.perf_counter()
                out = fn(*leaves)
                sync()
                t1 = time.perf_counter()
                out.backward(dy)
                sync()
                times.update(fwd_s=t1 - t0, bwd_s=time.perf_counter() - t1)
            peak = mem.measure(once)
            waits = fd.last_timings() if name == "ring" else {}
            rows.append(dict(procs=world, rank=rank, strategy=name, repeat=rep, **times,
                             bwd_wait_s=waits.get("bwd_wait", 0.0) + waits.get("bwd_tail", 0.0) if waits else "",
                             peak_mb=peak if peak is not None else "", threads=torch.get_num_threads()))
            del leaves
    with open(os.path.join(outdir, f"w{world}_r{rank}.txt"), "w") as f:
        f.write(repr(rows))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, outdir)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    p.terminate()
                raise SystemExit(f"procs={world}: a rank failed or timed out (exit codes {[p.exitcode for p in procs]})")
            time.sleep(0.1)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"procs={world}: exit codes {[p.exitcode for p in procs]}")
        rows = []
        for r in range(world):
            with open(os.path.join(outdir, f"w{world}_r{r}.txt")) as f:
                rows += eval(f.read())  # noqa: S307 - our own repr of a list of dicts of numbers
        return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (procs, strategy): the median over repeats of the slowest rank (and the per-repeat
    values, ``fwd_reps`` / ``bwd_reps``, for paired ratios); memory: the largest rank."""
    out = []
    keys = sorted({(r["procs"], r["strategy"]) for r in rows}, key=lambda k: (k[0], [x["strategy"] for x in rows
                                                                                      ].index(k[1])))
    for procs, strat in keys:
        mine = [r for r in rows if r["procs"] == procs and r["strategy"] == strat]
        reps = sorted({r["repeat"] for r in mine})
        worst = lambda key: [max(r[key] for r in mine if r["repeat"] == rep) for rep in reps]  # noqa: E731
        peaks = [r["peak_mb"] for r in mine if r["peak_mb"] != ""]
        waits = [r["bwd_wait_s"] for r in mine if r["bwd_wait_s"] != ""]
        fwd, bwd = worst("fwd_s"), worst("bwd_s")
        out.append(dict(procs=procs, strategy=strat, threads=mine[0]["threads"], fwd_s=statistics.median(fwd),
                        bwd_s=statistics.median(bwd), fwd_reps=fwd, bwd_reps=bwd,
                        bwd_wait_s=statistics.median(waits) if waits else None,
                        peak_mb=max(peaks) if peaks else None))
    return out


def paired(a: dict, b: dict | None, key: str) -> str:
    """Median over repeats of a's time / b's time in the same repeat (they ran interleaved)."""
    if not b:
        return "-"
    return f"{statistics.median(x / y for x, y in zip(a[key], b[key])):.2f}"


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mask", default="causal", choices=["causal", "full"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--strategies", nargs="+", default=["ring", "ulysses", "hybrid"],
                    choices=["ring", "ulysses", "hybrid"])
    ap.add_argument("--baseline", default="", help="a git revision whose ring_attention to run as well")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="", help="gloo (cpu default) or nccl (cuda default)")
    ap.add_argument("--threads", type=int, default=0, help="threads per process (0: cores // procs)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default="", help="CSV file for the per-rank rows")
    args = ap.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    for w in args.procs:
        if args.seq % (2 * w):
            raise SystemExit(f"--seq {args.seq} must be a multiple of 2 * procs = {2 * w}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# context parallel, {args.mask}: B={args.batch} S={args.seq} N={args.heads} (kv {args.kv_heads}) "
          f"D={args.dim} {args.dtype} on {args.device} ({args.backend}); torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {load:.2f} at start; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}", flush=True)
    rows = []
    for w in args.procs:
        rows += run(w, args)
    table = summarize(rows)
    base = {r["procs"]: r for r in table if r["strategy"].startswith("ring@")}
    single = next((r for r in table if r["strategy"] == "single"), None)
    print(f"| procs | strategy | threads/proc | forward s | backward s | bwd wait s | peak MB per rank | "
          f"fwd / 1 proc | bwd / 1 proc | bwd / {('ring@' + args.baseline) if args.baseline else 'baseline'} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        b = base.get(r["procs"])
        cells = [r["procs"], r["strategy"], r["threads"], f"{r['fwd_s']:.2f}", f"{r['bwd_s']:.2f}",
                 _fmt(r["bwd_wait_s"], 2), _fmt(r["peak_mb"], 0),
                 _ratio(r["fwd_s"], single and single["fwd_s"]), _ratio(r["bwd_s"], single and single["bwd_s"]),
                 paired(r, b, "bwd_reps") if r["strategy"] == "ring" else "-"]
        print("| " + " | ".join(str(x) for x in cells) + " |", flush=True)
    print(f"# load {os.getloadavg()[0]:.2f} at end")
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
