"""Device check of fascore's Triton engine: one command, a JSON file and a log.

    python benchmarks/gpu_check.py [--out DIR] [--budget SECONDS] [--tiny]

On one H100/H200 it finishes in under 6 minutes (``--budget``, default 330 s, bounds the timing
part: sections that no longer fit are skipped and say so). It records

1. the environment (GPU, capability, driver, torch / triton / Python versions);
2. conformance on the GPU of the triton and the torch ("flash") engines against SPEC 7: every
   case runs the public forward and autograd backward and is compared with the reference engine
   in float64 (ref64) and in the input dtype (ref_same): attention_out and gradients within 2x /
   3x of ref_same's error plus eps, the 0.5 % golden criterion, float32-level statistics, exact
   invalid-row sentinels; cases cover dense, causal, band, explicit masks, pse (dense, ALiBi),
   sink, dropout, TND, GQA, rope in bf16 / fp16 / fp32;
3. bitwise determinism: two runs of forward + backward give identical bits;
4. forward and forward+backward times of the triton engine (through the public op and through
   the engine's whole-problem hooks), SDPA's flash backend (dense / causal / GQA / dropout),
   SDPA with a boolean mask (band), FlexAttention compiled (dense, causal, band, TND document
   mask, GQA), for bf16 and fp16, S from 1k to 32k, with peak memory per run.

``--tiny`` runs the same code end to end on CPU tensors under ``TRITON_INTERPRET=1`` with tiny
shapes (fp16 / fp32: the interpreter's bf16 dot is wrong, triton#11584), timing SDPA's math
backend instead of the GPU-only ones and skipping FlexAttention; the test suite runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fascore  # noqa: E402

FLT_MAX = 3.4028234663852886e38
EPS = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


class Log:
    def __init__(self, path: str | None) -> None:
        self.f = open(path, "w") if path else None

    def __call__(self, *msg: object) -> None:
        line = " ".join(str(m) for m in msg)
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


# --------------------------------------------------------------------------- environment
def environment(dev: torch.device) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
               fascore=getattr(fascore, "__version__", "?"), device=str(dev),
               interpreter=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover
        env["triton"] = f"not importable: {exc}"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(dev)),
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   sm_count=p.multi_processor_count)
        try:
            import subprocess
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            env["driver"] = "?"
    return env


# --------------------------------------------------------------------------- SPEC 7 checks
def _f64(x):
    return None if x is None else x.detach().to(torch.float64)


def within_rule(lib, r64, same, dtype, factor, floor=1.0) -> dict:
    lib, r64, same = _f64(lib), _f64(r64), _f64(same)
    sent = r64.abs() == FLT_MAX
    if sent.any() and bool(((lib != r64) & sent).any()):
        return dict(ok=False, why="invalid-row sentinels differ")
    rest = ~sent
    if not rest.any():
        return dict(ok=True)
    if torch.isnan(lib[rest]).any():
        return dict(ok=False, why="NaN")
    err = (lib - r64)[rest].abs().max().item()
    err_same = (same - r64)[rest].abs().max().item()
    tol = factor * err_same + EPS[dtype] * max(floor, r64[rest].abs().max().item())
    return dict(ok=err <= tol, err=err, tol=tol)


def golden(lib, r64) -> dict:
    lib, r64 = _f64(lib), _f64(r64)
    if r64.numel() == 0:
        return dict(ok=True)
    frac = ((lib - r64).abs() > torch.clamp(0.005 * r64.abs(), min=2.5e-5)).double().mean().item()
    return dict(ok=frac <= 0.005, fraction=frac)


def stats_rule(lib, r64, rel) -> dict:
    lib, r64 = _f64(lib), _f64(r64)
    sent = r64.abs() == FLT_MAX
    if bool(((lib != r64) & sent).any()):
        return dict(ok=False, why="sentinels")
    tol = rel * (r64.abs().clamp(min=1.0) if rel == 1e-5 else r64.abs())
    bad = (((lib - r64).abs() > tol) & ~sent).sum().item()
    return dict(ok=bad == 0, bad=int(bad))


def _run(engine: str, inputs: dict, kw: dict, wrt: tuple, dy: torch.Tensor | None, cast=None):
    ins = {n: (t.to(cast) if cast is not None and torch.is_tensor(t) and t.is_floating_point() else t)
           for n, t in inputs.items()}
    kws = {n: (t.to(cast) if cast is not None and n == "pse" and torch.is_tensor(t) and t.dim() == 4 else t)
           for n, t in kw.items()}
    leaves = []
    for n in wrt:
        src = ins if n in ins else kws
        src[n] = src[n].detach().clone().requires_grad_(True)
        leaves.append(src[n])
    with fascore.use_engine(engine):
        res = fascore.npu_fusion_attention_v2(ins.pop("query"), ins.pop("key"), ins.pop("value"), **ins, **kws)
        grads = torch.autograd.grad(res[0], leaves, dy.to(res[0].dtype)) if dy is not None else ()
    return res, grads


def conformance_case(name: str, inputs: dict, kw: dict, wrt: tuple, engines: list[str]) -> dict:
    dtype = inputs["query"].dtype
    r64, g64 = _run("reference", inputs, kw, (), None, cast=torch.float64)
    dy = torch.randn(r64[0].shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(r64[0].device)
    r64, g64 = _run("reference", inputs, kw, wrt, dy, cast=torch.float64)
    rs, gs = _run("reference", inputs, kw, wrt, dy)
    floor = max([1.0] + [g.abs().max().item() for g in g64])
    out = {}
    for eng in engines:
        try:
            res, grads = _run(eng, inputs, kw, wrt, dy)
            checks = dict(out=within_rule(res[0], r64[0], rs[0], dtype, 2.0), golden=golden(res[0], r64[0]),
                          softmax_max=stats_rule(res[1], r64[1], 1e-5), softmax_sum=stats_rule(res[2], r64[2], 1e-4))
            for n, a, b, c in zip(wrt, grads, g64, gs):
                checks["d" + n] = within_rule(a, b, c, dtype, 3.0, floor)
            out[eng] = dict(ok=all(c["ok"] for c in checks.values()), checks=checks)
        except Exception as exc:
            out[eng] = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
    return out


def conformance_cases(dev: torch.device, tiny: bool) -> list[tuple[str, dict, dict, tuple]]:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float16] if tiny else [torch.bfloat16, torch.float16, torch.float32]
    s = 24 if tiny else 300
    nd, d64 = (1, 32) if tiny else (2, 64)  # tiny: fewer heads and D = 32 (the interpreter's time is per program)
    cases = []

    def qkv(layout, b, n1, n2, sq, skv, d, dv, dt):
        if layout == "BNSD":
            shp = lambda n, S, dd: (b, n, S, dd)  # noqa: E731
        else:
            shp = lambda n, S, dd: (b, S, n * dd)  # noqa: E731
        mk = lambda sh: torch.randn(*sh, generator=g).to(dt).to(dev)  # noqa: E731
        return dict(query=mk(shp(n1, sq, d)), key=mk(shp(n2, skv, d)), value=mk(shp(n2, skv, dv)), head_num=n1,
                    input_layout=layout)

    cm = CAUSAL.to(dev)
    for dt in dtypes:
        tag = str(dt).replace("torch.", "")
        qk = ("query", "key", "value")
        cases.append((f"dense-{tag}", qkv("BNSD", 2, nd, nd, s, s + 7, d64, d64, dt), dict(scale=0.125), qk))
        cases.append((f"causal-gqa-{tag}", qkv("BSH", 1, 2 * nd, nd, s, s, d64, 32, dt),
                      dict(scale=0.125, atten_mask=cm, sparse_mode=3), qk))
        cases.append((f"band-{tag}", qkv("BNSD", 1, 2, 1, s, s, 32, 32, dt),
                      dict(scale=0.2, atten_mask=cm, sparse_mode=4, pre_tokens=17, next_tokens=5), qk))
        m = (torch.rand(s, s + 3, generator=g) < 0.3).to(dev)
        m[2] = True
        cases.append((f"explicit-sink-{tag}", qkv("BNSD", 1, 2, 2, s, s + 3, 32, 32, dt),
                      dict(scale=0.2, atten_mask=m, sparse_mode=1, sink=torch.tensor([0.3, -0.2], device=dev)),
                      qk + ("sink",)))
        pse = torch.randn(1, 2, s, s, generator=g).to(dt).to(dev)
        cases.append((f"pse-{tag}", qkv("BNSD", 2, 2, 2, s, s, 32, 32, dt), dict(scale=0.2, pse=pse, pse_type=1),
                      qk + ("pse",)))
        cases.append((f"alibi-dropout-{tag}", qkv("BNSD", 1, 2, 2, s, s, 32, 32, dt),
                      dict(scale=0.2, pse=torch.tensor([0.25, 0.0625], device=dev), pse_type=2, keep_prob=0.8,
                           seed=1234, offset=16, atten_mask=cm, sparse_mode=2), qk))
        lens = [s // 3, 0, s - s // 3]
        cum = [lens[0], lens[0], s]
        t = dict(query=torch.randn(s, 2, 32, generator=g).to(dt).to(dev),
                 key=torch.randn(s, 1, 32, generator=g).to(dt).to(dev),
                 value=torch.randn(s, 1, 32, generator=g).to(dt).to(dev), head_num=2, input_layout="TND",
                 actual_seq_qlen=cum, actual_seq_kvlen=cum,
                 query_rope=torch.randn(s, 2, 16, generator=g).to(dt).to(dev),
                 key_rope=torch.randn(s, 1, 16, generator=g).to(dt).to(dev))
        cases.append((f"tnd-rope-{tag}", t, dict(scale=0.2, atten_mask=cm, sparse_mode=3),
                      qk + ("query_rope", "key_rope")))
    return cases


# --------------------------------------------------------------------------- determinism
def determinism(dev: torch.device, dt: torch.dtype, s: int, n1: int = 4, d: int = 64) -> dict:
    """Forward + backward twice (GQA, a pse broadcast over batches, causal, dropout): equal bits?"""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, n1, s, d, generator=g).to(dt).to(dev)
    k = torch.randn(2, n1 // 2, s, d, generator=g).to(dt).to(dev)
    v = torch.randn(2, n1 // 2, s, d, generator=g).to(dt).to(dev)
    pse = torch.randn(1, n1, s, s, generator=g).to(dt).to(dev)
    runs = []
    for _ in range(2):
        qq, kk, vv, pp = (x.clone().requires_grad_(True) for x in (q, k, v, pse))
        with fascore.use_engine("triton"):
            res = fascore.npu_fusion_attention_v2(qq, kk, vv, n1, "BNSD", pse=pp, scale=0.125, atten_mask=CAUSAL.to(dev),
                                                  sparse_mode=3, keep_prob=0.9, seed=7, offset=0)
            gr = torch.autograd.grad(res[0], [qq, kk, vv, pp], torch.ones_like(res[0]))
        runs.append([res[0], res[1], res[2], *gr])
    same = [torch.equal(a, b) for a, b in zip(*runs)]
    return dict(ok=all(same), tensors=["out", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dpse"], equal=same)


# --------------------------------------------------------------------------- timing
def timed(fn, dev: torch.device, reps: int) -> dict:
    """Median milliseconds of ``fn`` after a warm-up, and the peak memory of one call."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type != "cuda":  # the interpreter: one call shows the path works; its time means little
        t0 = time.perf_counter()
        fn()
        return dict(ms=round((time.perf_counter() - t0) * 1e3, 1), peak_mib=None)
    fn()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    fn()
    sync()
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=round(statistics.median(ts), 4), peak_mib=None if peak is None else round(peak / 2**20, 1))


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception:
        return None, None


