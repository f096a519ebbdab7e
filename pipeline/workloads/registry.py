"""The registry of built-in workloads: every built-in model, dataset, loss, optimizer and learning-rate schedule
that configs name by `_target_`, with its schema. A schema is a dataclass beside its workload (its `_target_`, its
arguments with their types and defaults, and the checks of `__post_init__`), registered with `@builtin(group)`;
the launch types and checks a config against it before anything runs, and imports no torch to do so. From the
registry follow the config schemas Hydra composes with (`register_configs`: `<group>/<name>_schema` in its
ConfigStore, which a file of conf/<group>/ extends) and the checks of a composed config (pipeline.config).
tests/test_registry.py fails when a schema and its workload's constructor, or the registry and conf/, disagree.
"""

from __future__ import annotations

import dataclasses
import importlib

# each group's built-ins are registered when their package is imported: these import no torch
PACKAGES = {"model": "pipeline.workloads.models", "dataset": "pipeline.workloads.datasets",
            "optimizer": "pipeline.workloads.optimizers", "scheduler": "pipeline.workloads.optimizers",
            "loss": "pipeline.workloads.losses"}
_registered: dict[str, dict[str, type]] = {group: {} for group in PACKAGES}


def builtin(group: str):
    """A class decorator: `schema` is the schema of a built-in of `group`, known by its `_target_`."""
    def register(schema: type) -> type:
        _registered[group][schema._target_] = schema
        return schema
    return register


def schemas(group: str) -> dict[str, type]:
    """The built-in schemas of `group`, by `_target_`."""
    importlib.import_module(PACKAGES[group])
    return _registered[group]


def schema_name(schema: type) -> str:
    """Its name in Hydra's ConfigStore, which conf/ files extend: MLPConfig -> mlp_schema."""
    return f"{schema.__name__.removesuffix('Config').lower()}_schema"


def defaults(schema: type) -> dict:
    """A built-in schema's defaults as its target's keyword arguments (what the dataset gives, and its `_target_`,
    left out): for code that builds a built-in model or dataset directly, as the benchmarks' hand-written loops
    do, with the defaults the pipeline's runs have."""
    values = dataclasses.asdict(schema())
    return {k: v for k, v in values.items() if k not in ("_target_", "_partial_", "input_shape", "num_classes")
            and not (k == "vocab_size" and v is None)}
