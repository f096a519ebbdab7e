"""The CIFAR-10 seed: three 3x3 convolutions with pooling, then two dense layers (its schema: CNNConfig,
pipeline.workloads.models)."""

from __future__ import annotations

from torch import nn


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
