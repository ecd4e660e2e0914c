"""A ``torch_npu`` stand-in so unmodified torch_npu attention code runs on fascore.

    import fascore.compat
    fascore.compat.install_torch_npu_shim()   # before the code under test imports torch_npu
    import torch_npu                          # the shim: torch_npu.npu_fusion_attention is fascore's

or, for a whole script, without touching it::

    python -m fascore.compat train_step.py --its --own --args
    fascore run train_step.py --its --own --args

The shim module provides ``npu_fusion_attention``, ``npu_fusion_attention_v2``,
``npu_fusion_attention_grad``, ``npu_fusion_attention_grad_v2`` (fascore's, same signatures and
7-tuple) and ``npu_ring_attention_update`` (``fascore.ring_attention_update``). It is installed
only when no real torch_npu can be imported: it never shadows one (``RuntimeError``).

Out of scope: devices. ``tensor.npu()``, ``torch.npu.*``, ``device="npu"`` and the rest of
torch_npu are not provided; use CPU or CUDA tensors (fascore computes on the inputs' device).
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
import types
from typing import Any

import fascore

__all__ = ["install_torch_npu_shim", "uninstall_torch_npu_shim", "real_torch_npu_available", "run_script", "main",
           "npu_ring_attention_update"]

SHIM_ATTR = "__fascore_shim__"


def npu_ring_attention_update(prev_attn_out: Any, prev_softmax_max: Any, prev_softmax_sum: Any, cur_attn_out: Any,
                              cur_softmax_max: Any, cur_softmax_sum: Any, actual_seq_qlen: Any = None,
                              layout: str = "SBH") -> Any:
    """torch_npu's ``npu_ring_attention_update``: merges two partial attentions (ring attention)
    with their softmax statistics; ``fascore.ring_attention_update`` (looked up at call time)."""
    return fascore.ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max, cur_softmax_sum,
              actual_seq_qlen=actual_seq_qlen, layout=layout)


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


def install_torch_npu_shim() -> types.ModuleType:
    """Register a ``torch_npu`` module backed by fascore and return it (idempotent).

    Raises ``RuntimeError`` if a real torch_npu is imported or importable: the shim never
    shadows it.
    """
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        if _is_shim(mod):
            return mod
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
    shim = types.ModuleType("torch_npu", "fascore's torch_npu shim (fascore.compat): FlashAttentionScore only")
    shim.__file__ = __file__
    shim.__version__ = f"fascore-{fascore.__version__}"
    setattr(shim, SHIM_ATTR, True)
    shim.npu_fusion_attention = fascore.npu_fusion_attention
    shim.npu_fusion_attention_v2 = fascore.npu_fusion_attention_v2
    shim.npu_fusion_attention_grad = fascore.npu_fusion_attention_grad
    shim.npu_fusion_attention_grad_v2 = fascore.npu_fusion_attention_grad_v2
    shim.npu_ring_attention_update = npu_ring_attention_update
    sys.modules["torch_npu"] = shim
    return shim


def uninstall_torch_npu_shim() -> bool:
    """Remove the shim from ``sys.modules`` (True if it was installed); a real torch_npu stays."""
    mod = sys.modules.get("torch_npu")
    if mod is not None and _is_shim(mod):
        del sys.modules["torch_npu"]
        return True
    return False


def run_script(path: str, argv: list[str] | None = None) -> None:
    """Run the Python file ``path`` as ``__main__`` with the shim installed (``sys.argv`` =
    ``[path, *argv]``)."""
    install_torch_npu_shim()
    old = sys.argv
    sys.argv = [path, *(argv or [])]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m fascore.compat SCRIPT.py [ARGS...]\n\n"
              "Runs SCRIPT.py with a torch_npu module backed by fascore (see fascore.compat).")
        return 0 if args else 2
    run_script(args[0], args[1:])
    return 0

