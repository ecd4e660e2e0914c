"""``fascore.capture(path)``: record every FlashAttentionScore call of a run into a replay bundle.

    import fascore
    from fascore.tools.capture import capture

    with capture("bundle/", sample=None):      # every call; sample=4: every 4th; sample=0.1: 10 %
        out = model(batch)                      # fascore.npu_fusion_attention* or the torch_npu shim
        out.sum().backward()                    # gradients of the recorded calls are recorded too

    # later, anywhere (NPU or not):  fascore compare bundle/

Inside the block the public entry points ``fascore.npu_fusion_attention``, ``_v2``,
``npu_fusion_attention_grad`` and ``_grad_v2`` (and ``_v3`` / ``_grad_v3`` where this fascore
has them) are wrapped, in the ``fascore`` module and in fascore's ``torch_npu`` stand-in when it
is (or gets) installed; on exit the originals are put back. Code that bound a function before the
block (``from fascore import npu_fusion_attention``) is not seen.

Replay bundle, format ``fascore-replay-bundle`` version 1: a directory holding

- ``fascore_bundle.json``: ``{"format", "version", "created", "fascore_version",
  "torch_version", "sample", "calls_seen", "calls": [...]}``; one entry per recorded call:
  ``{"id", "seq" (the call's number among all calls seen), "api" (e.g.
  "npu_fusion_attention_v2"), "engine", "device", "args": [...], "kwargs": {...},
  "outputs": [...] or null, "error": null or {"type", "status", "message"}, "backward": null or
  {"dy": T, "grads": {"query": T, "key": T, ...}}}``;
- ``tensors/<hash>.pt``: one ``torch.save``-d CPU tensor per distinct tensor (content-addressed,
  so a compressed mask passed to every layer is stored once).

Values are JSON: None, bool, int, float, str and lists as themselves; a tensor as
``{"tensor": "tensors/<hash>.pt", "dtype": "torch.bfloat16", "shape": [...], "device": "cuda:0"}``;
a ``torch.dtype`` as ``{"dtype": "torch.float32"}``; anything else as ``{"repr": "..."}``.
Inputs are written when the call is made (later in-place updates do not change them).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import inspect
import json
import os
import random
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

import fascore

__all__ = ["capture", "Capture", "load_bundle", "is_bundle", "FORWARD_APIS"]

FORMAT = "fascore-replay-bundle"
VERSION = 1
INDEX = "fascore_bundle.json"
TENSOR_DIR = "tensors"
ENTRY_POINTS = ("npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
                "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3")
FORWARD_APIS = ("npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3")
# inputs a forward call is differentiable in (semantics §1): their gradients are recorded by name
DIFFERENTIABLE = ("query", "key", "value", "pse", "sink", "query_rope", "key_rope")
_MARK = "__fascore_capture__"


# --------------------------------------------------------------------------- value encoding
def dtype_from_name(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` / ``"bfloat16"`` -> torch.bfloat16 (ValueError when unknown)."""
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


class TensorFile:
    """A tensor stored in a file (bundle or dump), loaded on demand onto the CPU."""

    def __init__(self, path: Path, dtype: str | None = None, shape: list[int] | None = None,
                 device: str | None = None) -> None:
        self.path, self.dtype, self.shape, self.device = Path(path), dtype, shape, device

    def load(self) -> Tensor:
        if self.path.suffix == ".npy":
            import numpy as np

            t = torch.from_numpy(np.load(self.path, allow_pickle=False))
        else:
            try:
                t = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - say which file, and why it may fail
                raise OSError(f"cannot load tensor file {self.path}: {type(e).__name__}: {e} (a tensor saved on "
                              "an NPU may need torch_npu to load; re-save it on the CPU)") from e
        if not isinstance(t, Tensor):
            raise OSError(f"{self.path} holds a {type(t).__name__}, not a tensor")
        if self.dtype:
            try:
                want = dtype_from_name(self.dtype)
                if t.dtype != want:
                    t = t.to(want)
            except ValueError:
                pass
        return t

    def __repr__(self) -> str:
        return f"TensorFile({self.path.name}, {self.dtype}, {self.shape})"


