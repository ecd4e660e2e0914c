# Operator tests written the way torch_npu's own test suite writes them (torch_npu.testing's
# TestCase and assertRtolEqual, .npu() tensors, NPU device strings, torch.npu.manual_seed,
# torch.ops.npu.*, FakeTensorMode), for a machine with an Ascend NPU. fascore's tests run this
# file unchanged under `fascore run` and under fascore.compat.install_torch_npu_shim(device="cpu")
# (tests/test_dropin.py). Each case compares against a plain PyTorch golden computed on the CPU.
import math

import numpy as np
import torch
import torch_npu
from torch._subclasses.fake_tensor import FakeTensorMode
from torch_npu.testing.testcase import TestCase, run_tests

torch.npu.set_compile_mode(jit_compile=False)

CAUSAL = torch.triu(torch.ones([2048, 2048], dtype=torch.bool), diagonal=1)


def golden_attention(q, k, v, scale, mask=None, pse=None, keep=None, keep_prob=1.0, q_rope=None, k_rope=None):
    """BNSD float32 golden: softmax((QK^T [+ QrKr^T] + pse) * scale, masked) [* keep / p] V."""
    q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-1, -2))
    if q_rope is not None:
        s = s + torch.matmul(q_rope.float(), k_rope.float().transpose(-1, -2))
    if pse is not None:
        s = s + pse.float()
    s = s * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep / keep_prob
    return torch.matmul(p, v)


def unpack_keep_mask(packed, shape):
    """The bool keep mask of a packed uint8 dropout mask (bit f % 8 of byte f // 8)."""
    bits = torch.from_numpy(np.unpackbits(packed.cpu().numpy(), bitorder="little").astype(bool))
    n = int(np.prod(shape))
    return bits[:n].reshape(shape)


