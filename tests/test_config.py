"""Config composition and validation: every group instantiates, every bad input is refused naming its key."""

import os
import zipfile

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from pipeline.config import ConfigError, parse_run_config, to_plain
from pipeline.point import prepare_run
from tests.conftest import CONF


CONFIG_FILES = sorted((group.name, f.stem) for group in CONF.iterdir() if group.is_dir() for f in group.glob("*.yaml"))
TOKEN_MODELS = ("gpt_tiny", "gpt2_small")
TOKEN_DATA = ("synthetic_tokens", "token_file", "byte_text")


def override_for(group: str, option: str) -> list[str]:
    """The override that selects a file, and a partner a built-in model or dataset needs (the same kind of data)."""
    if group == "experiment":
        return [f"+experiment={option}"]
    partner = {("model", True): ["dataset=synthetic_tokens"], ("dataset", True): ["model=gpt_tiny"]}
    return [f"{group}={option}", *partner.get((group, option in TOKEN_MODELS + TOKEN_DATA), [])]


def test_every_config_file_is_listed():
    groups = {g for g, _ in CONFIG_FILES}
    assert groups == {"model", "dataset", "optimizer", "scheduler", "loss", "cluster", "parallel", "experiment",
                      "search", "tracking"}
    assert len(CONFIG_FILES) == 36


@pytest.mark.parametrize("group, option", CONFIG_FILES)
def test_every_file_in_conf_composes_and_types(compose_cfg, group, option):
    cfg = compose_cfg(*override_for(group, option))
    run = parse_run_config(cfg)
    if group != "experiment":  # the file's values are the group's
        expected = {k: v for k, v in cfg[group].items() if k != "defaults"}
        assert {k: v for k, v in to_plain(run)[group].items() if k in expected} == expected
    # the frozen plain config parses back to the same typed config (what every rank does)
    assert parse_run_config(to_plain(run)) == run


@pytest.mark.parametrize("model, dataset, out", [
    ("mlp", "dataset.image_shape=[1,28,28]", (2, 10)), ("cnn", "dataset.image_shape=[3,32,32]", (2, 10)),
    ("resnet18", "dataset.image_shape=[3,32,32]", (2, 10)), ("resnet50", "dataset.image_shape=[3,64,64]", (2, 10)),
    ("gpt_tiny", "dataset=synthetic_tokens", (2, 64, 256)),
    ("gpt2_small", "dataset=synthetic_tokens dataset.seq_len=32", (2, 32, 256)),  # its 12 layers on short sequences
])
def test_every_model_builds_and_runs_on_its_data(compose_cfg, model, dataset, out):
    """Through the job's own build steps: the model gets what it asks of the dataset (shape, classes, vocabulary)."""
    from torch.utils.data import default_collate

    from pipeline.job.build import build_datasets, build_loss, build_model

    run = parse_run_config(compose_cfg(f"model={model}", *dataset.split(), "dataset.train_size=8",
                                       "dataset.test_size=4", "trainer.batch_size=2", "trainer.warmup_steps=1"))
    splits = build_datasets(run, rank=0)
    train, test = splits.train, splits.test
    net = build_model(run, train, rank=0)
    x, y = default_collate([train[0], train[1]])
    output = net(x)
    assert output.shape == out and build_loss(run, rank=0)(output, y).ndim == 0 and len(test) == 4


def test_defaults_are_the_seed_workload(compose_cfg):
    run = parse_run_config(compose_cfg())
    assert (run.model.hidden, run.model.dropout) == (128, 0.2)
    assert run.dataset._target_ == "pipeline.workloads.datasets.Synthetic" and run.dataset.image_shape == [1, 28, 28]
    assert (run.nodes, run.cluster.kind, run.world_size) == (1, "local", 1)


def test_scaling_modes_set_the_batches(compose_cfg):
    weak = parse_run_config(compose_cfg("nodes=2", "cluster.tasks_per_node=2", "trainer.batch_size=32"))
    assert (weak.per_rank_batch, weak.global_batch) == (32, 128)
    strong = parse_run_config(compose_cfg("nodes=2", "cluster.tasks_per_node=2", "trainer.scaling=strong",
                                          "trainer.global_batch_size=256"))
    assert (strong.per_rank_batch, strong.global_batch) == (64, 256)


@pytest.mark.parametrize("nodes, tasks, accum, micro", [(1, 1, 8, 32), (2, 2, 2, 32), (4, 2, 1, 32), (2, 1, 4, 32)])
def test_strong_scaling_picks_the_accumulation_per_node_count(compose_cfg, nodes, tasks, accum, micro):
    """trainer.grad_accum_steps=0: the fewest micro-batches of at most trainer.batch_size (32) that divide a rank's
    share of the global batch (256): 256 / 1 rank = 8 x 32; / 4 ranks = 64 = 2 x 32; / 8 ranks = 32."""
    run = parse_run_config(compose_cfg(f"nodes={nodes}", f"cluster.tasks_per_node={tasks}", "trainer.scaling=strong",
                                       "trainer.global_batch_size=256", "trainer.batch_size=32",
                                       "trainer.grad_accum_steps=0"))
    assert (run.accum_steps, run.micro_batch, run.global_batch) == (accum, micro, 256)
    assert run.micro_batch * run.accum_steps * run.world_size == 256


