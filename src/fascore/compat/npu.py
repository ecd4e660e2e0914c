"""``torch.npu`` / ``torch_npu.npu`` of fascore's stand-in: torch_npu's device API on CPU or CUDA.

Built by ``build_npu_module(mapping)`` for the target of a ``DeviceMapping``. On a CUDA target
every function is the ``torch.cuda`` one with "npu" devices mapped; on a CPU target each has a
documented CPU equivalent (docs/torch_npu.md):

* one device: ``is_available()`` True, ``device_count()`` the launcher's ``LOCAL_WORLD_SIZE``
  (1 without one), ``set_device(i)`` / ``current_device()`` keep the index as a label;
* ``synchronize`` and streams / events are synchronous no-ops (an ``Event`` records
  ``time.perf_counter()``, so ``elapsed_time`` measures host time);
* memory: ``memory_allocated`` / ``memory_reserved`` are the process's resident memory (VmRSS),
  ``max_memory_allocated`` / ``max_memory_reserved`` its peak (VmHWM), and
  ``reset_peak_memory_stats`` resets that peak (``/proc/self/clear_refs``); they include memory
  that is not tensors;
* random: ``manual_seed`` seeds fascore's emulated NPU generator (the dropout seeds of
  ``npu_fusion_attention``) and the target's torch generator (the "npu" tensors' random
  numbers); ``get_rng_state`` returns both, the emulated generator's 16 bytes first.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .. import rng as _rng
from .devices import DeviceMapping

__all__ = ["build_npu_module", "StandInModule", "CPUStream", "CPUEvent", "CPUDeviceProperties"]

NPU_API = ("is_available", "device_count", "current_device", "set_device", "synchronize", "manual_seed",
           "manual_seed_all", "seed", "seed_all", "initial_seed", "get_rng_state", "set_rng_state",
           "get_rng_state_all", "set_rng_state_all", "get_device_name", "get_device_properties",
           "get_device_capability", "Stream", "Event", "current_stream", "default_stream", "set_stream", "stream",
           "device", "device_of", "memory_allocated", "max_memory_allocated", "memory_reserved",
           "max_memory_reserved", "reset_peak_memory_stats", "reset_max_memory_allocated", "memory_stats",
           "mem_get_info", "empty_cache", "is_initialized", "init", "is_bf16_supported", "set_compile_mode",
           "config", "amp", "get_amp_supported_dtype", "is_autocast_enabled", "get_autocast_dtype")


class StandInModule(types.ModuleType):
    """A module whose unknown attributes raise an AttributeError saying what the stand-in covers."""

    __fascore_standin__ = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name}: fascore's torch_npu stand-in provides the FlashAttentionScore operators "
            "(npu_fusion_attention, _v2, _v3, _grad, _grad_v2, _grad_v3), npu_ring_attention_update, the dropout-mask "
            f"generators and device plumbing (torch.npu: {', '.join(NPU_API[:8])}, ...) only; {name!r} is not one "
            "of them (see docs/torch_npu.md). Run on Ascend with the real torch_npu for it, or replace the call.")


# ---------------------------------------------------------------------------------- CPU equivalents
def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss() -> int:
    v = _proc_status_bytes("VmHWM:")
    if v is not None:
        return v
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _rss() -> int:
    v = _proc_status_bytes("VmRSS:")
    return v if v is not None else _peak_rss()


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _meminfo() -> tuple[int, int]:
    vals = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    total = vals.get("MemTotal", 0)
    return vals.get("MemAvailable", total), total


class CPUEvent:
    """torch_npu's ``Event`` on a CPU target: work is synchronous, so ``record`` notes the time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing, self.blocking, self.interprocess = enable_timing, blocking, interprocess
        self._t: Optional[float] = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end_event: "CPUEvent") -> float:
        """Milliseconds from this event to ``end_event`` (both recorded, timing enabled)."""
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with enable_timing=True to measure elapsed time")
        if self._t is None or end_event._t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time")
        return (end_event._t - self._t) * 1000.0


