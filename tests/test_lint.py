"""fascore.lint: guard rails fire on the porting mistakes, stay silent on correct calls, never
change a result, and follow FASCORE_LINT (0 / 1 / error / strict / strict-error)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fascore
from fascore import lint
from fascore.tools import check
from conftest import band_keep


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("FASCORE_LINT", raising=False)
    lint.reset()
    yield
    lint.reset()


def _qkv(b=2, sq=16, skv=16, n=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, sq, n, d, generator=g), torch.randn(b, skv, n, d, generator=g),
            torch.randn(b, skv, n, d, generator=g))


def _rules(fn):
    """The lint rules a call fires in warn mode (each once per call site)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message).split("]")[0].split("[")[1] for x in w if issubclass(x.category, lint.LintWarning)]


def _raises(fn, rule):
    with lint.settings(level="error"):
        with pytest.raises(lint.LintError) as e:
            fn()
    assert e.value.rule == rule and e.value.status == 161002
    return str(e.value)


# --------------------------------------------------------------------------- keep-masks
KEEP_MASKS = {  # SDPA-polarity masks (True = attend) passed as atten_mask: each is a mistake
    "causal keep top-left": lambda sq, skv: band_keep(sq, skv, None, 0),
    "causal keep bottom-right": lambda sq, skv: band_keep(sq, skv, None, 0, skv - sq),
    "sliding window keep": lambda sq, skv: band_keep(sq, skv, -3, 0, skv - sq),
    "symmetric band keep": lambda sq, skv: band_keep(sq, skv, -2, 2),
    "causal keep with padded keys": lambda sq, skv: band_keep(sq, skv, None, 0) & (torch.arange(skv) < skv - 3)[None],
}


@pytest.mark.parametrize("name", list(KEEP_MASKS))
@pytest.mark.parametrize("sq,skv", [(16, 16), (12, 20), (20, 12)])
def test_keep_mask_fires(name, sq, skv):
    keep = KEEP_MASKS[name](sq, skv)
    if name == "causal keep with padded keys" and sq >= skv:
        pytest.skip("padding over the diagonal hides it (documented in docs/lint.md): Skv > Sq only")
    if name == "causal keep top-left" and skv > sq:
        keep = band_keep(sq, skv, None, 0)  # still the complement of a top-left causal mask
    q, k, v = _qkv(sq=sq, skv=skv)
    assert _rules(lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep)) == ["keep-mask"]
    msg = _raises(lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep), "keep-mask")
    assert "keep-mask" in msg and "masks where True" in msg and "~atten_mask" in msg


def test_keep_mask_fires_for_every_shape_and_mode_that_reads_a_full_mask():
    q, k, v = _qkv(b=2, sq=16, skv=16)
    keep = band_keep(16, 16, None, 0)
    for mask, kw in ((keep[None, None], {}), (keep.expand(2, 1, 16, 16), {}), (keep.expand(2, 2, 16, 16), {}),
                     (keep.to(torch.uint8), {}), (keep, dict(sparse_mode=1)),
                     (keep.expand(2, 1, 16, 16), dict(sparse_mode=5, prefix=[2, 3]))):
        lint.reset()
        assert _rules(lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=mask, **kw)) == \
            ["keep-mask"], (mask.shape, kw)


def test_keep_mask_in_tnd_both_mask_forms():
    t = torch.randn(30, 2, 8)
    cum = [10, 30]
    for mask in (band_keep(20, 20, None, 0), torch.block_diag(band_keep(10, 10, None, 0), band_keep(20, 20, None, 0))):
        lint.reset()
        assert _rules(lambda: fascore.npu_fusion_attention(t, t, t, 2, "TND", atten_mask=mask,
                                                           actual_seq_qlen=cum, actual_seq_kvlen=cum)) == ["keep-mask"]


CORRECT_MASKS = {  # Ascend polarity (True = masked out): silent
    "causal top-left": lambda sq, skv: ~band_keep(sq, skv, None, 0),
    "causal bottom-right": lambda sq, skv: ~band_keep(sq, skv, None, 0, skv - sq),
    "band": lambda sq, skv: ~band_keep(sq, skv, -3, 2),
    "band bottom-right": lambda sq, skv: ~band_keep(sq, skv, -4, 0, skv - sq),
    "padding": lambda sq, skv: (torch.arange(skv) >= skv - 5)[None].expand(sq, skv),
    "left padding": lambda sq, skv: (torch.arange(skv) < 3)[None].expand(sq, skv),
    "one row masked": lambda sq, skv: torch.zeros(sq, skv, dtype=torch.bool).index_fill(
        0, torch.tensor([min(2, sq - 1)]), True),
    "everything masked": lambda sq, skv: torch.ones(sq, skv, dtype=torch.bool),
    "nothing masked": lambda sq, skv: torch.zeros(sq, skv, dtype=torch.bool),
    "random": lambda sq, skv: torch.rand(sq, skv, generator=torch.Generator().manual_seed(1)) < 0.3,
    "dense random": lambda sq, skv: torch.rand(sq, skv, generator=torch.Generator().manual_seed(2)) < 0.9,
    "dense random rows": lambda sq, skv: (torch.rand(1, skv, generator=torch.Generator().manual_seed(3)) < 0.9)
    .expand(sq, skv),
}


