"""Device mapping: torch_npu's "npu" device runs on CPU or CUDA (docs/torch_npu.md).

PyTorch parses device strings in C++ and knows no "npu" (short of registering a PrivateUse1
backend, which needs a C++ allocator and device guard, and cannot be undone), so the mapping
patches the Python-level entry points, all reversibly (``DeviceMapping.install`` /
``uninstall``):

* ``torch.device`` becomes a proxy class: ``torch.device("npu:1")``, ``torch.device("npu", 1)``
  and ``torch.device(type="npu")`` return a real ``torch.device`` of the target ("cuda:1", or
  "cpu": a CPU has no device indices, so the index is dropped). ``isinstance(d, torch.device)``,
  ``==`` and hashing treat the proxy as the real class, which keeps torch.compile's and FX's
  lookups of ``torch.device`` working.
* the tensor factories of the ``torch`` namespace (``FACTORIES``), ``Tensor.to`` / ``new_*``,
  ``Module.to`` / ``to_empty``, ``torch.set_default_device``, ``torch.load`` (``map_location``
  and storages saved on "npu:N"), ``torch.Generator``, ``torch.autocast`` /
  ``torch.amp.autocast`` and ``torch.amp.GradScaler`` (``device_type="npu"``),
  ``torch.is_autocast_enabled`` / ``get_autocast_dtype`` and ``torch.distributed``'s
  ``init_process_group`` / ``new_group`` (``backend="hccl"`` -> gloo on CPU, nccl on CUDA) map
  "npu" strings (and, on a CPU target, integer device indices) to the target;
* ``Tensor.npu()``, ``Module.npu()`` and ``Tensor.is_npu`` are added;
* ``torch.manual_seed`` also seeds fascore's emulated NPU generator, as torch_npu's does.

What is not mapped: a device string parsed by C++ code that is not one of these entry points
(e.g. ``torch.ops.aten.*(..., device="npu")``), ``tensor.device.type == "npu"`` checks (tensors
live on the target, so the type is "cpu" or "cuda"), NPU-only memory formats.
"""
from __future__ import annotations

import functools
import importlib.abc
import re
import sys
from typing import Any, Callable

import torch

from ._patch import Patcher, wrap_found_spec

__all__ = ["FACTORIES", "TENSOR_METHODS", "DeviceMapping", "resolve_target"]

# torch-namespace functions taking a ``device=`` keyword (the ones that exist in this torch)
FACTORIES = (
    "tensor", "as_tensor", "asarray", "scalar_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint",
    "randperm", "arange", "range", "linspace", "logspace", "eye", "empty_strided", "empty_permuted", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "tril_indices",
    "triu_indices", "normal", "bartlett_window", "blackman_window", "hamming_window", "hann_window",
    "kaiser_window", "sparse_coo_tensor", "sparse_csr_tensor", "sparse_csc_tensor", "sparse_bsr_tensor",
    "sparse_bsc_tensor", "sparse_compressed_tensor", "from_file", "empty_quantized",
)
TENSOR_METHODS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros")
_NPU = re.compile(r"^npu(?::(\d+))?$")
_HCCL = re.compile(r"\bhccl\b")


def resolve_target(device: str) -> str:
    """"cpu", "cuda" or "auto" (cuda if available, else cpu) -> "cpu" / "cuda"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: must be 'cpu', 'cuda' or 'auto'")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda': CUDA is not available in this torch build / machine; use 'cpu' or 'auto'")
    return device


def _proxy_class(real: type, name: str, call: Callable[..., Any]) -> type:
    """A stand-in for the C type ``real``: calling it calls ``call``; isinstance/issubclass,
    == and hash behave as ``real``'s, so lookups keyed by ``real`` still find it."""

    class _Meta(type):
        def __instancecheck__(cls, inst: Any) -> bool:
            return isinstance(inst, real)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, real)

        def __eq__(cls, other: Any) -> bool:
            return other is cls or other is real

        def __ne__(cls, other: Any) -> bool:
            return not (other is cls or other is real)

        def __hash__(cls) -> int:
            return hash(real)

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return call(*args, **kwargs)

        def __getattr__(cls, attr: str) -> Any:  # class attributes of the real type
            return getattr(real, attr)

        def __repr__(cls) -> str:
            return repr(real)

    proxy = _Meta(name, (), {"__doc__": real.__doc__, "__module__": real.__module__,
                             "__qualname__": real.__qualname__, "__fascore_proxy_of__": real})
    return proxy


