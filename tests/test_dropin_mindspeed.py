"""MindSpeed's fused-op builders on fascore (fascore.compat.mindspeed).

A minimal ``mindspeed`` package is written for the tests: its builders, ``ops.fusion_attention_v2``
and ``ops.npu_ring_attention_update`` have the interface of Ascend/MindSpeed's
``mindspeed/op_builder/`` and ``mindspeed/ops/`` (the builders' ``load()`` would compile C++
against CANN, here it fails as it does without CANN; the ops call the loaded extension with its
positional signatures). With the stand-in installed, MindSpeed's v2 attention (ALiBi included)
and its fused ring merge run on fascore.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import fascore
from fascore import compat

PKG = {
    "mindspeed/__init__.py": "",
    "mindspeed/op_builder/__init__.py": """
        from .fusion_attention_v2_builder import FusionAttentionV2OpBuilder
        from .npu_ring_attention_update_builder import RingAttentionUpdateOpBuilder
        __all__ = ["FusionAttentionV2OpBuilder", "RingAttentionUpdateOpBuilder"]
    """,
    "mindspeed/op_builder/builder.py": """
        import os
        import torch_npu
        import mindspeed


        class MindSpeedOpBuilder:
            _loaded_ops = {}

            def __init__(self, name):
                self.name = name
                self._cann_path = os.environ.get("ASCEND_HOME_PATH")
                self._torch_npu_path = os.path.dirname(os.path.abspath(torch_npu.__file__))

            def sources(self):
                raise NotImplementedError

            def load(self, verbose=True):
                # MindSpeed compiles self.sources() with torch.utils.cpp_extension.load against CANN
                raise RuntimeError(f"cannot build {self.name}: CANN (ASCEND_HOME_PATH) and torch_npu's headers are "
                                   "needed")
    """,
    "mindspeed/op_builder/fusion_attention_v2_builder.py": """
        from mindspeed.op_builder.builder import MindSpeedOpBuilder


        class FusionAttentionV2OpBuilder(MindSpeedOpBuilder):
            OP_NAME = "fusion_attention_v2"

            def __init__(self):
                super().__init__(self.OP_NAME)

            def sources(self):
                return ["ops/csrc/cann/fusion_attention_v2.cpp"]
    """,
    "mindspeed/op_builder/npu_ring_attention_update_builder.py": """
        from mindspeed.op_builder.builder import MindSpeedOpBuilder


        class RingAttentionUpdateOpBuilder(MindSpeedOpBuilder):
            OP_NAME = "npu_ring_attention_update"

            def __init__(self):
                super().__init__(self.OP_NAME)

            def sources(self):
                return ["ops/csrc/cann/npu_ring_attention_update.cpp"]
    """,
    "mindspeed/ops/__init__.py": "",
    "mindspeed/ops/fusion_attention_v2.py": """
        import torch
        from mindspeed.op_builder import FusionAttentionV2OpBuilder


        class FusionAttentionV2Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                        keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                        sparse_mode, gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx):
                ops = FusionAttentionV2OpBuilder().load()
                outputs = ops.npu_fusion_attention_v2(
                    query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                    pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                    gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)
                attention_in, softmax_max, softmax_sum, softmax_in, seed, offset, numels = outputs
                ctx.save_for_backward(query, key, value, pse, padding_mask, atten_mask, attention_in, softmax_max,
                                      softmax_sum, softmax_in)
                ctx.args = (head_num, input_layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, seed,
                            offset, numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                            gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)
                return outputs

            @staticmethod
            def backward(ctx, grad_outputs, *unused):
                (query, key, value, pse, padding_mask, atten_mask, attention_in, softmax_max, softmax_sum,
                 softmax_in) = ctx.saved_tensors
                (head_num, input_layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, seed, offset,
                 numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, pse_type,
                 q_start_idx, kv_start_idx) = ctx.args
                ops = FusionAttentionV2OpBuilder().load()
                results = ops.npu_fusion_attention_grad_v2(
                    query, key, value, grad_outputs, head_num, input_layout, pse, padding_mask, atten_mask,
                    softmax_max, softmax_sum, softmax_in, attention_in, scale, keep_prob, pre_tokens, next_tokens,
                    inner_precise, seed, offset, numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                    gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)
                return (results[0], results[1], results[2], None, None, results[3]) + (None,) * 16


        def npu_fusion_attention(query, key, value, head_num, input_layout, *, pse=None, padding_mask=None,
                                 atten_mask=None, scale=1., keep_prob=1., pre_tokens=2147483647,
                                 next_tokens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                                 pse_type=1, q_start_idx=None, kv_start_idx=None):
            return FusionAttentionV2Function.apply(
                query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
                pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
                gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx)
    """,
    "mindspeed/ops/npu_ring_attention_update.py": """
        import torch
        from mindspeed.op_builder import RingAttentionUpdateOpBuilder

        op_builder = RingAttentionUpdateOpBuilder()


        def npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
                                      cur_softmax_max, cur_softmax_sum, actual_seq_qlen=None, layout="SBH"):
            ops = op_builder.load()
            return ops.npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out,
                                                 cur_softmax_max, cur_softmax_sum, actual_seq_qlen, layout)
    """,
}
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _drop_mindspeed():
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        del sys.modules[name]


@pytest.fixture
def mindspeed_pkg(tmp_path, monkeypatch):
    for rel, text in PKG.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    compat.uninstall_torch_npu_shim()
    _drop_mindspeed()
    yield tmp_path
    compat.uninstall_torch_npu_shim()
    _drop_mindspeed()


def _alibi_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, n, d = 2, 64, 4, 16
    q, k, v = (torch.randn(b, s, n * d, generator=g).requires_grad_(True) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / n) for i in range(n)], dtype=torch.float32)
    return q, k, v, n, slopes


def test_builders_are_replaced_when_mindspeed_is_imported_after_install(mindspeed_pkg):
    compat.install_torch_npu_shim(device="cpu")
    from mindspeed.ops.fusion_attention_v2 import npu_fusion_attention

    q, k, v, n, slopes = _alibi_inputs()
    kw = dict(pse=slopes, atten_mask=CAUSAL, scale=0.25, pre_tokens=65536, next_tokens=0, sparse_mode=2, pse_type=2)
    out = npu_fusion_attention(q, k, v, n, "BSH", **kw)
    assert len(out) == 7 and isinstance(out[4], int)
    dy = torch.randn_like(out[0])
    out[0].backward(dy)
    got = [t.grad.clone() for t in (q, k, v)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    want = fascore.npu_fusion_attention_v2(*leaves, n, "BSH", **kw)
    want[0].backward(dy)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    for a, b in zip(got, leaves):
        assert torch.equal(a, b.grad)


def test_mindspeed_dropout_path_passes_the_drawn_seed_to_the_grad(mindspeed_pkg):
    compat.install_torch_npu_shim(device="cpu")
    from mindspeed.op_builder import FusionAttentionV2OpBuilder
    from mindspeed.ops.fusion_attention_v2 import npu_fusion_attention

    q, k, v, n, _ = _alibi_inputs(1)
    out = npu_fusion_attention(q, k, v, n, "BSH", atten_mask=CAUSAL, scale=0.25, keep_prob=0.8, sparse_mode=2)
    seed, offset, numels = out[4:]
    assert seed != 0 and numels == 2 * n * 64 * 64
    dy = torch.randn_like(out[0])
    out[0].backward(dy)
    ops = FusionAttentionV2OpBuilder().load()
    dq, dk, dv, dpse = ops.npu_fusion_attention_grad_v2(
        q.detach(), k.detach(), v.detach(), dy, n, "BSH", None, None, CAUSAL, out[1], out[2], out[3],
        out[0].detach(), 0.25, 0.8, 2147483647, 2147483647, 0, seed, offset, numels, None, None, None, 2, True, False,
        1, None, None)
    assert dpse is None
    for a, b in zip((dq, dk, dv), (q.grad, k.grad, v.grad)):
        assert torch.equal(a, b)
    ref = fascore.npu_fusion_attention_v2(q.detach(), k.detach(), v.detach(), n, "BSH", atten_mask=CAUSAL,
                                          scale=0.25, keep_prob=0.8, sparse_mode=2, seed=seed, offset=offset)
    assert torch.equal(ref[0], out[0].detach())


def test_ring_attention_update_builder(mindspeed_pkg):
    compat.install_torch_npu_shim(device="cpu")
    from mindspeed.ops.npu_ring_attention_update import npu_ring_attention_update

    g = torch.Generator().manual_seed(2)
    s, b, n, d = 32, 2, 2, 8
    q, k, v = (torch.randn(s, b, n * d, generator=g) for _ in range(3))
    full = fascore.npu_fusion_attention(q, k, v, n, "SBH", scale=0.3)
    h1 = fascore.npu_fusion_attention(q, k[:12], v[:12], n, "SBH", scale=0.3)
    h2 = fascore.npu_fusion_attention(q, k[12:], v[12:], n, "SBH", scale=0.3)
    merged = npu_ring_attention_update(h1[0], h1[1], h1[2], h2[0], h2[1], h2[2])
    assert isinstance(merged, list) and len(merged) == 3
    torch.testing.assert_close(merged[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[1], full[1])
    # TND with MindSpeed's positional actual_seq_qlen / layout
    tq, tk, tv = (torch.randn(20, n, d, generator=g) for _ in range(3))
    lens = [8, 20]
    tf = fascore.npu_fusion_attention(tq, tk, tv, n, "TND", actual_seq_qlen=lens, actual_seq_kvlen=lens)
    t1 = fascore.npu_fusion_attention(tq, tk[:10], tv[:10], n, "TND", actual_seq_qlen=lens, actual_seq_kvlen=[5, 10])
    t2 = fascore.npu_fusion_attention(tq, tk[10:], tv[10:], n, "TND", actual_seq_qlen=lens, actual_seq_kvlen=[3, 10])
    # batch 0 sees keys [0, 5) in part 1 and [10, 13) in part 2, batch 1 keys [5, 10) and [13, 20)
    idx0, idx1 = list(range(0, 5)) + list(range(10, 13)), list(range(5, 10)) + list(range(13, 20))
    tm = npu_ring_attention_update(t1[0], t1[1], t1[2], t2[0], t2[1], t2[2], torch.tensor(lens), "TND")
    for rows, keys in ((slice(0, 8), idx0), (slice(8, 20), idx1)):
        ref = fascore.npu_fusion_attention(tq[rows], tk[keys], tv[keys], n, "TND", actual_seq_qlen=[rows.stop - rows.start],
                                           actual_seq_kvlen=[len(keys)])[0]
        torch.testing.assert_close(tm[0][rows], ref, rtol=1e-5, atol=1e-6)
    assert tf[0].shape == tm[0].shape


def test_builders_patched_when_mindspeed_was_imported_first_and_restored_on_uninstall(mindspeed_pkg):
    compat.install_torch_npu_shim()  # no device mapping needed for the operators
    import mindspeed.op_builder as ob

    assert ob.FusionAttentionV2OpBuilder().load().npu_fusion_attention_v2 is not None
    compat.uninstall_torch_npu_shim()
    with pytest.raises(RuntimeError, match="CANN"):
        ob.FusionAttentionV2OpBuilder().load()
    with pytest.raises(RuntimeError, match="CANN"):
        ob.RingAttentionUpdateOpBuilder().load()
    compat.install_torch_npu_shim()  # mindspeed is imported already: patched at once
    ops = ob.RingAttentionUpdateOpBuilder().load()
    assert callable(ops.npu_ring_attention_update)
    assert callable(ob.FusionAttentionV2OpBuilder().load().npu_fusion_attention_grad_v2)
