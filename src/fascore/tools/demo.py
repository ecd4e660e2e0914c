"""``make demo`` / ``fascore demo``: the operator in its main modes, timed, each checked against
the float64 reference.

Each mode is timed forward (under no_grad) and forward + backward (autograd), each as the median
of ``repeat`` runs after ``warmup`` untimed ones (the first call of a shape pays one-time costs:
plans, allocator growth, native build loading), with the min-max spread next to it.

    python -m fascore.tools.demo [--repeat 5] [--warmup 1] [--threads N]    # or: fascore demo
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import fascore
from fascore.canonical.bias import alibi_slopes

__all__ = ["cases", "run_case", "main"]

COMPRESSED = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
PREFIX_MASK = torch.cat([COMPRESSED, torch.cat([torch.zeros(1024, 1024), torch.ones(1024, 1024)], 1).bool()])


def cases() -> list[tuple[str, tuple, dict[str, Any]]]:
    """(name, (q, k, v, head_num, layout), keywords) of each mode the demo runs."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    b, n, s, d = 2, 8, 512, 64
    q, k, v = rnd(b, s, n * d), rnd(b, s, 2 * d), rnd(b, s, 2 * d)  # BSH, GQA 8 query heads / 2 kv heads
    tq, tk, tv = rnd(700, n, d), rnd(700, n, d), rnd(700, n, d)
    return [
        ("dense BSH, GQA 8/2", (q, k, v, n, "BSH"), {}),
        ("causal (mode 2)", (q, k, v, n, "BSH"), dict(atten_mask=COMPRESSED, sparse_mode=2)),
        ("band (mode 4, pre=next=64)", (q, k, v, n, "BSH"),
         dict(atten_mask=COMPRESSED, sparse_mode=4, pre_tokens=64, next_tokens=64)),
        ("prefix (mode 6, prefix=[100, 300])", (q, k, v, n, "BSH"),
         dict(atten_mask=PREFIX_MASK, sparse_mode=6, prefix=[100, 300])),
        ("ALiBi in-kernel (pse_type 2)", (q, k, v, n, "BSH"),
         dict(pse=alibi_slopes(n), pse_type=2, atten_mask=COMPRESSED, sparse_mode=2)),
        ("dropout keep_prob=0.9, seed=1234", (q, k, v, n, "BSH"), dict(keep_prob=0.9, seed=1234)),
        ("sink + causal", (q, k, v, n, "BSH"),
         dict(sink=rnd(n), atten_mask=COMPRESSED, sparse_mode=2)),
        ("TND varlen [100, 300, 0, 250] causal", (tq, tk, tv, n, "TND"),
         dict(actual_seq_qlen=[100, 400, 400, 650], actual_seq_kvlen=[100, 400, 400, 650],
              atten_mask=COMPRESSED, sparse_mode=3)),
    ]


def _timed(fn, repeat: int, warmup: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``repeat`` runs of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def run_case(name: str, args: tuple, kw: dict[str, Any], repeat: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Time one mode (forward; forward + backward: the median of ``repeat`` runs after ``warmup``
    untimed ones) and check its output against the float64 reference."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat={repeat}, warmup={warmup}: need repeat >= 1 and warmup >= 0")
    q, k, v, n, layout = args
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    res: dict[str, Any] = {}

    def fwd() -> None:
        with torch.no_grad():
            res["out"] = fascore.npu_fusion_attention_v2(q, k, v, n, layout, scale=0.125, **kw)[0]

    def fwdbwd() -> None:
        for x in (qg, kg, vg):
            x.grad = None
        o = fascore.npu_fusion_attention_v2(qg, kg, vg, n, layout, scale=0.125, **kw)[0]
        o.backward(torch.ones_like(o))

    f_med, f_min, f_max = _timed(fwd, repeat, warmup)
    b_med, b_min, b_max = _timed(fwdbwd, repeat, warmup)
    out = res["out"]
    with fascore.use_engine("reference"):
        ref = fascore.npu_fusion_attention_v2(q.double(), k.double(), v.double(), n, layout, scale=0.125, **kw)[0]
        naive = fascore.npu_fusion_attention_v2(q, k, v, n, layout, scale=0.125, **kw)[0]
    err = (out.double() - ref).abs().max().item()
    tol = 2 * (naive.double() - ref).abs().max().item() + 1e-5
    return dict(mode=name, shape=f"{list(q.shape)} {layout}", fwd_ms=1e3 * f_med, fwd_min_ms=1e3 * f_min,
                fwd_max_ms=1e3 * f_max, fwdbwd_ms=1e3 * b_med, fwdbwd_min_ms=1e3 * b_min, fwdbwd_max_ms=1e3 * b_max,
                err=err, tol=tol, ok=err <= tol)


def header() -> str:
    return (f"fascore {fascore.__version__} on torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"engine {fascore.current_engine_name()!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fascore.tools.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per mode (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.warmup < 0 or (a.threads is not None and a.threads < 1):
        ap.error("--repeat and --threads must be >= 1, --warmup >= 0")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    print(header() + f", median of {a.repeat} after {a.warmup} warm-up")
    print(f"{'mode':40s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} {'max |out - ref64|':>18s}  check")
    ok = True
    for name, args, kw in cases():
        r = run_case(name, args, kw, repeat=a.repeat, warmup=a.warmup)
        ok &= r["ok"]
        print(f"{name:40s} {r['fwd_ms']:8.1f} {r['fwdbwd_ms']:10.1f} {r['err']:18.2e}  "
              f"{'ok' if r['ok'] else 'FAIL'} (tol {r['tol']:.1e})")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