def test_the_parallel_group_and_its_mesh(compose_cfg):
    assert parse_run_config(compose_cfg()).parallel.kind == "ddp"
    hsdp = parse_run_config(compose_cfg("parallel=hsdp", "nodes=2", "cluster.tasks_per_node=2"))
    assert (hsdp.parallel.kind, hsdp.replicas, hsdp.shard_ranks) == ("hsdp", 2, 2)  # shard within a node
    fsdp = parse_run_config(compose_cfg("parallel=fsdp", "nodes=2", "cluster.tasks_per_node=2"))
    assert (fsdp.replicas, fsdp.shard_ranks, fsdp.parallel.reshard_after_forward) == (1, 4, True)
    # a point.json from before the group existed is DDP's
    plain = to_plain(fsdp)
    del plain["parallel"]
    assert parse_run_config(plain).parallel.kind == "ddp"


def test_a_resume_from_that_is_not_a_checkpoint_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.resume_from=.*does not exist"):
        prepare_run(compose_cfg(f"trainer.resume_from={tmp_path / 'nothing'}"))
    os.mkfifo(tmp_path / "fifo.pt")  # never opened: reading it would wait for a writer forever
    with pytest.raises(ConfigError, match=r"fifo.pt is not a regular file \(a FIFO, a socket or a device\)"):
        prepare_run(compose_cfg(f"trainer.resume_from={tmp_path / 'fifo.pt'}"))
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="a DDP checkpoint file, which parallel=fsdp cannot load"):
        prepare_run(compose_cfg("parallel=fsdp", f"trainer.resume_from={tmp_path / 'checkpoint.pt'}"))
    with pytest.raises(ConfigError, match="without checksums.json"):
        prepare_run(compose_cfg("parallel=fsdp", f"trainer.resume_from={tmp_path}"))
    # random bytes once trained from step 0 and exited 0; a zip that is no torch.save archive is refused too
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    for name in ("random.pt", "other.pt"):
        with pytest.raises(ConfigError, match=r"is not a file torch.save wrote \(a zip archive holding data.pkl\)"):
            prepare_run(compose_cfg(f"trainer.resume_from={tmp_path / name}"))
    # read torch-free: the weights alone (model.pt) are no checkpoint; the run that saved one had another model
    import torch

    from pipeline.rundir import GitInfo, Point
    from pipeline.workloads.models.mlp import MLP

    weights = MLP(input_shape=[784], num_classes=10, hidden=8, dropout=0.0).state_dict()
    torch.save(weights, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=r"model.pt is a torch.save file but no checkpoint of this project \(it "
                                          r"holds a dict of net.1.weight, .*model.pt is the weights alone"):
        prepare_run(compose_cfg(f"trainer.resume_from={tmp_path / 'model.pt'}"))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": weights, "optimizer": {}, "step": 3}, run / "checkpoint.pt")
    assert prepare_run(compose_cfg(f"trainer.resume_from={run / 'checkpoint.pt'}")).trainer.resume_from
    Point(run_id="r", sweep_id="s", point=0, overrides=[], launch_mode="local", launched_at="", launch_host="",
          launch_argv=[], git=GitInfo(None, None), config=to_plain(prepare_run(compose_cfg("model.hidden=8")))
          ).write(run)
    with pytest.raises(ConfigError, match=r"checkpoint.pt is a checkpoint of another model \(model.hidden=8 there, "
                                          r"128 here; its run's config: .*/run/point.json\)"):
        prepare_run(compose_cfg(f"trainer.resume_from={run / 'checkpoint.pt'}"))