@pytest.mark.parametrize("name", list(CORRECT_MASKS))
@pytest.mark.parametrize("sq,skv", [(16, 16), (12, 20), (20, 12), (1, 9), (9, 1)])
def test_correct_masks_are_silent(name, sq, skv):
    q, k, v = _qkv(sq=sq, skv=skv)
    mask = CORRECT_MASKS[name](sq, skv)
    with lint.settings(level="error"):
        fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=mask)
        fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=mask, pre_tockens=4, next_tockens=1)


def test_compressed_masks_and_no_mask_are_silent():
    q, k, v = _qkv(sq=16, skv=16)
    causal = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    with lint.settings(level="error"):
        for mode in (2, 3, 4):
            fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=causal, sparse_mode=mode)
        fascore.npu_fusion_attention(q, k, v, 2, "BSND")


def test_keep_mask_reason_patterns():
    r = lint.keep_mask_reason
    assert "complement of a causal" in r(band_keep(8, 8, None, 0))
    assert "complement of a band" in r(band_keep(8, 8, -2, 1))
    assert "every element of the diagonal" in r(band_keep(8, 8, None, 0) & (torch.rand(8, 8) < 2).index_fill(1, torch.tensor([0]), False) | torch.eye(8, dtype=torch.bool))
    assert r(~band_keep(8, 8, None, 0)) is None and r(torch.ones(8, 8, dtype=torch.bool)) is None
    assert r(torch.ones(1, 8, dtype=torch.bool)) is None  # one row: no diagonal to read


def test_large_masks_are_sampled_and_cached(monkeypatch):
    q, k, v = _qkv(b=1, sq=4096, skv=4096, n=1, d=8)
    keep = band_keep(4096, 4096, None, 0)
    calls = []
    real = lint.keep_mask_reason
    monkeypatch.setattr(lint, "keep_mask_reason", lambda m: calls.append(1) or real(m))
    with lint.settings(level="error"):
        with pytest.raises(lint.LintError):
            fascore.npu_fusion_attention(q, k, v, 1, "BSND", atten_mask=keep)
        with pytest.raises(lint.LintError):
            fascore.npu_fusion_attention(q, k, v, 1, "BSND", atten_mask=keep)
    assert len(calls) == 1  # the second call reads the cached verdict
    keep[0, 0] = False  # an in-place change is seen
    keep[0, 0] = True
    with lint.settings(level="error"), pytest.raises(lint.LintError):
        fascore.npu_fusion_attention(q, k, v, 1, "BSND", atten_mask=keep)
    assert len(calls) == 2


# --------------------------------------------------------------------------- TND lengths
def test_per_sequence_lengths_fire():
    t = torch.randn(600, 2, 8)
    rules = _rules(lambda: fascore.npu_fusion_attention(t, t, t, 2, "TND", actual_seq_qlen=[100, 200, 300],
                                                        actual_seq_kvlen=[100, 200, 300]))
    assert rules == ["seq-lens", "seq-lens"]  # query and key, each once
    msg = _raises(lambda: fascore.npu_fusion_attention(t, t, t, 2, "TND", actual_seq_qlen=[100, 200, 300],
                                                       actual_seq_kvlen=[100, 300, 600]), "seq-lens")
    assert "[100, 300, 600]" in msg and "rows 300..599" in msg and "cumulative" in msg


@pytest.mark.parametrize("cq,ck,t1,t2", [([100, 300, 600], [100, 300, 600], 600, 600),
                                         ([6, 16, 0], [8, 20, 0], 18, 22),  # padding, uncovered rows
                                         ([0, 100, 300, 600], [0, 100, 300, 600], 600, 600),  # flash's leading 0
                                         ([5], [7], 9, 9)])
def test_cumulative_offsets_are_silent(cq, ck, t1, t2):
    q, k = torch.randn(t1, 2, 8), torch.randn(t2, 2, 8)
    with lint.settings(level="error"):
        fascore.npu_fusion_attention(q, k, k, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ck)


