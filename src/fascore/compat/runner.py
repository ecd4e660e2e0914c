"""Running unmodified torch_npu programs on fascore: a script, a module (``-m``), or a
torchrun-style launch of several processes (``fascore run`` and ``python -m fascore.compat``).

The stand-in is installed with device mapping before the program's first line runs;
``sys.argv``, ``sys.path[0]`` and ``__name__ == "__main__"`` are as ``python SCRIPT`` /
``python -m MODULE`` would set them. An exception the program raises is reported as a short
traceback of the program's own frames (fascore's and the runner's frames left out) and a last
line naming the program's frame; the exit code is then 1.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

__all__ = ["RunConfig", "parse_args", "run", "run_script", "run_module", "format_user_error", "USAGE"]

USAGE = """Usage: python -m fascore.compat [--device auto|cpu|cuda] [--capture DIR] [--capture-sample N|F]
         [--nproc-per-node N] (SCRIPT | -m MODULE) [ARGS...]

Runs an unmodified torch_npu program on fascore's torch_npu stand-in with the "npu" device mapped
to the target (auto: cuda if available, else cpu). --capture records every FlashAttentionScore call
into a replay bundle (fascore compare); --nproc-per-node launches N processes as torchrun does."""

_FASCORE_DIR = str(Path(__file__).resolve().parents[1])
_STDLIB_DIRS = tuple({str(Path(p).resolve()) for p in (sysconfig.get_paths()["stdlib"],
                                                        sysconfig.get_paths()["platstdlib"])})


@dataclass
class RunConfig:
    target: str = ""  # the script's path or the module's name
    module: bool = False
    args: list[str] = field(default_factory=list)
    device: str = "auto"
    capture: Optional[str] = None
    capture_sample: Optional[float | int] = None
    nproc_per_node: Optional[int] = None


def parse_sample(text: str) -> int | float:
    """``--capture-sample``: an int n (every n-th call) or a fraction in (0, 1]."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--capture-sample {text!r}: must be an int N (every N-th call) or a fraction F") from None


def parse_args(argv: list[str]) -> RunConfig:
    """Options first, then SCRIPT or ``-m MODULE``; everything after belongs to the program."""
    cfg = RunConfig()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--device", "--capture", "--capture-sample", "--nproc-per-node", "--nproc_per_node", "-m"):
            if i + 1 >= len(argv):
                raise ValueError(f"{a} needs a value")
            v = argv[i + 1]
            if a == "-m":
                cfg.target, cfg.module, cfg.args = v, True, list(argv[i + 2:])
                return _check(cfg)
            if a == "--device":
                cfg.device = v
            elif a == "--capture":
                cfg.capture = v
            elif a == "--capture-sample":
                cfg.capture_sample = parse_sample(v)
            else:
                cfg.nproc_per_node = int(v)
            i += 2
        elif a.startswith("-") and a != "-":
            raise ValueError(f"unknown option {a!r} (options go before SCRIPT / -m MODULE)")
        else:
            cfg.target, cfg.args = a, list(argv[i + 1:])
            return _check(cfg)
    raise ValueError("no SCRIPT or -m MODULE given")


def _check(cfg: RunConfig) -> RunConfig:
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {cfg.device!r}: must be auto, cpu or cuda")
    if cfg.nproc_per_node is not None and cfg.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {cfg.nproc_per_node}: must be >= 1")
    if not cfg.module and not Path(cfg.target).is_file():
        raise ValueError(f"{cfg.target!r}: no such script")
    return cfg


# ---------------------------------------------------------------------------------- errors
def _is_runner_frame(filename: str) -> bool:
    """fascore's own frames (the runner, the operators, the generated entry points) and runpy's."""
    if filename.startswith("<fascore"):
        return True
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(_FASCORE_DIR + os.sep) or (
        path.startswith(_STDLIB_DIRS) and Path(path).name in ("runpy.py", "<frozen runpy>"))