@pytest.mark.parametrize("overrides, names", [
    (["nodes=0"], ["nodes=0", ">= 1"]),
    (["cluster.tasks_per_node=0"], ["cluster.tasks_per_node"]),
    (["trainer.scaling=strong", "trainer.global_batch_size=100", "nodes=3"],
     ["trainer.global_batch_size=100", "nodes(3)", "multiple of 3"]),
    (["trainer.scaling=linear"], ["trainer.scaling", "weak, strong"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "positive"]),
    (["optimizer=adam", "optimizer.betas=[0.9]"], ["optimizer.betas", "two numbers"]),
    (["model=gpt_tiny"], ["trains on tokens", "holds images", "SyntheticTokens"]),
    (["model=gpt_tiny", "dataset=synthetic_tokens", "dataset.seq_len=128"], ["dataset.seq_len=128",
                                                                            "model.context_length=64"]),
    (["model=gpt_tiny", "dataset=synthetic_tokens", "model.vocab_size=100"], ["model.vocab_size=100", "256"]),
    (["model=resnet18", "model.depth=19"], ["model.depth=19", "18, 34, 50, 101"]),
    (["loader.kind=fast"], ["loader.kind", "auto, memory, dataloader"]),
    (["loader.persistent_workers=true"], ["loader.persistent_workers", "loader.num_workers > 0"]),
    (["model._target_=nopkg.models.Net"], ["model._target_=nopkg.models.Net", "'nopkg' is not installed"]),
    (["optimizer._target_=SGD"], ["optimizer._target_='SGD'", "dotted path"]),
    (["trainer.precision=fp8"], ["trainer.precision", "fp32, bf16"]),
    (["optimizer.lr=-1"], ["optimizer.lr"]),
    (["optimizer.lr=fast"], ["optimizer.lr", "fast"]),
    (["nodes=two"], ["nodes", "two"]),
    (["trainer.epochs=1.5"], ["trainer.epochs"]),
    (["model.dropout=1.5"], ["model.dropout"]),
    (["dataset.image_shape=[28,28]"], ["dataset.image_shape"]),
    (["+trainer.unknown_key=1"], ["unknown_key"]),
    (["trainer.compile=true", "ddp.bucket_cap_mb=0.5"], ["ddp.bucket_cap_mb=0.5", "trainer.compile=true", ">= 1"]),
    (["cluster=slurm", "cluster.tasks_per_node=4", "cluster.gpus_per_node=2"],
     ["cluster.tasks_per_node=4", "cluster.gpus_per_node=2", "trainer.device=cpu"]),
    (["parallel=hsdp", "nodes=2", "cluster.tasks_per_node=3", "parallel.replicate=3"],
     ["parallel.replicate=3", "shard groups of 2 ranks", "cluster.tasks_per_node=3"]),
    (["parallel=hsdp", "nodes=2", "cluster.tasks_per_node=2", "parallel.replicate=3"],
     ["parallel.replicate=3 does not divide the 4 ranks"]),
    (["trainer.scaling=strong", "trainer.global_batch_size=96", "nodes=2", "trainer.grad_accum_steps=5"],
     ["trainer.grad_accum_steps=5", "the 48 samples each rank takes"]),
    (["trainer.grad_accum_steps=0"], ["trainer.grad_accum_steps=0", "trainer.scaling=strong"]),
    (["trainer.activation_checkpointing=true"], ["trainer.activation_checkpointing=true", "parallel.block_classes"]),
    (["parallel=fsdp", "trainer.channels_last=true"], ["trainer.channels_last=true", "parallel=fsdp"]),
    (["parallel=fsdp", "parallel.param_dtype=fp16"], ["parallel.param_dtype", "auto, fp32, bf16"]),
    (["parallel=fsdp", "parallel.block_classes=[my-block]"], ["parallel.block_classes", "class names"]),
    (["health.on_bad=drop"], ["health.on_bad", "warn, exclude, fail"]),
    (["health.threshold=1.5"], ["health.threshold=1.5", "(0, 1)"]),
    (["health.max_resubmits=-1"], ["health.max_resubmits=-1", ">= 0"]),
    (["health.min_link_gb_s=0"], ["health.min_link_gb_s=0", "positive"]),
    (["cluster=slurm", "cluster.exclude=['node1;reboot']"], ["cluster.exclude", "'node1;reboot'", "node[1-3]"]),
    (["cluster=slurm", "+cluster.sbatch_extra.exclude=node1"], ["cluster.sbatch_extra key 'exclude'"]),
])
def test_bad_values_name_the_key(compose_cfg, overrides, names):
    # wrong types are refused by Hydra while composing (against the schema), bad values by our checks
    with pytest.raises((ConfigError, ConfigCompositionException)) as e:
        parse_run_config(compose_cfg(*overrides))
    message = f"{e.value} {e.value.__cause__}"
    for name in names:
        assert name in message


def test_unknown_group_option_lists_the_choices(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("model=resnet")
    assert "mlp" in str(e.value) and "cnn" in str(e.value)


@pytest.mark.parametrize("dataset, expected", [
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]),
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"]),
])
def test_missing_dataset_files_name_the_paths(compose_cfg, tmp_path, dataset, expected):
    with pytest.raises(ConfigError) as e:
        prepare_run(compose_cfg(f"dataset={dataset}", f"dataset.root={tmp_path}"))
    assert "dataset.root" in str(e.value)
    for path in expected:
        assert str(tmp_path / path) in str(e.value)


def test_more_ranks_than_gpus_is_fine_on_the_cpu(compose_cfg):
    run = parse_run_config(compose_cfg("cluster=slurm", "cluster.tasks_per_node=4", "cluster.gpus_per_node=2",
                                       "trainer.device=cpu"))
    assert run.world_size == 4