def test_strict_rules(monkeypatch):
    q, k, v = _qkv(d=64)
    t = torch.randn(18, 2, 8)
    calls = {
        "scale": lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND"),
        "keep-prob": lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.125, keep_prob=0.1, seed=3),
        "uncovered": lambda: fascore.npu_fusion_attention(t, t, t, 2, "TND", actual_seq_qlen=[6, 16],
                                                          actual_seq_kvlen=[8, 18], scale=0.3),
    }
    for rule, fn in calls.items():
        assert _rules(fn) == [], rule  # not in the default mode
    monkeypatch.setenv("FASCORE_LINT", "strict")
    for rule, fn in calls.items():
        assert _rules(fn) == [rule], rule
    monkeypatch.setenv("FASCORE_LINT", "strict-error")
    with pytest.raises(lint.LintError, match="drops 90 %"):
        calls["keep-prob"]()
    with pytest.raises(lint.LintError, match=r"1/sqrt\(D\) = 0.125"):
        calls["scale"]()
    one = torch.randn(2, 8, 2, 1)  # D = 1: scale 1.0 is 1/sqrt(D)
    fascore.npu_fusion_attention(one, one, one, 2, "BSND")
    fascore.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.125, keep_prob=0.9, seed=3)


# --------------------------------------------------------------------------- modes, call sites, results
def test_environment_levels(monkeypatch):
    q, k, v = _qkv()
    keep = band_keep(16, 16, None, 0)

    def call():
        return fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep, scale=0.35)
    for value, expect in (("0", "off"), ("off", "off"), ("1", "warn"), ("", "warn"), ("error", "error"),
                          ("strict", "warn"), ("strict-error", "error")):
        monkeypatch.setenv("FASCORE_LINT", value)
        lint.reset()
        assert lint.level()[0] == expect
        if expect == "off":
            assert _rules(call) == []
        elif expect == "warn":
            assert _rules(call) == ["keep-mask"]
        else:
            with pytest.raises(lint.LintError):
                call()
    monkeypatch.setenv("FASCORE_LINT", "sometimes")
    with pytest.warns(lint.LintWarning, match="FASCORE_LINT='sometimes'"):
        assert lint.level() == ("warn", False)
    with lint.settings(level="off"):
        assert _rules(call) == []


def test_once_per_call_site_attributed_to_the_caller():
    q, k, v = _qkv()
    keep = band_keep(16, 16, None, 0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep)  # one site
        fascore.npu_fusion_attention_v2(q, k, v, 2, "BSND", atten_mask=keep)  # another
        fascore.attention(q, k, v, attn_mask=~keep)  # fascore.attention's own call site
    lw = [x for x in w if issubclass(x.category, lint.LintWarning)]
    assert len(lw) == 3
    assert all(x.filename == __file__ for x in lw)
    assert "SDPA's polarity (True = attend)" in str(lw[2].message) and "complement" in str(lw[2].message)


def test_lint_never_changes_a_result():
    q, k, v = _qkv()
    keep = band_keep(16, 16, None, 0)
    with lint.settings(level="off"):
        off = fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = fascore.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=keep)
    for a, b in zip(off[:4], on[:4]):
        assert torch.equal(a, b)
    assert off[4:] == on[4:]


def test_silent_on_the_conformance_cases():
    """Every call of ``fascore check --quick`` (layouts x modes x pse x dropout x TND ...) is correct:
    in error mode none of them trips a guard rail."""
    with lint.settings(level="error"):
        for s in check.cases(quick=True):
            kw = check._place(s, check.make_inputs(s), s.dtype, torch.device("cpu"))
            check._call(s.api, kw)


def test_silent_on_fascore_attention_calls():
    q, k, v = _qkv(sq=12, skv=20)
    keep = torch.rand(12, 20, generator=torch.Generator().manual_seed(3)) < 0.8
    with lint.settings(level="error", strict=True):
        for kw in (dict(causal=True), dict(causal=True, causal_alignment="top_left"), dict(window=(3, 2)),
                   dict(attn_mask=keep, causal=True), dict(attn_mask=band_keep(12, 20, None, 0, 8)),
                   dict(dropout_p=0.1, seed=3), dict(causal=True, prefix=[9, 12])):
            fascore.attention(q, k, v, **kw)


def test_fascore_lint_env_in_a_fresh_process():
    code = textwrap.dedent("""
        import torch, fascore
        q = torch.randn(1, 8, 1, 4)
        keep = torch.ones(8, 8, dtype=torch.bool).tril()
        try:
            fascore.npu_fusion_attention(q, q, q, 1, "BSND", atten_mask=keep)
            print("no error")
        except fascore.lint.LintError as e:
            print("LintError", e.status)
    """)
    env = dict(os.environ, FASCORE_LINT="error")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LintError", "161002"]


def test_random_masks_are_not_taken_for_keep_masks():
    """Random masks of every density (the fuzz tests' kind) at small sizes, where a diagonal is
    often fully masked by chance: no verdict (the keep-mask shape check rejects them)."""
    g = torch.Generator().manual_seed(7)
    fired = []
    for trial in range(400):
        sq, skv = (int(x) for x in torch.randint(2, 41, (2,), generator=g))
        p = (0.2, 0.5, 0.9, 0.97)[trial % 4]
        m = torch.rand(sq, skv, generator=g) < p
        if trial % 3 == 0:
            m = m[:1].expand(sq, skv)
        if lint.keep_mask_reason(m) is not None:
            fired.append((sq, skv, p))
    assert fired == []
