"""The default loss."""

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


class ModelLoss:
    """loss=model: the model computes its own loss when it is given the targets (Hugging Face's `labels=`,
    nanoGPT's `targets=`), and that loss is what is back-propagated (pipeline.job.model_io reads it from the output).

    targets_as: the keyword the targets are passed by; None: positionally, after the input.
    targets_from: "targets" (the batch's) or "inputs" (the inputs again: Hugging Face's causal LMs shift their
        labels inside, so they take the inputs as labels where the dataset's targets are already shifted).
    output: where the loss is in the output: "auto" (a `loss` attribute or key, a tuple's 0-dim tensor), a name, or a
        tuple index.
    """

    def __init__(self, targets_as: str | None = "labels", targets_from: str = "targets", output: str = "auto"):
        self.targets_as, self.targets_from, self.output = targets_as, targets_from, output
