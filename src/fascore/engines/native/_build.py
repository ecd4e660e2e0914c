"""Compile (once) and load the native CPU engine's C++ extension.

The extension is built with ``torch.utils.cpp_extension.load`` (ninja) against the installed
torch, in a cache directory keyed by torch version, Python version, machine and a hash of the
sources and flags: ``$FASCORE_CACHE_DIR/native/<key>`` or ``~/.cache/fascore/native/<key>``.
A finished build is loaded directly on later imports (no compiler run). A missing compiler or a
failed build warns once and leaves the extension unavailable (the PyTorch engine runs instead);
``FASCORE_NATIVE=0`` disables it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("native.cpp", "kernels_avx2.cpp", "kernels_generic.cpp")
HEADERS = ("args.h", "kernels_impl.h", "simd_avx2.h", "simd_generic.h")
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno")
# at::parallel_for is OpenMP inlined from ATen's headers: without -fopenmp it runs serially. The
# extension links libgomp.so.1, which resolves to the copy torch has already loaded (same soname).
OPENMP = ("-fopenmp",)
_BUILD_VERSION = "3"

_lock = threading.Lock()
_ext: "Extension | None" = None
_error: str | None = None
_warned = False


def disabled() -> bool:
    return os.environ.get("FASCORE_NATIVE", "1").strip().lower() in ("0", "false", "off", "no")


def build_key(openmp: bool = True) -> str:
    h = hashlib.sha256()
    for part in (_BUILD_VERSION, torch.__version__, f"{sys.version_info[0]}.{sys.version_info[1]}",
                 platform.machine(), " ".join(CFLAGS + (OPENMP if openmp else ()))):
        h.update(part.encode() + b"\0")
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (_CSRC / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("FASCORE_CACHE_DIR")
    base = Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "fascore"
    return base / "native"


def module_name(key: str) -> str:
    return f"fascore_native_{key}"


class Extension:
    """The built library's operators (``torch.ops.<name>.*``) under plain names."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        ops = getattr(torch.ops, name)
        self.forward = ops.forward
        self.backward = ops.backward
        self.isa = ops.isa
        self.set_isa = ops.set_isa
        self.scratch_bytes = ops.scratch_bytes
        self.num_threads = ops.num_threads
        self.set_min_work = ops.set_min_work
        self.bwd_chunks = ops.bwd_chunks


def _load_built(name: str, path: Path) -> Extension:
    torch.ops.load_library(str(path))
    return Extension(name, path)


def _compile(key: str, verbose: bool, openmp: bool) -> Extension:
    from torch.utils import cpp_extension

    name = module_name(key)
    build_dir = cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    done = build_dir / "built.ok"
    so = build_dir / f"{name}.so"
    if done.exists() and so.exists():
        return _load_built(name, so)
    print(f"fascore: compiling the native CPU engine (one time, about a minute) in {build_dir}",
          file=sys.stderr, flush=True)
    omp = list(OPENMP) if openmp else []
    cpp_extension.load(name=name, sources=[str(_CSRC / s) for s in SOURCES], extra_cflags=list(CFLAGS) + omp,
                       extra_ldflags=omp, extra_include_paths=[str(_CSRC)], build_directory=str(build_dir),
                       verbose=verbose, is_python_module=False)
    done.write_text(f"{torch.__version__}\n")
    return Extension(name, so)


def extension(verbose: bool = False) -> "Extension | None":
    """The loaded extension, building it on first use; None when unavailable (see ``error()``)."""
    global _ext, _error, _warned
    if _ext is not None:
        return _ext
    if disabled():
        return None
    with _lock:
        if _ext is not None or _error is not None:
            return _ext
        try:
            try:
                _ext = _compile(build_key(True), verbose, True)
            except Exception as exc:  # no OpenMP here: build the serial variant
                text = str(exc).lower()
                if not any(w in text for w in ("fopenmp", "omp.h", "gomp", "libomp")):
                    raise
                _ext = _compile(build_key(False), verbose, False)
                warnings.warn("fascore: native CPU engine built without OpenMP: it runs on one thread",
                              RuntimeWarning, stacklevel=3)
        except Exception as exc:  # compiler missing, build error, import error
            msg = str(exc).strip().splitlines()
            _error = f"{type(exc).__name__}: {msg[-1] if msg else ''}"[:500]
            if not _warned:
                _warned = True
                warnings.warn(f"fascore: the native CPU engine could not be built ({_error}); "
                              "the PyTorch engine runs instead", RuntimeWarning, stacklevel=3)
    return _ext


def error() -> str | None:
    if disabled():
        return "disabled by FASCORE_NATIVE=0"
    return _error
