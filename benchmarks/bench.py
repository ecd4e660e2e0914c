"""fascore vs torch SDPA vs naive attention vs FlexAttention, side by side in one process.

    python benchmarks/bench.py [--quick] [--out DIR] [--repeat N]

Writes DIR/bench.csv (one row per case x implementation x pass) and prints a table. Times are
the median of ``--repeat`` runs after one warm-up. GFLOP/s are given with the dense-equivalent
count (4*B*N*Sq*Skv*D per forward, 2.5x that for backward) and with the effective count
(pairs that take part). The ``bmm`` rate of the same dtype, measured in the same run, is the
ceiling. Peak memory (case 5) is measured in a child process per implementation (peak RSS).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fascore
from fascore.api import memory
from fascore.engines.flash import config as kernels
from fascore.tools.bench import _step
from fascore.tools.bench import timed as bench_timed

COMPRESSED = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@dataclass
class Case:
    name: str
    b: int
    n: int
    sq: int
    skv: int
    d: int
    dtype: torch.dtype
    mode: int = 0  # fascore sparse_mode (0: dense)
    pre: int = 2147483647
    nxt: int = 2147483647

    def allowed(self) -> torch.Tensor | None:
        """Boolean [Sq, Skv] take-part matrix for SDPA / naive (None: dense or is_causal)."""
        if self.mode in (0, 2):
            return None
        i = torch.arange(self.sq)[:, None]
        j = torch.arange(self.skv)[None, :]
        dd = self.skv - self.sq
        if self.mode == 3:
            return j <= i + dd
        return (j - i - dd >= -self.pre) & (j - i - dd <= self.nxt)

    def effective_pairs(self) -> int:
        if self.mode == 0:
            return self.sq * self.skv
        if self.mode == 2:
            return sum(min(i + 1, self.skv) for i in range(self.sq))
        return int(self.allowed().sum())


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` runs after a warm-up (fascore.tools.bench.timed on the CPU)."""
    return bench_timed(fn, repeat, torch.device("cpu"))[0]


def bmm_rate(dtype: torch.dtype, repeat: int) -> float:
    a = torch.randn(8, 512, 128).to(dtype)
    b = torch.randn(8, 128, 512).to(dtype)
    t = timed(lambda: torch.bmm(a, b), repeat * 4)
    return 8 * 2 * 512 * 128 * 512 / t / 1e9


def make(case: Case, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shp = lambda s: (case.b, case.n, s, case.d)  # noqa: E731
    q = torch.randn(shp(case.sq), generator=g).to(case.dtype)
    k = torch.randn(shp(case.skv), generator=g).to(case.dtype)
    v = torch.randn(shp(case.skv), generator=g).to(case.dtype)
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


def impls(case: Case) -> dict[str, Callable[..., torch.Tensor]]:
    scale = case.d ** -0.5
    allowed = case.allowed()
    kw = {}
    if case.mode:
        kw = dict(atten_mask=COMPRESSED, sparse_mode=case.mode, pre_tokens=case.pre, next_tokens=case.nxt)

    def fas(q, k, v):
        return fascore.npu_fusion_attention_v2(q, k, v, case.n, "BNSD", scale=scale, **kw)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=case.mode == 2, scale=scale)

    def naive(q, k, v):
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if case.mode == 2:
            s = s.masked_fill(torch.ones(case.sq, case.skv, dtype=torch.bool).triu(1), float("-inf"))
        elif allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(s, -1) @ v.float()).to(q.dtype)

    return {"fascore": fas, "sdpa": sdpa, "naive": naive}


def flex_forward(case: Case) -> Callable[..., torch.Tensor] | None:
    """FlexAttention compiled (CPU: forward only), or None where it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    dd = case.skv - case.sq
    if case.mode == 0:
        mask_mod = None
    elif case.mode == 2:
        def mask_mod(b, h, i, j):
            return j <= i
    elif case.mode == 3:
        def mask_mod(b, h, i, j):
            return j <= i + dd
    else:
        pre, nxt = case.pre, case.nxt

        def mask_mod(b, h, i, j):
            return (j - i - dd >= -pre) & (j - i - dd <= nxt)
    block = create_block_mask(mask_mod, 1, 1, case.sq, case.skv, device="cpu") if mask_mod else None
    compiled = torch.compile(flex_attention)
    scale = case.d ** -0.5
    return lambda q, k, v: compiled(q, k, v, block_mask=block, scale=scale)


def run_case(case: Case, repeat: int, with_flex: bool, with_naive: bool) -> list[dict]:
    rows = []
    dense_flops = 4 * case.b * case.n * case.sq * case.skv * case.d
    eff_flops = 4 * case.b * case.n * case.effective_pairs() * case.d
    fns = impls(case)
    if not with_naive:
        fns.pop("naive")
    if with_flex:
        try:
            f = flex_forward(case)
            if f is not None:
                fns["flex"] = f
        except Exception as e:  # noqa: BLE001 - report, don't abort the benchmark
            print(f"  flex unavailable for {case.name}: {type(e).__name__}: {e}", file=sys.stderr)
    for name, fn in fns.items():
        for passes in ("fwd", "fwd+bwd"):
            if passes == "fwd+bwd" and name == "flex":
                continue  # FlexAttention on CPU has no backward
            grad = passes == "fwd+bwd"
            q, k, v = make(case, grad)
            try:
                t = timed(_step(fn, q, k, v, grad), repeat)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {passes} failed on {case.name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            mult = 3.5 if grad else 1.0
            rows.append(dict(case=case.name, impl=name, passes=passes, dtype=str(case.dtype).replace("torch.", ""),
                             B=case.b, N=case.n, Sq=case.sq, Skv=case.skv, D=case.d, sparse_mode=case.mode,
                             seconds=round(t, 5), gflops_dense=round(mult * dense_flops / t / 1e9, 1),
                             gflops_effective=round(mult * eff_flops / t / 1e9, 1)))
            print(f"  {case.name:28s} {name:8s} {passes:8s} {t:8.4f} s  "
                  f"{rows[-1]['gflops_dense']:7.1f} dense GFLOP/s  {rows[-1]['gflops_effective']:7.1f} effective")
    return rows


def _peak_child(impl: str, passes: str, s: int) -> dict:
    code = f"""