class TestNPUFusionAttention(TestCase):
    def bnsd(self, b=2, n=4, s=64, d=32, dtype=torch.float32):
        return [torch.randn(b, n, s, d, dtype=dtype).npu() for _ in range(3)]

    def test_npu_fusion_attention_bnsd_causal(self):
        q, k, v = self.bnsd()
        scale = 1.0 / math.sqrt(32)
        out, smax, ssum, sout, seed, offset, numels = torch_npu.npu_fusion_attention(
            q, k, v, 4, "BNSD", pse=None, padding_mask=None, atten_mask=CAUSAL.npu(), scale=scale,
            keep_prob=1.0, pre_tockens=65536, next_tockens=0, inner_precise=0, sparse_mode=2)
        golden = golden_attention(q.cpu(), k.cpu(), v.cpu(), scale, mask=CAUSAL[:64, :64])
        self.assertRtolEqual(out.cpu(), golden)
        self.assertEqual(list(smax.shape), [2, 4, 64, 8])
        self.assertEqual(list(sout.shape), [0])
        self.assertEqual(numels, 2 * 4 * 64 * 64)

    def test_npu_fusion_attention_bsh_float16(self):
        b, s, n, d = 2, 48, 2, 64
        q, k, v = [torch.randn(b, s, n * d, dtype=torch.float16).npu() for _ in range(3)]
        out = torch_npu.npu_fusion_attention(q, k, v, n, "BSH", scale=0.125)[0]
        split = lambda t: t.cpu().reshape(b, s, n, d).transpose(1, 2)  # noqa: E731
        golden = golden_attention(split(q), split(k), split(v), 0.125).transpose(1, 2).reshape(b, s, n * d)
        self.assertRtolEqual(out.cpu(), golden.half(), prec16=0.005)

    def test_npu_fusion_attention_grad(self):
        q, k, v = self.bnsd(s=32, d=16)
        scale = 0.25
        out, smax, ssum, _, seed, offset, numels = torch_npu.npu_fusion_attention(
            q, k, v, 4, "BNSD", atten_mask=CAUSAL.npu(), scale=scale, sparse_mode=3)
        dy = torch.randn_like(out)
        dq, dk, dv, dpse, dsink = torch_npu.npu_fusion_attention_grad(
            q, k, v, dy, 4, "BNSD", atten_mask=CAUSAL.npu(), softmax_max=smax, softmax_sum=ssum,
            attention_in=out, scale_value=scale, seed=seed, offset=offset, numels=numels, sparse_mode=3)
        cq, ck, cv = [t.cpu().requires_grad_(True) for t in (q, k, v)]
        golden = golden_attention(cq, ck, cv, scale, mask=CAUSAL[:32, :32])
        golden.backward(dy.cpu())
        for got, want in ((dq, cq.grad), (dk, ck.grad), (dv, cv.grad)):
            self.assertRtolEqual(got.cpu(), want)
        self.assertIsNone(dpse)

    def test_npu_fusion_attention_autograd(self):
        q, k, v = [t.requires_grad_(True) for t in self.bnsd(s=24, d=16)]
        out = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.3)[0]
        out.sum().backward()
        cq, ck, cv = [t.detach().cpu().requires_grad_(True) for t in (q, k, v)]
        golden_attention(cq, ck, cv, 0.3).sum().backward()
        self.assertRtolEqual(q.grad.cpu(), cq.grad)
        self.assertRtolEqual(k.grad.cpu(), ck.grad)
        self.assertRtolEqual(v.grad.cpu(), cv.grad)

    def test_npu_fusion_attention_v2_rope_pse_grad_v2(self):
        b, n, s, d, dr = 1, 2, 32, 16, 8
        q, k, v = [torch.randn(b, s, n, d).npu() for _ in range(3)]
        qr, kr = [torch.randn(b, s, n, dr).npu() for _ in range(2)]
        pse = torch.randn(b, n, s, s).npu()
        scale = 0.2
        res = torch_npu.npu_fusion_attention_v2(q, k, v, n, "BSND", pse=pse, query_rope=qr, key_rope=kr,
                                                scale=scale, pse_type=1)
        out, smax, ssum = res[:3]
        bnsd = lambda t: t.cpu().transpose(1, 2)  # noqa: E731
        leaves = [bnsd(t).requires_grad_(True) for t in (q, k, v, qr, kr)]
        cpse = pse.cpu().requires_grad_(True)
        golden = golden_attention(leaves[0], leaves[1], leaves[2], scale, pse=cpse, q_rope=leaves[3],
                                  k_rope=leaves[4])
        self.assertRtolEqual(out.cpu(), golden.transpose(1, 2))
        dy = torch.randn_like(out)
        dq, dk, dv, dpse, dq_rope, dk_rope, dsink = torch_npu.npu_fusion_attention_grad_v2(
            q, k, v, dy, n, "BSND", pse=pse, softmax_max=smax, softmax_sum=ssum, attention_in=out,
            query_rope=qr, key_rope=kr, scale_value=scale, pse_type=1)
        golden.backward(bnsd(dy))
        for got, leaf in zip((dq, dk, dv, dq_rope, dk_rope), leaves):
            self.assertRtolEqual(got.cpu(), leaf.grad.transpose(1, 2))
        self.assertRtolEqual(dpse.cpu(), cpse.grad)
        self.assertIsNone(dsink)

    def test_npu_fusion_attention_grad_v2_without_rope(self):
        q, k, v = self.bnsd(b=1, s=16, d=8)
        res = torch_npu.npu_fusion_attention_v2(q, k, v, 4, "BNSD", scale=0.5)
        grads = torch_npu.npu_fusion_attention_grad_v2(q, k, v, torch.ones_like(res[0]), 4, "BNSD",
                                                       softmax_max=res[1], softmax_sum=res[2], attention_in=res[0],
                                                       scale_value=0.5)
        self.assertEqual(len(grads), 7)
        for t in grads[3:6]:  # dpse, dq_rope, dk_rope: empty tensors of query's dtype
            self.assertEqual(list(t.shape), [0])
            self.assertEqual(t.dtype, q.dtype)
        self.assertIsNone(grads[6])

    def test_npu_fusion_attention_v3_tnd_tensor_seqlens(self):
        n, d = 2, 16
        qlen = torch.tensor([16, 48], dtype=torch.int64)
        kvlen = torch.tensor([16, 48], dtype=torch.int64)
        q, k, v = [torch.randn(48, n, d).npu() for _ in range(3)]
        res = torch_npu.npu_fusion_attention_v3(q, k, v, n, "TND", atten_mask=CAUSAL.npu(), scale=0.25,
                                                sparse_mode=3, actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)
        self.assertEqual(len(res), 6)
        out, smax, ssum, _, seed, offset = res
        self.assertEqual((seed.dtype, list(seed.shape)), (torch.int64, [1]))
        self.assertEqual((offset.dtype, list(offset.shape)), (torch.int64, [1]))
        self.assertEqual(list(smax.shape), [48, n, 8])
        for lo, hi in ((0, 16), (16, 48)):
            seg = lambda t: t.cpu()[lo:hi].transpose(0, 1)  # noqa: E731
            golden = golden_attention(seg(q), seg(k), seg(v), 0.25, mask=CAUSAL[:hi - lo, :hi - lo])
            self.assertRtolEqual(out.cpu()[lo:hi], golden.transpose(0, 1))

    def test_npu_fusion_attention_grad_v3_dropout(self):
        n, d = 2, 16
        lens = torch.tensor([32, 64], dtype=torch.int64)
        q, k, v = [torch.randn(64, n, d).npu().requires_grad_(True) for _ in range(3)]
        torch.npu.manual_seed(2024)
        out, smax, ssum, _, seed, offset = torch_npu.npu_fusion_attention_v3(
            q, k, v, n, "TND", scale=0.25, keep_prob=0.8, actual_seq_qlen=lens, actual_seq_kvlen=lens)
        dy = torch.randn_like(out)
        out.backward(dy)
        dq, dk, dv, dpse, dsink = torch_npu.npu_fusion_attention_grad_v3(
            q.detach(), k.detach(), v.detach(), dy, n, "TND", softmax_max=smax, softmax_sum=ssum,
            attention_in=out.detach(), scale_value=0.25, keep_prob=0.8, seed=seed, offset=offset,
            actual_seq_qlen=lens, actual_seq_kvlen=lens)
        self.assertRtolEqual(dq.cpu(), q.grad.cpu())
        self.assertRtolEqual(dk.cpu(), k.grad.cpu())
        self.assertRtolEqual(dv.cpu(), v.grad.cpu())

    def test_dropout_with_npu_dropout_gen_mask(self):
        b, n, s, d = 1, 2, 32, 16
        q, k, v = self.bnsd(b=b, n=n, s=s, d=d)
        keep_prob, seed, offset = 0.75, 4321, 0
        mask = torch_npu._npu_dropout_gen_mask(q, [b, n, s, s], 1 - keep_prob, seed, offset, parallel=True)
        self.assertEqual(mask.dtype, torch.uint8)
        self.assertEqual(mask.numel(), (b * n * s * s + 127) // 128 * 16)
        out = torch_npu.npu_fusion_attention(q, k, v, n, "BNSD", scale=0.25, keep_prob=keep_prob,
                                             dropout_mask=mask)[0]
        keep = unpack_keep_mask(mask, (b, n, s, s))
        golden = golden_attention(q.cpu(), k.cpu(), v.cpu(), 0.25, keep=keep, keep_prob=keep_prob)
        self.assertRtolEqual(out.cpu(), golden)
        # the operator's own mask for the same seed and offset is that mask (S a multiple of 16)
        own = torch_npu.npu_fusion_attention(q, k, v, n, "BNSD", scale=0.25, keep_prob=keep_prob, seed=seed,
                                             offset=offset)[0]
        self.assertRtolEqual(own.cpu(), out.cpu())

    def test_dropout_gen_full_mask(self):
        x = torch.randn(32, 16).npu()
        mask = torch_npu._npu_dropout_gen_mask(x, x.shape, 0.0, 1, 0, parallel=False)
        self.assertRtolEqual(mask.cpu().numpy(), np.full(64, 255, dtype=np.uint8))

    def test_manual_seed_reproduces_dropout(self):
        q, k, v = self.bnsd(b=1, s=32, d=16)
        torch.npu.manual_seed(7)
        a = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.25, keep_prob=0.9)
        torch.npu.manual_seed(7)
        b = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.25, keep_prob=0.9)
        self.assertEqual(a[4:6], b[4:6])
        self.assertRtolEqual(a[0].cpu(), b[0].cpu())
        c = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.25, keep_prob=0.9)
        self.assertNotEqual(c[5], a[5])  # the generator's offset moved on

    def test_torch_ops_npu(self):
        q, k, v = self.bnsd(b=1, s=32, d=16)
        op = torch.ops.npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=CAUSAL.npu(), scale=0.25,
                                                sparse_mode=2)
        fn = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=CAUSAL.npu(), scale=0.25, sparse_mode=2)
        self.assertRtolEqual(op[0].cpu(), fn[0].cpu())
        g = torch.ops.npu.npu_fusion_attention_grad_v2(q, k, v, torch.ones_like(op[0]), 4, "BNSD",
                                                       atten_mask=CAUSAL.npu(), softmax_max=op[1], softmax_sum=op[2],
                                                       attention_in=op[0], scale_value=0.25, sparse_mode=2)
        self.assertEqual(len(g), 7)
        v2 = torch.ops.npu.npu_fusion_attention_v2(q, k, v, 4, "BNSD", atten_mask=CAUSAL.npu(), scale=0.25,
                                                   sparse_mode=2)
        self.assertRtolEqual(v2[0].cpu(), fn[0].cpu())

    def test_fake_tensor_mode(self):
        q, k, v = self.bnsd(b=2, n=4, s=16, d=8)
        real = torch_npu.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.3)
        with FakeTensorMode() as mode:
            fq, fk, fv = [mode.from_tensor(t) for t in (q, k, v)]
            for op in (torch.ops.npu.npu_fusion_attention, torch_npu.npu_fusion_attention):
                fake = op(fq, fk, fv, 4, "BNSD", scale=0.3)
                self.assertEqual([tuple(t.shape) for t in fake[:4]], [tuple(t.shape) for t in real[:4]])
            v2 = torch.ops.npu.npu_fusion_attention_v2(fq, fk, fv, 4, "BNSD", scale=0.3)
            self.assertEqual(tuple(v2[1].shape), (2, 4, 16, 8))
            v3 = torch.ops.npu.npu_fusion_attention_v3(fq, fk, fv, 4, "BNSD", scale=0.3)
            self.assertEqual([t.dtype for t in v3[4:]], [torch.int64, torch.int64])
            g = torch.ops.npu.npu_fusion_attention_grad(fq, fk, fv, fake[0], 4, "BNSD", softmax_max=fake[1],
                                                        softmax_sum=fake[2], attention_in=fake[0], scale_value=0.3)
            self.assertEqual([tuple(t.shape) for t in g[:3]], [tuple(q.shape)] * 3)
            attn = mode.from_tensor(torch.randn(16, 2, 32).npu())  # SBH, H = N * D = 4 * 8
            ring = torch.ops.npu.npu_ring_attention_update(attn, fake[1], fake[2], attn, fake[1], fake[2])
            self.assertEqual(tuple(ring[0].shape), (16, 2, 32))

    def test_npu_ring_attention_update(self):
        s, b, n, d = 32, 2, 2, 16
        q, k, v = [torch.randn(s, b, n * d).npu() for _ in range(3)]
        full = torch_npu.npu_fusion_attention(q, k, v, n, "SBH", scale=0.25)
        h1 = torch_npu.npu_fusion_attention(q, k[:16], v[:16], n, "SBH", scale=0.25)
        h2 = torch_npu.npu_fusion_attention(q, k[16:], v[16:], n, "SBH", scale=0.25)
        out, smax, ssum = torch_npu.npu_ring_attention_update(h1[0], h1[1], h1[2], h2[0], h2[1], h2[2],
                                                              input_layout="SBH")
        self.assertRtolEqual(out.cpu(), full[0].cpu())
        self.assertRtolEqual(smax.cpu(), full[1].cpu())
        self.assertRtolEqual(ssum.cpu(), full[2].cpu())

    def test_npu_device_strings(self):
        device = torch.device("npu:0")
        x = torch.ones(4, device=device)
        y = torch.zeros(4).to("npu")
        self.assertTrue(x.is_npu and y.is_npu)
        self.assertEqual(x.device, y.device)
        self.assertEqual((x + y).npu().device, torch.device("npu", 0))
        self.assertRtolEqual((x + y).cpu(), torch.ones(4))


if __name__ == "__main__":
    run_tests()
