"""The built-in models: the seed MLP and CNN, a ResNet, and a GPT-style language model. The image models take
the dataset's `input_shape` and `num_classes`, the language model its `vocab_size` (the pipeline passes what a
constructor asks for), so any image model runs on any image dataset. Their sizes have no defaults here: those are
the schemas' (pipeline/config.py: MLPConfig, ...), stated once; `schema_defaults` gives them to code that builds
a model directly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """flatten -> hidden ReLU -> dropout -> classes (the MNIST seed: 784-128-dropout 0.2-10)."""

    def __init__(self, input_shape, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """The CIFAR-10 seed: conv3x3 32, pool, conv3x3 64, pool, conv3x3 64, dense 64, dense classes (no padding)."""

    def __init__(self, input_shape, num_classes: int, channels, hidden: int):
        super().__init__()
        c_in, h, w = input_shape
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3), nn.ReLU(),
        )
        oh, ow = _feature_side(h), _feature_side(w)
        if min(oh, ow) < 1:
            raise ValueError(f"CNN needs images of at least 14x14 pixels, got {h}x{w}")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * oh * ow, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _feature_side(s: int) -> int:
    """Side after conv3x3 (-2), pool (/2), conv3x3 (-2), pool (/2), conv3x3 (-2): 32 -> 4 (CIFAR), 28 -> 3 (MNIST)."""
    return ((s - 2) // 2 - 2) // 2 - 2


# ------------------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18, -34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.shortcut = _shortcut(c_in, width, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand x4 (ResNet-50, -101)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = _shortcut(c_in, out, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


RESNET_LAYOUT = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                 50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}
IMAGENET_STEM_FROM = 64  # pixels: smaller images (CIFAR's 32) keep their resolution through a 3x3 stem


class ResNet(nn.Module):
    """He et al. 2016, as torchvision builds it (ResNet-50: 25.6 M parameters at 1000 classes). The ImageNet stem
    (7x7 stride 2, then 3x3 max pool stride 2) or the CIFAR one (3x3 stride 1, no pool), four stages of blocks
    (width, 2x, 4x, 8x channels; stride 2 from the second), global average pooling and one dense layer."""

    def __init__(self, input_shape, num_classes: int, depth: int, stem: str, width: int):
        super().__init__()
        block, counts = RESNET_LAYOUT[depth]
        c_in, h, _ = input_shape
        if stem == "auto":
            stem = "imagenet" if h >= IMAGENET_STEM_FROM else "cifar"
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(c_in, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        stages, channels = [], width
        for i, count in enumerate(counts):
            for j in range(count):
                stages.append(block(channels, width * 2 ** i, stride=2 if i > 0 and j == 0 else 1))
                channels = width * 2 ** i * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


# --------------------------------------------------------------------------------------------------- GPT
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
