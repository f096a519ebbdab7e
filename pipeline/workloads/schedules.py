"""Learning-rate schedules as recipes compose them: a linear warm-up, then any schedule.

A schedule learns the run's length from the pipeline under whichever name its constructor takes (`run_length`):
torch's `T_max` (CosineAnnealingLR), `total_iters` (LinearLR, PolynomialLR), `total_steps` (OneCycleLR) and
Hugging Face's `num_training_steps` (get_cosine_schedule_with_warmup and its kin, which take their own
`num_warmup_steps` from the config).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LinearLR, SequentialLR

from pipeline.callables import takes
from pipeline.config import LENGTH_NAMES



def run_length(fn: Any, steps: int) -> dict[str, int]:
    """The run's length under every name in LENGTH_NAMES that `fn` takes and its config has not set."""
    return {name: steps for name in LENGTH_NAMES if name in takes(fn)}


def with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                then: Callable | None = None, start_factor: float = 1e-3) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up from start_factor x lr to lr over `warmup_steps` steps, then `then` (a `_partial_`
    schedule, given the optimizer and the remaining total_steps - warmup_steps by its own name for a length), or
    the plain lr when `then` is null. torch's SequentialLR of LinearLR and the schedule that follows."""
    if not 0 < warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be between 1 and the run's {total_steps - 1} steps "
                         "before its last")
    warm = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
    if then is None:
        return warm  # LinearLR holds end_factor x lr once its total_iters have passed
    rest = total_steps - warmup_steps
    return SequentialLR(optimizer, [warm, then(optimizer, **run_length(then, rest))], milestones=[warmup_steps])
