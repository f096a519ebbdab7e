"""torch's optimizers and its cosine schedule as configs name them (`_target_: torch.optim.SGD`, with `_partial_`:
the trainer calls them with the model's parameters, and the optimizer): their schemas, registered with
`@builtin("optimizer")` and `@builtin("scheduler")` (pipeline.workloads.registry). A linear warm-up before any
schedule is pipeline.workloads.schedules.with_warmup (an open target: its config file has its keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from pipeline.checks import ConfigError, check_at_least, check_positive
from pipeline.workloads.registry import builtin


@builtin("optimizer")
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        check_positive("optimizer.lr", self.lr)
        check_at_least("optimizer.momentum", self.momentum, 0.0)
        check_at_least("optimizer.weight_decay", self.weight_decay, 0.0)


@builtin("optimizer")
@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_positive("optimizer.lr", self.lr)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas={list(self.betas)} is not allowed; give two numbers in [0, 1)")
        check_positive("optimizer.eps", self.eps)
        check_at_least("optimizer.weight_decay", self.weight_decay, 0.0)


@builtin("optimizer")
@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


@builtin("scheduler")
@dataclass
class CosineConfig:
    """torch's cosine decay of the learning rate to `eta_min`, over `T_max` steps (null: the run's steps)."""

    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    _partial_: bool = True
    eta_min: float = 0.0
    T_max: Optional[int] = None

    def __post_init__(self) -> None:
        check_at_least("scheduler.eta_min", self.eta_min, 0.0)
        if self.T_max is not None:
            check_at_least("scheduler.T_max", self.T_max, 1)
