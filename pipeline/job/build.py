"""The run's objects from their `_target_`s: datasets, model, loss, optimizer and learning-rate schedule.

A constructor gets the config's arguments, plus what the pipeline knows and the constructor asks for by name
(and the config leaves unset):
- a dataset: `split` ("train" / "test"), or else `train` (True / False), as torchvision's datasets take it; a
  dataset that takes neither is built once and nothing is held out;
- a model: the train dataset's `input_shape`, `num_classes` and `vocab_size`, where the dataset has them;
- an optimizer (`_partial_`): the model's parameters, first;
- a schedule (`_partial_`): the optimizer, first, and `T_max` / `total_steps` as the run's number of steps.
An error in a constructor stops the job at once with a message naming the config key, the target and the rank.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from hydra.utils import get_object, instantiate

from pipeline.config import RunConfig
from pipeline.rundir import target_of

MODEL_GETS = ("input_shape", "num_classes", "vocab_size")
SCHEDULE_STEPS = ("T_max", "total_steps")


class BuildError(RuntimeError):
    """A `_target_` that could not be built; the message names the key, the target and the rank."""


def _given(node: Any, name: str) -> bool:
    value = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
    return value is not None


def _asks_for(target: str, names: tuple[str, ...]) -> set[str]:
    """Which of `names` the target's constructor takes by name (its signature; none if it has no readable one)."""
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n in names if n in parameters}


def build(key: str, node: Any, rank: int, *args, partial: bool = False, **kwargs) -> Any:
    """instantiate(node) with `kwargs` (a `partial` target is then called with `args` and `kwargs`, whatever its
    config says of `_partial_`); a failure is reported as the config key's, on this rank."""
    try:
        if partial:
            return instantiate(node, _partial_=True, _convert_="all")(*args, **kwargs)
        return instantiate(node, _convert_="all", **kwargs)
    except Exception as e:
        raise BuildError(f"{key}._target_={target_of(node)} could not be built on rank {rank}: "
                         f"{type(e).__name__}: {_cause(e)}") from e


def _cause(e: BaseException) -> str:
    """Hydra wraps a constructor's exception in its own; the constructor's message is the one to show."""
    while e.__cause__ is not None and type(e).__name__ == "InstantiationException":
        e = e.__cause__
    return str(e)


def build_datasets(run: RunConfig, rank: int) -> tuple[Any, Any | None]:
    """(train split, test split), or (the dataset, None) when its constructor takes no split."""
    asks = _asks_for(target_of(run.dataset), ("split", "train"))
    if "split" in asks:
        return build("dataset", run.dataset, rank, split="train"), build("dataset", run.dataset, rank, split="test")
    if "train" in asks:
        return build("dataset", run.dataset, rank, train=True), build("dataset", run.dataset, rank, train=False)
    return build("dataset", run.dataset, rank), None


def build_model(run: RunConfig, dataset: Any, rank: int) -> torch.nn.Module:
    target = target_of(run.model)
    wanted = [name for name in _asks_for(target, MODEL_GETS) if not _given(run.model, name)]
    offered = {name: getattr(dataset, name) for name in wanted if getattr(dataset, name, None) is not None}
    try:
        model = build("model", run.model, rank, **offered)
    except BuildError as e:
        lacking = [name for name in wanted if name not in offered]
        if lacking:
            raise BuildError(f"{e} (the dataset has no {', '.join(lacking)} to give it: set it in model.*, or "
                             f"give the dataset that attribute)") from e.__cause__
        raise
    if not isinstance(model, torch.nn.Module):
        raise BuildError(f"model._target_={target} built a {type(model).__name__} on rank {rank}, not a "
                         "torch.nn.Module")
    return model


def build_loss(run: RunConfig, rank: int) -> Callable:
    loss = build("loss", run.loss, rank)
    if not callable(loss):
        raise BuildError(f"loss._target_={target_of(run.loss)} built a {type(loss).__name__} on rank {rank}, which "
                         "cannot be called as loss(output, target)")
    return loss


def build_optimizer(run: RunConfig, model: torch.nn.Module, rank: int) -> torch.optim.Optimizer:
    return build("optimizer", run.optimizer, rank, model.parameters(), partial=True)


def build_scheduler(run: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int, rank: int):
    """The learning-rate schedule, stepped after every optimizer step; None when the config has none."""
    if run.scheduler is None:
        return None
    steps = {name: total_steps for name in _asks_for(target_of(run.scheduler), SCHEDULE_STEPS)
             if not _given(run.scheduler, name)}
    return build("scheduler", run.scheduler, rank, optimizer, partial=True, **steps)
