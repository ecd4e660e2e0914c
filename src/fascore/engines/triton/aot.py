"""Ahead-of-time compiles of the engine's kernels for a GPU target, without a GPU.

``compile_kernel(name, arch, dtype, cfg, variant)`` builds the kernel's signature as the engine
launches it (head-dim strides 1, 16-byte aligned pointers), compiles it for ``GPUTarget("cuda",
arch, 32)`` and reads the register count, spills and shared memory from ptxas (Triton's bundled
one, run with ``-v`` on the generated PTX). Needs triton's JIT kernels: import with
``TRITON_INTERPRET`` unset. Used by ``tests/test_triton_aot.py`` and ``benchmarks/gpu_check.py``.
"""
from __future__ import annotations

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
        c.update(MODE=0, BATCH_SUM=full, BJ=t.bn)
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


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and shared memory of ``ptx`` for sm_<capability> (ptxas -v)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    return dict(regs=int(regs[-1]) if regs else -1, spill_stores=int(stores[-1]) if stores else 0,
                spill_loads=int(loads[-1]) if loads else 0)


def compile_kernel(name: str, capability: int, dtype: str, bd: int, cfg: configs.Config, variant: str) -> dict:
    """Compile one kernel configuration; returns its resource usage and compile time."""
    t = _tile(cfg, name)
    sig, const, attrs = signature(name, dtype, bd, cfg, variant)
    src = triton.compiler.ASTSource(fn=_FN[name], signature=sig, constexprs=const, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    t0 = time.perf_counter()
    k = triton.compile(src, target=target, options=dict(num_warps=t.warps, num_stages=t.stages))
    use = ptxas_usage(k.asm["ptx"], capability)
    use.update(kernel=name, arch=f"sm{capability}", dtype=dtype, bd=bd, variant=variant, bm=t.bm, bn=t.bn,
               warps=t.warps, stages=t.stages, shared=int(k.metadata.shared),
               seconds=round(time.perf_counter() - t0, 2))
    return use


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


def _compile_job(job: tuple) -> dict:
    name, cap, dtype, bd, cfg, var = job
    try:
        return compile_kernel(name, cap, dtype, bd, cfg, var)
    except Exception as exc:  # reported, not raised: the caller shows every failure at once
        return dict(kernel=name, arch=f"sm{cap}", dtype=dtype, bd=bd, variant=var, error=f"{type(exc).__name__}: {exc}"[:500])


def compile_all(job_list: list[tuple], processes: int = 2) -> list[dict]:
    """Compile ``job_list`` in ``processes`` worker processes (spawned: no inherited interpreter)."""
    import multiprocessing as mp

    if processes <= 1:
        return [_compile_job(j) for j in job_list]
    with mp.get_context("spawn").Pool(processes) as pool:
        return pool.map(_compile_job, job_list, chunksize=1)


def main() -> None:  # python -m fascore.engines.triton.aot [--plain] [--out FILE]
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also compile the all-features variants")
    ap.add_argument("--arch", action="append", choices=["sm80", "sm90"])
    ap.add_argument("--out")
    ap.add_argument("-j", type=int, default=2)
    args = ap.parse_args()
    variants = ("plain", "full") if args.full else ("plain",)
    res = compile_all(jobs(tuple(args.arch or ("sm80", "sm90")), variants), args.j)
    for r in res:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