class Missing:
    """A value the record does not hold (a tensor dumped without its data, an unsupported type)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"Missing({self.what})"


def decode(v: Any, root: Path) -> Any:
    """A bundle JSON value back to Python, tensors as :class:`TensorFile`."""
    if isinstance(v, list):
        return [decode(x, root) for x in v]
    if isinstance(v, dict):
        if "tensor" in v:
            return TensorFile(root / v["tensor"], v.get("dtype"), v.get("shape"), v.get("device"))
        if "dtype" in v and len(v) == 1:
            return dtype_from_name(v["dtype"])
        if "repr" in v:
            return Missing(f"unsupported value {v['repr']}")
        return {k: decode(x, root) for k, x in v.items()}
    return v


def materialize(v: Any) -> Any:
    """Load every :class:`TensorFile` in ``v`` (lists and dicts recursively)."""
    if isinstance(v, TensorFile):
        return v.load()
    if isinstance(v, list):
        return [materialize(x) for x in v]
    if isinstance(v, tuple):
        return tuple(materialize(x) for x in v)
    if isinstance(v, dict):
        return {k: materialize(x) for k, x in v.items()}
    return v


def find_missing(v: Any) -> list[str]:
    """What in ``v`` is :class:`Missing`."""
    if isinstance(v, Missing):
        return [v.what]
    if isinstance(v, (list, tuple)):
        return [m for x in v for m in find_missing(x)]
    if isinstance(v, dict):
        return [m for x in v.values() for m in find_missing(x)]
    return []


def load_bundle(path: str | Path) -> tuple[dict, list[dict]]:
    """(metadata, calls) of a bundle; each call's values decoded (tensors as :class:`TensorFile`)."""
    root = Path(path)
    index = root / INDEX if root.is_dir() else root
    root = index.parent
    with open(index) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index}: not a fascore replay bundle (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{index}: bundle version {meta.get('version')} is newer than this fascore reads ({VERSION})")
    calls = []
    for c in meta.get("calls", []):
        d = dict(c)
        for k in ("args", "kwargs", "outputs", "backward"):
            if d.get(k) is not None:
                d[k] = decode(d[k], root)
        calls.append(d)
    meta = {k: v for k, v in meta.items() if k != "calls"}
    return meta, calls


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return (p / INDEX).is_file() if p.is_dir() else p.name == INDEX


# --------------------------------------------------------------------------- the recorder
class Capture:
    """The recorder behind :func:`capture` (use that). ``calls`` holds the recorded entries."""

    def __init__(self, path: str | Path, *, sample: int | float | None = None, seed: int = 0,
                 max_calls: int | None = None, backward: bool = True, overwrite: bool = False) -> None:
        if sample is not None:
            if isinstance(sample, bool) or not isinstance(sample, (int, float)):
                raise ValueError(f"sample={sample!r}: must be None, an int >= 1 (every n-th call) or a float in (0, 1]")
            if isinstance(sample, int) and sample < 1:
                raise ValueError(f"sample={sample}: an int sample must be >= 1 (every n-th call)")
            if isinstance(sample, float) and not 0.0 < sample <= 1.0:
                raise ValueError(f"sample={sample}: a float sample is a fraction in (0, 1]")
        if max_calls is not None and max_calls < 0:
            raise ValueError(f"max_calls={max_calls}: must be >= 0")
        self.path = Path(path)
        self.sample, self.max_calls, self.backward, self.overwrite = sample, max_calls, backward, overwrite
        self._rng = random.Random(seed)
        self.calls: list[dict] = []
        self.calls_seen = 0
        self._lock = threading.RLock()
        self._active = False
        self._closed = False
        self._patched: list[tuple[Any, str, Callable]] = []
        self._originals: dict[str, Callable] = {}
        self._wrappers: dict[str, Callable] = {}
        self._saved: set[str] = set()
        self._tls = threading.local()  # per capture: nested captures each see the call
        self._created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # ---- files
    def _prepare_dir(self) -> None:
        if (self.path / INDEX).exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.path} already holds a replay bundle; pass overwrite=True to replace it")
            (self.path / INDEX).unlink()
            shutil.rmtree(self.path / TENSOR_DIR, ignore_errors=True)
        (self.path / TENSOR_DIR).mkdir(parents=True, exist_ok=True)

    def _save_tensor(self, t: Tensor) -> dict:
        cpu = t.detach().to("cpu").contiguous()
        h = hashlib.sha1(f"{cpu.dtype}{tuple(cpu.shape)}".encode())
        if cpu.numel():
            h.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
        rel = f"{TENSOR_DIR}/{h.hexdigest()[:24]}.pt"
        if rel not in self._saved:
            target = self.path / rel
            if not target.exists():
                tmp = target.with_suffix(".tmp")
                torch.save(cpu.clone(), tmp)  # clone: a view would save its whole storage
                os.replace(tmp, target)
            self._saved.add(rel)
        return {"tensor": rel, "dtype": str(t.dtype), "shape": list(t.shape), "device": str(t.device)}

    def _encode(self, v: Any) -> Any:
        if isinstance(v, Tensor):
            return self._save_tensor(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple, torch.Size)):
            return [self._encode(x) for x in v]
        if isinstance(v, torch.dtype):
            return {"dtype": str(v)}
        return {"repr": repr(v)[:200]}

    def _write_index(self) -> None:
        meta = {"format": FORMAT, "version": VERSION, "created": self._created,
                "fascore_version": getattr(fascore, "__version__", "?"), "torch_version": torch.__version__,
                "sample": self.sample, "max_calls": self.max_calls, "calls_seen": self.calls_seen,
                "calls": self.calls}
        tmp = self.path / (INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, self.path / INDEX)

    def flush(self) -> None:
        """Write the index now (it is written on exit, and after late gradients, anyway)."""
        with self._lock:
            self._write_index()

    # ---- sampling
    def _take(self) -> bool:
        seq = self.calls_seen
        self.calls_seen += 1
        if self.max_calls is not None and len(self.calls) >= self.max_calls:
            return False
        if self.sample is None:
            return True
        if isinstance(self.sample, int):
            return seq % self.sample == 0
        return self._rng.random() < self.sample

    # ---- recording
    def _record(self, api: str, orig: Callable, args: tuple, kwargs: dict) -> Any:
        with self._lock:
            seq = self.calls_seen
            take = self._take()
        if not take:
            return orig(*args, **kwargs)
        rec: dict[str, Any] = {"id": None, "seq": seq, "api": api, "engine": fascore.current_engine_name(),
                               "device": None, "args": None, "kwargs": None, "outputs": None, "error": None,
                               "backward": None}
        with self._lock:
            rec["args"] = self._encode(list(args))
            rec["kwargs"] = {k: self._encode(v) for k, v in kwargs.items()}
        devs = [str(a.device) for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
        rec["device"] = devs[0] if devs else None
        call_args, call_kwargs = args, kwargs
        taps: dict[str, Tensor] = {}
        if self.backward and api in FORWARD_APIS and torch.is_grad_enabled():
            call_args, call_kwargs, taps = self._tap_inputs(orig, args, kwargs, rec)
        try:
            result = orig(*call_args, **call_kwargs)
        except Exception as e:
            rec["error"] = {"type": type(e).__name__, "status": getattr(e, "status", None), "message": str(e)}
            self._append(rec)
            raise
        with self._lock:
            rec["outputs"] = self._encode(list(result) if isinstance(result, (list, tuple)) else [result])
        if taps and isinstance(result, (list, tuple)) and isinstance(result[0], Tensor) and result[0].requires_grad:
            result[0].register_hook(self._grad_hook(rec, "dy"))
        self._append(rec)
        return result

    def _append(self, rec: dict) -> None:
        with self._lock:
            rec["id"] = len(self.calls)
            self.calls.append(rec)

    def _tap_inputs(self, orig: Callable, args: tuple, kwargs: dict, rec: dict) -> tuple[tuple, dict, dict]:
        """Route each differentiable input through a view with a gradient hook: the hook sees exactly
        the gradient this call sends to that input."""
        try:
            bound = inspect.signature(orig).bind(*args, **kwargs)
        except TypeError:
            return args, kwargs, {}
        taps = {}
        for name in DIFFERENTIABLE:
            t = bound.arguments.get(name)
            if isinstance(t, Tensor) and t.requires_grad:
                view = t.view_as(t)
                view.register_hook(self._grad_hook(rec, name))
                bound.arguments[name] = view
                taps[name] = view
        if not taps:
            return args, kwargs, {}
        return tuple(bound.args), dict(bound.kwargs), taps

    def _grad_hook(self, rec: dict, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            with self._lock:
                bw = rec["backward"] or {"dy": None, "grads": {}}
                enc = self._save_tensor(grad)
                if name == "dy":
                    bw["dy"] = enc
                else:
                    bw["grads"][name] = enc
                rec["backward"] = bw
                if self._closed:  # a backward after the block: keep the index current
                    self._write_index()
        return hook

    # ---- patching
    def _make_wrapper(self, api: str, orig: Callable) -> Callable:
        capture = self

        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tls = capture._tls
            if not capture._active or getattr(tls, "inside", False) or _compiling(args, kwargs):
                return orig(*args, **kwargs)
            tls.inside = True  # calls made inside the operator are not recorded again
            try:
                return capture._record(api, orig, args, kwargs)
            finally:
                tls.inside = False

        setattr(wrapper, _MARK, (self, orig))
        return wrapper

    def _patch(self, mod: Any) -> None:
        for api in ENTRY_POINTS:
            fn = getattr(mod, api, None)
            if fn is None:
                continue
            if api not in self._wrappers:
                self._originals[api] = fn
                self._wrappers[api] = self._make_wrapper(api, fn)
            self._patched.append((mod, api, fn))
            setattr(mod, api, self._wrappers[api])

    def __enter__(self) -> "Capture":
        if self._active or self._closed:
            raise RuntimeError("a Capture can be entered once")
        self._prepare_dir()
        self._patch(fascore)
        shim = sys.modules.get("torch_npu")
        if shim is not None and getattr(shim, "__fascore_shim__", False):
            self._patch(shim)
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        for mod, api, fn in reversed(self._patched):
            if getattr(mod, api, None) is self._wrappers.get(api):
                setattr(mod, api, fn)
        # a torch_npu shim installed inside the block copied the wrappers: give it the originals
        shim = sys.modules.get("torch_npu")
        if shim is not None and getattr(shim, "__fascore_shim__", False):
            for api, w in self._wrappers.items():
                if getattr(shim, api, None) is w:
                    setattr(shim, api, self._originals[api])
        with self._lock:
            self._closed = True
            self._write_index()


def _compiling(args: tuple, kwargs: dict) -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover - old torch
        pass
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in list(args) + list(kwargs.values()))


def capture(path: str | Path, *, sample: int | float | None = None, seed: int = 0, max_calls: int | None = None,
            backward: bool = True, overwrite: bool = False) -> Capture:
    """Record every fascore FlashAttentionScore call made inside the ``with`` block into the
    replay bundle directory ``path`` (see the module docstring for the format).

    ``sample``: None records every call; an int n records every n-th call (the 1st, the n+1-th,
    ...); a float p in (0, 1] records each call with probability p (random, ``seed``).
    ``max_calls`` caps the number recorded. ``backward``: also record ``dy`` and the gradients
    each recorded forward call sends to its inputs (when autograd runs through it).
    ``overwrite``: replace a bundle already in ``path`` (else FileExistsError).

    Returns the :class:`Capture` (a context manager); ``.calls`` lists what was recorded.
    """
    return Capture(path, sample=sample, seed=seed, max_calls=max_calls, backward=backward, overwrite=overwrite)


def iter_wrapped(mod: Any) -> Iterator[str]:
    """Names of ``mod``'s entry points currently wrapped by a capture (for tests and diagnostics)."""
    for api in ENTRY_POINTS:
        if hasattr(getattr(mod, api, None), _MARK):
            yield api
