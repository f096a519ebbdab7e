"""The internals of Hydra and submitit that the launch relies on (pyproject.toml pins both to the minor releases
tested): each is still there, with the parameters and the behaviour the code takes from it. A new release that
moves one fails here, by name, before any launch does."""

import inspect

import submitit
from hydra._internal import utils as hydra_utils
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_hydras_internals_used_by_the_sweep_are_there():
    # pipeline/launcher/sweep.py: a point's value overrides applied as Hydra applies them, its folder's name
    assert parameters(ConfigLoaderImpl._apply_overrides_to_config) == ["overrides", "cfg"]
    assert {"overrides", "kv_sep", "item_sep", "exclude_keys"} <= set(parameters(get_overrides_dirname))
    # hydra_plugins/pipeline_launcher: the basic sweeper, less its check that composes every point
    assert parameters(BasicSweeper.validate_batch_is_legal) == ["self", "batch"]


def test_a_launch_with_m_may_skip_reading_the_mode():
    """pipeline/launch.py's mode_from_the_command_line: Hydra asks get_mode, and with no mode its _run_app takes
    the command line's (-m: a sweep)."""
    assert parameters(Hydra.get_mode) == ["self", "config_name", "overrides"]
    assert "hydra.get_mode(" in inspect.getsource(hydra_utils._run_hydra)
    run_app = inspect.getsource(hydra_utils._run_app)
    assert "if mode is None:" in run_app and "mode = RunMode.MULTIRUN" in run_app


def test_submitits_script_rendering_is_there():
    """pipeline/launcher/slurm.py renders a dry run's script as submitit would submit it."""
    assert parameters(submitit.SlurmExecutor._make_submission_file_text) == ["self", "command", "uid"]
    assert isinstance(inspect.getattr_static(submitit.SlurmExecutor, "_submitit_command_str"), property)
