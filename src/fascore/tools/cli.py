"""The ``fascore`` command line: ``check``, ``bench``, ``demo``, ``run``, ``info``.

    fascore check [--device cpu|cuda] [--quick]   conformance run against the float64 reference
    fascore check --case N                        rerun case N alone and print it as Python
    fascore bench [--quick] [--out DIR]           benchmark matrix: CSV, PNG plots, summary table
    fascore demo [--repeat N]                     the operator in its main modes, timed and checked
    fascore run [OPTIONS] SCRIPT.py [ARGS...]     an unmodified torch_npu program on fascore (stand-in)
    fascore info                                  versions, engines, devices, matmul path

``python -m fascore`` is the same command. Every option is checked: a bad value exits with code 2
and says why (click's usage errors, or ``_usage_error``).
"""
from __future__ import annotations

import math
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich import box
from rich.table import Table

import fascore

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="fascore: Ascend's FlashAttentionScore (npu_fusion_attention) on PyTorch.")
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console, transient=False)


def _device(device: Device) -> torch.device:
    if device == Device.cuda and not torch.cuda.is_available():
        console.print("[red]--device cuda: CUDA is not available in this torch build / machine[/red]")
        raise typer.Exit(2)
    return torch.device(device.value)


def _version(value: bool) -> None:
    if value:
        console.print(f"fascore {fascore.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """fascore: Ascend's FlashAttentionScore (npu_fusion_attention) on PyTorch."""


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == math.inf:
        return "inf"
    return f"{x:.2e}" if x else "0"


# --------------------------------------------------------------------------- shared option checks
def _usage_error(message: str) -> None:
    """Exit 2 with ``message`` (what click does for its own option errors)."""
    console.print(f"[red]{message}[/red]")
    raise typer.Exit(2)


def _threads(threads: Optional[int]) -> None:
    """``--threads N``: torch's intra-op threads for this run (None: torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def _threads_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--threads", min=1, help="CPU threads (torch.set_num_threads); default: torch's.")


# --------------------------------------------------------------------------- check
@app.command()
def check(device: Device = typer.Option(Device.cpu, help="Device the operator runs on (the reference runs on CPU)."),
          quick: bool = typer.Option(False, "--quick", help="The CI subset (about 50 cases)."),
          engine: Optional[str] = typer.Option(None, help="Engine to check (default: the current default)."),
          n_random: int = typer.Option(200, min=0, help="Random combinations in the full run."),
          seed: int = typer.Option(0, min=0, help="Seed of everything random: the combinations, each case's data "
                                                  "and the emulated NPU generator's seed per case."),
          limit: Optional[int] = typer.Option(None, min=1, help="Run only the first N cases (a smoke test)."),
          case: Optional[int] = typer.Option(None, "--case", min=0, help="Rerun case N alone (its number in the "
                                                                         "table, #N) and print it as Python."),
          threads: Optional[int] = _threads_option()) -> None:
    """Conformance run of this install against its float64 reference.

    Layouts x sparse modes x pse types x dtypes x dropout x TND x GQA (plus sink, rope, invalid
    rows, error codes), forward and backward, under semantics §7's tolerance rule. Prints a feature by
    status table with the worst error next to its tolerance; exit code 1 on any failure. Every
    random draw is fixed by --seed: two runs print the same table, and --case N reruns one case
    exactly as the list ran it.
    """
    from fascore.tools import check as chk

    dev = _device(device)
    if engine is not None and engine not in fascore.available_engines():
        _usage_error(f"--engine {engine!r}: must be one of {fascore.available_engines()}")
    _threads(threads)
    eng = engine or "dispatch"
    specs = chk.cases(quick=quick, n_random=n_random, seed=seed)
    if case is not None:
        if case >= len(specs):
            _usage_error(f"--case {case}: this list ({'quick' if quick else f'full, --n-random {n_random}'}) has "
                         f"{len(specs)} cases, #0 .. #{len(specs) - 1}")
        _check_one(chk, specs[case], dev, engine)
        return
    if limit is not None:
        specs = specs[:limit]
    console.print(engine_table())
    console.print(f"fascore {fascore.__version__} check: {len(specs)} cases + error codes, engine {eng!r} on "
                  f"{dev}{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}, "
                  f"reference float64 on cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"seed {seed}")
    t0 = time.perf_counter()
    failed = 0
    with _progress() as prog:
        task = prog.add_task("check", total=len(specs) + 1, last="")

        def step(r: "chk.Result") -> None:
            nonlocal failed
            failed += not r.ok
            prog.update(task, advance=1, last=f"{'ok  ' if r.ok else 'FAIL'} {r.name}"
                        + (f"  [{failed} failed]" if failed else ""))

        results = chk.run(specs, device=dev, engine=engine, progress=step)
    console.print(_check_table(chk, results, quick))
    bad = [r for r in results if not r.ok]
    rerun = (" --quick" if quick else "") + (f" --seed {seed}" if seed else "") + \
        (f" --n-random {n_random}" if not quick and n_random != 200 else "") + \
        (f" --device {dev.type}" if dev.type != "cpu" else "") + (f" --engine {engine}" if engine else "")
    for r in bad[:20]:
        detail = r.error or "; ".join(f"{c.quantity}: {_fmt(c.err)} > {_fmt(c.tol)}" for c in r.checks if not c.ok)
        number = r.name[1:4] if r.name.startswith("#") else None
        console.print(f"[red]FAIL[/red] {r.name}: {detail}"
                      + (f"\n     rerun alone, as Python: fascore check --case {int(number)}{rerun}" if number else ""))
    if len(bad) > 20:
        console.print(f"... and {len(bad) - 20} more")
    dt = time.perf_counter() - t0
    skipped = [r for r in results if r.skipped]
    for why in sorted({r.skipped for r in skipped}):
        names = [r.name.split(" ")[0] for r in skipped if r.skipped == why]
        console.print(f"[yellow]skipped[/yellow] {len(names)} case(s) the engine declares it cannot run "
                      f"({why}): {', '.join(names)}")
    n_ok = len(results) - len(bad) - len(skipped)
    if bad:
        console.print(f"[red]{len(bad)} of {len(results)} cases FAILED[/red] ({dt:.1f} s)")
        raise typer.Exit(1)
    console.print(f"[green]all {n_ok} cases passed[/green]" + (f", {len(skipped)} skipped" if skipped else "")
                  + f" on {dev} with engine {eng!r} ({dt:.1f} s)")


def _check_table(chk, results, quick: bool) -> Table:
    table = Table(title=f"fascore check ({'quick' if quick else 'full'}): worst error per feature, "
                        "semantics §7 tolerance", box=box.SIMPLE_HEAD)
    for col, just in (("feature", "left"), ("cases", "right"), ("status", "left"), ("worst quantity", "left"),
                      ("max |err|", "right"), ("tolerance", "right"), ("worst case", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for feature, n, n_failed, worst, chk_ in chk.feature_table(results):
        status = "[green]PASS[/green]" if not n_failed else f"[red]FAIL {n_failed}[/red]"
        if chk_ is None:
            qty, err, tol = (worst.error[:60] if worst is not None and worst.error else "-"), "-", "-"
        elif chk_.tol == 0 and chk_.err == 0:  # pass/fail checks (error codes)
            qty, err, tol = chk_.quantity, "-", "-"
        else:
            qty, err, tol = chk_.quantity, _fmt(chk_.err), _fmt(chk_.tol)
        table.add_row(feature, str(n), status, qty, err, tol, worst.name if worst else "-")
    return table


def _check_one(chk, spec, dev: torch.device, engine: Optional[str]) -> None:
    """``check --case N``: the case's checks, then the case as a Python snippet."""
    r = chk.run_case(spec, dev, engine)
    table = Table(title=f"fascore check {spec.name}: {', '.join(spec.features())}", box=box.SIMPLE_HEAD)
    for col, just in (("quantity", "left"), ("max |err|", "right"), ("tolerance", "right"), ("status", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in r.checks:
        table.add_row(c.quantity, _fmt(c.err), _fmt(c.tol), "[green]ok[/green]" if c.ok else "[red]FAIL[/red]")
    console.print(table)
    if r.skipped:
        console.print(f"[yellow]skipped[/yellow]: the engine declares it cannot run this case ({r.skipped})")
    if r.error:
        console.print(f"[red]FAIL[/red] {r.error}")
    console.print("# the case as Python (run it with python -):")
    console.print(chk.snippet(spec, dev), markup=False, soft_wrap=True)
    if not r.ok:
        raise typer.Exit(1)
    if not r.skipped:
        console.print(f"[green]{spec.name} passed[/green] ({r.seconds:.2f} s)")


# --------------------------------------------------------------------------- bench
def _seqlens(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    out = []
    for part in value.split(","):
        part = part.strip()
        try:
            s = int(part)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not an integer (give sequence lengths like 512,1024,2048)")
        if not 1 <= s <= 1 << 20:
            raise typer.BadParameter(f"{s}: a sequence length must be in [1, 1048576]")
        out.append(s)
    if len(set(out)) != len(out):
        raise typer.BadParameter(f"{value!r} repeats a length")
    return tuple(out)


@app.command()
def bench(quick: bool = typer.Option(False, "--quick", help="Small sizes, two repeats (under two minutes)."),
          out: Path = typer.Option(Path("bench_out"), "--out", file_okay=False,
                                   help="Directory for bench.csv and the PNG plots."),
          device: Device = typer.Option(Device.cpu, help="Device to benchmark on."),
          memory: bool = typer.Option(True, help="Measure peak memory (CPU: Linux only)."),
          seqlens: Optional[str] = typer.Option(None, callback=_seqlens,
                                                help="Comma-separated sequence lengths, each in [1, 1048576] "
                                                     "(overrides the matrix)."),
          repeat: Optional[int] = typer.Option(None, min=1, help="Timed runs per measurement (median, min-max band)."),
          threads: Optional[int] = _threads_option()) -> None:
    """fascore vs PyTorch SDPA vs naive attention over sequence lengths.

    Writes OUT/bench.csv, OUT/time.png, OUT/gflops.png (median with a min-max band over the
    repeats), OUT/memory.png and OUT/machine.json, and prints a summary table.
    """
    from dataclasses import replace

    from fascore.tools import bench as bn

    dev = _device(device)
    _threads(threads)
    cfg = bn.quick_config() if quick else bn.full_config()
    cfg = replace(cfg, memory=memory)
    if seqlens is not None:
        cfg = replace(cfg, seqlens=seqlens)
    if repeat is not None:
        cfg = replace(cfg, repeat=repeat)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _usage_error(f"--out {out}: cannot create the directory ({e.strerror or e})")
    console.print(f"fascore {fascore.__version__} bench on {dev}: masks {', '.join(cfg.masks)}, S in "
                  f"{list(cfg.seqlens)}, B={cfg.b} N={cfg.n} D={cfg.d} {str(cfg.dtype).replace('torch.', '')}, "
                  f"{torch.get_num_threads()} threads, median of {cfg.repeat}")
    t0 = time.perf_counter()
    with _progress() as prog:
        task = prog.add_task("bench", total=bn.n_steps(cfg), last="")
        rows, paths = bn.run(cfg, out, dev, progress=lambda what: prog.update(task, advance=1, last=what))
        prog.update(task, completed=bn.n_steps(cfg))
    if not rows:
        console.print("[red]no measurement succeeded (see the errors above); nothing plotted[/red]")
        raise typer.Exit(1)
    table = Table(title=f"summary ({dev}): time per call, effective GFLOP/s of fwd+bwd, peak memory of fwd+bwd")
    for col in ("mask", "S", "impl", "fwd ms", "fwd+bwd ms", "GFLOP/s", "peak MiB", "x SDPA time"):
        table.add_column(col, justify="left" if col in ("mask", "impl") else "right")
    for r in bn.summary(rows):
        def f(x: Optional[float], spec: str) -> str:
            return "-" if x is None else format(x, spec)
        table.add_row(r["mask"], str(r["S"]), r["impl"], f(r["fwd_ms"], ".1f"), f(r["fwdbwd_ms"], ".1f"),
                      f(r["gflops"], ".1f"), f(r["peak_mib"], ".0f"), f(r["vs_sdpa"], ".2f"))
    console.print(table)
    for p in paths:
        console.print(f"wrote {p}")
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------- demo
@app.command()
def demo(repeat: int = typer.Option(5, min=1, help="Timed runs per mode (the table shows their median)."),
         warmup: int = typer.Option(1, min=0, help="Untimed runs before timing."),
         threads: Optional[int] = _threads_option()) -> None:
    """The operator on realistic shapes in its main modes (causal, band, prefix, ALiBi, dropout,
    sink, TND), timed (median of --repeat runs after --warmup), each checked against the float64
    reference (what `make demo` runs)."""
    from fascore.tools import demo as dm

    _threads(threads)
    console.print(dm.header() + f", median of {repeat} after {warmup} warm-up")
    table = Table(title=f"fascore demo: each mode timed (median of {repeat}, [min-max]) and checked against the "
                        "float64 reference")
    for col in ("mode", "query", "fwd ms", "fwd+bwd ms", "max |out - ref64|", "tolerance", "check"):
        table.add_column(col, justify="left" if col in ("mode", "query", "check") else "right")
    ok = True
    cases = dm.cases()
    with _progress() as prog:
        task = prog.add_task("demo", total=len(cases), last="")
        for name, args, kw in cases:
            prog.update(task, last=name)
            r = dm.run_case(name, args, kw, repeat=repeat, warmup=warmup)
            ok &= r["ok"]
            table.add_row(name, r["shape"], f"{r['fwd_ms']:.1f} [{r['fwd_min_ms']:.1f}-{r['fwd_max_ms']:.1f}]",
                          f"{r['fwdbwd_ms']:.1f} [{r['fwdbwd_min_ms']:.1f}-{r['fwdbwd_max_ms']:.1f}]",
                          f"{r['err']:.2e}", f"{r['tol']:.1e}", "[green]ok[/green]" if r["ok"] else "[red]FAIL[/red]")
            prog.update(task, advance=1)
    console.print(table)
    if not ok:
        console.print("[red]SOME CHECKS FAILED[/red]")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/green]")


# --------------------------------------------------------------------------- run (torch_npu shim)
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False, "help_option_names": []})
def run(ctx: typer.Context) -> None:
    """Run an unmodified torch_npu program on fascore's torch_npu stand-in.

    fascore run [--device auto|cpu|cuda] [--capture DIR] [--capture-sample N|F]
                [--nproc-per-node N] (SCRIPT | -m MODULE) [ARGS...]

    The "npu" device maps to --device (auto: cuda if available, else cpu); torch_npu's attention
    operators, torch.npu, Tensor.npu(), torch.ops.npu.* and MindSpeed's fused-op builders are
    fascore's (docs/torch_npu.md). --capture records every FlashAttentionScore call into a replay
    bundle for `fascore compare` (--capture-sample: every N-th call, or a fraction F);
    --nproc-per-node launches N processes as torchrun --standalone does. Options go before the
    program; everything after it is the program's own. The program's exceptions are reported
    with its own frames (exit code 1).
    """
    from fascore.compat import runner

    args = list(ctx.args)
    if not args or args[0] in ("-h", "--help"):
        console.print(runner.USAGE.replace("python -m fascore.compat", "fascore run"))
        raise typer.Exit(0 if args else 2)
    try:
        cfg = runner.parse_args(args)
    except ValueError as e:
        console.print(f"[red]fascore run: {e}[/red]")
        raise typer.Exit(2) from e
    try:
        code = runner.run(cfg)
    except RuntimeError as e:
        if "shadow" in str(e) or "CUDA is not available" in str(e):
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from e
        raise
    raise typer.Exit(code)


# --------------------------------------------------------------------------- info
@app.command()
def info() -> None:
    """Versions, engines, devices and the matmul path of this machine."""
    from fascore import compat
    from fascore.engines.flash import config as kernels

    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("fascore", fascore.__version__)
    table.add_row("torch", torch.__version__)
    table.add_row("engines", ", ".join(fascore.available_engines()) + f" (default {fascore.current_engine_name()!r})")
    table.add_row("CPU threads", str(torch.get_num_threads()))
    table.add_row("CPU capability", str(torch.backends.cpu.get_cpu_capability()))
    table.add_row("bf16 matmul path", kernels.path_description())
    table.add_row("CUDA", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                  if torch.cuda.is_available() else "not available")
    table.add_row("custom ops", "torch.ops.fascore.npu_fusion_attention, torch.ops.fascore.npu_fusion_attention_grad")
    table.add_row("real torch_npu", "installed (shim disabled)" if compat.real_torch_npu_available() else
                  "not installed (fascore.compat shim available)")
    from fascore import lint
    lvl, strict = lint.level()
    table.add_row("guard rails", f"FASCORE_LINT: {lvl}{' + strict rules' if strict else ''} (docs/lint.md)")
    console.print(table)
    console.print(engine_table())


@app.command()
def build(verbose: bool = typer.Option(False, "--verbose", help="Show the compiler's output.")) -> None:
    """Compile the native CPU engine ahead of first use (cached per torch version and source hash)."""
    from fascore.engines import native

    ok = native.build(verbose=verbose)
    console.print(f"native engine: {native.status()}")
    if not ok:
        raise typer.Exit(1)


def engine_table() -> Table:
    """What every engine declares it runs, in dispatch order (``fascore.engines``)."""
    from fascore import engines

    table = Table(title="engines (dispatch takes the first one per device that can run a call)", box=box.SIMPLE)
    for col in ("engine", "devices", "dtypes", "features", "status"):
        table.add_column(col, overflow="fold")
    for row in engines.engine_table():
        table.add_row(*(row[c] for c in ("engine", "devices", "dtypes", "features", "status")))
    order = ", ".join(f"{dev}: {' > '.join(names)}" for dev, names in engines.PRIORITY.items())
    table.caption = f"priority {order}"
    return table


# --------------------------------------------------------------------------- compare (issue 16; begin)
# The command lives in fascore/tools/compare.py; this block only declares its options.
@app.command("compare")
def compare_cmd(path: Path = typer.Argument(..., help="An msprobe dump directory (dump.json) or a fascore replay "
                                                      "bundle (fascore_bundle.json)."),
                out: Optional[Path] = typer.Option(Path("compare_out"), "--out", help="Directory for the heatmap PNGs."),
                json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
                engine: Optional[str] = typer.Option(None, help="Baseline engine (default: fascore's default)."),
                device: str = typer.Option("cpu", help="Device of the baseline engine (the reference runs on CPU)."),
                block: int = typer.Option(128, help="Rows per query/key block in the tile statistics."),
                match: Optional[str] = typer.Option(None, help="Only calls whose name matches this regex."),
                limit: Optional[int] = typer.Option(None, help="At most this many calls."),
                heatmaps: bool = typer.Option(True, help="Write heatmap PNGs of the calls out of bounds."),
                all_heatmaps: bool = typer.Option(False, "--all-heatmaps", help="Heatmaps of every call."),
                diagnose: bool = typer.Option(True, help="Try likely causes of calls out of bounds."),
                dropout_seed: Optional[List[str]] = typer.Option(None, "--dropout-seed",
                                                                 help="NAME=SEED[,OFFSET] of a dropout call whose "
                                                                      "record lacks them (repeatable).")) -> None:
    """Check recorded npu_fusion_attention calls (an NPU run) against fascore's float64 reference.

    Per call: semantics §7's bounds on attention_out, softmax_max/sum and the gradients, where they
    diverge (heads, query/key blocks, NaN rows, invalid rows), a verdict and heatmaps. Exit code
    1 when a call is out of bounds, 2 on usage errors.
    """
    from fascore.tools.compare import compare_command

    raise typer.Exit(compare_command(path, out, json_out, engine=engine, device=device, block=block, match=match,
                                     limit=limit, heatmaps="all" if all_heatmaps else heatmaps, diagnose=diagnose,
                                     dropout_seeds=dropout_seed,
                                     console=console))
# --------------------------------------------------------------------------- compare (issue 16; end)


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point (``fascore``)."""
    app(args=argv, prog_name="fascore")


if __name__ == "__main__":
    main()
