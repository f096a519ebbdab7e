"""Cross-entropy over the output's last dimension (its schema: CrossEntropyConfig, pipeline.workloads.losses)."""

import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    """Cross-entropy over the last dimension of the output, for a classifier's (batch, classes) logits and a
    language model's (batch, sequence, vocab) alike: leading dimensions are flattened against the targets'."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, output, target):
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), label_smoothing=self.label_smoothing)
