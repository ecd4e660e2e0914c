"""Engines declare what they run; dispatch takes the first engine of a fixed priority list that
can run a call, and a forced engine that cannot raises naming the reasons (README: "Adding an
engine" is this toy engine)."""
from __future__ import annotations

import pytest
import torch

import fascore
from fascore import engines
from fascore.engines import Engine, reference
from fascore.spec import build_problem
from conftest import CAUSAL_MASK, make_qkv


class ToyEngine(Engine):
    """Dense float32 attention without masks, pse, dropout or varlen: it declares so."""

    name = "toy"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})
    features = frozenset({"backward", "gqa"})

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, seg, prob):
        self.calls += 1
        return reference.forward(seg, prob)

    def backward(self, seg, prob, dy, out, m, l, dpse, dsink):
        self.calls += 1
        return reference.backward(seg, prob, dy, out, m, l, dpse, dsink)

    def workspace_bytes(self, seg, prob, backward):
        return reference.workspace_bytes(seg, prob, backward)


@pytest.fixture
def toy():
    engine = ToyEngine()
    fascore.register_engine(engine, prefer=True)
    yield engine
    fascore.unregister_engine("toy")


def _call(inp, **kw):
    args = [inp[k] for k in ("query", "key", "value", "head_num", "input_layout")]
    extra = {k: v for k, v in inp.items() if k not in ("query", "key", "value", "head_num", "input_layout")}
    return fascore.npu_fusion_attention_v2(*args, **extra, **kw)


def test_dispatch_takes_the_preferred_engine_where_it_can(toy):
    inp = make_qkv("BNSD", B=1, N1=4, N2=2, Sq=6, Skv=7, D=8, seed=1)
    q = inp["query"].requires_grad_(True)
    out = _call(inp, scale=0.3)[0]
    assert toy.calls == 1
    out.sum().backward()
    assert toy.calls == 2 and q.grad is not None


@pytest.mark.parametrize("kw,what", [
    (dict(keep_prob=0.5, seed=3), "dropout not supported"),
    (dict(atten_mask=torch.zeros(6, 7, dtype=torch.bool), sparse_mode=1), "explicit_mask not supported"),
    (dict(sink=torch.zeros(4)), "sink not supported"),
    (dict(pse=torch.rand(4), pse_type=2), "alibi not supported"),
])
def test_dispatch_skips_it_for_what_it_lacks(toy, kw, what):
    if kw.get("pse_type") == 2:
        inp = make_qkv("BNSD", B=1, N1=4, N2=2, Sq=7, Skv=7, D=8, seed=2)
    else:
        inp = make_qkv("BNSD", B=1, N1=4, N2=2, Sq=6, Skv=7, D=8, seed=2)
    res = _call(inp, **kw)
    assert toy.calls == 0, "the toy engine ran a call it declared it cannot"
    with fascore.use_engine("reference"):
        ref = _call(inp, **kw)
    torch.testing.assert_close(res[0], ref[0], rtol=1e-5, atol=1e-6)
    args = {k: v for k, v in inp.items()}
    prob = build_problem(**args, **kw)
    reasons = dict(engines.explain(prob))["toy"]
    assert what in reasons, reasons
    assert engines.select(prob).name != "toy"


def test_dispatch_skips_dtypes_and_tnd(toy):
    inp = make_qkv("BSH", B=1, N1=2, Sq=5, Skv=5, D=8, dtype=torch.float16, seed=3)
    _call(inp)
    tnd = make_qkv("TND", N1=2, D=8, seqlens_q=[3, 2], seqlens_kv=[4, 2], seed=4)
    _call(tnd)
    assert toy.calls == 0
    reasons = dict(engines.explain(build_problem(**tnd)))["toy"]
    assert "tnd not supported" in reasons


def test_forcing_an_engine_that_cannot_run_the_call_names_the_reasons(toy):
    inp = make_qkv("BNSD", B=1, N1=2, Sq=6, Skv=6, D=8, seed=5)
    with fascore.use_engine("toy"), pytest.raises(fascore.FlashAttentionError) as ei:
        _call(inp, keep_prob=0.5, seed=1, atten_mask=CAUSAL_MASK, sparse_mode=3)
    msg = str(ei.value)
    assert ei.value.status == 161002 and "engine='toy'" in msg and "dropout not supported" in msg, msg
    with fascore.use_engine("toy"):
        _call(inp)  # what it can run, it runs
    assert toy.calls == 1


def test_the_forced_engine_and_dispatch_are_restored():
    assert fascore.current_engine_name() in engines.PRIORITY["cpu"]
    fascore.set_default_engine("reference")
    try:
        assert fascore.current_engine_name() == "reference"
        with fascore.use_engine("flash"):
            assert fascore.current_engine_name() == "flash"
        assert fascore.current_engine_name() == "reference"
    finally:
        fascore.set_default_engine("auto")
    with pytest.raises(fascore.FlashAttentionError, match="engine='nope'"):
        fascore.set_default_engine("nope")
    with pytest.raises(fascore.FlashAttentionError, match="engine='nope'"):
        with fascore.use_engine("nope"):
            pass


def test_registration_takes_engines_only():
    with pytest.raises(TypeError):
        fascore.register_engine(reference)  # a module, not an Engine


def test_engine_table_lists_declarations():
    rows = {r["engine"]: r for r in engines.engine_table()}
    assert {"flash", "reference"} <= set(rows)
    assert "dropout" in rows["flash"]["features"] and "float64" in rows["reference"]["dtypes"]
    assert all(r["status"] for r in rows.values())
