"""He et al.'s ResNet, as torchvision builds it: basic blocks (18, 34) or bottlenecks (50, 101), the ImageNet stem or
the CIFAR one (its schema: ResNetConfig, pipeline.workloads.models)."""

from __future__ import annotations

import torch
from torch import nn


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