import json, torch, torch.nn.functional as F, fascore
s={s}; q,k,v=[torch.randn(1,1,s,64, requires_grad={passes == 'fwd+bwd'}) for _ in range(3)]
mask=torch.triu(torch.ones(2048,2048,dtype=torch.bool),1)
def hwm():  # peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak over exec)
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1])
base=hwm()
if '{impl}'=='fascore':
    o=fascore.npu_fusion_attention_v2(q,k,v,1,'BNSD',scale=0.125,atten_mask=mask,sparse_mode=2)[0]
elif '{impl}'=='sdpa':
    o=F.scaled_dot_product_attention(q,k,v,is_causal=True,scale=0.125)
else:
    sc=(q@k.transpose(-1,-2))*0.125
    o=torch.softmax(sc.masked_fill(torch.ones(s,s,dtype=torch.bool).triu(1),float('-inf')),-1)@v
if {passes == 'fwd+bwd'}:
    o.backward(torch.ones_like(o))
peak=hwm()
print(json.dumps(dict(peak_kib=peak, before_kib=base)))
"""
    need = 4 * s * s * 3
    if impl == "naive" and need > 0.8 * memory.available_memory(torch.device("cpu")):
        return dict(status=f"cannot run: needs ~{need / 2**30:.0f} GiB for the {s}x{s} scores")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return dict(status=f"failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    return dict(status="ok", **json.loads(r.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated case names (5: memory)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    s, s_band = (1024, 4096) if q else (4096, 16384)
    cases = [
        Case("1 dense fp32", 1, 8, s, s, 128, torch.float32),
        Case("2a causal mode2 fp32", 1, 8, s, s, 128, torch.float32, mode=2),
        Case("2b causal mode3 fp32", 1, 8, s // 2, s, 128, torch.float32, mode=3),
        Case("3 band mode4 fp32", 1, 4, s_band, s_band, 64, torch.float32, mode=4, pre=256, nxt=256),
        Case("4 dense bf16", 1, 8, s, s, 128, torch.bfloat16),
    ]
    if args.only:
        keep = args.only.split(",")
        cases = [c for c in cases if any(c.name.startswith(k) for k in keep)]
    repeat = 2 if q else args.repeat
    info = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                capability=torch.backends.cpu.get_cpu_capability(), path=kernels.path_description(),
                bmm_fp32_gflops=round(bmm_rate(torch.float32, repeat), 1),
                bmm_bf16_gflops=round(bmm_rate(torch.bfloat16, repeat), 1))
    print(json.dumps(info, indent=1))
    rows = []
    for case in cases:
        print(case.name)
        rows += run_case(case, repeat, with_flex=not args.no_flex, with_naive=case.sq * case.skv <= 4096 * 4096)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _ratios(rows)
    if not q and (not args.only or "5" in args.only.split(",")):
        mem = {}
        for impl in ("fascore", "sdpa", "naive"):
            for passes in ("fwd", "fwd+bwd"):
                mem[f"{impl} {passes}"] = _peak_child(impl, passes, 65536)
                print("  5 memory S=65536 mode2", impl, passes, mem[f"{impl} {passes}"])
        info["memory_case5"] = mem
    (out / "machine.json").write_text(json.dumps(info, indent=1))
    return 0


def _ratios(rows: list[dict]) -> None:
    by = {(r["case"], r["impl"], r["passes"]): r["seconds"] for r in rows}
    print("\nfascore time / SDPA time (same run):")
    for (case, impl, passes), t in by.items():
        if impl == "fascore" and (case, "sdpa", passes) in by:
            print(f"  {case:28s} {passes:8s} {t / by[(case, 'sdpa', passes)]:.2f}x")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
