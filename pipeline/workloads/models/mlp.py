"""The MNIST seed: flatten -> hidden ReLU -> dropout -> classes (its schema: MLPConfig, pipeline.workloads.models)."""

from __future__ import annotations

import math

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
