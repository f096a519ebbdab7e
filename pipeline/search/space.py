"""A search space written as Hydra's Optuna sweeper writes it, one parameter per dotted key:

    interval(0.001, 0.1)              a float, uniform           int(interval(1, 8))   an integer, uniform
    tag(log, interval(1e-4, 1e-1))    a float, log-uniform       range(16, 129, 16)    16, 32, ..., 128 (Hydra's
    choice(adam, sgd)                 one of these                                     range: the stop excluded)

parsed with Hydra's own override grammar, at launch, into plain specs (`Param`) that search.json keeps and that a
worker turns into Optuna's distributions. Imports neither torch nor Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError


@dataclass(frozen=True)
class Param:
    name: str  # the dotted key it sets
    type: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def distribution(self):
        import optuna.distributions as d

        if self.type == "categorical":
            return d.CategoricalDistribution(self.choices)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list | None:
        """Its values, one by one, for search.sampler=grid: a choice's, or a whole-number range's; None for an
        interval (no grid of its own)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return None


def flatten(space: dict, prefix: str = "") -> dict[str, Any]:
    """`{optimizer: {lr: ...}}` (how `+search.space.optimizer.lr=...` arrives) and `{optimizer.lr: ...}` (YAML) alike:
    one entry per dotted key."""
    out = {}
    for key, value in space.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_space(space: dict, config: dict) -> list[Param]:
    """Every parameter of search.space, checked: its key one of the config's values (a config group cannot be
    searched: its choice changes which keys there are), its distribution well formed. ConfigError names the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not space:
        raise ConfigError("search.space is empty: give at least one parameter, e.g. "
                          "'+search.space.optimizer.lr=\"tag(log, interval(0.001, 0.1))\"'")
    parser = OverridesParser.create()
    params = []
    for name, text in flatten(space).items():
        key = f"search.space.{name}"
        if not _has_value(config, name):
            raise ConfigError(f"{key}: the config has no value {name} to search over (a config group's choice, "
                              "such as model or optimizer, cannot be searched; a value within it can)")
        try:
            override = parser.parse_overrides([f"{name}={text}"])[0]
        except Exception as e:
            raise ConfigError(f"{key}={text!r} is malformed ({str(e).splitlines()[0]}); write interval(low, high), "
                              "tag(log, interval(low, high)), int(interval(low, high)), range(start, stop[, step]) "
                              "or choice(a, b, ...)") from None
        params.append(_param(key, name, override))
    return params


def _has_value(config: dict, dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _param(key: str, name: str, override) -> Param:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        choices = [c for c in value.list]
        if not choices or not all(isinstance(c, (str, int, float, bool)) or c is None for c in choices):
            raise ConfigError(f"{key}: choice(...) takes plain values (numbers, strings, booleans, null)")
        return Param(name, "categorical", choices=choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        numbers = (start, stop, step)
        _finite(key, numbers)
        if step <= 0 or stop <= start:
            raise ConfigError(f"{key}: range({start}, {stop}, {step}) is empty: it needs start < stop and a positive "
                              "step (Hydra's range excludes stop)")
        last = start + step * math.floor((stop - start - 1e-12) / step)
        kind = "float" if any(isinstance(x, float) for x in numbers) else "int"
        return Param(name, kind, low=start, high=last, step=step)
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        _finite(key, (low, high))
        if not low < high:
            raise ConfigError(f"{key}: interval({low}, {high}) is reversed or empty; it needs low < high")
        if log and low <= 0:
            raise ConfigError(f"{key}: tag(log, interval({low}, {high})) includes values <= 0, which have no "
                              "logarithm; give a positive low bound")
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
        return Param(name, kind, low=low, high=high, log=log)
    raise ConfigError(f"{key}: {override.get_value_element_as_str()!r} is a single value, not a distribution; "
                      "set it as a plain override, or search it with interval(...), range(...) or choice(...)")


def _finite(key: str, numbers) -> None:
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
        raise ConfigError(f"{key}: the bounds {list(numbers)} must be finite numbers")
