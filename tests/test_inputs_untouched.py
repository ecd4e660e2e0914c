"""SPEC 1: the entry points never modify their inputs (checked with every engine: the
``engine`` fixture of conftest.py).

Every input (tensors, lists, tensors inside lists) is snapshotted before the call and compared
bitwise afterwards; tensor ``._version`` counters, shapes, strides, storage offsets, dtypes,
devices and ``requires_grad`` flags must be unchanged, and list arguments must keep their
contents."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import fascore
from fascore import aclnn

B, N1, N2, S, D = 2, 4, 2, 16, 8
I32MAX = 2147483647
_GEN = torch.Generator().manual_seed(777)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_GEN, dtype=torch.float64).to(dtype)


@functools.lru_cache(maxsize=None)
def _triu2048():
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def cmask(dtype=torch.bool):
    return _triu2048().clone().to(dtype)


def pmask(dtype=torch.bool):
    bottom = torch.cat([torch.zeros(1024, 1024, dtype=torch.bool),
                        torch.ones(1024, 1024, dtype=torch.bool)], 1)
    return torch.cat([_triu2048(), bottom], 0).to(dtype)


def dmask(nbytes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def _bits(t):
    t = t.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


class Snapshot:
    def __init__(self, *objs):
        self.items = []
        for o in objs:
            self._add(o, "arg")

    def _add(self, o, path):
        if torch.is_tensor(o):
            self.items.append((path, o, dict(
                bits=_bits(o), version=o._version, shape=tuple(o.shape), stride=o.stride(),
                offset=o.storage_offset(), dtype=o.dtype, device=o.device,
                requires_grad=o.requires_grad, grad=None if o.grad is None else o.grad.clone())))
        elif isinstance(o, dict):
            for k, v in o.items():
                self._add(v, f"{path}.{k}")
        elif isinstance(o, (list, tuple)):
            self.items.append((path, o, dict(seq=list(o), len=len(o))))
            for i, v in enumerate(o):
                if torch.is_tensor(v) or isinstance(v, (list, tuple, dict)):
                    self._add(v, f"{path}[{i}]")

    def verify(self, allow_grad=False):
        for path, o, st in self.items:
            if torch.is_tensor(o):
                assert o._version == st["version"], f"{path}: _version changed (in-place write)"
                assert tuple(o.shape) == st["shape"], f"{path}: shape changed"
                assert o.stride() == st["stride"], f"{path}: stride changed"
                assert o.storage_offset() == st["offset"], f"{path}: storage offset changed"
                assert o.dtype == st["dtype"] and o.device == st["device"], path
                assert o.requires_grad == st["requires_grad"], f"{path}: requires_grad changed"
                assert torch.equal(_bits(o), st["bits"]), f"{path}: contents changed"
                if not allow_grad:
                    if st["grad"] is None:
                        assert o.grad is None, f"{path}: .grad was set"
                    else:
                        assert torch.equal(o.grad, st["grad"]), f"{path}: .grad changed"
            else:
                assert len(o) == st["len"], f"{path}: list length changed"
                cur = list(o)
                for a, b in zip(cur, st["seq"]):
                    assert a is b or (not torch.is_tensor(a) and a == b), f"{path}: list changed"


def call_untouched(fn, *args, **kwargs):
    snap = Snapshot(list(args), kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fn(*args, **kwargs)
    snap.verify()
    return res


# --------------------------------------------------------------------------------------------
# forward entry points
# --------------------------------------------------------------------------------------------
def _fwd_cases():
    cases = {}
    # fp16 with full pse (type 1), explicit mask with band, generated dropout, sink
    cases["v2-BSND-f16-pse1-mask-band-gen-dropout-sink"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(B, S, N1, D, dtype=torch.float16), rnd(B, S, N2, D, dtype=torch.float16),
         rnd(B, S, N2, D, dtype=torch.float16), N1, "BSND"),
        dict(pse=rnd(B, N1, S, S, dtype=torch.float16),
             atten_mask=torch.rand(B, 1, S, S, generator=_GEN) < 0.3, pre_tokens=5,
             next_tokens=3, keep_prob=0.8, sink=rnd(N1), scale=0.4))
    # BSH: pse type 0 broadcast rows, compressed uint8 mask mode 3, explicit dropout mask
    cases["v2-BSH-pse0-mode3-uint8-dropout-mask"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(B, 12, N1 * D), rnd(B, 20, N2 * D), rnd(B, 20, N2 * D), N1, "BSH"),
        dict(pse=rnd(1, N1, 1, 20), pse_type=0, atten_mask=cmask(torch.uint8), sparse_mode=3,
             keep_prob=0.6, dropout_mask=dmask(B * N1 * 12 * 20 // 8)))
    # BNSD: ALiBi sqrt slopes with start indices (lists)
    cases["v2-BNSD-alibi3-start-idx"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(B, N1, S, D), rnd(B, N2, S, D), rnd(B, N2, S, D), N1, "BNSD"),
        dict(pse=torch.rand(N1, generator=_GEN), pse_type=3, q_start_idx=[2], kv_start_idx=[1]))
    # v1 SBH bf16: prefix mode 5 with uint8 mask, prefix list
    cases["v1-SBH-bf16-mode5-prefix"] = (
        fascore.npu_fusion_attention,
        (rnd(S, B, N1 * D, dtype=torch.bfloat16), rnd(S, B, N2 * D, dtype=torch.bfloat16),
         rnd(S, B, N2 * D, dtype=torch.bfloat16), N1, "SBH"),
        dict(atten_mask=(torch.rand(B, N1, S, S, generator=_GEN) < 0.2).to(torch.uint8),
             sparse_mode=5, prefix=[3, 11], pre_tockens=100, next_tockens=0))
    # TND with tensor seq lens, mode 7, sink, softmax_layout TND, explicit dropout mask
    cases["v2-TND-tensor-lens-mode7-sink-dropout"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(16, N1, D), rnd(20, N2, D), rnd(20, N2, D), N1, "TND"),
        dict(actual_seq_qlen=torch.tensor([6, 16]), actual_seq_kvlen=torch.tensor([8, 20]),
             atten_mask=cmask(), sparse_mode=7, sink=rnd(N1), softmax_layout="TND",
             keep_prob=0.7, dropout_mask=dmask(N1 * (6 * 8 + 10 * 12) // 8), pre_tokens=4,
             next_tokens=1))
    # TND with list seq lens, mode 6, prefix list
    cases["v2-TND-list-lens-mode6-prefix"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(16, N1, D), rnd(20, N2, D), rnd(20, N2, D), N1, "tnd"),
        dict(actual_seq_qlen=[6, 16], actual_seq_kvlen=[8, 20], atten_mask=pmask(),
             sparse_mode=6, prefix=[2, 12]))
    # TND with trailing-zero padding and uncovered query rows, full [T1, T2] mask
    cases["v2-TND-padding-full-mask"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(18, N1, D), rnd(22, N2, D), rnd(22, N2, D), N1, "TND"),
        dict(actual_seq_qlen=[6, 16, 0], actual_seq_kvlen=[8, 20, 0],
             atten_mask=torch.rand(18, 22, generator=_GEN) < 0.3, pre_tokens=4, next_tokens=4))
    # TND compressed pse, causal mode 3
    cases["v2-TND-compressed-pse"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(16, 2, D), rnd(16, 1, D), rnd(16, 1, D), 2, "TND"),
        dict(actual_seq_qlen=[6, 16], actual_seq_kvlen=[6, 16], pse=rnd(1, 2, 1024, 10),
             atten_mask=cmask(), sparse_mode=3))
    # rope + prefix compressed mode 6
    cases["v2-BSND-rope-mode6"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(B, S, N1, D), rnd(B, S, N2, D), rnd(B, S, N2, 4), N1, "BSND"),
        dict(query_rope=rnd(B, S, N1, 4), key_rope=rnd(B, S, N2, 4), atten_mask=pmask(),
             sparse_mode=6, prefix=[0, 16]))
    # non-contiguous views and zero-stride expanded tensors, float64
    base_q = rnd(B, N1, S, D, dtype=torch.float64)
    cases["v2-f64-noncontiguous-views"] = (
        fascore.npu_fusion_attention_v2,
        (base_q.transpose(1, 2), rnd(1, S, N2, D, dtype=torch.float64).expand(B, S, N2, D),
         rnd(B, S, N2, 2 * D, dtype=torch.float64)[..., ::2], N1, "BSND"),
        dict(pse=rnd(1, N1, 1, S, dtype=torch.float64).expand(B, N1, S, S),
             atten_mask=(torch.rand(S, S, generator=_GEN) < 0.3).t(), sparse_mode=1))
    # ALiBi-compressed external pse (Sq > 1024), mode 2
    cases["v2-compressed-pse-mode2"] = (
        fascore.npu_fusion_attention_v2,
        (rnd(1, 1040, 1, D), rnd(1, 1040, 1, D), rnd(1, 1040, 1, D), 1, "BSND"),
        dict(pse=rnd(1, 1, 1024, 1040), atten_mask=cmask(), sparse_mode=2))
    return cases


FWD_CASES = list(_fwd_cases())


@pytest.mark.parametrize("name", FWD_CASES)
def test_forward_inputs_untouched(name, engine):
    fn, args, kw = _fwd_cases()[name]
    res = call_untouched(fn, *args, **kw)
    assert len(res) == 7


def test_forward_generated_dropout_with_seed_inputs_untouched(engine):
    q, k = rnd(B, S, N1, D), rnd(B, S, N2, D)
    for seed, offset in [(0, 0), (123, 45)]:
        call_untouched(fascore.npu_fusion_attention_v2, q, k, k, N1, "BSND", keep_prob=0.5,
                       seed=seed, offset=offset)


# --------------------------------------------------------------------------------------------
# grad entry points (statistics and attention_in are inputs, too)
# --------------------------------------------------------------------------------------------
def _fwd(fn, args, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def test_grad_v1_inputs_untouched(engine):
    q, k, v = rnd(B, S, N1, D), rnd(B, S, N2, D), rnd(B, S, N2, D)
    kw = dict(pse=rnd(B, N1, S, S), atten_mask=torch.rand(S, S, generator=_GEN) < 0.3,
              keep_prob=0.75, dropout_mask=dmask(B * N1 * S * S // 8), sink=rnd(N1),
              pre_tockens=6, next_tockens=2)
    out, smax, ssum = _fwd(fascore.npu_fusion_attention, (q, k, v, N1, "BSND"),
                           dict(kw, scale=0.5))[:3]
    dy = rnd(*out.shape)
    res = call_untouched(fascore.npu_fusion_attention_grad, q, k, v, dy, N1, "BSND",
                         softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=0.5,
                         softmax_in=torch.empty(0), **kw)
    assert len(res) == 5


def test_grad_v2_tnd_rope_sink_inputs_untouched(engine):
    q, k, v = rnd(16, N1, D), rnd(20, N2, D), rnd(20, N2, D)
    kw = dict(actual_seq_qlen=[4, 16], actual_seq_kvlen=[6, 20], atten_mask=cmask(),
              sparse_mode=8, sink=rnd(N1), softmax_layout="TND", query_rope=rnd(16, N1, 4),
              key_rope=rnd(20, N2, 4), pre_tokens=3, next_tokens=2)
    out, smax, ssum = _fwd(fascore.npu_fusion_attention_v2, (q, k, v, N1, "TND"), kw)[:3]
    dy = rnd(*out.shape)
    res = call_untouched(fascore.npu_fusion_attention_grad_v2, q, k, v, dy, N1, "TND",
                         softmax_max=smax, softmax_sum=ssum, attention_in=out, **kw)
    assert len(res) == 7


def test_grad_v2_alibi_pse0_inputs_untouched(engine):
    q, k, v = rnd(B, N1, S, D), rnd(B, N2, S, D), rnd(B, N2, S, D)
    for kw in [dict(pse=torch.rand(B, N1, generator=_GEN), pse_type=2, q_start_idx=[1],
                    kv_start_idx=[3]),
               dict(pse=rnd(1, N1, 1, S), pse_type=0, atten_mask=cmask(), sparse_mode=4,
                    pre_tokens=5, next_tokens=0)]:
        out, smax, ssum = _fwd(fascore.npu_fusion_attention_v2, (q, k, v, N1, "BNSD"), kw)[:3]
        dy = rnd(*out.shape)
        call_untouched(fascore.npu_fusion_attention_grad_v2, q, k, v, dy, N1, "BNSD",
                       softmax_max=smax, softmax_sum=ssum, attention_in=out, **kw)


def test_autograd_backward_leaves_input_data_untouched(engine):
    q = rnd(B, S, N1, D).requires_grad_(True)
    k = rnd(B, S, N2, D).requires_grad_(True)
    v = rnd(B, S, N2, D).requires_grad_(True)
    pse = rnd(1, N1, S, S).requires_grad_(True)
    sink = rnd(N1).requires_grad_(True)
    mask = torch.rand(S, S, generator=_GEN) < 0.2
    snap = Snapshot([q, k, v, pse, sink, mask])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fascore.npu_fusion_attention_v2(q, k, v, N1, "BSND", pse=pse, sink=sink,
                                              atten_mask=mask)[0]
    out.backward(rnd(*out.shape))
    snap.verify(allow_grad=True)
    for t in (q, k, v, pse, sink):
        assert t.grad is not None and t.grad.shape == t.shape


# --------------------------------------------------------------------------------------------
# aclnn: inputs untouched, only the outputs are written
# --------------------------------------------------------------------------------------------
def test_aclnn_forward_and_grad_inputs_untouched(engine):
    q, k, v = rnd(B, S, N1 * D), rnd(B, S, N2 * D), rnd(B, S, N2 * D)
    pse = rnd(B, N1, S, S)
    drop = dmask(B * N1 * S * S // 8, seed=5)
    mask = pmask()
    prefix = [3, 16]
    smax = torch.full((B, N1, S, 8), float("nan"))
    ssum = torch.full((B, N1, S, 8), float("nan"))
    out = torch.full((B, S, N1 * D), float("nan"))
    inputs = [q, k, v, pse, drop, mask, prefix]
    snap = Snapshot(inputs)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
        q, k, v, pse, drop, None, mask, prefix, None, None, 0.5, 0.8, I32MAX, I32MAX, N1, "BSH",
        0, 6, 1, smax, ssum, None, out)
    assert st == 0, aclnn.get_recent_err_msg()
    snap.verify()
    assert aclnn.aclnnFlashAttentionScoreV2(
        torch.empty(ws, dtype=torch.uint8) if ws else None, ws, ex, None) == 0
    snap.verify()
    assert not torch.isnan(out).any()

    dy = rnd(B, S, N1 * D)
    ginputs = inputs + [dy, smax, ssum, out]
    gsnap = Snapshot(ginputs)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpse = torch.empty_like(pse)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradV2GetWorkspaceSize(
        q, k, v, dy, pse, drop, None, mask, smax, ssum, None, out, prefix, None, None, 0.5, 0.8,
        I32MAX, I32MAX, N1, "BSH", 0, 6, 1, dq, dk, dv, dpse)
    assert st == 0, aclnn.get_recent_err_msg()
    assert aclnn.aclnnFlashAttentionScoreGradV2(
        torch.empty(ws, dtype=torch.uint8) if ws else None, ws, ex, None) == 0
    gsnap.verify()


def test_failed_call_leaves_inputs_untouched(engine):
    q, k = rnd(B, S, N1, D), rnd(B, S, N2, D)
    mask = cmask()
    snap = Snapshot([q, k, mask])
    with pytest.raises(fascore.FlashAttentionError):
        fascore.npu_fusion_attention_v2(q, k, k, N1, "BSND", atten_mask=mask, sparse_mode=4,
                                        pre_tokens=-3, next_tokens=1)
    snap.verify()