class _DynamoPrimer(importlib.abc.MetaPathFinder):
    """torch.compile builds its tables of torch functions (``trace_rules``) once, from the ``torch``
    namespace as it is at that moment. Built while the wrappers are installed, they would hold the
    wrappers instead of PyTorch's functions, and compiled code would stop recognising the real
    ones (after an uninstall, or inside a wrapper). So the tables are built with the patches paused:
    now if Dynamo is loaded, else right after ``torch._dynamo`` is imported."""

    def __init__(self, patcher: Patcher) -> None:
        self._patcher = patcher

    @classmethod
    def watch(cls, patcher: Patcher) -> Callable[[], None]:
        if "torch._dynamo" in sys.modules:
            _prime_dynamo()
            return lambda: None
        hook = cls(patcher)
        sys.meta_path.insert(0, hook)
        return lambda: sys.meta_path.remove(hook) if hook in sys.meta_path else None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torch._dynamo":
            return None
        return wrap_found_spec(self, fullname, path, target, lambda loader: _PrimingLoader(loader, self._patcher))


class _PrimingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patcher: Patcher) -> None:
        self._loader, self._patcher = loader, patcher

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with self._patcher.paused():
            self._loader.exec_module(module)
            _prime_dynamo()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def _prime_dynamo() -> None:
    """Build Dynamo's lazily built tables of torch functions and classes (best effort)."""
    try:
        from torch._dynamo import trace_rules
        from torch._dynamo.variables.user_defined import UserDefinedClassVariable

        trace_rules.get_torch_obj_rule_map()
        trace_rules.get_tensor_method()
        UserDefinedClassVariable._constant_fold_classes()
        UserDefinedClassVariable._in_graph_classes()
    except Exception:  # a torch without these internals: nothing to prime
        pass


