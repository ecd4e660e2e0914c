"""The emulated NPU random generator (semantics §5): where (seed, offset) come from when seed == 0.

torch_npu draws the dropout seed and offset of ``npu_fusion_attention`` from the device's
default NPU generator with ``philox_engine_inputs(10)``: it returns the current (seed, offset)
and advances the offset by the increment rounded up to a multiple of 4 (12). fascore keeps one
such generator per device (``cpu``, ``cuda:0``, ...). ``manual_seed(s)`` sets seed ``s`` and
offset 0 on every device, as ``torch.manual_seed`` does; the initial seed is torch_npu's default.
The state is 16 bytes, seed then offset (little-endian uint64 / int64), as torch_npu's
``get_rng_state`` returns it.
"""
from __future__ import annotations

import struct
import threading

import torch
from torch import Tensor

__all__ = ["DEFAULT_SEED", "NPUGenerator", "default_generator", "manual_seed", "initial_seed",
           "get_rng_state", "set_rng_state"]

DEFAULT_SEED = 67280421310721  # torch_npu's default generator seed
_U64 = (1 << 64) - 1


class NPUGenerator:
    """One device's Philox (seed, offset) state, advanced as torch_npu's NPUGeneratorImpl does."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self._lock = threading.Lock()
        self._seed = seed & _U64
        self._offset = 0

    def manual_seed(self, seed: int) -> NPUGenerator:
        with self._lock:
            self._seed, self._offset = int(seed) & _U64, 0
        return self

    def initial_seed(self) -> int:
        return self._seed

    @property
    def offset(self) -> int:
        return self._offset

    def philox_engine_inputs(self, increment: int) -> tuple[int, int]:
        """The current (seed, offset); the offset then advances by ``increment`` rounded up to 4."""
        step = -(-int(increment) // 4) * 4
        with self._lock:
            seed, offset = self._seed, self._offset
            self._offset += step
        return seed, offset

    def get_state(self) -> Tensor:
        """uint8 [16]: seed (uint64) then offset (int64), little-endian."""
        with self._lock:
            raw = struct.pack("<Qq", self._seed, self._offset)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()

    def set_state(self, state: Tensor) -> None:
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.numel() != 16:
            raise ValueError(f"state={state!r}: must be a uint8 tensor of 16 bytes (seed, offset)")
        seed, offset = struct.unpack("<Qq", bytes(state.cpu().reshape(-1).tolist()))
        with self._lock:
            self._seed, self._offset = seed, offset


_generators: dict[str, NPUGenerator] = {}
_initial = DEFAULT_SEED
_registry_lock = threading.Lock()


def _key(device: torch.device | str | None) -> str:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(dev)


def default_generator(device: torch.device | str | None = None) -> NPUGenerator:
    """The generator of ``device`` (created on first use with the current initial seed)."""
    key = _key(device)
    with _registry_lock:
        gen = _generators.get(key)
        if gen is None:
            gen = _generators[key] = NPUGenerator(_initial)
        return gen


def manual_seed(seed: int, device: torch.device | str | None = None) -> None:
    """Seed the emulated NPU generator: of ``device``, or of every device (the default)."""
    global _initial
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: must be an int")
    if device is not None:
        default_generator(device).manual_seed(seed)
        return
    with _registry_lock:
        _initial = seed & _U64
        gens = list(_generators.values())
    for g in gens:
        g.manual_seed(seed)


def initial_seed(device: torch.device | str | None = None) -> int:
    return default_generator(device).initial_seed()


def get_rng_state(device: torch.device | str | None = None) -> Tensor:
    return default_generator(device).get_state()


def set_rng_state(state: Tensor, device: torch.device | str | None = None) -> None:
    default_generator(device).set_state(state)
