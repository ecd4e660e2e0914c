"""``torch.ops.npu.*``: torch_npu's operator schemas, backed by fascore (installed with the stand-in).

The six attention operators get torch_npu's exact schemas, derived from ``fascore.params``
(without the grad functions' **[fascore]** ``dropout_mask`` extension, which torch_npu's schemas
lack), and a ``CompositeImplicitAutograd`` kernel that calls fascore's public function. So

* eagerly, ``torch.ops.npu.npu_fusion_attention(...)`` is ``fascore.npu_fusion_attention(...)``,
  autograd included (query, key, value, pse, sink, and v2's rope tensors, as torch_npu's
  ``derivatives.yaml`` says);
* under ``FakeTensorMode`` and ``torch.compile`` the kernel decomposes into fascore's own custom
  ops (``torch.ops.fascore.*``, ``fascore.api.ops``), which carry the fake implementations and the
  autograd formula, so ``torch.compile(fullgraph=True)`` traces forward and backward without
  graph breaks;
* on ``meta`` tensors the call runs under a ``FakeTensorMode`` and returns meta tensors (torch_npu
  registers meta implementations too).

(``torch.library.custom_op`` / ``register_autograd`` refuse keyword-only Tensor arguments, which
torch_npu's schemas have; a composite kernel does not need them.)

``npu_ring_attention_update``, ``_npu_dropout_gen_mask.Tensor`` and ``npu_dropout_gen_mask`` are
registered with their torch_npu schemas too, with fake implementations; as in torch_npu they
have no derivative.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

import fascore

from ..params import ENTRY_POINTS

__all__ = ["ATTENTION_OPS", "OTHER_SCHEMAS", "torch_npu_schema", "register", "unregister", "registered"]

ATTENTION_OPS = ("npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
                 "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3")
OTHER_SCHEMAS = {  # torch_npu's op_plugin_functions.yaml
    "npu_ring_attention_update": (
        "npu_ring_attention_update(Tensor prev_attn_out, Tensor prev_softmax_max, Tensor prev_softmax_sum, "
        "Tensor cur_attn_out, Tensor cur_softmax_max, Tensor cur_softmax_sum, *, Tensor? actual_seq_qlen=None, "
        "str input_layout=\"SBH\", str input_softmax_layout=\"\") -> (Tensor, Tensor, Tensor)"),
    "_npu_dropout_gen_mask.Tensor": (
        "_npu_dropout_gen_mask.Tensor(Tensor self, int[] size, float p, int seed, int offset, *, "
        "bool? parallel=True, bool? sync=None) -> Tensor"),
    "npu_dropout_gen_mask": (
        "npu_dropout_gen_mask(int[] size, float p, *, ScalarType? dtype=None, Layout? layout=None, "
        "Device? device=None, bool? pin_memory=None) -> Tensor"),
}

_lib: Optional[torch.library.Library] = None


def torch_npu_schema(name: str) -> str:
    """torch_npu's schema of attention operator ``name`` (from ``fascore.params``)."""
    ep = ENTRY_POINTS[name]
    if name.startswith("npu_fusion_attention_grad"):  # without fascore's dropout_mask extension
        params = tuple(p for p in ep.params if p.name != "dropout_mask")
        ep = type(ep)(ep.name, params, ep.kwonly_from, ep.returns)
    return ep.schema()


def _has_meta(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(t, Tensor) and t.device.type == "meta" for t in (*args, *kwargs.values()))


def _on_meta(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn`` on meta tensors: run it on fake tensors and return meta tensors of the same shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        conv = (lambda t: mode.from_tensor(t) if isinstance(t, Tensor) else t)
        res = fn(*(conv(a) for a in args), **{k: conv(v) for k, v in kwargs.items()})

    def meta(t: Any) -> Any:
        if isinstance(t, Tensor):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t
    return tuple(meta(t) for t in res) if isinstance(res, tuple) else meta(res)


def _attention_kernel(name: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        fn = getattr(fascore, name)  # looked up at call time (fascore.capture wraps it)
        if _has_meta(args, kwargs):
            return _on_meta(fn, args, kwargs)
        return fn(*args, **kwargs)
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def _ring_kernel(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    from . import npu_ring_attention_update

    out = npu_ring_attention_update(*args, **kwargs)
    return tuple(t.clone() if t is args[0] or t is args[1] or t is args[2] else t for t in out)


def _ring_fake(prev_attn_out: Tensor, prev_softmax_max: Tensor, prev_softmax_sum: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(prev_attn_out), torch.empty_like(prev_softmax_max), torch.empty_like(prev_softmax_sum)


def _gen_mask_kernel(self: Tensor, size: list, p: float, seed: int, offset: int, *, parallel: Any = True,
                     sync: Any = None) -> Tensor:
    return fascore._npu_dropout_gen_mask(self, list(size), p, seed, offset, parallel=parallel, sync=sync)


def _gen_mask_fake(self: Tensor, size: list, p: float, seed: int, offset: int, *, parallel: Any = True,
                   sync: Any = None) -> Tensor:
    numel = 1
    for s in size:
        numel *= s
    return self.new_empty((-(-numel // 128) * 16,), dtype=torch.uint8)


def _gen_mask_default(size: list, p: float, *, dtype: Any = None, layout: Any = None, device: Any = None,
                      pin_memory: Any = None) -> Tensor:
    return fascore.npu_dropout_gen_mask(list(size), p, dtype=dtype, layout=layout, device=device,
                                        pin_memory=pin_memory)


def register() -> torch.library.Library:
    """Define the ``npu`` namespace's operators (idempotent); returns the library."""
    global _lib
    if _lib is not None:
        return _lib
    lib = torch.library.Library("npu", "DEF")
    try:
        for name in ATTENTION_OPS:
            lib.define(torch_npu_schema(name))
            lib.impl(name, _attention_kernel(name), "CompositeImplicitAutograd")
        for name, schema in OTHER_SCHEMAS.items():
            lib.define(schema)
        lib.impl("npu_ring_attention_update", _ring_kernel, "CompositeExplicitAutograd")
        torch.library.register_fake("npu::npu_ring_attention_update", _ring_fake, lib=lib)
        lib.impl("_npu_dropout_gen_mask.Tensor", _gen_mask_kernel, "CompositeExplicitAutograd")
        torch.library.register_fake("npu::_npu_dropout_gen_mask.Tensor", _gen_mask_fake, lib=lib)
        lib.impl("npu_dropout_gen_mask", _gen_mask_default, "CompositeImplicitAutograd")
    except Exception:
        lib._destroy()
        raise
    _lib = lib
    return lib


def registered() -> bool:
    return _lib is not None


def unregister() -> None:
    """Remove the ``npu`` operators again (``uninstall_torch_npu_shim``)."""
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None
