"""The checks a config value passes before anything runs, each failure a `ConfigError` that names the key, the value
and what is allowed (`trainer.batch_size=0 is not allowed; it must be >= 1`): the schemas' `__post_init__`s call
them, at launch and again when a rank types its frozen config. Imports nothing of the pipeline, so every torch-free
module can use them (pipeline.config, pipeline.slurm, the built-in workloads' schemas).
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A user-facing configuration error. The message names the key and what is allowed."""


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def check_at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be >= {minimum}")


def check_at_most(key: str, value: float, maximum: float, why: str) -> None:
    if value > maximum:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be <= {maximum} ({why})")


def check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a positive number")


def check_image_shape(shape: list[int], key: str = "dataset.image_shape") -> None:
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{key}={list(shape)} is not allowed; give [channels, height, width], "
                          "e.g. [1,28,28] (MNIST-shaped), [3,32,32] (CIFAR-shaped) or [3,224,224] (ImageNet-shaped)")
