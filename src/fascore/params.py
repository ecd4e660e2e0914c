"""One declaration of every entry point's parameters: order, types, defaults and spellings.

Each ``EntryPoint`` lists its parameters under fascore's canonical names (torch_npu's v2
spelling: ``pre_tokens``, ``scale``) together with the name the caller uses when it differs
(v1's ``pre_tockens``, the grad ops' ``scale_value``) and the ``torch.library`` schema type.
From it are derived

* the Python signature of the public function (``EntryPoint.signature``, used by
  ``api.functions``),
* the ``torch.library`` schemas of the custom ops (``EntryPoint.schema``, used by ``api.ops``),
* the parameter names in error messages (``EntryPoint.names``: canonical -> caller's spelling),

so a new keyword is added here once. Types and defaults follow torch_npu's
``op_plugin_functions.yaml``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from .limits import INT32_MAX

__all__ = ["REQUIRED", "Param", "EntryPoint", "Names", "ENTRY_POINTS", "entry_point"]

REQUIRED = inspect.Parameter.empty


class Names:
    """Canonical parameter names -> the caller's spelling (v1 ``pre_tockens``, aclnn ``preTokens``)."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self._o = dict(overrides or {})

    def __getitem__(self, key: str) -> str:
        return self._o.get(key, key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Names) and self._o == other._o

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._o.items())))


@dataclass(frozen=True)
class Param:
    name: str  # canonical name
    type: str  # torch.library schema type
    default: Any = REQUIRED
    spelling: str = ""  # the caller's name, if it differs from ``name``

    @property
    def public(self) -> str:
        return self.spelling or self.name

    def schema(self) -> str:
        if self.default is REQUIRED:
            return f"{self.type} {self.public}"
        return f"{self.type} {self.public}={_schema_default(self.default)}"