class DeviceMapping:
    """The "npu" -> target mapping and the patches that apply it."""

    def __init__(self, target: str) -> None:
        self.type = resolve_target(target)
        self.cpu_index = 0  # torch.npu.set_device's index on a CPU target (a label only)
        self._patcher = Patcher()
        self.real_device = torch.device
        self.real_generator = torch.Generator
        self.installed = False

    # ------------------------------------------------------------------ mapping
    def device(self, index: int | None = None) -> torch.device:
        """The target device (``index`` ignored on CPU)."""
        if self.type == "cpu" or index is None:
            return self.real_device(self.type)
        return self.real_device(self.type, index)

    def map(self, value: Any) -> Any:
        """A device argument with "npu" (and, on CPU, integer indices) mapped; others unchanged."""
        if isinstance(value, str):
            m = _NPU.match(value)
            if m is None:
                return value
            return str(self.device(None if m.group(1) is None else int(m.group(1))))
        if self.type == "cpu" and isinstance(value, int) and not isinstance(value, bool):
            return "cpu"
        return value

    def is_npu_type(self, value: Any) -> bool:
        return isinstance(value, str) and value == "npu"

    def map_device_type(self, value: Any) -> Any:
        """``device_type`` arguments (autocast, GradScaler): "npu" -> "cpu" / "cuda"."""
        return self.type if isinstance(value, str) and _NPU.match(value) else value

    def map_backend(self, backend: Any) -> Any:
        """torch.distributed backends: "hccl" -> gloo (CPU) / nccl (CUDA); in "dev:backend,..."
        lists "npu:hccl" becomes "<target>:<that>" unless the target device has an entry already."""
        if not isinstance(backend, str) or not _HCCL.search(backend):
            return backend
        repl = "gloo" if self.type == "cpu" else "nccl"
        if ":" not in backend:
            return _HCCL.sub(repl, backend)
        entries: dict[str, str] = {}
        for part in backend.split(","):
            dev, _, name = part.strip().partition(":")
            dev = self.type if dev == "npu" else dev
            entries.setdefault(dev, repl if name == "hccl" else name)
        return ",".join(f"{d}:{b}" for d, b in entries.items())

    def _new_device(self, *args: Any, **kwargs: Any) -> torch.device:
        if args and isinstance(args[0], str) and (args[0] == "npu" or _NPU.match(args[0])):
            m = _NPU.match(args[0])
            index = args[1] if len(args) > 1 else kwargs.get("index")
            if m is not None and m.group(1) is not None:
                if index is not None:
                    raise RuntimeError(f"torch.device({args[0]!r}, {index!r}): type (string) must not include an "
                                       "index because index was passed explicitly")
                index = int(m.group(1))
            return self.device(index)
        if not args and isinstance(kwargs.get("type"), str) and _NPU.match(kwargs["type"]):
            return self._new_device(kwargs["type"], kwargs.get("index"))
        if self.type == "cpu" and len(args) == 1 and isinstance(args[0], int) and not isinstance(args[0], bool):
            return self.real_device("cpu")
        return self.real_device(*args, **kwargs)

    # ------------------------------------------------------------------ wrappers
    def _kw(self, fn: Callable[..., Any], key: str = "device") -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if key in kwargs:
                kwargs[key] = mapping.map(kwargs[key])
            return fn(*args, **kwargs)
        wrapper.__fascore_wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _first_or_kw(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``to``-style methods: the first positional argument or ``device=``."""
        mapping = self

        @functools.wraps(fn)
        def wrapper(self_: Any, *args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], (str, int)) and not isinstance(args[0], bool):
                args = (mapping.map(args[0]), *args[1:])
            if "device" in kwargs:
                kwargs["device"] = mapping.map(kwargs["device"])
            return fn(self_, *args, **kwargs)
        wrapper.__fascore_wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _load(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
            return fn(f, mapping.map_location(map_location), *args, **kwargs)
        load.__fascore_wrapped__ = fn  # type: ignore[attr-defined]
        return load

    def map_location(self, map_location: Any) -> Any:
        """torch.load's ``map_location`` with "npu" targets mapped and storages saved on
        "npu[:N]" restored onto the target."""
        from torch.serialization import default_restore_location

        if isinstance(map_location, (str, int)) and not isinstance(map_location, bool):
            return self.map(map_location)
        if isinstance(map_location, torch.device):
            return map_location
        user = map_location

        def restore(storage: Any, location: str) -> Any:
            if isinstance(user, dict):
                location = user.get(location, location)
            elif callable(user):
                r = user(storage, location)
                if r is not None:
                    return r
            return default_restore_location(storage, self.map(location) if isinstance(location, str) else location)
        return restore

    def _autocast_init(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def __init__(self_: Any, device_type: Any = None, *args: Any, **kwargs: Any) -> None:
            if device_type is None:
                device_type = kwargs.pop("device_type")
            fn(self_, mapping.map_device_type(device_type), *args, **kwargs)
        return __init__

    def _scaler_init(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def __init__(self_: Any, device: Any = "cuda", *args: Any, **kwargs: Any) -> None:
            fn(self_, mapping.map_device_type(device), *args, **kwargs)
        return __init__

    def _device_type_arg(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if args:
                args = (mapping.map_device_type(args[0]), *args[1:])
            if "device_type" in kwargs:
                kwargs["device_type"] = mapping.map_device_type(kwargs["device_type"])
            return fn(*args, **kwargs)
        return wrapper

    def _backend(self, fn: Callable[..., Any], position: int) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > position:
                args = (*args[:position], mapping.map_backend(args[position]), *args[position + 1:])
            if "backend" in kwargs:
                kwargs["backend"] = mapping.map_backend(kwargs["backend"])
            return fn(*args, **kwargs)
        return wrapper

    def _manual_seed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def manual_seed(seed: Any) -> Any:
            gen = fn(seed)
            from ..rng import manual_seed as npu_manual_seed

            npu_manual_seed(int(seed))  # torch_npu's torch.manual_seed seeds the NPU generators too
            return gen
        return manual_seed

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        if self.installed:
            return
        self._patcher.on_restore(_DynamoPrimer.watch(self._patcher))
        p, mapping = self._patcher, self
        p.setattr(torch, "device", _proxy_class(self.real_device, "device", self._new_device))
        p.setattr(torch, "Generator", _proxy_class(
            self.real_generator, "Generator",
            lambda *a, **k: mapping.real_generator(*(mapping.map(x) for x in a),
                                                   **{n: mapping.map(v) if n == "device" else v
                                                      for n, v in k.items()})))
        for name in FACTORIES:
            if hasattr(torch, name):
                p.setattr(torch, name, self._kw(getattr(torch, name)))
        p.setattr(torch, "set_default_device", self._first_or_kw_fn(torch.set_default_device))
        p.setattr(torch, "load", self._load(torch.load))
        p.setattr(torch, "manual_seed", self._manual_seed(torch.manual_seed))
        p.setattr(torch.random, "manual_seed", torch.manual_seed)
        for name in ("is_autocast_enabled", "get_autocast_dtype"):
            if hasattr(torch, name):
                p.setattr(torch, name, self._device_type_arg(getattr(torch, name)))
        self._install_tensor(p)
        ac = torch.amp.autocast_mode.autocast
        p.setattr(ac, "__init__", self._autocast_init(ac.__init__))
        gs = torch.amp.GradScaler
        p.setattr(gs, "__init__", self._scaler_init(gs.__init__))
        if torch.distributed.is_available():
            import torch.distributed as dist

            p.setattr(dist, "init_process_group", self._backend(dist.init_process_group, 0))
            p.setattr(dist, "new_group", self._backend(dist.new_group, 2))
        self.installed = True

    def _first_or_kw_fn(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        mapping = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if args:
                args = (mapping.map(args[0]), *args[1:])
            if "device" in kwargs:
                kwargs["device"] = mapping.map(kwargs["device"])
            return fn(*args, **kwargs)
        return wrapper

    def _install_tensor(self, p: Patcher) -> None:
        mapping = self
        T, M = torch.Tensor, torch.nn.Module
        p.setattr(T, "to", self._first_or_kw(T.to))
        for name in TENSOR_METHODS:
            p.setattr(T, name, self._kw(getattr(T, name)))

        def npu(self_: torch.Tensor, device: Any = None, non_blocking: bool = False,
                memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
            """torch_npu's ``Tensor.npu()``: this tensor on the target device of fascore's stand-in."""
            return self_.to(mapping.npu_device(device), non_blocking=non_blocking, memory_format=memory_format)

        def is_npu(self_: torch.Tensor) -> bool:
            """True when the tensor is on the target device type of fascore's stand-in."""
            return self_.device.type == mapping.type

        def module_npu(self_: torch.nn.Module, device: Any = None) -> torch.nn.Module:
            """torch_npu's ``Module.npu()``: parameters and buffers moved to the target device."""
            return self_.to(mapping.npu_device(device))

        p.setattr(T, "npu", npu)
        p.setattr(T, "is_npu", property(is_npu))
        p.setattr(M, "to", self._first_or_kw(M.to))
        p.setattr(M, "to_empty", self._kw(M.to_empty))
        p.setattr(M, "npu", module_npu)

    def npu_device(self, device: Any = None) -> torch.device:
        """``Tensor.npu(device)``'s device: None -> the current one, an int or "npu:N" -> index N."""
        if device is None:
            return self.device(torch.cuda.current_device() if self.type == "cuda" else None)
        if isinstance(device, int) and not isinstance(device, bool):
            return self.device(device)
        mapped = self.map(device)
        return mapped if isinstance(mapped, torch.device) else self.real_device(mapped)

    def uninstall(self) -> None:
        self._patcher.restore()
        self.installed = False