class CPUStream:
    """torch_npu's ``Stream`` on a CPU target: one in-order queue, everything already done."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = torch.device("cpu")
        self.priority = priority

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Optional[CPUEvent] = None) -> CPUEvent:
        event = event if event is not None else CPUEvent()
        event.record(self)
        return event

    def __enter__(self) -> "CPUStream":
        _cpu_state.stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _cpu_state.stack.pop()


class _CPUState(threading.local):
    def __init__(self) -> None:
        self.stack: list[CPUStream] = []


_cpu_state = _CPUState()
_CPU_DEFAULT_STREAM = CPUStream()


@dataclass
class CPUDeviceProperties:
    """``get_device_properties`` on a CPU target (torch_npu's fields plus CUDA's common ones)."""

    name: str
    total_memory: int
    cube_core_num: int
    vector_core_num: int
    L2_cache_size: int = 0
    multi_processor_count: int = 0
    major: int = 0
    minor: int = 0


# ---------------------------------------------------------------------------------- the module
def build_npu_module(mapping: DeviceMapping, name: str = "torch_npu.npu") -> StandInModule:
    """The ``torch.npu`` module for ``mapping``'s target (see the module docstring)."""
    mod = StandInModule(name, __doc__)
    cuda = mapping.type == "cuda"

    def cuda_dev(device: Any) -> Any:
        i = _index_of(device)
        return torch.cuda.current_device() if i is None else i

    ns: dict[str, Any] = _devices(mapping, cuda, cuda_dev)
    ns.update(_streams(cuda))
    ns.update(_memory(cuda, cuda_dev))
    ns.update(_random(mapping, cuda, cuda_dev, ns["device_count"]))
    ns.update(_misc(mapping))
    for k, v in ns.items():
        if callable(v) and getattr(v, "__module__", None) == __name__:
            v.__module__ = name
        setattr(mod, k, v)
    mod.amp = build_amp_module(mapping, name + ".amp")
    mod.__all__ = [k for k in NPU_API if hasattr(mod, k)]
    return mod


