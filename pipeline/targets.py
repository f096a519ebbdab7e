"""A config's `_target_`, imported and built, with every failure reported as its config key's: torch-free, so the
launch builds the built-in datasets (which checks their files) through the same steps as the job does.

    build(key, node, rank)               instantiate(node): the object the target makes
    call(key, node, rank, *args)         the target as a partial, called with args (an optimizer's parameters)
    partial_of(key, node, rank)          the partial itself (a schedule, completed once its length is known)

A target is imported as the launch found it (pipeline.sources.module_part): its longest prefix that is a module,
then attributes, so an error inside the user's module (its own imports, a syntax error) is named with the key.
`${from_dataset:NAME}` anywhere in a node becomes the train dataset's NAME (`facts`, once it is built). `rank` is
where the building happens: a rank's number in a job, None at launch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.utils import instantiate

from pipeline.callables import takes
from pipeline.config import DATASET_GETS, FROM_DATASET, ConfigError, RunConfig, from_dataset_name, target_of
from pipeline.sources import module_part


class BuildError(RuntimeError):
    """A `_target_` that could not be built; the message names the key, the target and the rank."""


def given(node: Any, name: str) -> bool:
    """Whether a config node (a dict, or a built-in schema's dataclass) sets `name`."""
    value = node.get(name) if isinstance(node, dict) else getattr(node, name, None)
    return value is not None


def located(key: str, node: Any, rank: int | None) -> Any:
    """The class or function a `_target_` names, imported: its longest prefix that is a module (found as the
    launch found it, pipeline.sources.module_part), then attributes. An error in that module (its own imports, a
    syntax error) or a missing attribute is the key's."""
    target = target_of(node)
    parts = target.split(".")
    depth = module_part(target)
    try:
        if not depth:
            raise ModuleNotFoundError(f"no module of {target} can be found")
        obj = importlib.import_module(".".join(parts[:depth]))
        for attribute in parts[depth:]:
            obj = getattr(obj, attribute)
        return obj
    except Exception as e:
        raise BuildError(f"{key}._target_={target} could not be imported {where(rank)}: {type(e).__name__}: "
                         f"{e}{caused_by(e)}") from e


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


def check_model_sizes(run: RunConfig, facts: dict[str, Any], where: str) -> None:
    """A class count or vocabulary set in model.* covers the dataset's (a smaller one fails far from the cause: on
    CUDA, as a device-side assert), and an input shape set there is the dataset's (else the first layer's matrix
    product fails). `where`: "at launch" (a dataset the launch builds), or the rank."""
    def mine(name):
        return run.model.get(name) if isinstance(run.model, dict) else getattr(run.model, name, None)

    for name in ("num_classes", "vocab_size"):
        theirs = facts.get(name)
        if isinstance(mine(name), int) and isinstance(theirs, int) and mine(name) < theirs:
            raise ConfigError(f"model.{name}={mine(name)} is smaller than the dataset's {name}={theirs} ({where}); "
                              f"set model.{name}={theirs}, or null to take the dataset's")
    shape, theirs = mine("input_shape"), facts.get("input_shape")
    if isinstance(shape, (list, tuple)) and isinstance(theirs, (list, tuple)) and list(shape) != list(theirs):
        raise ConfigError(f"model.input_shape={list(shape)} is not the dataset's input_shape={list(theirs)} ({where}); "
                          "set model.input_shape=null to take the dataset's")


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
        # Hugging Face's readers end with a bare StopIteration where the files hold no row
        said = str(cause) or ("the data holds no rows (empty files?)" if isinstance(cause, StopIteration) else "")
        raise BuildError(f"{key}._target_={target_of(node)} could not be built {where(rank)}: "
                         f"{type(cause).__name__}: {said}{caused_by(cause)}") from e


def caused_by(e: BaseException) -> str:
    """The innermost exception under `e` (its causes and the exceptions it was raised while handling), in words,
    when it is not `e`: a library's wrapper (Hugging Face's DatasetGenerationError, transformers' "Could not
    import module") hides what went wrong beneath it."""
    inner, seen = e, {id(e)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(inner))
    if inner is e:
        return ""
    return f" (caused by {type(inner).__name__}: {str(inner).strip()[:300]})"


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


def build(key: str, node: Any, rank: int | None, /, facts: dict | None = None, **kwargs) -> Any:
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


# datasets the launch builds as the job will (their splits and held-out rows checked before anything starts): the
# built-in ones, and Hugging Face's `datasets` (torch-free, local files memory-mapped)
LAUNCH_BUILT = ("datasets.",)


def built_at_launch(node: Any) -> bool:
    return target_of(node).startswith(LAUNCH_BUILT)


@dataclass(frozen=True)
class Splits:
    """The datasets a run trains and evaluates on, and where its evaluation's samples come from, in words (the
    record's evaluation.split); whether they are streams (is_stream), and whether a stream was built with the
    rank's `rank` and `world_size` (it then reads that rank's share only)."""

    train: Any
    test: Any | None
    source: str | None  # None: no evaluation
    stream: bool = False
    shares_itself: bool = False


def is_stream(dataset: Any) -> bool:
    """A dataset read in order, without an index: a torch IterableDataset (Hugging Face's streaming datasets are
    ones), by its classes' names, torch-free."""
    return any(c.__name__ == "IterableDataset" for c in type(dataset).__mro__)


def build_datasets(run: RunConfig, rank: int | None, world_size: int | None = None) -> Splits:
    """The training set, built with what the config gives (an explicit `split` or `train` is passed as given; an
    unset one is filled in: split="train", train=True; on a rank, `rank` and `world_size` where the constructor
    takes both), and the held-out set as `evaluate` says: the constructor's `evaluate.split` (train=False), or
    `evaluate.holdout` of the training rows. A held-out set that is the training data, or data without that split,
    is a ConfigError naming the keys that choose another; so is a stream the run cannot be planned by."""
    ev, node = run.evaluate, run.dataset
    if rank is None and isinstance(node, dict):
        check_data_files(node)
    asks = asks_for("dataset", node, rank, DATASET_GETS)
    by = "split" if "split" in asks else "train" if "train" in asks else None
    own = {by: "train" if by == "split" else True} if by and not given(node, by) else {}
    share = {"rank": rank, "world_size": world_size} if rank is not None and {"rank", "world_size"} <= asks and \
        not (given(node, "rank") or given(node, "world_size")) else {}
    train = build("dataset", node, rank, **own, **share)
    check_field_types(node, train)
    stream = is_stream(train)
    if stream:
        check_stream(run, train)
    elif run.loader.epoch_samples is not None:
        raise ConfigError(f"loader.epoch_samples={run.loader.epoch_samples} is for a stream (an IterableDataset), and "
                          f"dataset._target_={target_of(node)} is indexed: an epoch is all of its samples; leave "
                          "loader.epoch_samples null")
    if not ev.enabled:
        return Splits(train, None, None, stream, bool(share))
    if ev.holdout:
        if stream:
            raise ConfigError(f"evaluate.holdout={ev.holdout}: dataset._target_={target_of(node)} is a stream, whose "
                              "rows cannot be held out by index; give evaluate.split=<name> for another split of the "
                              "data, or evaluate.enabled=false")
        return held_out(train, ev.holdout)
    if by is None:
        return Splits(train, None, None, stream, bool(share))
    if by == "split":
        test, built_with = held_split(node, rank, ev.split, share), f"split={ev.split!r}"
    else:
        test, built_with = build("dataset", node, rank, train=False, **share), "train=False"
    same = same_data(train, test) if isinstance(node, dict) else None  # a built-in's splits are its own
    if same:
        raise ConfigError(f"dataset._target_={target_of(node)}: the evaluation's samples (built with {built_with}) are "
                          f"the training data ({same}): {CHOOSE_EVALUATION}")
    return Splits(train, test, f"the dataset built with {built_with}", stream, bool(share))


def check_data_files(node: dict) -> None:
    """Hugging Face's `data_files` (a path or pattern, a list of them, or a split's of each): every local one
    matches a file (their own message for none, in streaming, is a bare StopIteration)."""
    import glob

    from pipeline.rundir import special_kind

    files = node.get("data_files")
    by_split = files.items() if isinstance(files, dict) else [(None, files)]
    for split, patterns in by_split:
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            if not isinstance(pattern, str) or "://" in pattern:
                continue
            key = "dataset.data_files" + (f".{split}" if split is not None else "")
            matched = glob.glob(pattern, recursive=True)
            if not matched:
                raise ConfigError(f"{key}={pattern!r} matches no file (from {os.getcwd()})")
            for path in matched:  # reading a FIFO would wait for a writer forever
                kind = special_kind(Path(path))
                if kind is not None and kind != "a folder":  # Hugging Face reads a folder's files
                    raise ConfigError(f"{key}={pattern!r}: {path} is {kind}, not a file")


def check_field_types(node: Any, dataset: Any) -> None:
    """Hugging Face's datasets type a field whose rows differ in type (a list in one, a string in another) as Json,
    which no collate can make a tensor of: refused where the dataset is built, naming the field."""
    features = getattr(dataset, "features", None)
    mixed = [name for name, f in (features or {}).items() if type(f).__name__ == "Json"] \
        if isinstance(features, dict) else []
    if mixed:
        raise ConfigError(f"dataset._target_={target_of(node)}: the rows' field {mixed[0]!r} differs in type from "
                          "row to row (Hugging Face's reader typed it Json); give every row's field one type")


def check_stream(run: RunConfig, train: Any) -> None:
    """A stream has no length: the run's is trainer.max_steps, or trainer.epochs of loader.epoch_samples. A stream
    that yields nothing is refused (at launch, for the datasets built there)."""
    if not (run.trainer.max_steps or run.loader.epoch_samples):
        raise ConfigError(f"dataset._target_={target_of(run.dataset)} is a stream, with no length to plan the run by: "
                          "set trainer.max_steps, or loader.epoch_samples (the run is then trainer.epochs of them)")
    if not first_of(train, 1):
        raise ConfigError(f"dataset._target_={target_of(run.dataset)}: the stream yields nothing")


def first_of(dataset: Any, n: int) -> list:
    """The first `n` items of a stream, read from a copy (the stream itself does not move)."""
    import copy
    import itertools

    return list(itertools.islice(iter(copy.deepcopy(dataset)), n))


CHOOSE_EVALUATION = ("set evaluate.holdout=0.1 to hold a tenth of the training rows out, evaluate.split=<name> for "
                     "another split of the data, or evaluate.enabled=false to train without evaluating")


def held_split(node: Any, rank: int | None, split: str, share: dict) -> Any:
    """The dataset built with split=`split`; data without that split (Hugging Face's `Unknown split "test".
    Should be one of ['train']`) is a ConfigError naming evaluate.split."""
    try:
        return build("dataset", node, rank, split=split, **share)
    except BuildError as e:
        cause = _cause(e.__cause__) if e.__cause__ is not None else e
        if isinstance(cause, (ValueError, KeyError)) and "split" in str(cause).lower():
            raise ConfigError(f"evaluate.split={split!r}: dataset._target_={target_of(node)} has no such split "
                              f"({str(cause).strip()[:300]}); {CHOOSE_EVALUATION}") from None
        raise


class Rows:
    """Some rows of a dataset, by index (torch.utils.data.Subset's job, torch-free: the launch builds it). The
    dataset's facts for `${from_dataset:...}` (its vocab_size, num_classes, ...) are the rows' too."""

    def __init__(self, dataset: Any, indices: Any):
        self.dataset, self.indices = dataset, indices  # a sorted array of the dataset's indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

    def __getattr__(self, name: str) -> Any:
        if name in FROM_DATASET or name == "validate":
            return getattr(self.dataset, name)
        raise AttributeError(name)


HOLDOUT_SEED = 0x5EED  # the held-out rows: one permutation, whatever the run's seed, so every run holds out the same


def held_out(train: Any, fraction: float) -> Splits:
    """`fraction` of the training rows held out: a permutation of their indices by a fixed seed, its last
    ceil(fraction x n) rows; the same on every rank, restart and run of the data."""
    import numpy as np

    n = len(train)
    k = math.ceil(fraction * n)
    if k == 0 or k == n:
        raise ConfigError(f"evaluate.holdout={fraction} of {n} training rows leaves {n - k} to train on and {k} to "
                          "evaluate; choose a fraction that leaves some of each")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return Splits(Rows(train, np.sort(order[:n - k])), Rows(train, np.sort(order[n - k:])),
                  f"holdout: {k} of the {n} training rows ({fraction:g}), never trained on")


def same_data(a: Any, b: Any) -> str | None:
    """Why two datasets are the same data, or None: the same object, the same files (Hugging Face's cache files),
    or the same length and the same rows at the start, the middle and the end (a cheap fingerprint)."""
    if a is b:
        return "the same object"
    files = [sorted(f.get("filename", "") for f in getattr(d, "cache_files", None) or []) for d in (a, b)]
    if files[0] and files[0] == files[1]:
        return f"the same files: {', '.join(files[0])[:200]}"
    if is_stream(a) or is_stream(b):
        try:
            first = [first_of(d, 3) for d in (a, b)]
            if first[0] and _plain(first[0]) == _plain(first[1]):
                return f"the same first {len(first[0])} rows"
        except Exception:  # a stream that cannot be read twice: no verdict
            return None
        return None
    try:
        n = len(a)
        if n != len(b) or n == 0:
            return None
        if all(_plain(a[i]) == _plain(b[i]) for i in sorted({0, n // 2, n - 1})):
            return f"the same {n} rows, as far as the first, middle and last show"
    except Exception:  # rows that cannot be compared: no verdict
        return None
    return None


def _plain(value: Any) -> Any:
    """A row as plain data to compare: tensors and arrays as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def where(rank: int | None) -> str:
    return "at launch" if rank is None else f"on rank {rank}"