def _schema_default(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return repr(v) if v != int(v) else f"{v:.1f}"
    return repr(v)


@dataclass(frozen=True)
class EntryPoint:
    """One public function: its parameters in order, where keyword-only ones start, its result."""

    name: str
    params: tuple[Param, ...]
    kwonly_from: int  # index of the first keyword-only parameter (len(params): none)
    returns: str  # schema of the result
    names: Names = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", Names({p.name: p.spelling for p in self.params if p.spelling}))

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def signature(self) -> inspect.Signature:
        """The Python signature, in the caller's spellings."""
        kinds = [inspect.Parameter.POSITIONAL_OR_KEYWORD] * self.kwonly_from + \
            [inspect.Parameter.KEYWORD_ONLY] * (len(self.params) - self.kwonly_from)
        return inspect.Signature([inspect.Parameter(p.public, kind, default=p.default)
                                  for p, kind in zip(self.params, kinds)])

    def schema(self, name: str | None = None, returns: str | None = None) -> str:
        """``name(<params>) -> <returns>`` in torch.library's schema language (torch_npu's)."""
        parts = [p.schema() for p in self.params]
        if self.kwonly_from < len(self.params):
            parts.insert(self.kwonly_from, "*")
        return f"{name or self.name}({', '.join(parts)}) -> {returns or self.returns}"

    def positional_schema(self, returns: str, drop: tuple[str, ...] = (), extra: tuple[Param, ...] = ()) -> str:
        """``(<params>) -> <returns>``: canonical names, all positional and without defaults
        (custom ops take no keyword-only tensors), without ``drop`` and with ``extra`` appended."""
        parts = [f"{p.type} {p.name}" for p in self.op_params(drop, extra)]
        return f"({', '.join(parts)}) -> {returns}"

    def op_params(self, drop: tuple[str, ...] = (), extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.name not in drop) + tuple(extra)

    def canonical(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments bound under the caller's spellings, keyed by canonical names."""
        by_public = {p.public: p.name for p in self.params}
        return {by_public[k]: v for k, v in bound.items()}


def _p(name: str, type_: str, default: Any = REQUIRED, spelling: str = "") -> Param:
    return Param(name, type_, default, spelling)


_QKV = (_p("query", "Tensor"), _p("key", "Tensor"), _p("value", "Tensor"))
_HEAD = (_p("head_num", "int"), _p("input_layout", "str"))
_MASKS = (_p("pse", "Tensor?", None), _p("padding_mask", "Tensor?", None), _p("atten_mask", "Tensor?", None))
_ROPE = (_p("query_rope", "Tensor?", None), _p("key_rope", "Tensor?", None))
_V1_BAND = (_p("pre_tokens", "int", INT32_MAX, "pre_tockens"), _p("next_tokens", "int", INT32_MAX, "next_tockens"))
_V2_BAND = (_p("pre_tokens", "int", INT32_MAX), _p("next_tokens", "int", INT32_MAX))
_SCHED = (_p("gen_mask_parallel", "bool", True), _p("sync", "bool", False))
_STARTS = (_p("pse_type", "int", 1), _p("q_start_idx", "int[]?", None), _p("kv_start_idx", "int[]?", None))
_TAIL = (_p("softmax_layout", "str", ""), _p("sink", "Tensor?", None))
_DROP = (_p("dropout_mask", "Tensor?", None), _p("seed", "int", 0), _p("offset", "int", 0))
_EXT = (_p("dropout_mask", "Tensor?", None),)  # [fascore] extension: the forward's explicit mask
_STATS = (_p("softmax_max", "Tensor?", None), _p("softmax_sum", "Tensor?", None), _p("softmax_in", "Tensor?", None),
          _p("attention_in", "Tensor?", None))


def _lens(type_: str) -> tuple[Param, ...]:
    return (_p("prefix", "int[]?" if type_ == "int[]?" else "SymInt[]?", None),
            _p("actual_seq_qlen", type_, None), _p("actual_seq_kvlen", type_, None),
            _p("sparse_mode", "int", 0))


_FWD_V1 = (*_QKV, *_HEAD, *_MASKS, _p("scale", "float", 1.0), _p("keep_prob", "float", 1.0), *_V1_BAND,
           _p("inner_precise", "int", 0), *_lens("int[]?"), *_SCHED, *_TAIL)
_FWD_RETURNS = "(Tensor, Tensor, Tensor, Tensor, int, int, int)"

ENTRY_POINTS: dict[str, EntryPoint] = {ep.name: ep for ep in (
    EntryPoint("npu_fusion_attention", (*_FWD_V1, *_DROP), len(_FWD_V1) + 3, _FWD_RETURNS),
    EntryPoint("npu_fusion_attention_v2",
               (*_QKV, *_HEAD, *_MASKS, *_ROPE, _p("scale", "float", 1.0), _p("keep_prob", "float", 1.0), *_V2_BAND,
                _p("inner_precise", "int", 0), *_lens("int[]?"), *_SCHED, *_STARTS, *_TAIL, *_DROP),
               5, _FWD_RETURNS),
    EntryPoint("npu_fusion_attention_v3",
               (*_QKV, *_HEAD, *_MASKS, _p("scale", "float", 1.0), _p("keep_prob", "float", 1.0), *_V1_BAND,
                _p("inner_precise", "int", 0), *_lens("Tensor?"), *_SCHED, *_TAIL),
               21, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    EntryPoint("npu_fusion_attention_grad",
               (*_QKV, _p("dy", "Tensor"), *_HEAD, *_MASKS, *_STATS, _p("scale", "float", 1.0, "scale_value"),
                _p("keep_prob", "float", 1.0), *_V1_BAND, _p("inner_precise", "int", 0), _p("seed", "int", 0),
                _p("offset", "int", 0), _p("numels", "int", 0), *_lens("int[]?"), *_SCHED, *_TAIL, *_EXT),
               6, "(Tensor, Tensor, Tensor, Tensor, Tensor)"),
    EntryPoint("npu_fusion_attention_grad_v2",
               (*_QKV, _p("dy", "Tensor"), *_HEAD, *_MASKS, *_STATS, *_ROPE,
                _p("scale", "float", 1.0, "scale_value"), _p("keep_prob", "float", 1.0), *_V2_BAND,
                _p("inner_precise", "int", 0), _p("seed", "int", 0), _p("offset", "int", 0), _p("numels", "int", 0),
                *_lens("int[]?"), *_SCHED, *_STARTS, *_TAIL, *_EXT),
               6, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"),
    EntryPoint("npu_fusion_attention_grad_v3",
               (*_QKV, _p("dy", "Tensor"), *_HEAD, *_MASKS, *_STATS, _p("scale", "float", 1.0, "scale_value"),
                _p("keep_prob", "float", 1.0), *_V1_BAND, _p("inner_precise", "int", 0),
                _p("seed", "Tensor?", None), _p("offset", "Tensor?", None), *_lens("Tensor?"), *_SCHED, *_TAIL,
                *_EXT),
               6, "(Tensor, Tensor, Tensor, Tensor, Tensor)"),
)}


def entry_point(name: str) -> EntryPoint:
    return ENTRY_POINTS[name]