def bench_case(name: str, dev: torch.device, dt: torch.dtype, b: int, n1: int, n2: int, s: int, d: int,
               mode: str, tiny: bool, reps: int, flex, lens: list[int] | None = None, keep: float = 1.0,
               window: int = 256) -> dict:
    import torch.nn.functional as F
    from fascore.engines import triton as te
    from fascore.engines.triton import _adapter as fa
    g = torch.Generator(device="cpu").manual_seed(2)
    rows = {}
    tnd = lens is not None
    if tnd:
        t = sum(lens)
        q = torch.randn(t, n1, d, generator=g).to(dt).to(dev)
        k = torch.randn(t, n2, d, generator=g).to(dt).to(dev)
        v = torch.randn(t, n2, d, generator=g).to(dt).to(dev)
        cum = list(torch.tensor(lens).cumsum(0).tolist())
        kw = dict(head_num=n1, input_layout="TND", actual_seq_qlen=cum, actual_seq_kvlen=cum, scale=d ** -0.5,
                  atten_mask=CAUSAL.to(dev), sparse_mode=3)
    else:
        q = torch.randn(b, n1, s, d, generator=g).to(dt).to(dev)
        k = torch.randn(b, n2, s, d, generator=g).to(dt).to(dev)
        v = torch.randn(b, n2, s, d, generator=g).to(dt).to(dev)
        kw = dict(head_num=n1, input_layout="BNSD", scale=d ** -0.5)
        if mode == "causal":
            kw.update(atten_mask=CAUSAL.to(dev), sparse_mode=2)
        elif mode == "band":
            kw.update(atten_mask=CAUSAL.to(dev), sparse_mode=4, pre_tokens=window, next_tokens=0)
    if keep < 1.0:
        kw.update(keep_prob=keep, seed=11, offset=0)
    dy = torch.randn(*(q.shape[:-1]), d, generator=g).to(dt).to(dev)
    # triton through the public op (forward; forward + backward through autograd)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))

    def tri_fwd():
        with fascore.use_engine("triton"):
            return fascore.npu_fusion_attention_v2(q, k, v, **kw)[0]

    def tri_fb():
        with fascore.use_engine("triton"):
            o = fascore.npu_fusion_attention_v2(qq, kk, vv, **kw)[0]
            torch.autograd.grad(o, [qq, kk, vv], dy)

    rows["triton api fwd"] = timed(tri_fwd, dev, reps)
    rows["triton api fwd+bwd"] = timed(tri_fb, dev, reps)
    prob = fa.build_problem(q, k, v, **kw)
    if te.supports_all(prob):
        outs = te.forward_all(prob)
        rows["triton engine fwd"] = timed(lambda: te.forward_all(prob), dev, reps)
        rows["triton engine bwd"] = timed(lambda: te.backward_all(prob, dy, *outs), dev, reps)
    # SDPA
    if not tnd:
        rep = n1 // n2
        kr, vr = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.MATH if tiny else SDPBackend.FLASH_ATTENTION
        label = "sdpa math" if tiny else "sdpa flash"
        p_drop = 1.0 - keep
        if mode in ("dense", "causal"):
            qs, ks_, vs = (x.clone().requires_grad_(True) for x in (q, kr, vr))

            def sd_fwd():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=mode == "causal", dropout_p=p_drop,
                                                          scale=d ** -0.5)

            def sd_fb():
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(qs, ks_, vs, is_causal=mode == "causal", dropout_p=p_drop,
                                                       scale=d ** -0.5)
                    torch.autograd.grad(o, [qs, ks_, vs], dy)
            try:
                rows[f"{label} fwd"] = timed(sd_fwd, dev, reps)
                rows[f"{label} fwd+bwd"] = timed(sd_fb, dev, reps)
            except Exception as exc:
                rows[f"{label}"] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
        elif mode == "band" and s <= 16384:
            i = torch.arange(s, device=dev)
            allowed = ((i[None, :] - i[:, None]) <= 0) & ((i[:, None] - i[None, :]) <= window)
            qs, ks_, vs = (x.clone().requires_grad_(True) for x in (q, kr, vr))
            try:
                rows["sdpa bool-mask fwd"] = timed(
                    lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=allowed, scale=d ** -0.5), dev, reps)
                rows["sdpa bool-mask fwd+bwd"] = timed(lambda: torch.autograd.grad(
                    F.scaled_dot_product_attention(qs, ks_, vs, attn_mask=allowed, scale=d ** -0.5), [qs, ks_, vs], dy),
                    dev, reps)
            except Exception as exc:
                rows["sdpa bool-mask"] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
    # FlexAttention (compiled; no dropout)
    fx, cbm = flex
    if fx is not None and keep >= 1.0:
        try:
            if tnd:
                doc = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))

                def mm(b_, h, qi, kj):
                    return (doc[qi] == doc[kj]) & (kj <= qi)
                total = sum(lens)
                qf, kf, vf = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
                dyf = dy.transpose(0, 1).unsqueeze(0)
                bm = cbm(mm, None, None, total, total, device=dev)
            else:
                qf, kf, vf, dyf = q, k, v, dy
                if mode == "dense":
                    bm = None
                elif mode == "causal":
                    bm = cbm(lambda b_, h, qi, kj: kj <= qi, None, None, s, s, device=dev)
                else:
                    bm = cbm(lambda b_, h, qi, kj: (kj <= qi) & (qi - kj <= window), None, None, s, s, device=dev)
            gq = n1 != n2
            qs, ks_, vs = (x.clone().requires_grad_(True) for x in (qf, kf, vf))
            rows["flex fwd"] = timed(lambda: fx(qf, kf, vf, block_mask=bm, scale=d ** -0.5, enable_gqa=gq), dev, reps)
            rows["flex fwd+bwd"] = timed(lambda: torch.autograd.grad(
                fx(qs, ks_, vs, block_mask=bm, scale=d ** -0.5, enable_gqa=gq), [qs, ks_, vs], dyf), dev, reps)
        except Exception as exc:
            rows["flex"] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
    return dict(name=name, dtype=str(dt).replace("torch.", ""), b=b, n1=n1, n2=n2, s=s, d=d, mode=mode,
                lens=lens, keep_prob=keep, results=rows)


