"""MindSpeed's fused-op builders on fascore.

MindSpeed does not call torch_npu for its flash-attention and ring-merge paths: ``mindspeed.ops``
calls ``FusionAttentionV2OpBuilder().load()`` / ``RingAttentionUpdateOpBuilder().load()``, which
compile C++ against CANN with ``torch.utils.cpp_extension.load`` and return the extension module.
With the stand-in installed, the two builder classes' ``load`` returns a module of fascore's
implementations with the extension's positional signatures (MindSpeed's
``ops/csrc/cann/fusion_attention_v2.cpp`` and ``npu_ring_attention_update.cpp``):

* ``npu_fusion_attention_v2(query, key, value, head_num, input_layout, pse, padding_mask,
  atten_mask, scale, keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen,
  actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)``
  -> ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``;
* ``npu_fusion_attention_grad_v2(query, key, value, dy, head_num, input_layout, pse, padding_mask,
  atten_mask, softmax_max, softmax_sum, softmax_in, attention_in, scale_value, keep_prob,
  pre_tokens, next_tokens, inner_precise, seed, offset, numels, prefix, actual_seq_qlen,
  actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)``
  -> ``(dq, dk, dv, dpse)``, dpse None without a pse of type 0/1 (the extension returns an
  undefined tensor);
* ``npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
  cur_softmax_max, cur_softmax_sum, actual_seq_qlen=None, layout="SBH")`` -> ``[attn_out,
  softmax_max, softmax_sum]``.

The builders are patched when their modules are imported (a ``sys.meta_path`` hook, so
``mindspeed`` may be imported before or after the stand-in is installed) and put back on
uninstall. Other MindSpeed builders are untouched.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Optional, Sequence

import fascore

from ._patch import Patcher, wrap_found_spec

__all__ = ["BUILDERS", "fusion_attention_v2_module", "ring_attention_update_module", "MindSpeedHook"]

# module -> (builder class, the module its load() returns)
BUILDERS = {
    "mindspeed.op_builder.fusion_attention_v2_builder": "FusionAttentionV2OpBuilder",
    "mindspeed.op_builder.npu_ring_attention_update_builder": "RingAttentionUpdateOpBuilder",
}


def _npu_fusion_attention_v2(query: Any, key: Any, value: Any, head_num: int, input_layout: str, pse: Any,
                             padding_mask: Any, atten_mask: Any, scale: float, keep_prob: float, pre_tokens: int,
                             next_tokens: int, inner_precise: int, prefix: Any, actual_seq_qlen: Any,
                             actual_seq_kvlen: Any, sparse_mode: int, gen_mask_parallel: bool, sync: bool,
                             pse_type: int, q_start_idx: Any, kv_start_idx: Any) -> tuple:
    return fascore.npu_fusion_attention_v2(
        query, key, value, head_num, input_layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        scale=scale, keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
        inner_precise=inner_precise, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, gen_mask_parallel=gen_mask_parallel,
        sync=sync, pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx)


def _npu_fusion_attention_grad_v2(query: Any, key: Any, value: Any, dy: Any, head_num: int, input_layout: str,
                                  pse: Any, padding_mask: Any, atten_mask: Any, softmax_max: Any, softmax_sum: Any,
                                  softmax_in: Any, attention_in: Any, scale_value: float, keep_prob: float,
                                  pre_tokens: int, next_tokens: int, inner_precise: int, seed: int, offset: int,
                                  numels: int, prefix: Any, actual_seq_qlen: Any, actual_seq_kvlen: Any,
                                  sparse_mode: int, gen_mask_parallel: bool, sync: bool, pse_type: int,
                                  q_start_idx: Any, kv_start_idx: Any) -> tuple:
    g = fascore.npu_fusion_attention_grad_v2(
        query, key, value, dy, head_num, input_layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_in, attention_in=attention_in,
        scale_value=scale_value, keep_prob=keep_prob, pre_tokens=pre_tokens, next_tokens=next_tokens,
        inner_precise=inner_precise, seed=seed, offset=offset, numels=numels, prefix=prefix,
        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
        gen_mask_parallel=gen_mask_parallel, sync=sync, pse_type=pse_type, q_start_idx=q_start_idx,
        kv_start_idx=kv_start_idx)
    dpse = g[3] if pse is not None and pse_type in (0, 1) else None
    return g[0], g[1], g[2], dpse


def _npu_ring_attention_update(prev_attn_out: Any, prev_softmax_max: Any, prev_softmax_sum: Any, cur_attn_out: Any,
                               cur_softmax_max: Any, cur_softmax_sum: Any, actual_seq_qlen: Any = None,
                               layout: str = "SBH") -> list:
    from . import npu_ring_attention_update

    return list(npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
                                          cur_softmax_max, cur_softmax_sum, actual_seq_qlen=actual_seq_qlen,
                                          input_layout=layout))


def _ops_module(name: str, **fns: Any) -> types.ModuleType:
    mod = types.ModuleType(name, f"MindSpeed's {name} extension, backed by fascore (fascore.compat.mindspeed).")
    for k, v in fns.items():
        setattr(mod, k, v)
    mod.__fascore_standin__ = True
    return mod


fusion_attention_v2_module = _ops_module("fusion_attention_v2", npu_fusion_attention_v2=_npu_fusion_attention_v2,
                                         npu_fusion_attention_grad_v2=_npu_fusion_attention_grad_v2)
ring_attention_update_module = _ops_module("npu_ring_attention_update",
                                           npu_ring_attention_update=_npu_ring_attention_update)
_MODULES = {"FusionAttentionV2OpBuilder": fusion_attention_v2_module,
            "RingAttentionUpdateOpBuilder": ring_attention_update_module}


def _make_load(ops: types.ModuleType) -> Any:
    def load(self: Any, verbose: bool = True) -> types.ModuleType:
        """fascore's implementation of this MindSpeed extension (nothing is compiled)."""
        return ops
    load.__fascore_standin__ = True  # type: ignore[attr-defined]
    return load


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the builder class the module defines."""

    def __init__(self, loader: Any, hook: "MindSpeedHook") -> None:
        self._loader, self._hook = loader, hook

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._hook.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class MindSpeedHook(importlib.abc.MetaPathFinder):
    """Patches MindSpeed's two builders now (if imported) and whenever their modules load."""

    def __init__(self, patcher: Patcher) -> None:
        self._patcher = patcher

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname not in BUILDERS:
            return None
        return wrap_found_spec(self, fullname, path, target, lambda loader: _PatchingLoader(loader, self))

    def patch(self, module: types.ModuleType) -> None:
        cls_name = BUILDERS.get(module.__name__)
        cls = getattr(module, cls_name, None) if cls_name else None
        if isinstance(cls, type) and not getattr(cls.__dict__.get("load"), "__fascore_standin__", False):
            self._patcher.setattr(cls, "load", _make_load(_MODULES[cls_name]))

    def install(self) -> None:
        sys.meta_path.insert(0, self)
        self._patcher.on_restore(lambda: sys.meta_path.remove(self) if self in sys.meta_path else None)
        for name in BUILDERS:
            if name in sys.modules:
                self.patch(sys.modules[name])
