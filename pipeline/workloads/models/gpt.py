"""A GPT-2-style decoder-only transformer, as nanoGPT writes it (its schema: GPTConfig, pipeline.workloads.models)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        # FlashAttention (or the memory-efficient kernel) where torch has one for the device and dtype
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style language model, as nanoGPT writes it: token and learned position embeddings, `layers`
    pre-LayerNorm blocks, a final LayerNorm, the output layer tied to the token embedding. GPT-2 small is
    layers=12 heads=12 width=768 context_length=1024 vocab_size=50257 (124 M parameters). Returns logits
    (batch, sequence, vocab_size)."""

    def __init__(self, vocab_size: int, layers: int, heads: int, width: int, context_length: int, dropout: float):
        super().__init__()
        self.context_length = context_length
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context_length, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size, bias=False)
        self.out.weight = self.tokens.weight  # weight tying (GPT-2)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2: the residual projections scaled by 1/sqrt(2 x layers), so the residual stream's
                # variance does not grow with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[1]
        if t > self.context_length:
            raise ValueError(f"a sequence of {t} tokens is longer than model.context_length={self.context_length}")
        x = self.dropout(self.tokens(idx) + self.positions(torch.arange(t, device=idx.device)))
        return self.out(self.ln(self.blocks(x)))
