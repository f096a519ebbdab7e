"""A sweep point's config the quick way (pipeline/launcher/overrides.py: its changes set on the plain data of its group
choice; its folder named by its number) is what composing it in full gives: for each sweep here, every point's plain
config and folder (or its error, word for word) are compared both ways. In process, through Hydra's own sweeper and
the sweep's Composer; no launch, no training."""

import pytest
from hydra import initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, RunMode

from pipeline.config import register_configs
from pipeline.launcher import sweep
from pipeline.launcher.errors import one_line
from pipeline.launcher.overrides import PlainBase

GPT = ("model=gpt_tiny", "dataset=synthetic_tokens")
# (the sweep's arguments, whether every point takes the quick way); hydra.sweep.dir=sweeps is added where none is
# given, so that both ways name the same folder
SWEEPS = [
    (("trainer.seed=range(4)",), True),
    (("nodes=1,2,4", "cluster=slurm"), True),
    (("optimizer.lr=0.1,1e-3,1",), True),  # 1 into a float node: 1.0, as OmegaConf converts it
    (("trainer.precision=bf16,fp32", "trainer.compile=true,false"), True),
    (("trainer.seed='7',8",), True),  # a quoted number into an int node
    ((*GPT, "dataset.seq_len=16,32"), True),  # a leaf that is itself an interpolation, replaced
    (("cluster=slurm", "+cluster.sbatch_extra.begin=now+1hour", "trainer.seed=0,1"), True),  # +key, shared
    (("scheduler=warmup_cosine", "~scheduler.start_factor", "trainer.seed=0,1"), True),  # ~key, shared
    (("model=mlp,cnn", "trainer.seed=0,1"), True),
    (("hydra.sweep.dir=multirun/${now:%Y-%m-%d}", "nodes=1,2"), True),
    ((*GPT, "model.context_length=32,128"), False),  # dataset.seq_len interpolates it, and must follow
    (("model=cnn", "model.channels=[8,8,8],[16,16,16]"), True),  # a list value: its point's base
    (("trainer.seed=${nodes},3",), True),  # an interpolation as the value: its point's base
    (("trainer.channels_last=null,true",), True),
    (("scheduler=warmup_cosine", "scheduler.then.eta_min=0.1,0.2", "~scheduler.then"), False),  # order matters
    (("trainer.seed=0,abc",), False),  # a bad type: the error names the key
    (("nodes=1,x", "trainer.nosuchkey=1,2"), False),
    (("hydra.sweep.subdir=${hydra.job.override_dirname}", "trainer.seed=0,1"), False),  # the folder needs the node
]


@pytest.fixture
def sweep_points(monkeypatch):
    """sweep_points(*arguments, quick) -> each point's (config, folder) or error, as the Composer gives them with
    the quick way on (quick=True) or off; whether any point's config or folder was composed in full; and how many
    configs the Composer had Hydra compose (beside the sweep's own, which Hydra composed before the sweep)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="pipeline.conf", version_base="1.3"):
        hydra = GlobalHydra.instance().hydra

        def points(*arguments: str, quick: bool) -> tuple[list, bool, int]:
            if not any(a.startswith("hydra.sweep.dir=") for a in arguments):
                arguments = (*arguments, "hydra.sweep.dir=sweeps")
            master = hydra.compose_config("config", list(arguments), run_mode=RunMode.MULTIRUN)
            # as Hydra's multirun hands them to the sweeper: the task's overrides (Hydra's own are in every config)
            task = list(master.hydra.overrides.task)
            jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task), None)[0]
            in_full = []
            with monkeypatch.context() as m:
                if not quick:
                    m.setattr(PlainBase, "apply", lambda self, changes: None)
                    m.setattr(sweep, "numbered_in", lambda full: None)
                m.setattr(sweep.Composer, "_in_full", spy(sweep.Composer._in_full, in_full))
                m.setattr(sweep.Composer, "_point_dir", spy(sweep.Composer._point_dir, in_full, static=False))
                composer = sweep.Composer(HydraContext(hydra.config_loader, None), master)
                outcomes = [outcome(composer, i, job) for i, job in enumerate(jobs)]
                return outcomes, bool(in_full), len(composer.composed)

        yield points
    GlobalHydra.instance().clear()


def spy(method, calls: list, static: bool = True):
    def called(*args):
        calls.append(args)
        return method(*args)
    return staticmethod(called) if static else called


def outcome(composer: sweep.Composer, idx: int, overrides: list[str]):
    try:
        return composer.compose(idx, overrides)
    except Exception as e:
        return one_line(e) or repr(e)


@pytest.mark.parametrize("arguments, all_quick", SWEEPS, ids=[" ".join(a) for a, _ in SWEEPS])
def test_each_point_gets_the_config_composing_in_full_gives(sweep_points, arguments, all_quick):
    quick, any_in_full, _ = sweep_points(*arguments, quick=True)
    full, _, _ = sweep_points(*arguments, quick=False)
    assert quick == full
    assert any_in_full != all_quick


def test_a_sweep_of_values_is_composed_once_by_hydra_alone(sweep_points):
    """Every point's group choice and shared overrides are those Hydra composed the sweep's own config with."""
    points, _, composed = sweep_points("cluster=slurm", "+cluster.sbatch_extra.begin=now+1hour", "nodes=1,2",
                                       "trainer.seed=range(3)", quick=True)
    assert len(points) == 6 and composed == 0
    _, _, composed = sweep_points("model=mlp,cnn", "trainer.seed=0,1", quick=True)
    assert composed == 2  # one for each model


def test_an_interpolation_follows_the_key_it_reads(sweep_points):
    points, _, _ = sweep_points(*GPT, "model.context_length=32,128", quick=True)
    assert [config["dataset"]["seq_len"] for config, _ in points] == [32, 128]


def test_a_bad_value_names_its_key(sweep_points):
    points, _, _ = sweep_points("trainer.seed=0,abc", quick=True)
    assert isinstance(points[0], tuple) and "trainer.seed=abc" in points[1]