def bench_plan(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(name="causal-gqa", dt=torch.float16, b=1, n1=2, n2=1, s=32, d=16, mode="causal"),
                dict(name="tnd", dt=torch.float16, b=1, n1=1, n2=1, s=0, d=16, mode="causal", lens=[12, 20])]
    plan = []
    for s, b in ((1024, 8), (4096, 2), (16384, 1), (32768, 1)):
        plan.append(dict(name=f"dense-{s}", dt=torch.bfloat16, b=b, n1=16, n2=16, s=s, d=128, mode="dense"))
        plan.append(dict(name=f"causal-{s}", dt=torch.bfloat16, b=b, n1=16, n2=16, s=s, d=128, mode="causal"))
    for s in (4096, 16384, 32768):
        plan.append(dict(name=f"band512-{s}", dt=torch.bfloat16, b=1, n1=16, n2=16, s=s, d=128, mode="band",
                         window=512))
    plan.append(dict(name="tnd-16k", dt=torch.bfloat16, b=1, n1=16, n2=16, s=0, d=128, mode="causal",
                     lens=[512, 1024, 3072, 256, 4096, 2048, 1536, 3840]))
    plan.append(dict(name="gqa-4096", dt=torch.bfloat16, b=2, n1=32, n2=8, s=4096, d=128, mode="causal"))
    plan.append(dict(name="dense-4096-fp16", dt=torch.float16, b=2, n1=16, n2=16, s=4096, d=128, mode="dense"))
    plan.append(dict(name="dense-4096-dropout", dt=torch.bfloat16, b=2, n1=16, n2=16, s=4096, d=128, mode="dense",
                     keep=0.9))
    plan.append(dict(name="dense-4096-d64", dt=torch.bfloat16, b=2, n1=16, n2=16, s=4096, d=64, mode="dense"))
    return plan


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="directory for gpu_check.json and gpu_check.log")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (timing is cut to fit)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (default 20 on GPU, 1 tiny)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    report: dict = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), tiny=args.tiny)
    from fascore.engines import register_engine
    from fascore.engines import triton as te
    from fascore.engines.triton.engine import TritonEngine
    register_engine(TritonEngine())
    if args.tiny:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        log("no CUDA device: run with --tiny for the interpreter")
        return 2
    report["environment"] = env = environment(dev)
    log("environment:", json.dumps(env))
    log("triton engine available:", te.available())
    engines = ["triton", "flash"]
    # conformance
    conf = {}
    for name, inputs, kw, wrt in conformance_cases(dev, args.tiny):
        t0 = time.perf_counter()
        try:
            conf[name] = conformance_case(name, inputs, kw, wrt, engines)
        except Exception as exc:
            conf[name] = dict(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        status = {e: conf[name].get(e, {}).get("ok") for e in engines} if "error" not in conf[name] else conf[name]
        conf[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"conformance {name}: {status} ({conf[name]['seconds']} s)")
    report["conformance"] = conf
    report["conformance_ok"] = {e: all(c.get(e, {}).get("ok", False) for c in conf.values()) for e in engines}
    # determinism
    dts = [torch.float16] if args.tiny else [torch.bfloat16, torch.float16]
    report["determinism"] = {}
    for dt in dts:
        t0 = time.perf_counter()
        try:
            r = determinism(dev, dt, 20, n1=2, d=16) if args.tiny else determinism(dev, dt, 2048)
        except Exception as exc:
            r = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
        report["determinism"][str(dt).replace("torch.", "")] = r
        r["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"determinism {dt}: {r.get('ok')} ({r['seconds']} s)")
    # timing
    reps = args.reps or (1 if args.tiny else 20)
    flex = (None, None) if args.tiny else _flex()
    bench = []
    for case in bench_plan(args.tiny):
        left = args.budget - (time.perf_counter() - t_start)
        if left < (1 if args.tiny else 25):
            bench.append(dict(name=case["name"], skipped=f"time budget ({left:.0f} s left)"))
            log(f"bench {case['name']}: skipped (budget)")
            continue
        c = dict(case)
        dt = c.pop("dt")
        name = c.pop("name")
        t0 = time.perf_counter()
        try:
            r = bench_case(name, dev, dt, tiny=args.tiny, reps=reps, flex=flex, **c)
        except Exception as exc:
            r = dict(name=name, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        r["seconds"] = round(time.perf_counter() - t0, 2)
        bench.append(r)
        log(f"bench {name} ({r['seconds']} s): " + json.dumps(r.get("results", r.get("error"))))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["bench"] = bench
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"done in {report['seconds']} s; conformance {report['conformance_ok']}; "
        f"determinism {[v.get('ok') for v in report['determinism'].values()]}")
    ok = all(report["conformance_ok"].values()) and all(v.get("ok") for v in report["determinism"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
