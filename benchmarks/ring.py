"""Ring attention (fascore.distributed) on one machine: 1, 2 and 4 processes, causal, forward + backward.

    python benchmarks/ring.py                       # S=16384, B=1, N=4, D=64, float32, procs 1 2 4
    python benchmarks/ring.py --seq 4096 --procs 2  # smaller
    python benchmarks/ring.py --device cuda --backend nccl --procs 1 2   # one GPU per rank

"1 process" is plain single-process ``npu_fusion_attention_v2`` on the full sequence; W > 1 is
``fascore.distributed.ring_attention`` with zigzag shards over a gloo (CPU) or nccl (CUDA) group.
Each rank creates only its own shard and warms up on a short sequence first. Reported per configuration: forward and backward wall time
(slowest rank, after a barrier), and per-rank peak memory: CPU: peak RSS of the process
(``ru_maxrss``) and its growth over the RSS before the attention call (inputs already allocated);
CUDA: ``torch.cuda.max_memory_allocated``. Threads per process: cores // W (at least 1).
Results go to stdout as a markdown table and, with --out, as CSV.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    import fascore
    from fascore import distributed as fd

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.threads == 0 else args.threads)
    dev = torch.device(args.device if args.device == "cpu" else f"cuda:{rank % max(1, torch.cuda.device_count())}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=3600))
    dtype = getattr(torch, args.dtype)
    s_local = args.seq // world
    g = torch.Generator().manual_seed(rank)
    shape = lambda n: (args.batch, s_local, n * args.dim)  # noqa: E731  BSH
    q = torch.randn(*shape(args.heads), generator=g).to(dev, dtype).requires_grad_(True)
    k = torch.randn(*shape(args.kv_heads), generator=g).to(dev, dtype).requires_grad_(True)
    v = torch.randn(*shape(args.kv_heads), generator=g).to(dev, dtype).requires_grad_(True)
    dy = torch.randn(*shape(args.heads), generator=g).to(dev, dtype)
    causal = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=dev), diagonal=1)
    kw = dict(atten_mask=causal, sparse_mode=3, scale=args.dim ** -0.5)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if world > 1:
            dist.barrier()

    def attention(q, k, v):
        if world == 1:
            return fascore.npu_fusion_attention_v2(q, k, v, args.heads, "BSH", **kw)[0]
        return fd.ring_attention(q, k, v, args.heads, "BSH", **kw)[0]

    # warm-up on a short sequence: one-time costs (the engine's path probe, gloo connections)
    n = min(s_local, 128)
    small = [t.detach()[:, :n].clone().requires_grad_(True) for t in (q, k, v)]
    attention(*small).backward(dy[:, :n])
    del small
    sync()

    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    sync()
    t0 = time.perf_counter()
    out = attention(q, k, v)
    sync()
    t1 = time.perf_counter()
    out.backward(dy)
    sync()
    t2 = time.perf_counter()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _peak_rss_mb()
    row = dict(procs=world, rank=rank, fwd_s=t1 - t0, bwd_s=t2 - t1, peak_mb=peak, growth_mb=peak - base,
               threads=torch.get_num_threads())
    with open(os.path.join(outdir, f"w{world}_r{rank}.txt"), "w") as f:
        f.write(repr(row))
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
                rows.append(eval(f.read()))  # noqa: S307 - our own repr of a dict of numbers
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
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

    print(f"# ring attention, causal: B={args.batch} S={args.seq} N={args.heads} (kv {args.kv_heads}) D={args.dim} "
          f"{args.dtype} on {args.device} ({args.backend}); torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    allrows = []
    mem = "peak RSS MB" if args.device == "cpu" else "peak CUDA MB"
    print(f"| procs | threads/proc | forward s | backward s | {mem} per rank (max) | growth MB per rank (max) |")
    print("|---|---|---|---|---|---|")
    for w in args.procs:
        rows = run(w, args)
        allrows += rows
        print(f"| {w} | {rows[0]['threads']} | {max(r['fwd_s'] for r in rows):.2f} | "
              f"{max(r['bwd_s'] for r in rows):.2f} | {max(r['peak_mb'] for r in rows):.0f} | "
              f"{max(r['growth_mb'] for r in rows):.0f} |", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(allrows[0]))
            wr.writeheader()
            wr.writerows(allrows)


if __name__ == "__main__":
    sys.exit(main())
