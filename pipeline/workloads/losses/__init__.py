"""The built-in losses, as configs name them: cross-entropy (its module, cross_entropy.py, imported when a job builds
it: it imports torch) and `loss=model`, the model's own loss. Their schemas, here, are read by the launch without
torch (each registered with `@builtin("loss")`, pipeline.workloads.registry)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.checks import ConfigError, check_choice
from pipeline.workloads.registry import builtin

IO_OUTPUT_HELP = "auto, an attribute or mapping key name, or a tuple index"  # what io.output and loss.output take


def __getattr__(name: str) -> Any:
    """`pipeline.workloads.losses.CrossEntropy`, from its module, when first asked for (PEP 562)."""
    if name != "CrossEntropy":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.cross_entropy").CrossEntropy


@builtin("loss")
@dataclass
class CrossEntropyConfig:
    """Cross-entropy over the output's last dimension, with torch's label smoothing."""

    _target_: str = "pipeline.workloads.losses.CrossEntropy"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing!r} is not allowed; it must be in [0, 1]")


TARGETS_FROM = ("targets", "inputs")


@builtin("loss")
@dataclass
class ModelLossConfig:
    """loss=model: the model computes its own loss, given the targets (pipeline.workloads.losses.ModelLoss)."""

    _target_: str = "pipeline.workloads.losses.ModelLoss"
    targets_as: Optional[str] = "labels"  # the keyword (Hugging Face: labels, nanoGPT: targets); null: positional
    targets_from: str = "targets"  # or inputs: Hugging Face's causal LMs shift their labels inside
    output: str = "auto"  # where its loss is: auto (.loss, ["loss"], a tuple's 0-dim tensor), a name or an index

    def __post_init__(self) -> None:
        check_choice("loss.targets_from", self.targets_from, TARGETS_FROM)
        if self.targets_as is not None and not self.targets_as.isidentifier():
            raise ConfigError(f"loss.targets_as={self.targets_as!r} is not allowed; give the keyword the model "
                              "takes its targets by (labels, targets), or null to pass them positionally")
        if not self.output.strip():
            raise ConfigError(f"loss.output={self.output!r} is not allowed; give {IO_OUTPUT_HELP}")


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
