"""The torch_npu shim (fascore.compat): an unmodified torch_npu-style script runs on fascore."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fascore
from fascore import compat

from conftest import CAUSAL_MASK, assert_within_rule
from oracle import attention_oracle

# A script as a torch_npu user writes it (MindSpeed's FlashSelfAttention, a custom autograd pair
# with the explicit grad op, packed TND sequences, ring-attention merging), run unmodified with
# CPU tensors (tests/test_dropin.py runs scripts with .npu() and NPU device strings).
NPU_SCRIPT = textwrap.dedent('''
    import math
    import sys

    import torch
    import torch_npu


    class FlashSelfAttention(torch.nn.Module):
        """MindSpeed-style core attention: [S, B, H] in and out, causal, sparse_mode 2."""

        def __init__(self, head_num, head_dim, attention_dropout=0.0, sparse_mode=2):
            super().__init__()
            self.head_num = head_num
            self.scale = 1.0 / math.sqrt(head_dim)
            self.keep_prob = 1.0 - attention_dropout
            self.sparse_mode = sparse_mode
            self.register_buffer("attention_mask",
                                 torch.triu(torch.ones([2048, 2048], dtype=torch.bool), diagonal=1),
                                 persistent=False)

        def forward(self, q, k, v):
            output = torch_npu.npu_fusion_attention(
                q, k, v, self.head_num, "SBH",
                pse=None,
                padding_mask=None,
                atten_mask=self.attention_mask,
                scale=self.scale,
                pre_tockens=65536,
                next_tockens=0,
                keep_prob=self.keep_prob,
                inner_precise=0,
                sparse_mode=self.sparse_mode)[0]
            return output


    class AttentionWithExplicitGrad(torch.autograd.Function):
        """Forward and backward as separate NPU ops (as ring attention implementations do)."""

        @staticmethod
        def forward(ctx, q, k, v, n, mask, scale, keep_prob):
            out, smax, ssum, _, seed, offset, numels = torch_npu.npu_fusion_attention(
                q, k, v, n, "BSND", atten_mask=mask, scale=scale, keep_prob=keep_prob, sparse_mode=3)
            ctx.save_for_backward(q, k, v, mask, out, smax, ssum)
            ctx.meta = (n, scale, keep_prob, seed, offset, numels)
            AttentionWithExplicitGrad.drawn = (seed, offset)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, mask, out, smax, ssum = ctx.saved_tensors
            n, scale, keep_prob, seed, offset, numels = ctx.meta
            dq, dk, dv, _, _ = torch_npu.npu_fusion_attention_grad(
                q, k, v, dout, n, "BSND", pse=None, padding_mask=None, atten_mask=mask,
                softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=scale,
                keep_prob=keep_prob, seed=seed, offset=offset, numels=numels, sparse_mode=3)
            return dq, dk, dv, None, None, None, None


    def main(out_path):
        torch.manual_seed(1234)
        s, b, n, d = 48, 2, 4, 16
        q, k, v = (torch.randn(s, b, n * d, requires_grad=True) for _ in range(3))
        attn = FlashSelfAttention(n, d)
        out = attn(q, k, v)
        dy = torch.randn_like(out)
        out.backward(dy)

        mask = torch.triu(torch.ones([2048, 2048], dtype=torch.bool), diagonal=1)
        bq, bk, bv = (torch.randn(2, 40, n, d, requires_grad=True) for _ in range(3))
        out2 = AttentionWithExplicitGrad.apply(bq, bk, bv, n, mask, 0.25, 0.9)
        out2.sum().backward()

        # packed sequences: [T, N, D] with cumulative lengths
        tq, tk, tv = (torch.randn(60, n, d) for _ in range(3))
        out3, smax3, ssum3 = torch_npu.npu_fusion_attention(
            tq, tk, tv, n, "TND", atten_mask=mask, scale=0.25, sparse_mode=3,
            actual_seq_qlen=[20, 60], actual_seq_kvlen=[20, 60])[:3]

        # ring attention: attend to two halves of the keys, merge with the statistics
        full = torch_npu.npu_fusion_attention(q, k, v, n, "SBH", scale=0.25)
        h1 = torch_npu.npu_fusion_attention(q, k[:24], v[:24], n, "SBH", scale=0.25)
        h2 = torch_npu.npu_fusion_attention(q, k[24:], v[24:], n, "SBH", scale=0.25)
        merged = torch_npu.npu_ring_attention_update(h1[0], h1[1], h1[2], h2[0], h2[1], h2[2])

        torch.save(dict(module=torch_npu.__name__, q=q.detach(), k=k.detach(), v=v.detach(), dy=dy, out=out.detach(),
                        dq=q.grad, dk=k.grad, dv=v.grad,
                        bq=bq.detach(), bk=bk.detach(), bv=bv.detach(), out2=out2.detach(),
                        bdq=bq.grad, bdk=bk.grad, bdv=bv.grad, seed2=AttentionWithExplicitGrad.drawn,
                        tq=tq, tk=tk, tv=tv, out3=out3, smax3=smax3, ssum3=ssum3,
                        full=full[0], merged=merged[0], merged_max=merged[1], full_max=full[1]), out_path)


    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.fixture(scope="module")
def script_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("npu")
    script, out = d / "train_attention.py", d / "out.pt"
    script.write_text(NPU_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "fascore.tools.cli", "run", str(script), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out)


def _grads(q, k, v, dy, dtype, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = attention_oracle(*leaves, dtype=dtype, **kw)[0]
    return torch.autograd.grad(out, leaves, dy.to(out.dtype))


def test_script_forward_and_autograd_match_the_reference(script_results):
    r = script_results
    assert r["module"] == "torch_npu"
    kw = dict(head_num=4, input_layout="SBH", atten_mask=CAUSAL_MASK, scale=0.25, sparse_mode=2,
              pre_tokens=65536, next_tokens=0)
    ref = attention_oracle(r["q"], r["k"], r["v"], **kw)[0]
    naive = attention_oracle(r["q"], r["k"], r["v"], dtype=torch.float32, **kw)[0]
    assert_within_rule("out", r["out"], ref, naive, torch.float32)
    g64 = _grads(r["q"], r["k"], r["v"], r["dy"], torch.float64, **kw)
    g32 = _grads(r["q"], r["k"], r["v"], r["dy"], torch.float32, **kw)
    for name, got, want, nv in zip(("dq", "dk", "dv"), (r["dq"], r["dk"], r["dv"]), g64, g32):
        assert_within_rule(name, got, want, nv, torch.float32, factor=3.0)


def test_script_explicit_grad_op_with_dropout_matches_fascore(script_results):
    r = script_results
    q, k, v = (r[x].clone().requires_grad_(True) for x in ("bq", "bk", "bv"))
    mask = CAUSAL_MASK
    seed, offset = r["seed2"]  # drawn by the script (seed=0 was passed): it regenerates the mask
    assert seed != 0
    res = fascore.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=mask, scale=0.25, keep_prob=0.9,
                                       sparse_mode=3, seed=seed, offset=offset)
    assert torch.equal(res[0], r["out2"])
    res[0].sum().backward()
    for a, b in zip((q.grad, k.grad, v.grad), (r["bdq"], r["bdk"], r["bdv"])):
        assert torch.equal(a, b)
    ref = attention_oracle(q.detach(), k.detach(), v.detach(), 4, "BSND", atten_mask=mask, scale=0.25,
                           keep_prob=0.9, sparse_mode=3, seed=res[4], offset=res[5])[0]
    naive = attention_oracle(q.detach(), k.detach(), v.detach(), 4, "BSND", atten_mask=mask, scale=0.25,
                             keep_prob=0.9, sparse_mode=3, seed=res[4], offset=res[5], dtype=torch.float32)[0]
    assert_within_rule("out2", r["out2"], ref, naive, torch.float32)


def test_script_tnd_and_ring_update(script_results):
    r = script_results
    kw = dict(head_num=4, input_layout="TND", atten_mask=CAUSAL_MASK, scale=0.25, sparse_mode=3,
              actual_seq_qlen=[20, 60], actual_seq_kvlen=[20, 60])
    ref = attention_oracle(r["tq"], r["tk"], r["tv"], **kw)
    naive = attention_oracle(r["tq"], r["tk"], r["tv"], dtype=torch.float32, **kw)
    assert_within_rule("out3", r["out3"], ref[0], naive[0], torch.float32)
    torch.testing.assert_close(r["merged"], r["full"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["merged_max"], r["full_max"])


# ----------------------------------------------------------------------------------------------
# install / refuse to shadow / uninstall
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    yield
    compat.uninstall_torch_npu_shim()


def test_install_is_idempotent_and_uninstalls(no_torch_npu):
    shim = compat.install_torch_npu_shim()
    assert compat.install_torch_npu_shim() is shim
    import torch_npu
    assert torch_npu is shim and torch_npu.npu_fusion_attention is fascore.npu_fusion_attention
    for name in ("npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
                 "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3",
                 "npu_ring_attention_update", "_npu_dropout_gen_mask", "npu_dropout_gen_mask"):
        assert callable(getattr(torch_npu, name))
    assert compat.uninstall_torch_npu_shim() and "torch_npu" not in sys.modules
    assert not compat.uninstall_torch_npu_shim()


def test_refuses_to_shadow_an_installed_torch_npu(no_torch_npu, tmp_path, monkeypatch):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compat.real_torch_npu_available()
    with pytest.raises(RuntimeError, match="will not shadow"):
        compat.install_torch_npu_shim()
    assert "torch_npu" not in sys.modules


def test_refuses_to_shadow_an_imported_torch_npu(no_torch_npu, monkeypatch):
    import types
    real = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", real)
    with pytest.raises(RuntimeError, match="will not shadow"):
        compat.install_torch_npu_shim()
    assert sys.modules["torch_npu"] is real and not compat.uninstall_torch_npu_shim()


def test_ring_update_is_torch_npus(no_torch_npu):
    shim = compat.install_torch_npu_shim()
    assert shim.npu_ring_attention_update is fascore.npu_ring_attention_update
    with pytest.raises(TypeError):  # torch_npu's actual_seq_qlen / input_layout are keyword-only
        shim.npu_ring_attention_update(*([torch.zeros(1)] * 6), None, "SBH")
