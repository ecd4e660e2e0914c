"""``make demo`` / ``fascore demo``: the operator in its main modes, timed, each checked against
the float64 reference.

    python -m fascore.tools.demo      # or: fascore demo
"""
from __future__ import annotations

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


def run_case(name: str, args: tuple, kw: dict[str, Any]) -> dict[str, Any]:
    """Time one mode (forward; forward + backward) and check its output against the reference."""
    q, k, v, n, layout = args
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fascore.npu_fusion_attention_v2(q, k, v, n, layout, scale=0.125, **kw)[0]
    t1 = time.perf_counter()
    o = fascore.npu_fusion_attention_v2(qg, kg, vg, n, layout, scale=0.125, **kw)[0]
    o.backward(torch.ones_like(o))
    t2 = time.perf_counter()
    with fascore.use_engine("reference"):
        ref = fascore.npu_fusion_attention_v2(q.double(), k.double(), v.double(), n, layout, scale=0.125, **kw)[0]
        naive = fascore.npu_fusion_attention_v2(q, k, v, n, layout, scale=0.125, **kw)[0]
    err = (out.double() - ref).abs().max().item()
    tol = 2 * (naive.double() - ref).abs().max().item() + 1e-5
    return dict(mode=name, shape=f"{list(q.shape)} {layout}", fwd_ms=1e3 * (t1 - t0), fwdbwd_ms=1e3 * (t2 - t1),
                err=err, tol=tol, ok=err <= tol)


def header() -> str:
    return (f"fascore {fascore.__version__} on torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"engine {fascore.current_engine_name()!r}")


def main() -> int:
    print(header())
    print(f"{'mode':40s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} {'max |out - ref64|':>18s}  check")
    ok = True
    for name, args, kw in cases():
        r = run_case(name, args, kw)
        ok &= r["ok"]
        print(f"{name:40s} {r['fwd_ms']:8.1f} {r['fwdbwd_ms']:10.1f} {r['err']:18.2e}  "
              f"{'ok' if r['ok'] else 'FAIL'} (tol {r['tol']:.1e})")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
