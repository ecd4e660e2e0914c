"""The ``torch_npu`` module tree of fascore's stand-in (built by ``build``, registered by
``fascore.compat.install_torch_npu_shim``).

    torch_npu                      operators: npu_fusion_attention[_v2|_v3], ..._grad[_v2|_v3],
                                   npu_ring_attention_update, _npu_dropout_gen_mask,
                                   npu_dropout_gen_mask; __version__; a real ModuleSpec
    torch_npu.npu (= torch.npu)    the device API (fascore.compat.npu), with device mapping only
    torch_npu.npu.amp              autocast, GradScaler, custom_fwd, custom_bwd
    torch_npu.contrib.transfer_to_npu   importable; a no-op (see its docstring)
    torch_npu.testing.testcase     TestCase (assertRtolEqual), run_tests
    torch_npu.testing.common_utils create_common_tensor, SupportedDevices, set_npu_device

Any other attribute raises an AttributeError naming it and saying what the stand-in covers; any
other submodule a ModuleNotFoundError saying the same.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any, Optional, Sequence

import torch

import fascore

from .npu import StandInModule

__all__ = ["SHIM_ATTR", "OPERATORS", "build", "version", "StandInFinder", "TRANSFER_TO_NPU_NOTE"]

SHIM_ATTR = "__fascore_shim__"
OPERATORS = ("npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
             "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3",
             "_npu_dropout_gen_mask", "npu_dropout_gen_mask")
TRANSFER_TO_NPU_NOTE = (
    "torch_npu.contrib.transfer_to_npu is a no-op under fascore's torch_npu stand-in: on Ascend it rewrites "
    "CUDA calls to NPU ones; here 'npu' itself maps to the target device (CPU or CUDA), and CUDA calls are left "
    "as they are (on a CPU target they fail as on any machine without CUDA).")


def version() -> str:
    """``torch_npu.__version__``: torch's release with a PEP 440 local part naming fascore."""
    return f"{torch.__version__.split('+')[0]}+fascore.standin.{fascore.__version__}"


class _Loader(importlib.abc.Loader):
    """The stand-in's modules already exist; ``reload`` keeps them as they are."""

    def __init__(self, modules: dict[str, types.ModuleType]) -> None:
        self._modules = modules

    def create_module(self, spec: Any) -> Optional[types.ModuleType]:
        mod = self._modules.get(spec.name)
        if mod is None and spec.name == "torch_npu.contrib.transfer_to_npu":
            mod = _transfer_to_npu()
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "torch_npu.contrib.transfer_to_npu":
            warnings.warn(TRANSFER_TO_NPU_NOTE, UserWarning, stacklevel=2)


def _transfer_to_npu() -> types.ModuleType:
    mod = types.ModuleType("torch_npu.contrib.transfer_to_npu", TRANSFER_TO_NPU_NOTE)
    mod.__all__ = []
    return mod


class StandInFinder(importlib.abc.MetaPathFinder):
    """Serves ``torch_npu.*`` submodules: the stand-in's, or a ModuleNotFoundError that says why."""

    def __init__(self, loader: _Loader) -> None:
        self._loader = loader

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if not fullname.startswith("torch_npu."):
            return None
        if fullname in self._loader._modules or fullname == "torch_npu.contrib.transfer_to_npu":
            pkg = fullname in ("torch_npu.npu", "torch_npu.contrib", "torch_npu.testing")
            return importlib.machinery.ModuleSpec(fullname, self._loader, origin="fascore.compat",
                                                  is_package=pkg)
        raise ModuleNotFoundError(
            f"No module named {fullname!r}: fascore's torch_npu stand-in provides torch_npu's FlashAttentionScore "
            "operators, npu_ring_attention_update, the dropout-mask generators, torch_npu.npu (device plumbing), "
            "torch_npu.testing.testcase and torch_npu.contrib.transfer_to_npu only (see docs/torch_npu.md)",
            name=fullname)


class _TopModule(StandInModule):
    def __getattr__(self, name: str) -> Any:
        if name == "npu":
            raise AttributeError(
                "torch_npu.npu: fascore's torch_npu stand-in was installed without device mapping; install it with "
                "fascore.compat.install_torch_npu_shim(device='cpu' | 'cuda' | 'auto') (or run the script with "
                "`fascore run`) for torch_npu.npu, torch.npu, Tensor.npu() and the 'npu' device")
        return super().__getattr__(name)


def _package(name: str, doc: str, loader: _Loader, **attrs: Any) -> StandInModule:
    mod = (_TopModule if name == "torch_npu" else StandInModule)(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader, origin=__file__, is_package=True)
    mod.__spec__.submodule_search_locations = []
    mod.__path__ = []
    mod.__file__ = __file__
    mod.__loader__ = loader
    mod.__package__ = name
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _child(name: str, mod: types.ModuleType, loader: _Loader, package: bool = False) -> types.ModuleType:
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader, origin=__file__, is_package=package)
    if package:
        mod.__spec__.submodule_search_locations = []
        mod.__path__ = []
    mod.__loader__ = loader
    mod.__package__ = name if package else name.rpartition(".")[0]
    return mod


def build(npu_module: Optional[types.ModuleType], ring_update: Any) -> tuple[dict[str, types.ModuleType],
                                                                                 StandInFinder]:
    """The stand-in's modules by name (to put in ``sys.modules``) and the finder for submodules."""
    from . import testing

    modules: dict[str, types.ModuleType] = {}
    loader = _Loader(modules)
    ops = {name: getattr(fascore, name) for name in OPERATORS}
    top = _package("torch_npu", __doc__, loader, __version__=version(), npu_ring_attention_update=ring_update,
                   **ops)
    setattr(top, SHIM_ATTR, True)
    top.__all__ = [*OPERATORS, "npu_ring_attention_update"] + (["npu"] if npu_module is not None else [])
    modules["torch_npu"] = top
    contrib = _package("torch_npu.contrib", "torch_npu.contrib of fascore's stand-in: transfer_to_npu only.", loader)
    top.contrib = modules["torch_npu.contrib"] = contrib
    tst = _package("torch_npu.testing", "torch_npu.testing of fascore's stand-in.", loader)
    testcase = _child("torch_npu.testing.testcase", StandInModule("torch_npu.testing.testcase", testing.__doc__),
                      loader)
    testcase.TestCase, testcase.run_tests = testing.TestCase, testing.run_tests
    common = _child("torch_npu.testing.common_utils", StandInModule("torch_npu.testing.common_utils"), loader)
    for name in ("create_common_tensor", "SupportedDevices", "set_npu_device", "get_npu_device"):
        setattr(common, name, getattr(testing, name))
    tst.testcase, tst.common_utils = testcase, common
    top.testing = tst
    modules.update({"torch_npu.testing": tst, "torch_npu.testing.testcase": testcase,
                    "torch_npu.testing.common_utils": common})
    if npu_module is not None:
        top.npu = modules["torch_npu.npu"] = _child("torch_npu.npu", npu_module, loader, package=True)
        modules["torch_npu.npu.amp"] = _child("torch_npu.npu.amp", npu_module.amp, loader)
    return modules, StandInFinder(loader)