def _is_library_frame(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = str(Path(filename).resolve())
    lib_dirs = (_FASCORE_DIR, *_STDLIB_DIRS, str(Path(__import__("torch").__file__).resolve().parent))
    return path.startswith(tuple(d + os.sep for d in lib_dirs)) or "site-packages" in path


def _strip(te: traceback.TracebackException) -> None:
    seen = set()
    while te is not None and id(te) not in seen:
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not _is_runner_frame(f.filename) and not f.filename.startswith("<frozen")])
        te = te.__cause__ or te.__context__  # type: ignore[assignment]


def format_user_error(exc: BaseException, program: str) -> str:
    """The program's exception as a traceback of its own frames and a line naming the frame."""
    te = traceback.TracebackException.from_exception(exc)
    _strip(te)
    text = "".join(te.format())
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not _is_runner_frame(f.filename) and not _is_library_frame(f.filename)]
    where = user[-1] if user else (frames[-1] if frames else None)
    head = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"fascore run: {program} raised {type(exc).__name__}"
    if where is not None:
        line += f" at {where.filename}:{where.lineno} in {where.name}"
        if where.line:
            line += f": {where.line.strip()}"
    if head:
        line += f"\n  {type(exc).__name__}: {head}"
    return text + line + "\n"


# ---------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _argv_path(argv0: str, args: list[str], path0: str) -> Iterator[None]:
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [argv0, *args]
    sys.path.insert(0, path0)
    try:
        yield
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path


def _capture_ctx(cfg: RunConfig) -> Any:
    if not cfg.capture:
        return contextlib.nullcontext()
    from ..tools.capture import capture

    path = Path(cfg.capture)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # one bundle per rank
        path = path / f"rank{os.environ.get('RANK', '0')}"
    return capture(path, sample=cfg.capture_sample, overwrite=True)


def _execute(cfg: RunConfig) -> None:
    with _capture_ctx(cfg):
        if cfg.module:
            with _argv_path(cfg.target, cfg.args, os.getcwd()):
                runpy.run_module(cfg.target, run_name="__main__", alter_sys=True)
        else:
            with _argv_path(cfg.target, cfg.args, str(Path(cfg.target).resolve().parent)):
                runpy.run_path(cfg.target, run_name="__main__")


def run(cfg: RunConfig, stderr: Optional[TextIO] = None) -> int:
    """Run ``cfg``'s program (or launch ``nproc_per_node`` copies of it); the exit code."""
    from . import install_torch_npu_shim

    if cfg.nproc_per_node is not None:
        return _launch(cfg)
    install_torch_npu_shim(device=cfg.device)
    program = f"-m {cfg.target}" if cfg.module else cfg.target
    try:
        _execute(cfg)
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=stderr or sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (the program's own exception, reported cleanly)
        (stderr or sys.stderr).write(format_user_error(e, program))
        return 1
    return 0


def _launch(cfg: RunConfig) -> int:
    """torchrun-style: ``nproc_per_node`` workers, each ``python -m fascore.compat ...``."""
    from torch.distributed import run as torchrun

    inner = ["--device", cfg.device]
    if cfg.capture:
        inner += ["--capture", cfg.capture]
        if cfg.capture_sample is not None:
            inner += ["--capture-sample", str(cfg.capture_sample)]
    inner += (["-m", cfg.target] if cfg.module else [cfg.target]) + cfg.args
    argv = ["--standalone", "--nproc-per-node", str(cfg.nproc_per_node), "-m", "fascore.compat", *inner]
    try:
        torchrun.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:  # ChildFailedError: the workers printed their own reports
        print(f"fascore run: a worker failed ({type(e).__name__})", file=sys.stderr)
        return 1
    return 0


def run_script(path: str, argv: Optional[list[str]] = None, *, device: str = "auto") -> int:
    """Run the Python file ``path`` as ``__main__`` (``sys.argv = [path, *argv]``) on the stand-in."""
    return run(_check(RunConfig(target=path, args=list(argv or []), device=device)))


def run_module(name: str, argv: Optional[list[str]] = None, *, device: str = "auto") -> int:
    """``python -m name`` on the stand-in."""
    return run(_check(RunConfig(target=name, module=True, args=list(argv or []), device=device)))
