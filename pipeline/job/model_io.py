"""How a batch meets the model and the loss, and what is read from what the model returns.

The ecosystem's models return their outputs in several shapes, and this module reads all of them with no
configuration (io.output=auto), deciding once, on the first batch, where the logits are:

    a tensor                                   the logits themselves (torchvision-, timm-style models, ours)
    an object with a `logits` attribute        Hugging Face's ModelOutput (also a mapping)
    a mapping with a "logits" key              a model that returns a dict
    a tuple or list                            its first tensor (nanoGPT returns (logits, loss))

`io.output` names the place for anything else: an attribute or mapping key (`io.output=scores`), or a tuple
index (`io.output=1`). The loss is then `loss(logits, targets)`, or `loss(output, targets)` with io.loss_on=output
(a loss of the user's that reads more of the output than its logits).

Under `loss=model` (pipeline.workloads.losses.ModelLoss) the model computes its own loss: it is called with the
targets (as the keyword `loss.targets_as`, Hugging Face's `labels` or nanoGPT's `targets`, or positionally after
the input when that is null), and what is back-propagated is the loss it returns (auto: a `loss` attribute, a
"loss" key, or the tuple's 0-dim tensor; or `loss.output`); its logits, when it returns them, still give the
evaluation's accuracy or perplexity.

Every batch is (inputs, targets, extra): `extra` holds a mapping batch's other keys (an attention mask), passed
to the model as keywords (pipeline.job.data splits the items).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.config import IOConfig
from pipeline.result import ModelIOInfo
from pipeline.workloads.losses import ModelLoss

AUTO = "auto"


class OutputError(TypeError):
    """The model's output has nothing where the logits (or its own loss) should be; the message says what it has
    and which key to set."""


def describe_output(out: Any) -> str:
    """What a model returned, for error messages: its type and, for containers, what they hold."""
    if isinstance(out, torch.Tensor):
        return f"a tensor {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        return f"a {len(out)}-{type(out).__name__} of " + ", ".join(describe_output(o) for o in out)
    return f"a {type(out).__name__}"


@dataclass(frozen=True)
class Reader:
    """Where a value sits in a model's output: `how` says it in words (what the record states), `get` reads it."""

    how: str
    get: Callable[[Any], Any]


def _attribute_or_key(name: str) -> Reader:
    return Reader(f"attribute or key {name}",
                  lambda out: getattr(out, name) if hasattr(out, name) else out[name])


def _index(i: int) -> Reader:
    return Reader(f"element {i}", lambda out: out[i])


def explicit_reader(where: str) -> Reader:
    """io.output / loss.output as the user gave it: a tuple index when it is an integer, else a name."""
    return _index(int(where)) if where.lstrip("-").isdigit() else _attribute_or_key(where)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0


def find_logits(out: Any, skip_scalar: bool = False) -> Reader | None:
    """Where the logits are in an output, by the ecosystem's conventions (the module docstring); None if nowhere.
    `skip_scalar`: in a tuple, a 0-dim tensor is a loss, not logits (nanoGPT's (logits, loss))."""
    if isinstance(out, torch.Tensor):
        return Reader("the output itself (a tensor)", lambda o: o)
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return Reader("attribute logits", lambda o: o.logits)
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return Reader("key logits", lambda o: o["logits"])
    if isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            if isinstance(value, torch.Tensor) and not (skip_scalar and _is_scalar(value)):
                return _index(i)
    return None


def find_loss(out: Any) -> Reader | None:
    """Where a model's own loss is: a `loss` attribute or key, or a tuple's 0-dim tensor; None if nowhere."""
    if _is_scalar(getattr(out, "loss", None)):
        return Reader("attribute loss", lambda o: o.loss)
    if isinstance(out, Mapping) and _is_scalar(out.get("loss")):
        return Reader("key loss", lambda o: o["loss"])
    if isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            if _is_scalar(value):
                return _index(i)
    return None


class ModelIO:
    """One rank's way of running the model on a batch: `loss_and_logits(model, batch)`. Where the logits (and the
    model's own loss) sit is found on the first call (the job's two-sample check) and then read directly."""

    def __init__(self, io: IOConfig, loss_fn: Callable, batch_kind: str):
        self.loss_fn, self._batch_kind = loss_fn, batch_kind
        self.own_loss, self.whole_output = isinstance(loss_fn, ModelLoss), io.loss_on == "output"
        self._logits: Reader | None = None if io.output == AUTO else explicit_reader(io.output)
        self._loss: Reader | None = None
        if self.own_loss and loss_fn.output != AUTO:
            self._loss = explicit_reader(loss_fn.output)
        self._found = False

    def call(self, model: torch.nn.Module, batch) -> Any:
        """The model on the batch: its input, its extra keys as keywords, and under loss=model the targets."""
        if not self.own_loss:
            return model(batch.inputs, **batch.extra)
        targets = batch.inputs if self.loss_fn.targets_from == "inputs" else batch.targets
        if self.loss_fn.targets_as is None:
            return model(batch.inputs, targets, **batch.extra)
        return model(batch.inputs, **{self.loss_fn.targets_as: targets}, **batch.extra)

    def loss_and_logits(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.call(model, batch)
        if not self._found:
            self._find(out)
        logits = self._logits.get(out) if self._logits is not None else None
        if self.own_loss:
            return self._loss.get(out), logits
        return self.loss_fn(out if self.whole_output else logits, batch.targets), logits

    def _find(self, out: Any) -> None:
        """Decide, from the first output, where the logits (and the model's own loss) are."""
        if self.own_loss and self._loss is None:
            self._loss = find_loss(out)
            if self._loss is None:
                raise OutputError(f"loss=model: the model returned {describe_output(out)}, with no loss in it (a "
                                  "`loss` attribute or key, or a 0-dim tensor in a tuple); set loss.output to where "
                                  "it is, or check loss.targets_as (the keyword the model takes its targets by)")
        if self._logits is None:
            self._logits = find_logits(out, skip_scalar=self.own_loss)
            if self._logits is None and not (self.own_loss or self.whole_output):
                raise OutputError(f"the model returned {describe_output(out)}, with no logits in it (a tensor, a "
                                  "`logits` attribute or key, or a tuple's first tensor); set io.output to the "
                                  "attribute, key or tuple index that holds them, or use loss=model if the model "
                                  "computes its own loss")
        self._found = True

    def info(self) -> ModelIOInfo:
        """What the record states: how batches were given, where the logits and the loss came from."""
        if self.own_loss:
            given = ("positionally after the input" if self.loss_fn.targets_as is None
                     else f"as the keyword {self.loss_fn.targets_as}")
            what = "the inputs" if self.loss_fn.targets_from == "inputs" else "the targets"
            loss = f"the model's own ({self._loss.how if self._loss else '?'}), given {what} {given}"
        else:
            loss = f"loss._target_ on the {'whole output' if self.whole_output else 'logits'} and the targets"
        return ModelIOInfo(batch=self._batch_kind, logits=self._logits.how if self._logits else None, loss=loss)
