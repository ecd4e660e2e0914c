"""``fascore compare`` and ``fascore.tools.capture``: replay bundles and msprobe dumps with injected
faults (a corrupted head, bf16-rounded logits, a wrong sparse mode, NaNs in a row, a wrong mask
shape) are found, located and exit 1; clean records pass and exit 0; heatmaps have their axes.

The msprobe dumps are written here in msprobe's PyTorch format (``dump.json`` "data" keyed by
``NPU.<api>.<n>.forward|backward`` with input_args / input_kwargs / output, tensors in
``dump_tensor_data/<entry>.<input|kwargs|output>.<index|name>.pt``), as checked against dumps made
by mindstudio-probe 26.2.0 on the CPU. ``FASCORE_MSPROBE_PYTHON`` (a Python with msprobe and this
fascore importable) also runs msprobe itself to make a real dump.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fascore
from fascore.tools import capture as cap
from fascore.tools import compare as cmp

B, S, N, D = 2, 64, 4, 16
BLOCK = 16
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@pytest.fixture(autouse=True)
def _small_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def qkv(dtype=torch.bfloat16, sq=S, skv=S, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, s, N * D, generator=g).to(dtype) for s in (sq, skv, skv)]
    if requires_grad:
        t = [x.requires_grad_(True) for x in t]
    return t


def forward_record(name="call", api="npu_fusion_attention", dtype=torch.bfloat16, sq=S, skv=S, seed=0,
                   backward=False, **kw):
    """A Record of a call as fascore's reference computes it (the 'NPU' output, to be corrupted)."""
    q, k, v = qkv(dtype, sq, skv, seed, requires_grad=backward)
    with fascore.use_engine("reference"):
        res = getattr(fascore, api)(q, k, v, N, "BSH", **kw)
    bw = None
    if backward:
        dy = torch.randn(res[0].shape, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
        grads = torch.autograd.grad(res[0], [q, k, v], dy)
        bw = {"dy": dy, "grads": {"query": grads[0], "key": grads[1], "value": grads[2]}}
        q, k, v = q.detach(), k.detach(), v.detach()
    outs = [r.detach() if isinstance(r, torch.Tensor) else r for r in res]
    return cmp.Record(name, api, [q, k, v, N, "BSH"], dict(kw), outs, bw, "test")


def run(recs, tmp_path=None, **kw):
    opts = cmp.Options(block=BLOCK, out_dir=tmp_path, **kw)
    out = []
    for r in recs:
        out += cmp.compare_record(r, opts)
    return out


def tensor(call, name):
    return next(t for t in call.tensors if t.name == name)


def bsh_head(x, h):
    """The hidden slice of head h in a BSH tensor."""
    return x[..., h * D:(h + 1) * D]


# --------------------------------------------------------------------------- a dense "NPU" with bf16 logits
def bf16_logits_forward(q, k, v, scale, causal):
    """attention with the logits rounded to bf16 before the softmax (the fault SPEC 3 forbids)."""
    def heads(x):
        return x.float().reshape(B, x.shape[1], N, D).permute(0, 2, 1, 3)
    qh, kh, vh = heads(q), heads(k), heads(v)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.to(torch.bfloat16).float()
    if causal:
        s = s.masked_fill(torch.triu(torch.ones(s.shape[-2:], dtype=torch.bool), 1), float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    l = p.sum(-1)
    o = (p / l[..., None]).to(q.dtype).float() @ vh
    out = o.permute(0, 2, 1, 3).reshape(B, q.shape[1], N * D).to(q.dtype)
    return out, m[..., None].expand(*m.shape, 8).contiguous(), l[..., None].expand(*l.shape, 8).contiguous()


# =========================================================================== bundles: faults found
def test_clean_records_pass():
    recs = [forward_record("clean mode 2", atten_mask=CAUSAL, sparse_mode=2, scale=0.25, backward=True),
            forward_record("clean fp32 v2", api="npu_fusion_attention_v2", dtype=torch.float32, sq=40, skv=72,
                           scale=0.3, atten_mask=CAUSAL, sparse_mode=3)]
    calls = run(recs)
    assert [c.kind for c in calls] == ["forward", "backward", "forward"]
    assert all(c.verdict == cmp.WITHIN for c in calls), [(c.name, c.message) for c in calls]
    names = {t.name for c in calls for t in c.tensors}
    assert names == {"attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv"}
    t = tensor(calls[0], "attention_out")
    assert t.fascore_ok and t.max_err <= t.bound and t.frac_beyond <= 0.005


def test_corrupted_head_is_found():
    rec = forward_record("bad head", scale=0.25)
    rec.outputs[0] = rec.outputs[0].clone()
    h = bsh_head(rec.outputs[0], 2)
    h += 0.05 * torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(h.dtype)
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    t = tensor(call, "attention_out")
    assert not t.ok and t.bad_heads == [2]
    assert [h["head"] for h in t.heads if h["n_beyond"]] == [2]
    assert t.worst_tiles and {x["head"] for x in t.worst_tiles} == {2}
    assert tensor(call, "softmax_max").ok and tensor(call, "softmax_sum").ok
    assert "heads 2 of 4" in call.message


def test_bf16_rounded_logits_are_found():
    q, k, v = qkv(torch.bfloat16, seed=5)
    out, m, l = bf16_logits_forward(q, k, v, 0.25, causal=True)
    rec = cmp.Record("bf16 logits", "npu_fusion_attention", [q, k, v, N, "BSH"],
                     {"atten_mask": CAUSAL, "sparse_mode": 2, "scale": 0.25},
                     [out, m, l, torch.empty(0, dtype=q.dtype), 0, 0, B * N * S * S], None, "test")
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    smax = tensor(call, "softmax_max")
    assert not smax.ok and smax.bound > 10  # ~1e-2 relative: far beyond 1e-5
    assert len(smax.bad_heads) == N  # everywhere, not one head
    assert any("rounded to bf16" in d for d in call.diagnosis), call.diagnosis


def test_wrong_sparse_mode_is_found_and_named():
    # the "NPU" ran rightDownCausal (3) although the call says leftUpCausal (2); Sq < Skv
    rec = forward_record("wrong mode", dtype=torch.float32, sq=48, skv=80, atten_mask=CAUSAL, sparse_mode=3, scale=0.25)
    rec.kwargs["sparse_mode"] = 2
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    t = tensor(call, "attention_out")
    assert not t.ok and t.bad_heads == list(range(N))
    assert any("sparse_mode=3" in d and "matches" in d for d in call.diagnosis), call.diagnosis
    assert not any("sparse_mode=1" in d for d in call.diagnosis)


def test_mask_rows_error_is_located_in_query_blocks():
    # the "NPU" ignored rows 32..47 of the user's mask (mode 0): only query block 2 differs
    mask = torch.rand(S, S, generator=torch.Generator().manual_seed(8)) < 0.3
    npu_mask = mask.clone()
    npu_mask[32:48] = False
    rec = forward_record("mask rows", dtype=torch.float32, atten_mask=npu_mask, scale=0.25)
    rec.kwargs["atten_mask"] = mask
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    for name in ("attention_out", "softmax_max", "softmax_sum"):
        t = tensor(call, name)
        assert not t.ok and t.bad_blocks == [2] and t.bad_heads == list(range(N)), name
        assert {x["q_block"] for x in t.worst_tiles} == {2} and t.worst_tiles[0]["rows"] == "32-47"
    assert "query blocks 2 of 4" in call.message
    assert not any("matches" in d for d in call.diagnosis)


def test_nan_row_is_located():
    rec = forward_record("nan row", scale=0.25)
    out = rec.outputs[0].clone()
    out[1, 37, 3 * D:4 * D] = float("nan")  # batch 1, query row 37, head 3
    rec.outputs[0] = out
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    t = tensor(call, "attention_out")
    assert t.n_nan == D and t.max_err == math.inf
    assert t.nonfinite_rows == [{"batch": 1, "head": 3, "row": 37}]
    assert t.bad_heads == [3] and t.bad_blocks == [37 // BLOCK]
    assert "NaN" in call.message and "row 37" in call.message


def test_invalid_rows_that_differ():
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[5] = True  # query row 5 takes part nowhere: an invalid row
    rec = forward_record("invalid row", dtype=torch.float32, atten_mask=mask, scale=0.25)
    clean = run([rec])[0]
    assert clean.verdict == cmp.WITHIN and clean.invalid_rows["ref_invalid"] == B * N
    assert clean.invalid_rows["differ"] == 0
    # an NPU without invalid-row correction: an average instead of zeros, ordinary statistics
    rec.outputs = list(rec.outputs)
    rec.outputs[0] = rec.outputs[0].clone()
    rec.outputs[0][0, 5, :D] = 0.3
    rec.outputs[1] = rec.outputs[1].clone()
    rec.outputs[1][0, 0, 5] = 0.0
    (call,) = run([rec])
    assert call.verdict == cmp.OUT
    assert call.invalid_rows["differ"] == 1
    assert call.invalid_rows["positions"][0] == {"batch": 0, "head": 0, "row": 5, "reference": "invalid",
                                                 "recorded": "valid"}
    assert not tensor(call, "softmax_max").ok


def test_wrong_mask_shape_is_inputs_invalid():
    rec = forward_record("bad mask", dtype=torch.float32, scale=0.25)
    rec.kwargs["atten_mask"] = torch.zeros(S, S + 1, dtype=torch.bool)
    (call,) = run([rec])
    assert call.verdict == cmp.INVALID
    assert call.status == fascore.ACLNN_ERR_PARAM_INVALID
    assert "atten_mask" in call.message


def test_corrupted_gradient_head_and_key_block():
    rec = forward_record("bad dk", dtype=torch.float32, scale=0.25, backward=True)
    dk = rec.backward["grads"]["key"].clone()
    dk[0, 20:28, 1 * D:2 * D] += 0.5  # kv head 1, key rows 20..27 (key block 1)
    rec.backward["grads"]["key"] = dk
    fw, bw = run([rec])
    assert fw.verdict == cmp.WITHIN and bw.verdict == cmp.OUT
    t = tensor(bw, "dk")
    assert not t.ok and t.bad_heads == [1] and t.bad_blocks == [1] and t.row_axis == "key"
    assert t.worst_tiles[0]["k_block"] == 1
    assert tensor(bw, "dq").ok and tensor(bw, "dv").ok


def test_grad_op_record():
    q, k, v = qkv(torch.float32, seed=2)
    with fascore.use_engine("reference"):
        o = fascore.npu_fusion_attention(q, k, v, N, "BSH", atten_mask=CAUSAL, sparse_mode=2, scale=0.25)
        dy = torch.randn(o[0].shape, generator=torch.Generator().manual_seed(1))
        g = fascore.npu_fusion_attention_grad(q, k, v, dy, N, "BSH", atten_mask=CAUSAL, sparse_mode=2, scale_value=0.25,
                                              softmax_max=o[1], softmax_sum=o[2], attention_in=o[0])
    kw = dict(atten_mask=CAUSAL, sparse_mode=2, scale_value=0.25, softmax_max=o[1], softmax_sum=o[2],
              attention_in=o[0])
    good = cmp.Record("grad", "npu_fusion_attention_grad", [q, k, v, dy, N, "BSH"], kw, list(g), None, "test")
    dv = g[2].clone()
    dv[1, :, :D] *= 1.1
    bad = cmp.Record("grad bad", "npu_fusion_attention_grad", [q, k, v, dy, N, "BSH"], kw,
                     [g[0], g[1], dv, g[3], g[4]], None, "test")
    c_good, c_bad = run([good, bad])
    assert c_good.kind == "grad" and c_good.verdict == cmp.WITHIN
    assert {t.name for t in c_good.tensors} == {"dq", "dk", "dv"}
    assert c_bad.verdict == cmp.OUT and tensor(c_bad, "dv").bad_heads == [0]


def test_tnd_record_and_statistics_layout():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(30, N, D, generator=g) for _ in range(3))
    kw = dict(actual_seq_qlen=[12, 30], actual_seq_kvlen=[12, 30], scale=0.25, atten_mask=CAUSAL, sparse_mode=3)
    with fascore.use_engine("reference"):
        res = fascore.npu_fusion_attention_v2(q, k, v, N, "TND", **kw)
    outs = list(res)
    outs[1] = outs[1].clone()
    # softmax_layout "": batch 1 (tokens 12..29) is a contiguous [N, 18, 8] block after batch 0's
    blk = outs[1].reshape(-1)[N * 12 * 8:].view(N, 18, 8)
    blk[2, 4] += 1.0  # head 2, token 12 + 4
    rec = cmp.Record("tnd", "npu_fusion_attention_v2", [q, k, v, N, "TND"], kw, outs, None, "test")
    (call,) = run([rec])
    t = tensor(call, "softmax_max")
    assert call.verdict == cmp.OUT and t.bad_heads == [2] and t.row_axis == "token"
    assert t.worst_tiles[0]["rows"] == "16-29" and t.n_beyond == 8


def test_dropout_flagged_bits_assumed_and_seedless_skipped():
    rec = forward_record("dropout", dtype=torch.float32, keep_prob=0.8, scale=0.25)
    assert rec.outputs[4] != 0
    (call,) = run([rec])
    assert call.verdict == cmp.WITHIN and call.flags == ["bits assumed"]
    seed, offset = rec.outputs[4], rec.outputs[5]
    rec.outputs[4] = rec.outputs[5] = None  # as msprobe records npu_fusion_attention: without seed/offset
    (call,) = run([rec])
    assert call.verdict == cmp.SKIPPED and "seed" in call.message
    (call,) = run([rec], seeds={"dropout": (seed, offset)})  # given by the user
    assert call.verdict == cmp.WITHIN and call.flags == ["bits assumed"]
    (call,) = run([rec], seeds={"dropout": (seed + 1, offset)})  # other bits: far out
    assert call.verdict == cmp.OUT
    assert cmp._parse_seed("NPU.npu_fusion_attention.3=0x10,24") == ("NPU.npu_fusion_attention.3", (16, 24))
    with pytest.raises(ValueError):
        cmp._parse_seed("no-seed")


# =========================================================================== capture
def test_capture_records_and_replays(tmp_path):
    bundle = tmp_path / "bundle"
    q, k, v = qkv(torch.bfloat16, requires_grad=True)
    orig = fascore.npu_fusion_attention
    with cap.capture(bundle) as c:
        assert fascore.npu_fusion_attention is not orig
        assert set(cap.iter_wrapped(fascore)) >= {"npu_fusion_attention", "npu_fusion_attention_grad"}
        res = fascore.npu_fusion_attention(q, k, v, N, "BSH", atten_mask=CAUSAL, sparse_mode=2, scale=0.25)
        res[0].float().square().sum().backward()
        fascore.npu_fusion_attention_v2(q.detach(), k.detach(), v.detach(), N, "BSH", atten_mask=CAUSAL,
                                        sparse_mode=3, scale=0.25)
        with pytest.raises(fascore.FlashAttentionError):
            fascore.npu_fusion_attention(q.detach(), k.detach(), v.detach(), N, "BSH", sparse_mode=11)
    assert fascore.npu_fusion_attention is orig and not list(cap.iter_wrapped(fascore))
    assert len(c.calls) == 3 and c.calls[2]["error"]["status"] == fascore.ACLNN_ERR_PARAM_INVALID
    rec0 = c.calls[0]
    assert rec0["backward"]["dy"] is not None and set(rec0["backward"]["grads"]) == {"query", "key", "value"}
    # the compressed mask is stored once (content-addressed)
    masks = {json.dumps(x["kwargs"]["atten_mask"]) for x in c.calls[:2]}
    assert len(masks) == 1
    meta, calls = cap.load_bundle(bundle)
    assert meta["format"] == cap.FORMAT and meta["calls_seen"] == 3
    g = calls[0]["backward"]["grads"]["query"].load()
    assert torch.equal(g, q.grad)
    report = cmp.compare(bundle, tmp_path / "png", block=BLOCK)
    assert report.format == "bundle"
    verdicts = [(c.name, c.kind, c.verdict) for c in report.calls]
    assert verdicts == [("call 0", "forward", cmp.WITHIN), ("call 0 backward", "backward", cmp.WITHIN),
                        ("call 1", "forward", cmp.WITHIN), ("call 2", "forward", cmp.INVALID)]
    assert report.exit_code == 0


def test_capture_sampling_and_late_backward(tmp_path):
    q, k, v = qkv(torch.float32, requires_grad=True)
    with cap.capture(tmp_path / "every3", sample=3) as c:
        for _ in range(7):
            fascore.npu_fusion_attention_v2(q.detach(), k.detach(), v.detach(), N, "BSH")
    assert [x["seq"] for x in c.calls] == [0, 3, 6] and c.calls_seen == 7
    with cap.capture(tmp_path / "frac", sample=0.5, seed=1) as c:
        for _ in range(40):
            fascore.npu_fusion_attention_v2(q.detach(), k.detach(), v.detach(), N, "BSH")
    assert 8 <= len(c.calls) <= 32
    with cap.capture(tmp_path / "late", max_calls=1) as c:
        res = fascore.npu_fusion_attention(q, k, v, N, "BSH")
        fascore.npu_fusion_attention(q, k, v, N, "BSH")
    res[0].sum().backward()  # after the block: the gradients still land in the bundle
    meta, calls = cap.load_bundle(tmp_path / "late")
    assert len(calls) == 1 and set(calls[0]["backward"]["grads"]) == {"query", "key", "value"}
    with pytest.raises(FileExistsError):
        with cap.capture(tmp_path / "late"):
            pass
    with pytest.raises(ValueError):
        cap.capture(tmp_path / "x", sample=0)


def test_capture_wraps_the_torch_npu_shim(tmp_path):
    from fascore import compat

    if compat.real_torch_npu_available():
        pytest.skip("a real torch_npu is installed")
    installed = "torch_npu" in sys.modules
    try:
        with cap.capture(tmp_path / "shim") as c:
            shim = compat.install_torch_npu_shim()  # installed inside the block: copies the wrappers
            q, k, v = qkv(torch.float32)
            shim.npu_fusion_attention(q, k, v, N, "BSH")
        assert len(c.calls) == 1
        assert not list(cap.iter_wrapped(shim)) and shim.npu_fusion_attention is fascore.npu_fusion_attention
    finally:
        if not installed:
            compat.uninstall_torch_npu_shim()


# =========================================================================== msprobe format
def _stats(t):
    if t.numel() == 0 or t.dtype == torch.bool:
        return {"Max": bool(t.any()) if t.numel() else None, "Min": bool(t.all()) if t.numel() else None,
                "Mean": None, "Norm": None}
    f = t.double()
    return {"Max": float(f.max()), "Min": float(f.min()), "Mean": float(f.mean()), "Norm": float(f.norm())}


def _ms_entry(v, data_dir, stem, save=True):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        e = {"type": "torch.Tensor", "dtype": str(v.dtype), "shape": list(v.shape), **_stats(v),
             "requires_grad": bool(v.requires_grad)}
        if v.numel() and save:  # msprobe writes no file for an empty tensor
            torch.save(v.detach().clone(), data_dir / f"{stem}.pt")
            e["data_name"] = f"{stem}.pt"
        return e
    if isinstance(v, (list, tuple)):
        return [_ms_entry(x, data_dir, f"{stem}.{i}", save) for i, x in enumerate(v)]
    return {"type": type(v).__name__, "value": v}


def write_msprobe_dump(root, calls, task="tensor", rank="rank0"):
    """An msprobe PyTorch L1 dump of ``calls`` [(api, n, args, kwargs, outputs, backward)] with
    backward = (grads of the outputs, grads of the tensor inputs) or None."""
    rank = root / "step0" / rank
    data_dir = rank / "dump_tensor_data"
    data_dir.mkdir(parents=True)
    data = {}
    save = task == "tensor"
    for api, n, args, kwargs, outputs, backward in calls:
        base = f"NPU.{api}.{n}.forward"
        out = [_ms_entry(o, data_dir, f"{base}.output.{i}", save) for i, o in enumerate(outputs)]
        if api == "npu_fusion_attention":
            out[4] = out[5] = None  # msprobe's builtin ignore rule for seed / offset
        data[base] = {"input_args": [_ms_entry(a, data_dir, f"{base}.input.{i}", save) for i, a in enumerate(args)],
                      "input_kwargs": {k: _ms_entry(x, data_dir, f"{base}.kwargs.{k}", save)
                                       for k, x in kwargs.items()},
                      "output": out}
        if backward is not None:
            bb = f"NPU.{api}.{n}.backward"
            gin, gout = backward
            data[bb] = {"input": [_ms_entry(x, data_dir, f"{bb}.input.{i}", save) for i, x in enumerate(gin)],
                        "output": [_ms_entry(x, data_dir, f"{bb}.output.{i}", save) for i, x in enumerate(gout)]}
        data["Tensor.__add__.0.forward"] = {"input_args": [], "input_kwargs": {}, "output": []}  # other APIs
    meta = {"task": task, "level": "L1", "framework": "pytorch", "dump_data_dir": "/npu/host/path/dump_tensor_data",
            "data": data}
    (rank / "dump.json").write_text(json.dumps(meta, indent=1))
    (rank / "stack.json").write_text("{}")
    return rank


def _ms_call(n, dtype=torch.bfloat16, seed=0, with_pse=False, corrupt=None):
    q, k, v = qkv(dtype, seed=seed, requires_grad=True)
    pse = torch.randn(B, N, S, S, generator=torch.Generator().manual_seed(seed + 3)).to(dtype).requires_grad_(True) \
        if with_pse else None
    args = [q, k, v, N, "BSH"] + ([pse, None, CAUSAL, 0.25] if with_pse else [])
    kwargs = {"sparse_mode": 2} if with_pse else {"atten_mask": CAUSAL, "scale": 0.25, "sparse_mode": 2}
    with fascore.use_engine("reference"):
        res = fascore.npu_fusion_attention(*args, **kwargs)
    dy = torch.randn(res[0].shape, generator=torch.Generator().manual_seed(seed + 9)).to(dtype)
    wrt = [q, k, v] + ([pse] if with_pse else [])
    grads = [x.detach() for x in torch.autograd.grad(res[0], wrt, dy)]
    outs = [r.detach() if isinstance(r, torch.Tensor) else r for r in res]
    if corrupt == "head1":
        outs[0] = outs[0].clone()
        bsh_head(outs[0], 1)[:] *= 1.2
    if corrupt == "dpse":
        grads[3] = grads[3].clone()
        grads[3][0, 2, 40:48, 8:16] += 1.0  # head 2, query rows 40..47, key cols 8..15
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    return ("npu_fusion_attention", n, args, kwargs, outs, ([dy, None, None], grads))


def test_msprobe_dump_clean_and_faulty(tmp_path):
    clean = write_msprobe_dump(tmp_path / "clean", [_ms_call(0), _ms_call(1, seed=1, with_pse=True)])
    report = cmp.compare(tmp_path / "clean", block=BLOCK)
    assert report.format == "msprobe"
    assert [(c.name, c.kind, c.verdict) for c in report.calls] == [
        ("NPU.npu_fusion_attention.0", "forward", cmp.WITHIN),
        ("NPU.npu_fusion_attention.0 backward", "backward", cmp.WITHIN),
        ("NPU.npu_fusion_attention.1", "forward", cmp.WITHIN),
        ("NPU.npu_fusion_attention.1 backward", "backward", cmp.WITHIN)]
    assert {t.name for t in report.calls[3].tensors} == {"dq", "dk", "dv", "dpse"}
    assert report.exit_code == 0 and clean.is_dir()
    write_msprobe_dump(tmp_path / "bad", [_ms_call(0, corrupt="head1"), _ms_call(1, seed=1, with_pse=True,
                                                                                   corrupt="dpse")])
    out = tmp_path / "png"
    report = cmp.compare(tmp_path / "bad", out, block=BLOCK)
    by = {(c.name, c.kind): c for c in report.calls}
    fw0 = by[("NPU.npu_fusion_attention.0", "forward")]
    assert fw0.verdict == cmp.OUT and tensor(fw0, "attention_out").bad_heads == [1]
    bw1 = by[("NPU.npu_fusion_attention.1 backward", "backward")]
    t = tensor(bw1, "dpse")
    assert bw1.verdict == cmp.OUT and t.bad_heads == [2]
    assert (t.worst_tiles[0]["q_block"], t.worst_tiles[0]["k_block"]) == (40 // BLOCK, 8 // BLOCK)
    assert report.exit_code == 1
    # heatmaps: one PNG per compared call, axes head x row block
    import matplotlib.image as mpimg

    assert fw0.heatmap and Path(fw0.heatmap).is_file()
    img = mpimg.imread(fw0.heatmap)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    ax = {a["tensor"]: a for a in fw0.heatmap_axes}
    assert ax["attention_out"]["xlabel"] == f"query block ({BLOCK} rows)" and ax["attention_out"]["ylabel"] == "head"
    assert ax["attention_out"]["shape"] == [N, S // BLOCK]
    axb = {a["tensor"]: a for a in bw1.heatmap_axes}
    assert axb["dk"]["xlabel"].startswith("key block") and axb["dk"]["ylabel"] == "kv head"


def test_msprobe_dump_of_two_ranks(tmp_path):
    write_msprobe_dump(tmp_path / "d", [_ms_call(0)], rank="rank0")
    write_msprobe_dump(tmp_path / "d", [_ms_call(0, seed=4, corrupt="head1")], rank="rank1")
    report = cmp.compare(tmp_path / "d", block=BLOCK, diagnose=False)
    got = [(c.name, c.verdict) for c in report.calls if c.kind == "forward"]
    assert got == [("step0/rank0:NPU.npu_fusion_attention.0", cmp.WITHIN),
                   ("step0/rank1:NPU.npu_fusion_attention.0", cmp.OUT)]
    # a rank directory alone: plain names
    report = cmp.compare(tmp_path / "d" / "step0" / "rank1", block=BLOCK, diagnose=False)
    assert report.calls[0].name == "NPU.npu_fusion_attention.0"


def test_msprobe_statistics_dump_is_skipped(tmp_path):
    write_msprobe_dump(tmp_path / "stats", [_ms_call(0)], task="statistics")
    report = cmp.compare(tmp_path / "stats")
    assert {c.verdict for c in report.calls} == {cmp.SKIPPED}
    assert 'task "tensor"' in report.calls[0].message and report.exit_code == 0


# =========================================================================== the command
def test_compare_command_exit_codes_and_json(tmp_path):
    write_msprobe_dump(tmp_path / "bad", [_ms_call(0, corrupt="head1")])
    write_msprobe_dump(tmp_path / "good", [_ms_call(0)])
    js = tmp_path / "r.json"
    from rich.console import Console

    con = Console(file=open(os.devnull, "w"), width=160)
    assert cmp.compare_command(tmp_path / "bad", tmp_path / "png", js, block=BLOCK, console=con) == 1
    d = json.loads(js.read_text())
    assert d["exit_code"] == 1 and d["summary"][cmp.OUT] == 1
    fw = d["calls"][0]
    assert fw["verdict"] == cmp.OUT and fw["tensors"][0]["bad_heads"] == [1]
    assert cmp.compare_command(tmp_path / "good", None, None, block=BLOCK, console=con) == 0
    assert cmp.compare_command(tmp_path / "nowhere", None, console=con) == 2
    assert cmp.compare_command(tmp_path / "good", None, block=0, console=con) == 2


def test_cli_compare(tmp_path):
    from typer.testing import CliRunner

    from fascore.tools.cli import app

    write_msprobe_dump(tmp_path / "bad", [_ms_call(0, corrupt="head1")])
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "bad"), "--out", str(tmp_path / "png"), "--block",
                                 str(BLOCK), "--no-diagnose"])
    assert r.exit_code == 1, r.output
    assert "out of bounds" in r.output and list((tmp_path / "png").glob("*.png"))


# =========================================================================== real msprobe (optional)
_MSPROBE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, fascore
    from msprobe.pytorch import PrecisionDebugger
    out = sys.argv[1]
    cfg = {"task": "tensor", "dump_path": out, "rank": [], "step": [], "level": "L1", "async_dump": False,
           "tensor": {"scope": [], "list": ["npu_fusion_attention"], "data_mode": ["all"]}}
    json.dump(cfg, open(out + ".config.json", "w"))
    dbg = PrecisionDebugger(config_path=out + ".config.json")
    dbg.register_custom_api(fascore, "npu_fusion_attention", "NPU")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 64, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    with fascore.use_engine("reference"):
        dbg.start()
        r = fascore.npu_fusion_attention(q, k, v, 4, "BSH", atten_mask=mask, scale=0.25, sparse_mode=2)
        r[0].float().sum().backward()
        dbg.stop()
        dbg.step()
""")


@pytest.mark.skipif(not os.environ.get("FASCORE_MSPROBE_PYTHON"), reason="FASCORE_MSPROBE_PYTHON not set")
def test_real_msprobe_dump(tmp_path):
    py = os.environ["FASCORE_MSPROBE_PYTHON"]
    dump = tmp_path / "dump"
    subprocess.run([py, "-c", _MSPROBE_SCRIPT, str(dump)], check=True, capture_output=True, timeout=300)
    report = cmp.compare(dump, block=BLOCK)
    assert [(c.kind, c.verdict) for c in report.calls] == [("forward", cmp.WITHIN), ("backward", cmp.WITHIN)], \
        [(c.name, c.message, c.notes) for c in report.calls]
    (f,) = list(dump.rglob("NPU.npu_fusion_attention.0.forward.output.0.pt"))
    out = torch.load(f)
    bsh_head(out, 3)[:, 10] += 0.5
    torch.save(out, f)
    report = cmp.compare(dump, block=BLOCK)
    t = tensor(report.calls[0], "attention_out")
    assert report.calls[0].verdict == cmp.OUT and t.bad_heads == [3] and report.exit_code == 1


def test_dense_reference_out_of_memory_falls_back(monkeypatch):
    rec = forward_record("big", dtype=torch.float32, scale=0.25)
    real = cmp._call

    def no_dense(api, named, engine, *a, **k):
        if engine == "reference":
            raise fascore.FlashAttentionError("memory: this call needs about 99 GiB", fascore.ACLNN_ERR_RUNTIME_ERROR)
        return real(api, named, engine, *a, **k)

    monkeypatch.setattr(cmp, "_call", no_dense)
    (call,) = run([rec])
    assert call.verdict == cmp.WITHIN  # not "inputs invalid": the inputs are fine
    assert any("does not fit" in n for n in call.notes)
