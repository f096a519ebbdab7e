"""The run's objects from their `_target_`s: datasets, model, loss, optimizer, learning-rate schedule and
DataLoader's collate_fn.

A constructor gets the config's arguments, plus what the pipeline knows and the constructor asks for by name
(and the config leaves unset):
- a dataset: `split` ("train" / "test"), or else `train` (True / False), as torchvision's datasets take it; a
  dataset that takes neither is built once and nothing is held out;
- a model: the train dataset's `input_shape`, `num_classes` and `vocab_size`, where the dataset has them. A
  constructor that takes `**kwargs` (a timm-style factory) is given none of them unasked, and the log says so;
  `${from_dataset:NAME}` anywhere in a config reaches the dataset's NAME explicitly (config.FROM_DATASET);
- an optimizer (`_partial_`): the model's parameters (or the parameter groups of `param_groups.*`), first;
- a schedule (`_partial_`): the optimizer, first, and the run's number of steps under the name it takes
  (pipeline.config.LENGTH_NAMES).
An error in a constructor, or in importing its module, stops the job at once with a message naming the config
key, the target and the rank.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from hydra.utils import get_object

from pipeline.callables import takes
from pipeline.config import MODEL_GETS, ParamGroupsConfig, RunConfig, target_of
from pipeline.job.data import Data, ItemFormat, check_datasets
from pipeline.job.stream import first_items
from pipeline.job.memory import resident_bytes
from pipeline.result import OptimizerInfo, ParamGroupInfo
from pipeline.targets import (BuildError, asks_for, build, build_datasets, call, check_model_sizes, dataset_facts,
                              given, located, partial_of, reported, takes_any_keyword)
from pipeline.workloads.losses import ModelLoss
from pipeline.workloads.schedules import run_length

log = logging.getLogger(__name__)
NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
                    torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)


LIGHTNING_HOOKS = ("training_step", "validation_step")


def say_unused_hooks(model: torch.nn.Module, run: RunConfig, rank: int) -> None:
    """A LightningModule (or any model with Lightning's hooks) trains through forward() and loss._target_ here:
    its training_step, validation_step and self.log are not called, which rank 0 says once."""
    hooks = [h for h in LIGHTNING_HOOKS if callable(getattr(model, h, None))]
    if rank != 0 or not hooks:
        return
    optimizers = ("its configure_optimizers gives the optimizer" if run.param_groups.method == "configure_optimizers"
                  else "the optimizer is optimizer._target_ (param_groups.method=configure_optimizers takes the "
                  "model's own)")
    log.warning("model %s has %s, which the pipeline does not call: it trains through forward() and the loss "
                "(loss._target_ on the logits, or loss=model for the model's own), evaluates on the held-out set "
                "(evaluate.*), and self.log reaches nothing; %s", type(model).__name__, " and ".join(hooks), optimizers)


def build_model(run: RunConfig, dataset: Any, rank: int) -> torch.nn.Module:
    target, facts = target_of(run.model), dataset_facts(dataset)
    wanted = [name for name in asks_for("model", run.model, rank, MODEL_GETS) if not given(run.model, name)]
    offered = {name: facts[name] for name in wanted if facts.get(name) is not None}
    _say_what_was_passed(run, rank, offered, facts)
    try:
        model = build("model", run.model, rank, facts=facts, **offered)
    except BuildError as e:
        lacking = [name for name in wanted if name not in offered]
        if lacking:
            raise BuildError(f"{e} (the dataset has no {', '.join(lacking)} to give it: set model.{lacking[0]}, or "
                             f"give the dataset that attribute)") from e.__cause__
        raise
    if not isinstance(model, torch.nn.Module):
        raise BuildError(f"model._target_={target} built a {type(model).__name__} on rank {rank}, not a "
                         "torch.nn.Module")
    check_model_sizes(run, facts, f"rank {rank}")
    say_unused_hooks(model, run, rank)
    return model


def _say_what_was_passed(run: RunConfig, rank: int, offered: dict, facts: dict) -> None:
    """The log says which of the dataset's values the model's constructor was given; one that takes **kwargs (a
    timm-style factory) is given none unasked, and a missing class count is warned about."""
    if rank != 0:
        return
    target, has = target_of(run.model), [n for n in MODEL_GETS if facts.get(n) is not None]
    passed = ", ".join(f"{k}={v}" for k, v in offered.items()) or "nothing"
    withheld = [n for n in has if n not in offered and not given(run.model, n)]
    log.info("model._target_=%s given %s from the dataset%s", target, passed,
             f"; not given: {', '.join(withheld)}" if withheld else "")
    if takes_any_keyword("model", run.model, rank) and "num_classes" in withheld:
        log.warning("model._target_=%s takes **kwargs, so it was not given the dataset's num_classes=%s: it builds "
                    "its own default head unless you set model.num_classes (or model.num_classes="
                    "${from_dataset:num_classes})", target, facts["num_classes"])


def build_loss(run: RunConfig, rank: int, facts: dict | None = None) -> Callable:
    loss = build("loss", run.loss, rank, facts=facts)
    if not callable(loss) and not isinstance(loss, ModelLoss):
        raise BuildError(f"loss._target_={target_of(run.loss)} built a {type(loss).__name__} on rank {rank}, which "
                         "cannot be called as loss(output, target)")
    return loss


def build_collate(run: RunConfig, rank: int, facts: dict | None = None) -> Callable | None:
    """loader.collate_fn, built (None: pipeline.job.data.collate_rows): a function as a partial of its config's
    arguments (as the optimizer is, whatever `_partial_` says), a class as the callable object it makes."""
    node = run.loader.collate_fn
    if node is None:
        return None
    if inspect.isclass(located("loader.collate_fn", node, rank)):
        collate = build("loader.collate_fn", node, rank, facts=facts)
    else:
        collate = partial_of("loader.collate_fn", node, rank, facts)
    if not callable(collate):
        raise BuildError(f"loader.collate_fn._target_={target_of(run.loader.collate_fn)} built a "
                         f"{type(collate).__name__} on rank {rank}, not a function of a list of items")
    return collate


def no_decay_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups: weight decay for the weights of the other layers, none for biases, normalisation layers' weights
    and embeddings (nanoGPT's and Hugging Face's Trainer's rule, embeddings included). Each parameter once (a
    tied weight is one parameter)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES) or "Norm" in type(m).__name__
              for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (no_decay if id(p) in exempt or p.dim() < 2 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _method_arguments(method: Callable, run: RunConfig, device: torch.device) -> dict:
    """What a model's configure_optimizers-style method asks for by name, from the optimizer's config."""
    opt = run.optimizer if isinstance(run.optimizer, dict) else vars(run.optimizer)
    known = {"weight_decay": opt.get("weight_decay"), "learning_rate": opt.get("lr"), "lr": opt.get("lr"),
             "betas": opt.get("betas"), "device_type": device.type}
    return {k: v for k, v in known.items() if k in takes(method) and v is not None}


def build_optimizer(run: RunConfig, model: torch.nn.Module, rank: int,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the model's parameters, or over the groups param_groups.* makes; a model method that
    returns a whole optimizer (nanoGPT's configure_optimizers) gives it directly."""
    groups: Any = model.parameters()
    pg: ParamGroupsConfig = run.param_groups
    if pg.no_decay:
        groups = no_decay_groups(model)
    elif pg.method is not None:
        method = getattr(model, pg.method, None)
        if not callable(method):
            raise BuildError(f"param_groups.method={pg.method}: the model ({type(model).__name__}) has no such method "
                             f"(rank {rank})")
        given = _method_arguments(method, run, device)
        try:
            made = method(**given)
        except Exception as e:
            raise BuildError(f"param_groups.method={pg.method} failed on rank {rank}, given "
                             f"{', '.join(given) or 'nothing'} (from the optimizer's config): "
                             f"{type(e).__name__}: {e}") from e
        optimizer = method_optimizer(made, pg.method, rank)
        if optimizer is not None:
            return optimizer
        groups = made
    elif pg.function is not None:
        groups = call("param_groups.function", pg.function, rank, model)
    return call("optimizer", run.optimizer, rank, groups)


def method_optimizer(made: Any, name: str, rank: int) -> torch.optim.Optimizer | None:
    """The optimizer a configure_optimizers-style method returned in one of Lightning's shapes (an optimizer; a
    dict with `optimizer`; `([optimizers], [schedulers])`; a list of one optimizer), or None when it returned
    parameter groups. A schedule or a second optimizer in it is refused by name: the pipeline steps one optimizer,
    and the schedule it steps (after every optimizer step) is the `scheduler` group's."""
    where = f"param_groups.method={name} (rank {rank})"
    if isinstance(made, dict) and "optimizer" in made:
        extra = [k for k in made if k != "optimizer"]
        if extra:
            raise BuildError(f"{where} returned a dict with {', '.join(map(repr, extra))} beside 'optimizer': the "
                             "pipeline steps no schedule but its own; return the optimizer alone and set "
                             "scheduler=... (stepped after every optimizer step)")
        made = made["optimizer"]
    if isinstance(made, tuple) and len(made) == 2 and all(isinstance(x, (list, tuple)) for x in made):
        optimizers, schedulers = made
        if schedulers:
            raise BuildError(f"{where} returned {len(schedulers)} schedule(s) beside its optimizer(s): the pipeline "
                             "steps no schedule but its own; return the optimizer alone and set scheduler=...")
        made = list(optimizers)
    if isinstance(made, (list, tuple)) and made and all(isinstance(x, torch.optim.Optimizer) for x in made):
        if len(made) > 1:
            raise BuildError(f"{where} returned {len(made)} optimizers: the pipeline steps one; return one "
                             "optimizer (or its parameter groups)")
        made = made[0]
    return made if isinstance(made, torch.optim.Optimizer) else None


def optimizer_info(optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """What the record states of the optimizer: its class and each parameter group's size and settings."""
    return OptimizerInfo(name=type(optimizer).__name__, groups=[
        ParamGroupInfo(parameters=sum(p.numel() for p in g["params"]), tensors=len(g["params"]),
                       lr=float(g["lr"]), weight_decay=float(g.get("weight_decay", 0.0)))
        for g in optimizer.param_groups])


def build_scheduler(run: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int, rank: int):
    """The learning-rate schedule, stepped after every optimizer step; None when the config has none."""
    if run.scheduler is None:
        return None
    schedule = partial_of("scheduler", run.scheduler, rank)
    return reported("scheduler", run.scheduler, rank,
                     lambda: schedule(optimizer, **run_length(schedule, total_steps)))


@dataclass
class Workload:
    """What a job trains, built from the config's `_target_`s: the model, the data (the splits, how their items are
    read and collated) and the loss."""

    model: torch.nn.Module
    data: Data
    loss_fn: Callable
    label: str  # the model as people name it (model_label)
    baseline_rss: int | None = None  # this process's resident set before the model was built (the memory baseline)


def build_workload(run: RunConfig, rank: int, mark: Callable[[str], None], world_size: int = 1) -> Workload:
    """The datasets (their items checked), the model, the loss and the collate_fn, from their `_target_`s, with
    the same initial weights on every rank; `mark(name)` notes the moment each part is done (the start-up
    breakdown)."""
    torch.manual_seed(run.trainer.seed)
    splits = build_datasets(run, rank, world_size)
    train_set, test_set = splits.train, splits.test
    items = ItemFormat(run.io.input_key, run.io.target_key,
                       tuple(run.io.model_keys) if run.io.model_keys is not None else None)
    kind = check_datasets(train_set, test_set, target_of(run.dataset), rank, items, splits.stream)
    first = first_items(train_set, 2, splits.stream)
    mark("datasets")
    baseline = resident_bytes()
    model = build_model(run, train_set, rank)
    mark("model")
    facts = dataset_facts(train_set)
    data = Data(train_set=train_set, test_set=test_set, items=items, collate_fn=build_collate(run, rank, facts),
                kind=kind, first=first, evaluation_source=splits.source, stream=splits.stream,
                shares_itself=splits.shares_itself)
    return Workload(model=model, data=data, loss_fn=build_loss(run, rank, facts), label=model_label(run, model),
                    baseline_rss=baseline)


def _targets(node: Any, depth: int = 0) -> list[tuple[int, str]]:
    """Every `_target_` in a config node, nested ones too, with its depth."""
    if not isinstance(node, dict):
        return [(depth, node._target_)] if hasattr(node, "_target_") else []
    found = [(depth, node["_target_"])] if "_target_" in node else []
    for value in node.values():
        found += _targets(value, depth + 1)
    return found


def model_label(run: RunConfig, model: torch.nn.Module) -> str:
    """The model as people name it: the innermost torch.nn.Module class among the model config's `_target_`s (a
    wrapper's model, a Hugging Face model rather than its config; the built model's class for a factory
    function), and its size: layers x width where that module's config says (Hugging Face's num_hidden_layers and
    hidden_size), else its parameter count."""
    classes = [cls for _, cls in sorted(((d, get_object(t)) for d, t in _targets(run.model)), key=lambda dc: -dc[0])
               if isinstance(cls, type) and issubclass(cls, torch.nn.Module)]
    cls = classes[0] if classes else type(model)
    inner = next((m for m in model.modules() if type(m) is cls), model)
    config = getattr(inner, "config", None)
    layers, width = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if isinstance(layers, int) and isinstance(width, int):
        return f"{cls.__name__} {layers}x{width}"
    return f"{cls.__name__} {sum(p.numel() for p in inner.parameters()) / 1e6:.3g}M params"
