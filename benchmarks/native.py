"""The native C++ CPU engine vs torch SDPA (and the PyTorch tile engine), same process, same run.

    python benchmarks/native.py [--threads 1,2] [--repeat 5] [--only dense,causal] [--out DIR]

Rows of issue 12's table: dense fp32/bf16/fp16 B1 N8 S2048 D128, causal (sparse_mode 3), GQA
causal B2 N16/4 S1024 D64, small causal B4 N8 S256 D64, decode B8 N32 Sq1 Skv4096 D128, band
w256 S8192 (SDPA with a boolean mask; FlexAttention compiled, forward), dropout (keep_prob 0.9,
vs the engine's own time without dropout), causal B1 N4 S8192 D64 on BSH storage (vs the same case in
BNSD, and vs the native kernels reading the re-read operands in place instead of regrouping them:
``native-inplace``). Each time is the median of ``--repeat`` runs after a
warm-up; ratios are native time / SDPA time measured in the same run and thread count, with the
implementations of a case interleaved repeat by repeat (so that load changes hit all alike). The bmm
ceiling (GFLOP/s of torch.bmm in the same dtype) is measured in the same run; effective GFLOP/s
count the (i, j) pairs that take part (4*D flops per pair forward, 2.5x that for backward).
Writes DIR/native.csv and DIR/native.json and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fascore
import fascore.engines.native as native
from fascore.tools.bench import timed

COMPRESSED = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@dataclass
class Case:
    name: str
    b: int
    n1: int
    n2: int
    sq: int
    skv: int
    d: int
    dtype: torch.dtype
    mode: int = 0  # 0 dense, 3 causal (bottom-right), 4 band
    pre: int = 2147483647
    nxt: int = 2147483647
    keep_prob: float = 1.0
    layout: str = "BNSD"  # "BSH": fascore and SDPA get the same BSH storage (SDPA as a BNSD view)

    def allowed(self) -> torch.Tensor | None:
        if self.mode == 0:
            return None
        i = torch.arange(self.sq)[:, None]
        j = torch.arange(self.skv)[None, :]
        dd = self.skv - self.sq
        if self.mode == 3:
            return j <= i + dd
        return (j - i - dd >= -self.pre) & (j - i - dd <= self.nxt)

    def pairs(self) -> int:
        a = self.allowed()
        return self.sq * self.skv if a is None else int(a.sum())


CASES = [
    Case("dense fp32", 1, 8, 8, 2048, 2048, 128, torch.float32),
    Case("causal fp32", 1, 8, 8, 2048, 2048, 128, torch.float32, mode=3),
    Case("dense bf16", 1, 8, 8, 2048, 2048, 128, torch.bfloat16),
    Case("causal bf16", 1, 8, 8, 2048, 2048, 128, torch.bfloat16, mode=3),
    Case("dense fp16", 1, 8, 8, 2048, 2048, 128, torch.float16),
    Case("gqa causal fp32", 2, 16, 4, 1024, 1024, 64, torch.float32, mode=3),
    Case("small causal fp32", 4, 8, 8, 256, 256, 64, torch.float32, mode=3),
    Case("decode fp32", 8, 32, 32, 1, 4096, 128, torch.float32),
    Case("band w256 fp32", 1, 4, 4, 8192, 8192, 64, torch.float32, mode=4, pre=256, nxt=256),
    Case("dropout fp32", 1, 8, 8, 2048, 2048, 128, torch.float32, keep_prob=0.9),
    Case("causal fp32 BSH", 1, 4, 4, 8192, 8192, 64, torch.float32, mode=3, layout="BSH"),
]


def bmm_rate(dtype: torch.dtype, repeat: int) -> float:
    a = torch.randn(8, 512, 128).to(dtype)
    b = torch.randn(8, 128, 512).to(dtype)
    t = timed(lambda: torch.bmm(a, b), max(5, repeat) * 4, torch.device("cpu"))[0]
    return 8 * 2 * 512 * 128 * 512 / t / 1e9


def inputs(case: Case, grad: bool, layout: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(case.b, case.n1, case.sq, case.d, generator=g).to(case.dtype)
    k = torch.randn(case.b, case.n2, case.skv, case.d, generator=g).to(case.dtype)
    v = torch.randn(case.b, case.n2, case.skv, case.d, generator=g).to(case.dtype)
    if layout == "BSH":
        q, k, v = (x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1).contiguous() for x in (q, k, v))
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


def _bnsd(x: torch.Tensor, n: int) -> torch.Tensor:
    """A BSH tensor as a [B, N, S, D] view."""
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def fascore_fn(case: Case, engine: str, keep_prob: float | None = None, layout: str = "",
               in_place: bool = False) -> Callable:
    """``in_place``: the native kernels read re-read operands through their strides, not regrouped
    (``native._REREADS`` out of reach), the behaviour before the regrouping."""
    lay = layout or case.layout
    kw = {}
    if case.mode:
        kw = dict(atten_mask=COMPRESSED, sparse_mode=case.mode, pre_tokens=case.pre, next_tokens=case.nxt)
    kp = case.keep_prob if keep_prob is None else keep_prob
    scale = case.d ** -0.5

    def fn(q, k, v):
        return fascore.npu_fusion_attention_v2(q, k, v, case.n1, lay, scale=scale, keep_prob=kp, seed=1, **kw)[0]
    fn.layout = lay
    fn.rereads = 1 << 62 if in_place else native._REREADS
    fn.engine = engine  # step() selects it around forward *and* backward (autograd runs the
    return fn           # backward with the engine current at backward time)


def sdpa_fn(case: Case) -> Callable:
    allowed = case.allowed()
    causal = case.mode == 3 and case.sq == case.skv
    mask = None if causal else allowed
    gqa = case.n1 != case.n2
    scale = case.d ** -0.5
    p = 1.0 - case.keep_prob

    def fn(q, k, v):
        if case.layout == "BSH":
            q, k, v = _bnsd(q, case.n1), _bnsd(k, case.n2), _bnsd(v, case.n2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, dropout_p=p,
                                              enable_gqa=gqa)
    fn.layout = case.layout
    return fn


def flex_fn(case: Case) -> Callable | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    dd, pre, nxt = case.skv - case.sq, case.pre, case.nxt

    def mask_mod(b, h, i, j):
        return (j - i - dd >= -pre) & (j - i - dd <= nxt)
    block = create_block_mask(mask_mod, 1, 1, case.sq, case.skv, device="cpu")
    compiled = torch.compile(flex_attention)
    scale = case.d ** -0.5
    return lambda q, k, v: compiled(q, k, v, block_mask=block, scale=scale)


def step(fn: Callable, case: Case, grad: bool) -> Callable[[], None]:
    layout = getattr(fn, "layout", "BNSD")
    q, k, v = inputs(case, grad, layout)
    dy = torch.randn(case.b, case.n1, case.sq, case.d).to(case.dtype) if grad else None
    if dy is not None and layout == "BSH" and getattr(fn, "engine", None):
        dy = dy.transpose(1, 2).reshape(case.b, case.sq, -1).contiguous()

    engine = getattr(fn, "engine", None)

    def run() -> None:
        saved = native._REREADS
        native._REREADS = getattr(fn, "rereads", saved)
        try:
            with fascore.use_engine(engine) if engine else contextlib.nullcontext():
                out = fn(q, k, v)
                if grad:
                    torch.autograd.grad(out, (q, k, v), dy)
        finally:
            native._REREADS = saved
    return run


def run_case(case: Case, repeat: int, threads: int, with_flash: bool) -> list[dict]:
    """All implementations of one case, interleaved repeat by repeat (load changes hit all alike)."""
    rows = []
    impls = {"native": fascore_fn(case, "native"), "sdpa": sdpa_fn(case)}
    if with_flash:
        impls["flash"] = fascore_fn(case, "flash")
    if case.layout != "BNSD":
        impls["native-bnsd"] = fascore_fn(case, "native", layout="BNSD")
        impls["native-inplace"] = fascore_fn(case, "native", in_place=True)
    if case.keep_prob < 1.0:
        impls["native-nodrop"] = fascore_fn(case, "native", keep_prob=1.0)
    if case.mode == 4:
        try:
            f = flex_fn(case)
            if f is not None:
                impls["flex"] = f
        except Exception as e:  # noqa: BLE001 - report, do not abort
            print(f"  flex unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    flops = 4 * case.b * case.n1 * case.pairs() * case.d
    for passes in ("fwd", "fwd+bwd"):
        grad = passes == "fwd+bwd"
        steps = {}
        for name, fn in impls.items():
            if name == "flex" and grad:
                continue  # FlexAttention has no CPU backward
            try:
                run = step(fn, case, grad)
                run()  # warm-up (and compile, for flex)
                steps[name] = run
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {passes} failed: {type(e).__name__}: {e}", file=sys.stderr)
        times: dict[str, list[float]] = {n: [] for n in steps}
        for _ in range(repeat):
            for name, run in steps.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        mult = 3.5 if grad else 1.0
        for name, ts in times.items():
            t = statistics.median(ts)
            rows.append(dict(case=case.name, impl=name, passes=passes, threads=threads, seconds=round(t, 5),
                             gflops_effective=round(mult * flops / t / 1e9, 1)))
            print(f"  {threads}T {case.name:18s} {name:13s} {passes:8s} {t:9.5f} s {rows[-1]['gflops_effective']:7.1f} "
                  "GFLOP/s", flush=True)
    return rows


def table(rows: list[dict], ceilings: dict) -> str:
    by = {(r["case"], r["impl"], r["passes"], r["threads"]): r for r in rows}
    lines = ["| case | threads | fwd native/SDPA | fwd+bwd native/SDPA | fwd native/flash | fwd+bwd native/flash | "
             "other |", "|---|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        key = (r["case"], r["threads"])
        if key not in seen:
            seen.append(key)
    for case, th in seen:
        def ratio(a: str, b: str, p: str) -> str:
            x, y = by.get((case, a, p, th)), by.get((case, b, p, th))
            return f"{x['seconds'] / y['seconds']:.2f}x" if x and y else "-"
        other = []
        if by.get((case, "flex", "fwd", th)):
            other.append(f"fwd native/flex {ratio('native', 'flex', 'fwd')}")
        if by.get((case, "native-nodrop", "fwd+bwd", th)):
            other.append(f"fwd+bwd dropout/no-dropout {ratio('native', 'native-nodrop', 'fwd+bwd')}")
        if by.get((case, "native-bnsd", "fwd+bwd", th)):
            other.append(f"native {case.split()[-1]}/BNSD fwd {ratio('native', 'native-bnsd', 'fwd')}, "
                         f"fwd+bwd {ratio('native', 'native-bnsd', 'fwd+bwd')}; regrouped/in-place reads fwd "
                         f"{ratio('native', 'native-inplace', 'fwd')}, fwd+bwd {ratio('native', 'native-inplace', 'fwd+bwd')}")
        nat = by.get((case, "native", "fwd", th))
        dt = "bf16" if "bf16" in case else ("fp16" if "fp16" in case else "fp32")
        if nat and case.startswith("dense"):
            other.append(f"fwd {nat['gflops_effective']:.0f} GFLOP/s = "
                         f"{nat['gflops_effective'] / ceilings[(dt, th)]:.0%} of bmm {dt}")
        lines.append(f"| {case} | {th} | {ratio('native', 'sdpa', 'fwd')} | {ratio('native', 'sdpa', 'fwd+bwd')} | "
                     f"{ratio('native', 'flash', 'fwd')} | {ratio('native', 'flash', 'fwd+bwd')} | {'; '.join(other)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated case-name prefixes")
    ap.add_argument("--no-flash", action="store_true", help="skip the PyTorch tile engine")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    if not native.build():
        print(f"native engine unavailable: {native.status()}", file=sys.stderr)
        return 1
    cases = [c for c in CASES if not args.only or any(c.name.startswith(p) for p in args.only.split(","))]
    rows, ceilings = [], {}
    info = dict(status=native.status(), torch=torch.__version__, load=os.getloadavg(), repeat=args.repeat,
                cpu=torch.backends.cpu.get_cpu_capability())
    saved = torch.get_num_threads()
    try:
        for th in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(th)
            for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
                ceilings[(dt, th)] = bmm_rate(dtype, args.repeat)
                print(f"{th}T bmm {dt}: {ceilings[(dt, th)]:.1f} GFLOP/s", flush=True)
            for case in cases:
                rows += run_case(case, args.repeat, th, not args.no_flash)
    finally:
        torch.set_num_threads(saved)
    info["load_after"] = os.getloadavg()
    info["bmm_gflops"] = {f"{k[0]} {k[1]}T": round(v, 1) for k, v in ceilings.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "native.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info["table"] = table(rows, ceilings)
    (out / "native.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "table"}, indent=1))
    print(info["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
