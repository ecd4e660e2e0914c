"""fascore's ``torch_npu`` stand-in: unmodified torch_npu code runs on CPU or CUDA (docs/torch_npu.md).

    import fascore.compat
    fascore.compat.install_torch_npu_shim(device="cpu")   # before the code imports torch_npu
    import torch_npu                                       # the stand-in
    x = torch.randn(2, 128, 8, 64).npu()                   # a CPU tensor; "npu" maps to the target

or, for a whole program, without touching it::

    fascore run train.py --its --own --args            # --device auto: cuda if available, else cpu
    fascore run -m my_pkg.train ...
    fascore run --nproc-per-node 2 train.py ...         # torchrun-style
    python -m fascore.compat [--device cpu] train.py ...

``install_torch_npu_shim()`` registers, and ``uninstall_torch_npu_shim()`` removes again:

* the ``torch_npu`` module tree (``fascore.compat.standin``): the FlashAttentionScore operators
  (fascore's, torch_npu's signatures and returns), ``npu_ring_attention_update``, the
  dropout-mask generators, ``torch_npu.testing.testcase``, ``torch_npu.contrib.transfer_to_npu``;
* ``torch.ops.npu.*`` with torch_npu's schemas (``fascore.compat.npu_ops``);
* replacements for MindSpeed's ``FusionAttentionV2OpBuilder`` / ``RingAttentionUpdateOpBuilder``
  ``.load()`` (``fascore.compat.mindspeed``), now or when mindspeed is imported later;
* with ``device="cpu" | "cuda" | "auto"`` only, the device mapping (``fascore.compat.devices``):
  "npu" devices wherever PyTorch takes one, ``Tensor.npu()``, ``Tensor.is_npu``, ``torch.npu`` /
  ``torch_npu.npu`` (``fascore.compat.npu``).

Nothing is patched unless asked. A real torch_npu is never shadowed: installing raises
``RuntimeError`` when one is imported or importable.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Optional

import fascore
from fascore import npu_ring_attention_update  # torch_npu's keywords (fascore.distributed.merge)

from ._patch import Patcher
from .standin import SHIM_ATTR

__all__ = ["install_torch_npu_shim", "uninstall_torch_npu_shim", "installed_device", "real_torch_npu_available",
           "run_script", "run_module", "main", "npu_ring_attention_update", "SHIM_ATTR"]


class _State:
    def __init__(self) -> None:
        self.patcher: Optional[Patcher] = None
        self.mapping: Any = None
        self.module: Optional[types.ModuleType] = None


_state = _State()


def _is_shim(mod: Any) -> bool:
    return bool(getattr(mod, SHIM_ATTR, False))


def real_torch_npu_available() -> bool:
    """Is a real torch_npu imported already or importable?"""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return not _is_shim(mod)
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def installed_device() -> Optional[str]:
    """The device the stand-in maps "npu" to ("cpu" / "cuda"), or None (no mapping / not installed)."""
    return None if _state.mapping is None else _state.mapping.type


def _refuse_real() -> None:
    mod = sys.modules.get("torch_npu")
    if mod is not None and not _is_shim(mod):
        raise RuntimeError(f"torch_npu is already imported from {getattr(mod, '__file__', '?')}: "
                           "fascore's shim will not shadow a real torch_npu")
    spec = None
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError):
        pass
    if spec is not None:
        raise RuntimeError(f"torch_npu is installed ({spec.origin}): fascore's shim will not shadow a real "
                           "torch_npu; uninstall it or call fascore.npu_fusion_attention directly")


def install_torch_npu_shim(device: Optional[str] = None) -> types.ModuleType:
    """Install fascore's torch_npu stand-in and return the ``torch_npu`` module (idempotent).

    ``device``: None (operators, ``torch.ops.npu``, MindSpeed builders only), or "cpu", "cuda",
    "auto" (cuda if available, else cpu) to map the "npu" device too. Installing again with
    another ``device`` raises ``RuntimeError`` (uninstall first). Raises ``RuntimeError`` if a real
    torch_npu is imported or importable: the stand-in never shadows it.
    """
    from . import devices

    target = None if device is None else devices.resolve_target(device)
    if _state.module is not None:
        if target is not None and target != installed_device():
            raise RuntimeError(f"fascore's torch_npu stand-in is installed with device={installed_device()!r}; "
                               f"call uninstall_torch_npu_shim() before installing it with device={device!r}")
        return _state.module
    _refuse_real()
    patcher = Patcher()
    try:
        return _install(patcher, target)
    except BaseException:
        patcher.restore()
        _state.patcher = _state.mapping = _state.module = None
        raise


def _install(patcher: Patcher, target: Optional[str]) -> types.ModuleType:
    import torch

    from . import mindspeed, npu_ops, standin
    from .devices import DeviceMapping
    from .npu import build_npu_module

    _state.patcher = patcher
    npu_module = None
    if target is not None:
        mapping = DeviceMapping(target)
        mapping.install()
        patcher.on_restore(mapping.uninstall)
        _state.mapping = mapping
        patcher.on_restore(lambda: setattr(_state, "mapping", None))
        npu_module = build_npu_module(mapping)
    modules, finder = standin.build(npu_module, fascore.npu_ring_attention_update)
    for name, mod in modules.items():
        patcher.setitem(sys.modules, name, mod)
    sys.meta_path.insert(0, finder)
    patcher.on_restore(lambda: sys.meta_path.remove(finder) if finder in sys.meta_path else None)
    patcher.on_restore(lambda: sys.modules.pop("torch_npu.contrib.transfer_to_npu", None))
    if npu_module is not None:
        patcher.setattr(torch, "npu", npu_module)
        patcher.setitem(sys.modules, "torch.npu", npu_module)
        patcher.setitem(sys.modules, "torch.npu.amp", npu_module.amp)
    npu_ops.register()
    patcher.on_restore(npu_ops.unregister)
    mindspeed.MindSpeedHook(patcher).install()
    _state.module = modules["torch_npu"]
    return _state.module


def uninstall_torch_npu_shim() -> bool:
    """Undo everything ``install_torch_npu_shim`` did (True if it was installed); a real torch_npu
    stays untouched."""
    if _state.module is None:
        mod = sys.modules.get("torch_npu")
        if mod is not None and _is_shim(mod):  # installed by an older copy of this module
            del sys.modules["torch_npu"]
            return True
        return False
    patcher = _state.patcher
    _state.patcher = _state.module = None
    assert patcher is not None
    patcher.restore()
    return True


def run_script(path: str, argv: Optional[list[str]] = None, *, device: str = "auto") -> int:
    """Run the Python file ``path`` as ``__main__`` on the stand-in (``fascore.compat.runner``);
    the exit code (1 after the script's own exception, reported on stderr)."""
    from .runner import run_script as _run

    return _run(path, argv, device=device)


def run_module(name: str, argv: Optional[list[str]] = None, *, device: str = "auto") -> int:
    """``python -m name`` on the stand-in; the exit code."""
    from .runner import run_module as _run

    return _run(name, argv, device=device)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m fascore.compat [options] (SCRIPT | -m MODULE) [ARGS...]`` (``runner.USAGE``)."""
    from . import runner

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(runner.USAGE)
        return 0 if args else 2
    try:
        cfg = runner.parse_args(args)
    except ValueError as e:
        print(f"fascore.compat: {e}\n\n{runner.USAGE}", file=sys.stderr)
        return 2
    try:
        return runner.run(cfg)
    except RuntimeError as e:  # a real torch_npu, or --device cuda without CUDA
        if "shadow" in str(e) or "CUDA is not available" in str(e):
            print(f"fascore.compat: {e}", file=sys.stderr)
            return 2
        raise
