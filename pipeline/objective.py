"""What a search optimises: figures of a run's record, named by their dotted place in it (`evaluation.value`,
`timing.throughput_samples_per_s`) or by a figure derived from it (`cost.node_hours`). The one home of that
catalogue: the launch checks an `objective` against it (a typo is refused, with the near names), and Hydra's
optimisation sweepers (through the launcher) and the built-in search (pipeline/search/) read the values from the
record with it. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from functools import cache
from typing import Any

from pipeline.checks import ConfigError
from pipeline.result import Result

DEFAULT = "evaluation.value"
ALIASES = {"evaluation": DEFAULT}
# the allocation a run held, as a cost: nodes x its wall time, and the GPUs of those nodes x its wall time
DERIVED = {
    "cost.node_hours": lambda rec: rec.nodes * rec.wall_time_s / 3600,
    "cost.gpu_hours": lambda rec: (rec.config.get("cluster", {}).get("gpus_per_node") or 0) * rec.nodes
    * rec.wall_time_s / 3600,
}
DIRECTIONS = ("minimize", "maximize")
# the objectives a trial also reports during training (trainer.eval_every), which a pruner can judge it by: the
# figure of each evaluation that is the objective's
INTERMEDIATE = {"evaluation.value": "value", "evaluation.loss": "loss"}


class NoValue(Exception):
    """The record lacks the figure (not measured, or the run failed before it): the trial failed."""


@cache
def numeric_fields() -> tuple[str, ...]:
    """Every number a record can hold, dotted: its numeric fields and those of its nested parts (lists and
    mappings left out: their items are no single figure), and the derived ones."""
    names = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Union:  # Optional[X]: X
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            elif tp in (int, float) and name not in ("schema_version", "point"):
                names.append(f"{prefix}{name}")


    walk(Result, "")
    return tuple(sorted(names)) + tuple(DERIVED)


def objectives(value: Any) -> list[str]:
    """`objective` typed: one name or a list of them, each a record's number (an alias resolved); ConfigError
    naming the key and the near names otherwise."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"objective={value!r}: give a record's figure by its dotted name (default {DEFAULT}), "
                          "or a list of them for several objectives")
    out = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in numeric_fields():
            near = difflib.get_close_matches(name, numeric_fields(), n=3, cutoff=0.5)
            raise ConfigError(f"objective={name!r} is no figure a record holds"
                              + (f"; did you mean {' or '.join(near)}?" if near else "")
                              + f" (a record's numbers: {', '.join(numeric_fields())})")
        out.append(name)
    if len(set(out)) < len(out):
        raise ConfigError(f"objective={names}: a figure is named twice")
    return out


def auto_direction(name: str, provides: str | None) -> str | None:
    """The direction a figure is optimised in when none is given: the evaluation's accuracy up (a classifier),
    its perplexity down (a language model); throughput up; times, costs and losses down. None where it depends on
    what the dataset provides and that is not known (a dataset of the user's)."""
    if name == DEFAULT:
        return {"images": "maximize", "tokens": "minimize"}.get(provides or "")
    if name.startswith(("timing.throughput", "utilisation.")):
        return "maximize"
    return "minimize"


def value_of(rec: Result, name: str) -> float:
    """The figure `name` of a record; NoValue, saying why, where it has none or it is not finite."""
    if name in DERIVED:
        value = DERIVED[name](rec)
    else:
        value: Any = rec
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                why = rec.missing.get(part) or rec.missing.get(name.split(".")[0])
                raise NoValue(f"the record has no {name}" + (f": {why}" if why else ""))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NoValue(f"the record's {name} is {value!r}, not a finite number")
    return float(value)