def _index_of(device: Any) -> Optional[int]:
    """The device index of an int / "npu:N" / torch.device argument (None: the current one)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str):
        m = device.split(":")
        if m[0] not in ("npu", "cuda", "cpu"):
            raise ValueError(f"device={device!r}: expected 'npu', 'npu:N' or an index")
        return int(m[1]) if len(m) > 1 else None
    if isinstance(device, torch.device):
        return device.index
    raise ValueError(f"device={device!r}: expected an int, 'npu:N' or a torch.device")


def _devices(mapping: DeviceMapping, cuda: bool, cuda_dev: Any) -> dict[str, Any]:
    def is_available() -> bool:
        return True

    def device_count() -> int:
        if cuda:
            return torch.cuda.device_count()
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))

    def current_device() -> int:
        return torch.cuda.current_device() if cuda else mapping.cpu_index

    def set_device(device: Any) -> None:
        i = _index_of(device)
        if i is None:
            return
        if i < 0:
            raise ValueError(f"set_device({device!r}): the device index must be >= 0")
        if cuda:
            torch.cuda.set_device(i)
        else:
            mapping.cpu_index = i

    def synchronize(device: Any = None) -> None:
        if cuda:
            torch.cuda.synchronize(cuda_dev(device))

    def get_device_name(device_name: Any = None) -> str:
        if cuda:
            return torch.cuda.get_device_name(cuda_dev(device_name))
        return f"CPU ({platform.processor() or platform.machine()}) via fascore's torch_npu stand-in"

    def get_device_properties(device_name: Any = None) -> Any:
        if cuda:
            return torch.cuda.get_device_properties(cuda_dev(device_name))
        n = os.cpu_count() or 1
        return CPUDeviceProperties(get_device_name(), _meminfo()[1], n, n, 0, n)

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        return torch.cuda.get_device_capability(cuda_dev(device)) if cuda else (0, 0)

    class device:  # noqa: N801 (torch_npu's name)
        """Context manager that makes ``device`` the current one."""

        def __init__(self, device: Any) -> None:
            self.idx, self.prev = _index_of(device), None

        def __enter__(self) -> None:
            if self.idx is not None:
                self.prev = current_device()
                set_device(self.idx)

        def __exit__(self, *exc: Any) -> None:
            if self.prev is not None:
                set_device(self.prev)

    class device_of(device):  # noqa: N801
        """Context manager: the device of tensor ``obj`` is current."""

        def __init__(self, obj: Tensor) -> None:
            super().__init__(obj.get_device() if obj.device.type == "cuda" else None)

    return dict(is_available=is_available, device_count=device_count, current_device=current_device,
                set_device=set_device, synchronize=synchronize, get_device_name=get_device_name,
                get_device_properties=get_device_properties, get_device_capability=get_device_capability,
                device=device, device_of=device_of)


def _streams(cuda: bool) -> dict[str, Any]:
    if cuda:
        return dict(Stream=torch.cuda.Stream, Event=torch.cuda.Event, current_stream=torch.cuda.current_stream,
                    default_stream=torch.cuda.default_stream, set_stream=torch.cuda.set_stream,
                    stream=torch.cuda.stream)

    def current_stream(device: Any = None) -> CPUStream:
        return _cpu_state.stack[-1] if _cpu_state.stack else _CPU_DEFAULT_STREAM

    def default_stream(device: Any = None) -> CPUStream:
        return _CPU_DEFAULT_STREAM

    def set_stream(stream: CPUStream) -> None:
        if stream is None:
            return
        if _cpu_state.stack:
            _cpu_state.stack[-1] = stream
        else:
            _cpu_state.stack.append(stream)

    @contextlib.contextmanager
    def stream(stream: Optional[CPUStream]) -> Iterator[None]:
        """Context manager selecting ``stream`` (None: no change)."""
        if stream is None:
            yield
            return
        _cpu_state.stack.append(stream)
        try:
            yield
        finally:
            _cpu_state.stack.pop()

    return dict(Stream=CPUStream, Event=CPUEvent, current_stream=current_stream, default_stream=default_stream,
                set_stream=set_stream, stream=stream)


def _memory(cuda: bool, cuda_dev: Any) -> dict[str, Any]:
    if cuda:
        names = ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                 "reset_peak_memory_stats", "reset_max_memory_allocated", "memory_stats", "mem_get_info")
        out: dict[str, Any] = {}
        for n in names:
            def fn(device: Any = None, _f: Any = getattr(torch.cuda, n)) -> Any:
                return _f(cuda_dev(device))
            fn.__name__ = fn.__qualname__ = n
            fn.__doc__ = f"torch.cuda.{n} of the mapped device."
            out[n] = fn
        out["empty_cache"] = torch.cuda.empty_cache
        return out

    def memory_allocated(device: Any = None) -> int:
        """CPU target: the process's resident memory in bytes (VmRSS), tensors and all."""
        return _rss()

    def max_memory_allocated(device: Any = None) -> int:
        """CPU target: the process's peak resident memory in bytes (VmHWM) since the last reset."""
        return _peak_rss()

    def reset_peak_memory_stats(device: Any = None) -> None:
        """CPU target: resets the peak resident memory (writes 5 to /proc/self/clear_refs)."""
        _reset_peak_rss()

    def memory_stats(device: Any = None) -> dict[str, int]:
        cur, peak = _rss(), _peak_rss()
        return {"allocated_bytes.all.current": cur, "allocated_bytes.all.peak": peak,
                "reserved_bytes.all.current": cur, "reserved_bytes.all.peak": peak}

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """CPU target: (MemAvailable, MemTotal) of the machine in bytes."""
        return _meminfo()

    def empty_cache() -> None:
        """CPU target: a garbage collection (freed tensors are returned to the allocator already)."""
        gc.collect()

    return dict(memory_allocated=memory_allocated, max_memory_allocated=max_memory_allocated,
                memory_reserved=memory_allocated, max_memory_reserved=max_memory_allocated,
                reset_peak_memory_stats=reset_peak_memory_stats, reset_max_memory_allocated=reset_peak_memory_stats,
                memory_stats=memory_stats, mem_get_info=mem_get_info, empty_cache=empty_cache)


