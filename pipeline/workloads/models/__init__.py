"""The built-in models, as configs name them (`_target_: pipeline.workloads.models.GPT`): their schemas, here, read by
the launch without torch (each registered with `@builtin("model")`, pipeline.workloads.registry), and their
modules, one each beside this file (mlp, cnn, resnet, gpt), imported when a job builds one. The image models take
the dataset's `input_shape` and `num_classes`, the language model its `vocab_size` (the pipeline passes what a
constructor asks for), so any image model runs on any image dataset.

Adding a model: its module here, its schema below (the module's constructor arguments, their defaults and checks),
and a config file in conf/model/ that extends the schema (`defaults: [<name>_schema]`); tests/test_registry.py
fails when the schema and the module's constructor disagree.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from pipeline.checks import ConfigError, check_at_least, check_choice, check_image_shape
from pipeline.workloads.registry import builtin

# what each model's `_target_` names, and the module that defines it (imported on first use: it imports torch)
MODULES = {"MLP": "mlp", "CNN": "cnn", "ResNet": "resnet", "GPT": "gpt"}


def __getattr__(name: str) -> Any:
    """`pipeline.workloads.models.GPT` and the rest, from their modules, when first asked for (PEP 562): the launch
    reads the schemas below and must not import torch."""
    if name not in MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{MODULES[name]}"), name)


def check_image_model(model: Any) -> None:
    """A built-in image model's explicit input size and class count, when given (null: the dataset's)."""
    if model.input_shape is not None:
        check_image_shape(model.input_shape, "model.input_shape")
    if model.num_classes is not None:
        check_at_least("model.num_classes", model.num_classes, 2)


# `needs` says which kind of dataset a model trains on (image classification or language modelling: a dataset's
# `provides`); `blockless`, that it has no repeated blocks (FSDP shards it as one group; nothing to checkpoint per
# block).
@builtin("model")
@dataclass
class MLPConfig:
    """flatten -> hidden ReLU -> dropout -> classes (the input size comes from the dataset)."""

    needs: ClassVar[str] = "images"
    blockless: ClassVar[bool] = True
    _target_: str = "pipeline.workloads.models.MLP"
    hidden: int = 128
    dropout: float = 0.2
    input_shape: Optional[List[int]] = None  # null: the dataset's
    num_classes: Optional[int] = None  # null: the dataset's

    def __post_init__(self) -> None:
        check_at_least("model.hidden", self.hidden, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} is not allowed; it must be in [0, 1)")
        check_image_model(self)


@builtin("model")
@dataclass
class CNNConfig:
    """conv3x3 c0, pool, conv3x3 c1, pool, conv3x3 c2, dense hidden, dense classes."""

    needs: ClassVar[str] = "images"
    blockless: ClassVar[bool] = True
    _target_: str = "pipeline.workloads.models.CNN"
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    hidden: int = 64
    input_shape: Optional[List[int]] = None  # null: the dataset's
    num_classes: Optional[int] = None  # null: the dataset's

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ConfigError(f"model.channels={list(self.channels)} is not allowed; give 3 positive ints")
        check_at_least("model.hidden", self.hidden, 1)
        check_image_model(self)


RESNET_DEPTHS = (18, 34, 50, 101)
RESNET_STEMS = ("auto", "cifar", "imagenet")


@builtin("model")
@dataclass
class ResNetConfig:
    """He et al.'s ResNet: basic blocks (18, 34) or bottlenecks (50, 101); the stem is the ImageNet one (7x7
    stride 2 and max pool) or the CIFAR one (3x3 stride 1); `auto` picks by image size (ImageNet from 64 px)."""

    needs: ClassVar[str] = "images"
    _target_: str = "pipeline.workloads.models.ResNet"
    depth: int = 18
    stem: str = "auto"
    width: int = 64  # channels of the first stage; each stage doubles them
    input_shape: Optional[List[int]] = None  # null: the dataset's
    num_classes: Optional[int] = None  # null: the dataset's

    def __post_init__(self) -> None:
        if self.depth not in RESNET_DEPTHS:
            raise ConfigError(f"model.depth={self.depth!r} is not allowed; choose one of: "
                              f"{', '.join(map(str, RESNET_DEPTHS))}")
        check_choice("model.stem", self.stem, RESNET_STEMS)
        check_at_least("model.width", self.width, 1)
        check_image_model(self)


@builtin("model")
@dataclass
class GPTConfig:
    """A GPT-2-style decoder-only transformer: pre-LayerNorm blocks of causal self-attention and a 4x MLP,
    learned positions, the output layer tied to the token embedding."""

    needs: ClassVar[str] = "tokens"
    _target_: str = "pipeline.workloads.models.GPT"
    layers: int = 2
    heads: int = 4
    width: int = 128  # the embedding size; a multiple of `heads`
    context_length: int = 64
    vocab_size: Optional[int] = None  # null: the dataset's
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_at_least("model.layers", self.layers, 1)
        check_at_least("model.heads", self.heads, 1)
        check_at_least("model.context_length", self.context_length, 1)
        if self.width < 1 or self.width % self.heads:
            raise ConfigError(f"model.width={self.width} is not allowed; it must be a positive multiple of "
                              f"model.heads={self.heads}")
        if self.vocab_size is not None:
            check_at_least("model.vocab_size", self.vocab_size, 2)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} is not allowed; it must be in [0, 1)")
