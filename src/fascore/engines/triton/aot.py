"""Ahead-of-time compiles of the engine's kernels for a GPU target, without a GPU.

``compile_kernel(name, capability, dtype, bd, cfg, variant)`` builds the kernel's signature as
the engine launches it (head-dim strides 1, 16-byte aligned pointers), compiles it with
``triton.compile`` for ``GPUTarget("cuda", capability, 32)`` and reads the register count and
spill bytes from the log of the ptxas run that produced the cubin (Triton's own command line, so
exactly the cubin a GPU would load), and shared memory from the kernel's metadata.

``compile_all(jobs)`` compiles each distinct job once (jobs with the same compile inputs share
one result) in worker processes and keeps every result in a cache directory,
``$FASCORE_CACHE_DIR/triton-aot`` (default ``~/.cache/fascore/triton-aot``): one JSON file per
compile key, a hash of the Triton version, the ptxas version, the kernel's source hash (Triton's
``JITFunction.cache_key``: its source and that of every function and global it uses), the
signature, constexprs, attributes, target and options. Any edit to a kernel or a configuration
changes the key, so a cached result is always that of the same compile; ``FASCORE_AOT_CACHE=0``
(or ``--no-cache``) compiles everything afresh.

Needs triton's JIT kernels: import with ``TRITON_INTERPRET`` unset (a process that runs the
interpreter tests must not import this module). Used by ``tests/test_triton_aot.py``;
``python -m fascore.engines.triton.aot [--full] [--arch sm80] [-j N] [--out FILE]`` prints a table.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from . import configs, kernels

KERNELS = ("fwd", "pre", "kv", "q", "pse")
VARIANTS = ("plain", "full")  # no features / pse + explicit mask + prefix + dropout + sink
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_FN = {"fwd": kernels.fwd_kernel, "pre": kernels.bwd_pre_kernel, "kv": kernels.bwd_kv_kernel,
       "q": kernels.bwd_q_kernel, "pse": kernels.bwd_pse_kernel}
_F32_PTRS = {"O", "M", "L", "RM", "RI", "RR", "DK", "DV_", "DQ", "DP", "SLOPE", "SINK"}
_IN_PTRS = {"Q", "K", "V", "DY", "PSE"}
_I32_PTRS = {"PFX", "PLAN_PTR", "PLAN_KB", "PLAN_QB"}
_U8_PTRS = {"MASK", "BITS"}
_I64_ARGS = {"ADELTA", "DBASE0", "DSTEP", "DROW", "ctr0", "seed"}
_F32_ARGS = {"scale", "inv_keep"}
_UNIT_STRIDES = {"sq_d", "sk_d", "sv_d", "so_d", "sy_d", "sdk_d", "sdv_d", "sdq_d", "sm_s", "sdp_j", "sp_j",
                 "smk_j", "ssl_n"}


def _tile(cfg: configs.Config, name: str) -> configs.Tile:
    return {"fwd": cfg.fwd, "pre": cfg.pre, "kv": cfg.kv, "q": cfg.q, "pse": cfg.pse}[name]


def constexprs(name: str, dtype: str, bd: int, cfg: configs.Config, variant: str) -> dict:
    t = _tile(cfg, name)
    full = variant == "full"
    c: dict = dict(BM=t.bm, BDV=bd) if name == "pre" else dict(BM=t.bm, BD=bd, BDV=bd)
    if name != "pre":
        c.update(BN=t.bn, PSE_KIND=1 if full else 0, PRE_SCALE=True, HAS_MASK=full, HAS_PFX=full,
                 DROP=2 if full else 0, PREC="ieee" if dtype == "fp32" else None)
    if name == "fwd":
        c.update(HAS_SINK=full, VARLEN=False, COPIES=1, REVERSE=True, SPLIT_P=dtype != "fp32")
    elif name == "pre":
        c.update(HAS_SINK=full, VARLEN=False)
    elif name == "kv":
        c.update(VARLEN=False)
    elif name == "q":
        c.update(VARLEN=False, REVERSE=True)
    else:
        c.update(MODE=0, BATCH_SUM=full, BJ=t.bn, DC=t.dim_chunk(bd), DCV=t.dim_chunk(bd))
    if name == "pse":
        c["PSE_KIND"] = 1
    return c


def signature(name: str, dtype: str, bd: int, cfg: configs.Config, variant: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile``."""
    fn = _FN[name]
    const = constexprs(name, dtype, bd, cfg, variant)
    full = variant == "full"
    unused = set()
    if not full:
        unused |= {"PFX", "MASK", "PLAN_PTR", "PLAN_KB", "PLAN_QB", "PSE", "SLOPE", "SINK", "BITS"}
    unused |= {"TAB", "SLOPE"}
    if name == "pse":
        unused.discard("PSE")
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const:
            sig[arg] = "constexpr"
            continue
        if arg in unused and (arg in _F32_PTRS | _IN_PTRS | _I32_PTRS | _U8_PTRS or arg == "TAB"):
            sig[arg] = "constexpr"
            const[arg] = None
            continue
        if arg in _UNIT_STRIDES:
            sig[arg] = "constexpr"
            const[arg] = 1
            continue
        if arg in _IN_PTRS:
            sig[arg] = _PTR[dtype]
        elif arg in _F32_PTRS:
            sig[arg] = "*fp32"
        elif arg in _I32_PTRS:
            sig[arg] = "*i32"
        elif arg in _U8_PTRS:
            sig[arg] = "*u8"
        elif arg == "TAB":
            sig[arg] = "*i64"
        elif arg in _I64_ARGS:
            sig[arg] = "i64"
        elif arg in _F32_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
        if sig[arg].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _parse_ptxas_log(log: str) -> dict | None:
    regs = re.findall(r"Used (\d+) registers", log)
    if not regs:
        return None
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    return dict(regs=int(regs[-1]), spill_stores=int(stores[-1]) if stores else 0,
                spill_loads=int(loads[-1]) if loads else 0)


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers and spill bytes of ``ptx`` for sm_<capability> from a separate ``ptxas -v`` run
    (the fallback when Triton's own ptxas log cannot be captured)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    use = _parse_ptxas_log(res.stderr + res.stdout)
    return use if use is not None else dict(regs=-1, spill_stores=0, spill_loads=0)


@contextlib.contextmanager
def _fresh_compile_with_ptxas_log():
    """Make ``triton.compile`` run every stage (no Triton cache hit) and print ptxas's log."""
    knobs = getattr(triton, "knobs", None)
    saved = []
    if knobs is not None:
        for group, name in ((knobs.compilation, "always_compile"), (knobs.nvidia, "dump_ptxas_log")):
            if hasattr(group, name):
                saved.append((group, name, getattr(group, name)))
                setattr(group, name, True)
    try:
        yield
    finally:
        for group, name, value in reversed(saved):
            setattr(group, name, value)


def compile_kernel(name: str, capability: int, dtype: str, bd: int, cfg: configs.Config, variant: str) -> dict:
    """Compile one kernel configuration; returns its resource usage and compile time."""
    t = _tile(cfg, name)
    sig, const, attrs = signature(name, dtype, bd, cfg, variant)
    src = triton.compiler.ASTSource(fn=_FN[name], signature=sig, constexprs=const, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    t0 = time.perf_counter()
    log = io.StringIO()
    with _fresh_compile_with_ptxas_log(), contextlib.redirect_stdout(log):
        k = triton.compile(src, target=target, options=dict(num_warps=t.warps, num_stages=t.stages))
    use = _parse_ptxas_log(log.getvalue())
    source = "triton ptxas log"
    if use is None:
        use = ptxas_usage(k.asm["ptx"], capability)
        source = "separate ptxas -v"
    use.update(_describe((name, capability, dtype, bd, cfg, variant)), shared=int(k.metadata.shared),
               seconds=round(time.perf_counter() - t0, 2), usage_from=source, triton=triton.__version__)
    return use


def _describe(job: tuple) -> dict:
    name, cap, dtype, bd, cfg, var = job
    t = _tile(cfg, name)
    d = dict(kernel=name, arch=f"sm{cap}", dtype=dtype, bd=bd, variant=var, bm=t.bm, bn=t.bn, warps=t.warps,
             stages=t.stages)
    if name == "pse":
        d["dc"] = t.dim_chunk(bd)
    return d


def table_entries(archs: tuple[str, ...] = ("sm80", "sm90")) -> list[tuple[str, int, str, int, configs.Config]]:
    """(arch key, capability, dtype, BD, config) for every GPU entry of the table; the "half"
    class compiles as bf16 (fp16 uses the same registers and instructions but for the MMA type)."""
    out = []
    for (arch, cls, bd), cfg in sorted(configs.TABLE.items()):
        if arch not in archs:
            continue
        out.append((arch, int(arch[2:]), "bf16" if cls == "half" else "fp32", bd, cfg))
    return out


def jobs(archs: tuple[str, ...] = ("sm80", "sm90"), variants: tuple[str, ...] = ("plain",)) -> list[tuple]:
    """Every (kernel, capability, dtype, BD, config, variant) compile of the table's GPU entries.

    The "full" variant (pse, explicit mask, prefix, Philox dropout, sink) is each kernel's
    heaviest form; "plain" is the feature-free one."""
    out = []
    for _arch, cap, dtype, bd, cfg in table_entries(archs):
        for name in KERNELS:
            for var in variants:
                out.append((name, cap, dtype, bd, cfg, var))
    return out


# --------------------------------------------------------------------------- the result cache
_CACHE_FORMAT = 1
_tool_versions: dict[int, str] = {}


def cache_dir() -> str | None:
    """Where compile results are kept (None: caching is off)."""
    if os.environ.get("FASCORE_AOT_CACHE", "1") in ("0", "", "off", "no"):
        return None
    root = os.environ.get("FASCORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fascore")
    return os.path.join(root, "triton-aot")


def _ptxas_version(capability: int) -> str:
    if capability not in _tool_versions:
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            tool = get_ptxas(capability)
            out = subprocess.run([tool.path, "--version"], capture_output=True, text=True, timeout=60).stdout
            _tool_versions[capability] = out.strip().splitlines()[-1] if out.strip() else str(tool.path)
        except Exception as exc:  # pragma: no cover - a broken install fails in the compile anyway
            _tool_versions[capability] = f"unknown ({type(exc).__name__})"
    return _tool_versions[capability]


def job_key(job: tuple) -> str:
    """Compile key of ``job``: equal keys mean identical compiles (inputs and tools)."""
    name, cap, dtype, bd, cfg, var = job
    t = _tile(cfg, name)
    sig, const, attrs = signature(name, dtype, bd, cfg, var)
    payload = dict(format=_CACHE_FORMAT, triton=triton.__version__, ptxas=_ptxas_version(cap),
                   kernel=_FN[name].cache_key, signature=sig, constexprs={k: repr(v) for k, v in const.items()},
                   attrs=sorted([list(k), v] for k, v in attrs.items()), target=["cuda", cap, 32],
                   options=dict(num_warps=t.warps, num_stages=t.stages))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_path(root: str, key: str) -> str:
    return os.path.join(root, key[:2], key + ".json")


def _cache_load(root: str | None, key: str) -> dict | None:
    if root is None:
        return None
    try:
        with open(_cache_path(root, key)) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("key") == key and "regs" in res else None


def _cache_store(root: str | None, key: str, res: dict) -> None:
    if root is None or "error" in res:
        return
    path = _cache_path(root, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(dict(res, key=key), f)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache directory only costs the next run its time
        pass


def _compile_job(job: tuple) -> dict:
    try:
        return compile_kernel(*job)
    except Exception as exc:  # reported, not raised: the caller shows every failure at once
        return dict(_describe(job), error=f"{type(exc).__name__}: {exc}"[:500])


def _cost(job: tuple) -> tuple:
    """Rough compile cost, for the longest-first order: big head dims and the main kernels."""
    name, _cap, dtype, bd, _cfg, var = job
    return (var == "full", bd, name in ("fwd", "kv", "q"), dtype == "fp32")


def compile_all(job_list: list[tuple], processes: int = 2, cache: bool = True) -> list[dict]:
    """Results of ``job_list`` (in its order; ``cached`` says which came from the cache): each
    distinct compile runs once, misses in ``processes`` worker processes (spawned: no inherited
    interpreter state), longest first."""
    import multiprocessing as mp

    root = cache_dir() if cache else None
    keys = [job_key(j) for j in job_list]
    distinct = dict(zip(keys, job_list))
    done: dict[str, dict] = {}
    for key in distinct:
        hit = _cache_load(root, key)
        if hit is not None:
            done[key] = dict(hit, cached=True)
    todo = sorted(((k, j) for k, j in distinct.items() if k not in done), key=lambda kj: _cost(kj[1]), reverse=True)
    if todo:
        if processes <= 1 or len(todo) == 1:
            fresh = map(_compile_job, [j for _k, j in todo])
        else:
            pool = mp.get_context("spawn").Pool(min(processes, len(todo)))
            fresh = pool.imap(_compile_job, [j for _k, j in todo], chunksize=1)
        try:
            for (key, _job), res in zip(todo, fresh):
                _cache_store(root, key, res)
                done[key] = dict(res, key=key, cached=False)
        finally:
            if processes > 1 and len(todo) > 1:
                pool.close()
                pool.join()
    return [dict(done[k], **_describe(j)) for k, j in zip(keys, job_list)]


def format_row(r: dict) -> str:
    tile = f"{r['bm']}x{r['bn']}" + (f" dc{r['dc']}" if "dc" in r else "")
    head = f"{r['kernel']:4s} {r['arch']} {r['dtype']} BD={r['bd']:3d} {r['variant']:5s} {tile:12s} w{r['warps']} s{r['stages']}"
    if "error" in r:
        return f"{head}: ERROR {r['error'][:200]}"
    return (f"{head}: regs {r['regs']:3d} spill {r['spill_stores']}/{r['spill_loads']} smem {r['shared']:6d}"
            f"{' (cached)' if r.get('cached') else ''}")


def main() -> None:  # python -m fascore.engines.triton.aot [--full] [--arch sm80] [--out FILE]
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also compile the all-features variants")
    ap.add_argument("--arch", action="append", choices=["sm80", "sm90"])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    ap.add_argument("--no-cache", action="store_true", help="compile everything afresh (the cache is not read)")
    ap.add_argument("-j", type=int, default=2)
    args = ap.parse_args()
    variants = ("plain", "full") if args.full else ("plain",)
    t0 = time.perf_counter()
    job_list = jobs(tuple(args.arch or ("sm80", "sm90")), variants)
    res = compile_all(job_list, args.j, cache=not args.no_cache)
    for r in res:
        print(json.dumps(r) if args.json else format_row(r), flush=True)
    n_distinct = len({r["key"] for r in res if "key" in r})
    n_cached = len({r["key"] for r in res if r.get("cached")})
    print(f"{len(res)} compiles, {n_distinct} distinct, {n_cached} from the cache ({cache_dir() or 'off'}), "
          f"triton {triton.__version__}, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
