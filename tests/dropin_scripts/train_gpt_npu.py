# A small GPT training script written for Ascend (torch_npu): NPU device strings, .npu(),
# torch.npu.set_device / synchronize / manual_seed / max_memory_allocated, and the fused
# npu_fusion_attention with a compressed causal mask and attention dropout. fascore's tests run
# it unchanged with `fascore run` on the CPU (tests/test_dropin.py).
import argparse
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_npu


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, attn_dropout):
        super().__init__()
        self.heads, self.head_dim, self.attn_dropout = heads, dim // heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # torch_npu's compressed causal mask for sparse_mode 2
        self.register_buffer("atten_mask", torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1),
                             persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        keep_prob = 1.0 - self.attn_dropout if self.training else 1.0
        out = torch_npu.npu_fusion_attention(
            q, k, v, self.heads, "BSH", atten_mask=self.atten_mask, scale=1.0 / math.sqrt(self.head_dim),
            keep_prob=keep_prob, pre_tockens=65536, next_tockens=0, sparse_mode=2)[0]
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim, heads, attn_dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, attn_dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, seq, dim, heads, layers, attn_dropout):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, attn_dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, :idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.npu.set_device(0)
    device = torch.device("npu:0")
    torch.manual_seed(args.seed)
    torch.npu.manual_seed(args.seed)

    vocab, seq, batch = 96, 64, 4
    model = GPT(vocab, seq, dim=64, heads=4, layers=2, attn_dropout=0.1).npu()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, vocab, (batch, seq + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]

    losses = []
    model.train()
    for step in range(args.steps):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.npu.synchronize()
        losses.append(loss.item())
        print(f"step {step} loss {loss.item():.5f}")
    peak = torch.npu.max_memory_allocated()
    print(f"max_memory_allocated {peak / 2**20:.1f} MiB on {torch.npu.get_device_name()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "max_memory_allocated": peak, "device": str(data.device)}, f)


if __name__ == "__main__":
    main()
