"""What a callable takes, read from its signature: the names a constructor, a schedule or a model's method asks
for, so the pipeline passes only those (pipeline.targets, pipeline.job.build, pipeline.workloads.schedules)."""

from __future__ import annotations

import functools
import inspect
from typing import Any


def takes(fn: Any) -> set[str]:
    """The parameter names a callable takes (a functools.partial's function, less what its config set: a keyword
    bound to None is unset, e.g. a schedule's `T_max: null`, the run's length); none if its signature cannot be
    read."""
    bound = {k for k, v in fn.keywords.items() if v is not None} if isinstance(fn, functools.partial) else set()
    try:
        return set(inspect.signature(fn).parameters) - bound
    except (TypeError, ValueError):
        return set()
