"""bf16 / fp16 fascore vs torch SDPA (same dtype) in one process: forward and forward+backward.

    python benchmarks/halfprec.py [--repeat 5] [--threads 2] [--seq 2048] [--engine NAME] [--json OUT]

Prints one line per case: median seconds of fascore and SDPA (after a warm-up) and their ratio.
Run it against another checkout with ``PYTHONPATH=that/src`` to compare versions in ratios
measured the same way (SPEC §3's float32 logits cost the old bf16 path its half-precision
GEMMs; this measures what that costs).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import fascore
from fascore.tools.bench import timed

CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def median_time(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` runs after a warm-up (fascore.tools.bench.timed)."""
    return timed(fn, repeat, torch.device("cpu"))[0]


def cases(seq: int) -> list[tuple[str, torch.dtype, bool]]:
    return [(f"{'causal' if c else 'dense'} {n}", dt, c) for dt, n in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))
            for c in (False, True)]


def run(seq: int, repeat: int) -> list[dict]:
    b, n, d = 1, 8, 128
    rows = []
    for name, dtype, causal in cases(seq):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, n, seq, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
        dy = torch.randn(b, n, seq, d, generator=g).to(dtype)
        kw = dict(atten_mask=CAUSAL, sparse_mode=3) if causal else {}

        def fa_fwd():
            with torch.no_grad():
                fascore.npu_fusion_attention(q, k, v, n, "BNSD", scale=d ** -0.5, **kw)

        def fa_bwd():
            out = fascore.npu_fusion_attention(q, k, v, n, "BNSD", scale=d ** -0.5, **kw)[0]
            torch.autograd.grad(out, (q, k, v), dy)

        def sd_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=d ** -0.5)

        def sd_bwd():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=d ** -0.5)
            torch.autograd.grad(out, (q, k, v), dy)

        for pass_, fa, sd in (("fwd", fa_fwd, sd_fwd), ("fwd+bwd", fa_bwd, sd_bwd)):
            tf, ts = median_time(fa, repeat), median_time(sd, repeat)
            rows.append(dict(case=name, pass_=pass_, fascore_s=tf, sdpa_s=ts, ratio=tf / ts))
            print(f"{name:12s} {pass_:8s} fascore {tf:7.3f} s  SDPA {ts:7.3f} s  ratio {tf / ts:5.2f}x", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--engine", default="", help="fascore engine to run (default: dispatch's choice)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.engine:
        fascore.set_default_engine(a.engine)
    print(f"fascore from {fascore.__file__} (engine {a.engine or 'default'}), torch {torch.__version__}, {a.threads} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = run(a.seq, a.repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
