"""A config's `_target_`, imported and built, with every failure reported as its config key's: torch-free, so the
launch builds the built-in datasets (which checks their files) through the same steps as the job does.

    build(key, node, rank)               instantiate(node): the object the target makes
    call(key, node, rank, *args)         the target as a partial, called with args (an optimizer's parameters)
    partial_of(key, node, rank)          the partial itself (a schedule, completed once its length is known)

A target is imported as the launch found it (pipeline.config.find_module): its longest prefix that is a module,
then attributes, so an error inside the user's module (its own imports, a syntax error) is named with the key.
`${from_dataset:NAME}` anywhere in a node becomes the train dataset's NAME (`facts`, once it is built). `rank` is
where the building happens: a rank's number in a job, None at launch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from hydra.utils import instantiate

from pipeline.callables import takes
from pipeline.config import FROM_DATASET, ConfigError, RunConfig, find_module, from_dataset_name, target_of


class BuildError(RuntimeError):
    """A `_target_` that could not be built; the message names the key, the target and the rank."""


def given(node: Any, name: str) -> bool:
    """Whether a config node (a dict, or a built-in schema's dataclass) sets `name`."""
    value = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
    return value is not None


def located(key: str, node: Any, rank: int | None) -> Any:
    """The class or function a `_target_` names, imported: its longest prefix that is a module (found as the
    launch found it, pipeline.config.find_module), then attributes. An error in that module (its own imports, a
    syntax error) or a missing attribute is the key's."""
    target = target_of(node)
    parts = target.split(".")
    depth = next((n for n in range(len(parts) - 1, 0, -1) if find_module(".".join(parts[:n]))), 0)
    try:
        if not depth:
            raise ModuleNotFoundError(f"no module of {target} can be found")
        obj = importlib.import_module(".".join(parts[:depth]))
        for attribute in parts[depth:]:
            obj = getattr(obj, attribute)
        return obj
    except Exception as e:
        raise BuildError(f"{key}._target_={target} could not be imported {where(rank)}: {type(e).__name__}: "
                         f"{e}") from e


def asks_for(key: str, node: Any, rank: int | None, names: tuple[str, ...]) -> set[str]:
    """Which of `names` the target's constructor takes by name (its signature; none if it has no readable one)."""
    return takes(located(key, node, rank)) & set(names)


def takes_any_keyword(key: str, node: Any, rank: int | None) -> bool:
    try:
        parameters = inspect.signature(located(key, node, rank)).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def with_dataset_values(key: str, node: Any, facts: dict[str, Any]) -> Any:
    """`node` with every `${from_dataset:NAME}` replaced by the train dataset's NAME (`facts`); a name the dataset
    does not have is an error naming the key."""
    if isinstance(node, dict):
        return {k: with_dataset_values(f"{key}.{k}", v, facts) for k, v in node.items()}
    if isinstance(node, list):
        return [with_dataset_values(f"{key}[{i}]", v, facts) for i, v in enumerate(node)]
    name = from_dataset_name(node)
    if name is None:
        return node
    if facts.get(name) is None:
        have = [n for n in FROM_DATASET if facts.get(n) is not None]
        raise BuildError(f"{key}=${{from_dataset:{name}}}: the train dataset has no {name} (it has: "
                         f"{', '.join(have) or 'none of ' + ', '.join(FROM_DATASET)}); set {key} to a value")
    return facts[name]


def dataset_facts(dataset: Any) -> dict[str, Any]:
    """What a dataset says of itself that configs may use: its FROM_DATASET attributes (tuples as lists)."""
    facts = {name: getattr(dataset, name, None) for name in FROM_DATASET}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in facts.items()}


def reported(key: str, node: Any, rank: int | None, make: Callable[[], Any]) -> Any:
    """`make()`, its failure the key's. A ConfigError (a built-in dataset's missing files) names its key already
    and is passed on as it is."""
    try:
        return make()
    except ConfigError:
        raise
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, ConfigError):
            raise cause from None
        raise BuildError(f"{key}._target_={target_of(node)} could not be built {where(rank)}: "
                         f"{type(cause).__name__}: {cause}") from e


def _prepared(key: str, node: Any, rank: int | None, facts: dict | None) -> Any:
    """The node with `${from_dataset:...}` filled in, its target importable."""
    node = with_dataset_values(key, node, facts or {})
    located(key, node, rank)
    return node


def partial_of(key: str, node: Any, rank: int | None, facts: dict | None = None) -> Callable:
    """The `_target_` as a partial (its config's arguments bound), not yet called, whatever its config says of
    `_partial_`."""
    node = _prepared(key, node, rank, facts)
    return reported(key, node, rank, lambda: instantiate(node, _partial_=True, _convert_="all"))


def build(key: str, node: Any, rank: int | None, facts: dict | None = None, **kwargs) -> Any:
    """instantiate(node) with `kwargs`; a failure, in importing the target's module or in its constructor, is
    reported as the config key's. `facts`: the dataset's values for `${from_dataset:...}`. A built-in schema's
    node (a dataclass: plain values, no nested targets) is given to its class directly: the launch builds the
    built-in datasets of every point of a sweep, and Hydra's instantiate costs a millisecond a call."""
    if dataclasses.is_dataclass(node):
        target = located(key, node, rank)
        arguments = {k: v for k, v in vars(node).items() if k not in ("_target_", "_partial_")}
        return reported(key, node, rank, lambda: target(**{**arguments, **kwargs}))  # kwargs win, as with Hydra
    node = _prepared(key, node, rank, facts)
    return reported(key, node, rank, lambda: instantiate(node, _convert_="all", **kwargs))


def call(key: str, node: Any, rank: int | None, *args, **kwargs) -> Any:
    """The target as a partial (whatever its config says of `_partial_`), called with `args` and `kwargs` (an
    optimizer with the parameters, a groups function with the model)."""
    made = partial_of(key, node, rank)
    return reported(key, node, rank, lambda: made(*args, **kwargs))


def _cause(e: BaseException) -> BaseException:
    """Hydra wraps a constructor's exception in its own; the constructor's is the one to show."""
    while e.__cause__ is not None and type(e).__name__ == "InstantiationException":
        e = e.__cause__
    return e


def build_datasets(run: RunConfig, rank: int | None) -> tuple[Any, Any | None]:
    """(train split, test split), or (the dataset, None) when its constructor takes no split."""
    asks = asks_for("dataset", run.dataset, rank, ("split", "train"))
    if "split" in asks:
        return build("dataset", run.dataset, rank, split="train"), build("dataset", run.dataset, rank, split="test")
    if "train" in asks:
        return build("dataset", run.dataset, rank, train=True), build("dataset", run.dataset, rank, train=False)
    return build("dataset", run.dataset, rank), None




def where(rank: int | None) -> str:
    return "at launch" if rank is None else f"on rank {rank}"
