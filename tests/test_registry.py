"""Each built-in is stated once: its schema beside it, registered (pipeline.workloads.registry), and everything else
follows from the registry or is held against it here. A schema whose fields are not its target's constructor
arguments, a registered schema no conf/ file extends, or a conf/ file that extends a schema the registry lacks,
fails."""

import inspect

import pytest
import yaml
from hydra.core.config_store import ConfigStore

from pipeline.config import TARGET_GROUPS, register_configs
from pipeline.workloads.registry import PACKAGES, schema_name, schemas
from pipeline.targets import located
from tests.conftest import CONF

# what the pipeline gives a built-in's constructor besides its config (pipeline.job.build, pipeline.targets,
# pipeline.workloads.schedules): a dataset its split, an image model the dataset's shape and classes, a language
# model its vocabulary, an optimizer the parameters, a schedule the optimizer and the run's length
PASSED = {"dataset": {"split"}, "model": {"input_shape", "num_classes", "vocab_size"}, "optimizer": {"params"},
          "scheduler": {"optimizer", "T_max"}, "loss": set()}
BUILTINS = [(group, schema) for group in TARGET_GROUPS for schema in schemas(group).values()]


def fields(schema: type) -> set[str]:
    return {name for name in inspect.signature(schema).parameters if name not in ("_target_", "_partial_")}


def test_the_registry_holds_every_built_in_of_every_group():
    assert set(PACKAGES) == set(TARGET_GROUPS)
    assert {group: len(schemas(group)) for group in TARGET_GROUPS} == {
        "model": 4, "dataset": 6, "optimizer": 3, "scheduler": 1, "loss": 2}


@pytest.mark.parametrize("group, schema", BUILTINS, ids=[s.__name__ for _, s in BUILTINS])
def test_a_schema_states_exactly_its_targets_constructor_arguments(group, schema):
    """Every field is an argument of the target's constructor, and every argument the constructor needs is a field
    or something the pipeline gives it: the schema and the code cannot drift apart unseen."""
    target = located(group, schema(), rank=None)
    parameters = inspect.signature(target).parameters
    taken = {n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    required = {n for n, p in parameters.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                               p.VAR_KEYWORD)}
    assert fields(schema) <= taken, f"{schema.__name__} has fields {fields(schema) - taken} its target does not take"
    assert required <= fields(schema) | PASSED[group], (
        f"{target.__name__} needs {required - fields(schema) - PASSED[group]}, which {schema.__name__} does not state")


def conf_files():
    return sorted(p for group in TARGET_GROUPS for p in (CONF / group).glob("*.yaml"))


def extends(path) -> list[str]:
    return [d for d in (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if isinstance(d, str)]


def test_conf_follows_the_registry():
    """Every registered schema is in Hydra's ConfigStore under its group, and extended by a file of conf/; every
    file of a workload group extends a registered schema or names a `_target_` of its own (an open one)."""
    register_configs()
    store = ConfigStore.instance()
    registered = {(group, schema_name(s)) for group, s in BUILTINS}
    for group, name in registered:
        assert f"{name}.yaml" in store.list(group), (group, name)
    extended = set()
    for path in conf_files():
        group, names = path.parent.name, [n for n in extends(path) if n.endswith("_schema")]
        if not names:
            assert "_target_" in (yaml.safe_load(path.read_text()) or {}), f"{path} extends no schema and has no target"
        for name in names:
            assert (group, name) in registered, f"{path} extends {name}, which the registry does not hold"
            extended.add((group, name))
    assert extended == registered, f"registered but extended by no conf/ file: {registered - extended}"