def _random(mapping: DeviceMapping, cuda: bool, cuda_dev: Any, device_count: Any) -> dict[str, Any]:
    def npu_key(device: Any = None) -> str:
        return f"cuda:{cuda_dev(device)}" if cuda else "cpu"

    def torch_gen(device: Any = None) -> torch.Generator:
        if cuda:
            return torch.cuda.default_generators[cuda_dev(device)]
        return torch.default_generator

    def manual_seed(seed: int) -> None:
        """Seeds the current device: fascore's emulated NPU generator and the target's torch one."""
        seed = int(seed)
        _rng.manual_seed(seed, device=npu_key())
        torch_gen().manual_seed(seed)

    def manual_seed_all(seed: int) -> None:
        seed = int(seed)
        _rng.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        else:
            torch.default_generator.manual_seed(seed)

    def seed() -> None:
        manual_seed(int(torch.seed()) if not cuda else int.from_bytes(os.urandom(7), "little"))

    def seed_all() -> None:
        manual_seed_all(int.from_bytes(os.urandom(7), "little"))

    def initial_seed() -> int:
        return _rng.initial_seed(npu_key())

    def get_rng_state(device: Any = "npu") -> Tensor:
        """uint8: the emulated NPU generator's 16 bytes (seed, offset), then the torch generator's state."""
        return torch.cat([_rng.get_rng_state(npu_key(device)), torch_gen(device).get_state()])

    def set_rng_state(new_state: Tensor, device: Any = "npu") -> None:
        if not isinstance(new_state, Tensor) or new_state.dtype != torch.uint8 or new_state.numel() < 16:
            raise ValueError(f"new_state={new_state!r}: must be a uint8 tensor from torch.npu.get_rng_state()")
        flat = new_state.detach().cpu().reshape(-1)
        _rng.set_rng_state(flat[:16].clone(), npu_key(device))
        if flat.numel() > 16:
            torch_gen(device).set_state(flat[16:].clone())

    def get_rng_state_all() -> list[Tensor]:
        return [get_rng_state(i) for i in range(device_count())] if cuda else [get_rng_state()]

    def set_rng_state_all(new_states: list[Tensor]) -> None:
        for i, s in enumerate(new_states):
            set_rng_state(s, i if cuda else "npu")

    return dict(manual_seed=manual_seed, manual_seed_all=manual_seed_all, seed=seed, seed_all=seed_all,
                initial_seed=initial_seed, get_rng_state=get_rng_state, set_rng_state=set_rng_state,
                get_rng_state_all=get_rng_state_all, set_rng_state_all=set_rng_state_all)


def _misc(mapping: DeviceMapping) -> dict[str, Any]:
    def is_initialized() -> bool:
        return True

    def init() -> None:
        pass

    def is_bf16_supported(including_emulation: bool = False) -> bool:
        return True

    def set_compile_mode(jit_compile: bool = False) -> None:
        """Ascend's operator compilation mode: nothing to choose off Ascend (a no-op)."""

    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    def is_autocast_enabled() -> bool:
        return torch.is_autocast_enabled(mapping.type)

    def get_autocast_dtype() -> torch.dtype:
        return torch.get_autocast_dtype(mapping.type)

    config = types.SimpleNamespace(allow_internal_format=False)
    return dict(is_initialized=is_initialized, init=init, is_bf16_supported=is_bf16_supported,
                set_compile_mode=set_compile_mode, get_amp_supported_dtype=get_amp_supported_dtype,
                is_autocast_enabled=is_autocast_enabled, get_autocast_dtype=get_autocast_dtype, config=config)


def build_amp_module(mapping: DeviceMapping, name: str) -> StandInModule:
    """``torch.npu.amp``: ``autocast`` (torch_npu's default dtype float16), ``GradScaler``,
    ``custom_fwd`` / ``custom_bwd`` on the target device type."""
    mod = StandInModule(name, "torch_npu.npu.amp of fascore's stand-in: torch.amp on the target device type.")
    base_autocast, base_scaler = torch.amp.autocast_mode.autocast, torch.amp.GradScaler

    class autocast(base_autocast):  # noqa: N801 (torch_npu's name)
        """torch_npu's ``torch.npu.amp.autocast(enabled=True, dtype=torch.float16, cache_enabled=True)``."""

        def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True) -> None:
            super().__init__(mapping.type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    class GradScaler(base_scaler):
        """torch_npu's ``torch.npu.amp.GradScaler`` (``dynamic`` accepted; False means a fixed scale)."""

        def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                     growth_interval: int = 2000, enabled: bool = True, dynamic: bool = True) -> None:
            if not dynamic:
                growth_factor, backoff_factor = 1.0, 1.0
            super().__init__(mapping.type, init_scale=init_scale, growth_factor=growth_factor,
                             backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)

    def custom_fwd(fwd: Any = None, *, cast_inputs: Optional[torch.dtype] = None) -> Any:
        return torch.amp.custom_fwd(fwd, device_type=mapping.type, cast_inputs=cast_inputs)

    def custom_bwd(bwd: Any) -> Any:
        return torch.amp.custom_bwd(bwd, device_type=mapping.type)

    for k, v in dict(autocast=autocast, GradScaler=GradScaler, custom_fwd=custom_fwd, custom_bwd=custom_bwd).items():
        v.__module__ = name
        setattr(mod, k, v)
    mod.__all__ = ["autocast", "GradScaler", "custom_fwd", "custom_bwd"]
    return mod
