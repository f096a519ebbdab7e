"""Issue 31: a table of bad inputs, every config group and every program's options, each refused as the user sees it:
exit 2 (or the documented code); the message on one line, naming the key (a sweep's: a line more for each bad point;
a dataset's missing files: a line for each file expected); no traceback; no rank, nor any other process, started;
nothing of a run written; and nothing run by a shell: a value with shell syntax ($(...), backticks, `;`) would make
a file MARKER, which must never appear. tests/test_launch_errors.py has a few dozen more, each through a real
`python -m pipeline.launch`: none of them is repeated here.

NOT_YET holds the inputs refused, but not as the rest (in several lines, with a traceback, in words that name no
key): expected to fail, strictly, so that mending one says so. ACCEPTED holds values with shell syntax that a launch
takes (a dry run) where they reach an sbatch script: quoted there, so that the job's shell reads them literally.

A process start costs half a second, a few hundred rows' minutes: the rows run through the programs' real entries
in one process (tests/bad_inputs_harness.py, a fork per row), which the first row's test starts and which says each
row's outcome as soon as it has it; a row's test waits for its own row alone, so that no test of the fast tier waits
long. The harness refuses every process start but those a row allows: an input the launch takes by mistake fails
its row at once, naming what it would have started, instead of training.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

ROW_WAIT_S = 60.0  # a row takes 0.1 to 0.3 s; the harness kills one that runs past 30 s
HEADER = "pipeline.launch: configuration error: "
MARKER = "MARKER"  # what `touch MARKER` in a value makes, were it run


@dataclass(frozen=True)
class Row:
    id: str  # group/name
    argv: tuple
    said: str  # in the error; "{t}" is the row's folder, as in argv
    program: str = "launch"
    code: int = 2
    lines: int = 1  # the error's lines on stderr (a sweep's: one a bad point, after its first)
    usage: bool = False  # argparse's error: its usage, then one line "PROG: error: ..."
    make: Callable[[Path], None] | None = None  # what the row's folder holds before it runs
    allow: tuple = ()  # the processes it may start (a dry run asks git for the commit)


def launch(rid: str, *argv: str, said: str, **kw) -> Row:
    return Row(rid, argv, said, **kw)


def slurm(rid: str, *argv: str, said: str, **kw) -> Row:
    """A Slurm launch as a dry run: its checks, and no sbatch (the sbatch script is written, not submitted)."""
    return Row(rid, ("cluster=slurm", "dry_run=true", *argv), said, **kw)


def sweep(rid: str, *argv: str, said: str, **kw) -> Row:
    return Row(rid, ("-m", *argv), said, **kw)


def program(name: str, rid: str, *argv: str, said: str, **kw) -> Row:
    return Row(rid, argv, said, program=name, **kw)


# ------------------------------------------------------------------------------------------ what a folder holds
def fifo(name: str) -> Callable[[Path], None]:
    """A FIFO where a file is expected: a reader that opens it waits for a writer forever."""
    def make(t: Path) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(t / name)
    return make


def holding(name: str, data: bytes) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(data)
    return make


def folder(name: str) -> Callable[[Path], None]:
    return lambda t: (t / name).mkdir(parents=True)


def both(*makes: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        for m in makes:
            m(t)
    return make


RANDOM = bytes((i * 151 + 7) % 256 for i in range(4096))  # the same bytes every run: not UTF-8, not JSON, no zip
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TOKENS = ("model=gpt_tiny", "dataset=synthetic_tokens")
SPACE = "+search.space.optimizer.lr='interval(0.01, 0.1)'"

# -------------------------------------------------------------------------------------------------- the table
ROWS = [
    # model: every built-in's checks, the pairing with the data, OmegaConf's typing
    launch("model/mlp-hidden-0", "model.hidden=0", said="model.hidden=0 is not allowed; it must be >= 1"),
    launch("model/mlp-dropout-1", "model.dropout=1.0", said="model.dropout=1.0 is not allowed; it must be in [0, 1)"),
    launch("model/mlp-input-shape-2d", "model.input_shape=[1,28]",
           said="model.input_shape=[1, 28] is not allowed; give [channels, height, width]"),
    launch("model/mlp-one-class", "model.num_classes=1", said="model.num_classes=1 is not allowed; it must be >= 2"),
    launch("model/mlp-hidden-float", "model.hidden=1.5",
           said="model.hidden=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    launch("model/mlp-input-shape-string", "model.input_shape=abc",
           said="model.input_shape=abc: Invalid value assigned: str is not a ListConfig, list or tuple"),
    launch("model/mlp-unknown-key", "model.nope=1", said="model.nope is not a key of the config"),
    launch("model/cnn-two-channels", "model=cnn", "model.channels=[32,64]",
           said="model.channels=[32, 64] is not allowed; give 3 positive ints"),
    launch("model/resnet-depth", "model=resnet18", "model.depth=20",
           said="model.depth=20 is not allowed; choose one of: 18, 34, 50, 101"),
    launch("model/resnet-stem", "model=resnet18", "model.stem=big",
           said="model.stem='big' is not allowed; choose one of: auto, cifar, imagenet"),
    launch("model/resnet50-no-class", "model=resnet50", "model.num_classes=0",
           said="model.num_classes=0 is not allowed; it must be >= 2"),
    launch("model/gpt-layers-0", *TOKENS, "model.layers=0", said="model.layers=0 is not allowed; it must be >= 1"),
    launch("model/gpt-width-not-a-multiple", *TOKENS, "model.width=130",
           said="model.width=130 is not allowed; it must be a positive multiple of model.heads=4"),
    launch("model/gpt2-small-heads", "model=gpt2_small", "dataset=synthetic_tokens", "model.heads=7",
           said="model.width=768 is not allowed; it must be a positive multiple of model.heads=7"),
    launch("model/gpt-on-images", "model=gpt_tiny",
           said="model._target_=pipeline.workloads.models.GPT trains on tokens, but dataset._target_="
                "pipeline.workloads.datasets.Synthetic holds images; choose a dataset among: "),
    launch("model/mlp-on-tokens", "dataset=synthetic_tokens",
           said="model._target_=pipeline.workloads.models.MLP trains on images, but dataset._target_="
                "pipeline.workloads.datasets.SyntheticTokens holds tokens"),
    launch("model/gpt-vocab-below-the-data", *TOKENS, "model.vocab_size=100",
           said="model.vocab_size=100 is smaller than the dataset's vocabulary (256)"),
    launch("model/gpt-data-longer-than-context", *TOKENS, "dataset.seq_len=128",
           said="dataset.seq_len=128 is longer than model.context_length=64"),

    # dataset: every built-in (conf/dataset/*.yaml), its values and its files
    launch("dataset/synthetic-image-shape-2d", "dataset.image_shape=[1,28]",
           said="dataset.image_shape=[1, 28] is not allowed; give [channels, height, width]"),
    launch("dataset/synthetic-one-class", "dataset.num_classes=1",
           said="dataset.num_classes=1 is not allowed; it must be >= 2"),
    launch("dataset/synthetic-separation-negative", "dataset.separation=-1",
           said="dataset.separation=-1.0 is not allowed; it must be >= 0.0"),
    launch("dataset/synthetic-fewer-than-a-batch", "dataset.train_size=10",
           said="dataset.train_size=10 gives 10 samples to each of 1 ranks, fewer than one per-rank batch of 64"),
    launch("dataset/synthetic-unknown-key", "dataset.nope=1",
           said="dataset.nope is not a key of the config; did you mean dataset.seed?"),
    launch("dataset/no-such-option", "dataset=imagenet",
           said="dataset=imagenet is not an option of dataset; choose one of: byte_text, cifar10, mnist, synthetic"),
    # a root that holds nothing is said with the files expected, a line each (the key on the first)
    launch("dataset/mnist-missing", "dataset=mnist", "dataset.root={t}/nowhere", lines=6,
           said="dataset.root='{t}/nowhere': MNIST files not found. Expected (torchvision's layout):"),
    launch("dataset/mnist-root-substitution", "dataset=mnist", "dataset.root='$(touch MARKER)'", lines=6,
           said="dataset.root='{t}/$(touch MARKER)': MNIST files not found"),
    launch("dataset/mnist-fifos-for-files", "dataset=mnist", "dataset.root={t}/data", lines=6,
           make=both(*(fifo(f"data/MNIST/raw/{n}") for n in MNIST_FILES)),
           said="dataset.root='{t}/data': MNIST files not found"),
    launch("dataset/mnist-key-of-another", "dataset=mnist", "dataset.seed=1",
           said="dataset.seed is not a key of the dataset chosen here (other options of it have one)"),
    launch("dataset/cifar10-root-semicolon", "dataset=cifar10", "model=cnn", "dataset.root='; touch MARKER'", lines=8,
           said="dataset.root='{t}/; touch MARKER': CIFAR-10 files not found"),
    launch("dataset/tokens-branching-over-vocab", *TOKENS, "dataset.branching=1000",
           said="dataset.branching=1000 is not allowed; it must be in [1, dataset.vocab_size=256]"),
    launch("dataset/token-file-vocab-over-uint16", "model=gpt_tiny", "dataset=token_file", "dataset.vocab_size=70000",
           said="dataset.vocab_size=70000 is not allowed: uint16 token files hold values below 65536"),
    launch("dataset/token-file-missing", "model=gpt_tiny", "dataset=token_file", "dataset.root={t}/nowhere", lines=4,
           said="dataset.root='{t}/nowhere': token files not found"),
    launch("dataset/token-file-root-backticks", "model=gpt_tiny", "dataset=token_file", "dataset.root='`touch MARKER`'",
           lines=4, said="dataset.root='{t}/`touch MARKER`': token files not found"),
    launch("dataset/token-file-too-short", "model=gpt_tiny", "dataset=token_file", "dataset.root={t}/tokens",
           make=both(holding("tokens/train.bin", b"\1\0" * 10), holding("tokens/val.bin", b"\1\0" * 10)),
           said="dataset.root='{t}/tokens': {t}/tokens/train.bin holds 20 bytes, not a uint16 token file of at least "
                "dataset.seq_len + 1 = 65 tokens"),
    launch("dataset/token-file-odd-size", "model=gpt_tiny", "dataset=token_file", "dataset.root={t}/tokens",
           make=both(holding("tokens/train.bin", b"\1" * 301), holding("tokens/val.bin", b"\1\0" * 200)),
           said="{t}/tokens/train.bin holds 301 bytes, not a uint16 token file"),
    launch("dataset/byte-text-test-share-0", "model=gpt_tiny", "dataset=byte_text", "dataset.test_share=0",
           said="dataset.test_share=0.0 is not allowed; it must be in (0, 1)"),
    launch("dataset/byte-text-root-missing", "model=gpt_tiny", "dataset=byte_text", "dataset.root={t}/nowhere",
           said="dataset.root='{t}/nowhere' is not a folder; give a folder of *.py files"),
    launch("dataset/byte-text-root-a-file", "model=gpt_tiny", "dataset=byte_text", "dataset.root={t}/a-file",
           make=holding("a-file", b"x = 1\n"), said="dataset.root='{t}/a-file' is not a folder"),
    launch("dataset/byte-text-root-pipe", "model=gpt_tiny", "dataset=byte_text", "dataset.root='|touch MARKER'",
           said="dataset.root='{t}/|touch MARKER' is not a folder"),

    # loader
    launch("loader/kind", "loader.kind=fast", said="loader.kind='fast' is not allowed; choose one of: auto, memory"),
    launch("loader/workers-negative", "loader.num_workers=-1",
           said="loader.num_workers=-1 is not allowed; it must be >= 0"),
    launch("loader/persistent-without-workers", "loader.persistent_workers=true",
           said="loader.persistent_workers and loader.prefetch_factor need loader.num_workers > 0"),
    launch("loader/prefetch-0", "loader.num_workers=2", "loader.prefetch_factor=0",
           said="loader.prefetch_factor=0 is not allowed; it must be >= 1"),
    launch("loader/epoch-samples-0", "loader.epoch_samples=0", said="loader.epoch_samples=0 is not allowed"),
    launch("loader/epoch-samples-not-a-stream", "loader.epoch_samples=100",
           said="loader.epoch_samples=100 is for a stream (an IterableDataset)"),
    launch("loader/collate-not-a-config", "loader.collate_fn=notadict",
           said="loader.collate_fn='notadict' is not allowed; give a config with a `_target_`"),
    launch("loader/pin-memory-maybe", "loader.pin_memory=maybe",
           said="loader.pin_memory=maybe: Value 'maybe' is not a valid bool"),

    # optimizer: sgd, adam, adamw
    launch("optimizer/sgd-lr-0", "optimizer.lr=0",
           said="optimizer.lr=0.0 is not allowed; it must be a positive number"),
    launch("optimizer/sgd-lr-string", "optimizer.lr=abc",
           said="optimizer.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    launch("optimizer/sgd-momentum-negative", "optimizer.momentum=-0.5",
           said="optimizer.momentum=-0.5 is not allowed; it must be >= 0.0"),
    launch("optimizer/sgd-nesterov-maybe", "optimizer.nesterov=maybe",
           said="optimizer.nesterov=maybe: Value 'maybe' is not a valid bool"),
    launch("optimizer/adam-one-beta", "optimizer=adam", "optimizer.betas=[0.9]",
           said="optimizer.betas=[0.9] is not allowed; give two numbers in [0, 1)"),
    launch("optimizer/adam-eps-0", "optimizer=adam", "optimizer.eps=0",
           said="optimizer.eps=0.0 is not allowed; it must be a positive number"),
    launch("optimizer/adamw-beta-negative", "optimizer=adamw", "optimizer.betas=[-0.1,0.9]",
           said="optimizer.betas=[-0.1, 0.9] is not allowed"),
    launch("optimizer/adamw-momentum", "optimizer=adamw", "optimizer.momentum=0.9",
           said="optimizer.momentum is not a key of the optimizer chosen here"),
    launch("optimizer/no-such-option", "optimizer=rmsprop",
           said="optimizer=rmsprop is not an option of optimizer; choose one of: adam, adamw, sgd"),

    # scheduler: cosine, and none chosen (warmup_cosine's refusals at launch: test_launch_errors.py)
    launch("scheduler/cosine-t-max-0", "scheduler=cosine", "scheduler.T_max=0",
           said="scheduler.T_max=0 is not allowed; it must be >= 1"),
    launch("scheduler/cosine-t-max-string", "scheduler=cosine", "scheduler.T_max=abc",
           said="scheduler.T_max=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    launch("scheduler/cosine-unknown-key", "scheduler=cosine", "scheduler.nope=1",
           said="scheduler.nope is not a key of the config"),
    launch("scheduler/none-chosen", "scheduler.eta_min=0",
           said="scheduler.eta_min is not a key of the scheduler chosen here (other options of it have one)"),
    launch("scheduler/no-such-option", "scheduler=linear",
           said="scheduler=linear is not an option of scheduler; choose one of: cosine, warmup_cosine"),

    # loss: cross_entropy, model
    launch("loss/smoothing-negative", "loss.label_smoothing=-0.1",
           said="loss.label_smoothing=-0.1 is not allowed; it must be in [0, 1]"),
    launch("loss/smoothing-string", "loss.label_smoothing=abc",
           said="loss.label_smoothing=abc: Value 'abc' of type 'str' could not be converted to Float"),
    launch("loss/no-such-option", "loss=hinge",
           said="loss=hinge is not an option of loss; choose one of: cross_entropy"),
    launch("loss/model-targets-as-not-a-keyword", "loss=model", "loss.targets_as='not a keyword'",
           said="loss.targets_as='not a keyword' is not allowed; give the keyword the model takes its targets by"),
    launch("loss/model-targets-as-empty", "loss=model", "loss.targets_as=''",
           said="loss.targets_as='' is not allowed"),
    launch("loss/model-output-empty", "loss=model", "loss.output=''",
           said="loss.output='' is not allowed; give auto, an attribute or mapping key name, or a tuple index"),
    launch("loss/unknown-key", "loss.nope=1", said="loss.nope is not a key of the config"),

    # trainer
    launch("trainer/epochs-0", "trainer.epochs=0", said="trainer.epochs=0 is not allowed; it must be >= 1"),
    launch("trainer/scaling", "trainer.scaling=medium",
           said="trainer.scaling='medium' is not allowed; choose one of: weak, strong"),
    launch("trainer/batch-size-0", "trainer.batch_size=0", said="trainer.batch_size=0 is not allowed; it must be >= 1"),
    launch("trainer/batch-size-empty", "trainer.batch_size=",
           said="trainer.batch_size=: Value '' of type 'str' could not be converted to Integer"),
    launch("trainer/precision", "trainer.precision=fp16",
           said="trainer.precision='fp16' is not allowed; choose one of: auto, fp32, bf16"),
    launch("trainer/device", "trainer.device=tpu",
           said="trainer.device='tpu' is not allowed; choose one of: auto, cpu"),
    launch("trainer/seed-negative", "trainer.seed=-1", said="trainer.seed=-1 is not allowed; it must be >= 0"),
    launch("trainer/eval-every-negative", "trainer.eval_every=-1", said="trainer.eval_every=-1 is not allowed"),
    launch("trainer/finite-check-0", "trainer.finite_check_every=0",
           said="trainer.finite_check_every=0 is not allowed; it must be >= 1"),
    launch("trainer/accumulation-picked-in-weak-scaling", "trainer.grad_accum_steps=0",
           said="trainer.grad_accum_steps=0 (picked per node count) needs trainer.scaling=strong"),
    launch("trainer/strong-batch-over-3-ranks", "trainer.scaling=strong", "trainer.global_batch_size=100", "nodes=3",
           said="trainer.global_batch_size=100 does not divide over nodes(3) x cluster.tasks_per_node(1) = 3 ranks"),
    launch("trainer/checkpointing-without-blocks", "trainer.activation_checkpointing=true",
           said="trainer.activation_checkpointing=true: model._target_=pipeline.workloads.models.MLP has no repeated "
                "blocks to checkpoint"),
    launch("trainer/compile-with-small-buckets", "trainer.compile=true", "ddp.bucket_cap_mb=0.5",
           said="ddp.bucket_cap_mb=0.5 is not allowed with trainer.compile=true"),
    launch("trainer/data-on-device-maybe", "trainer.data_on_device=maybe",
           said="trainer.data_on_device=maybe: Value 'maybe' is not a valid bool"),
    launch("trainer/unknown-key", "trainer.nope=1", said="trainer.nope is not a key of the config; did you mean "),

    # trainer.resume_from: nothing there, a folder that is no checkpoint, bytes that are none, a FIFO
    launch("resume/missing", "trainer.resume_from={t}/nowhere.pt",
           said="trainer.resume_from={t}/nowhere.pt does not exist; give a run folder's checkpoint.dcp"),
    launch("resume/folder-without-checksums", "trainer.resume_from={t}/dcp", make=folder("dcp"),
           said="trainer.resume_from={t}/dcp is a folder without checksums.json: not a whole sharded checkpoint"),
    launch("resume/random-bytes", "trainer.resume_from={t}/checkpoint.pt", make=holding("checkpoint.pt", RANDOM),
           said="trainer.resume_from={t}/checkpoint.pt is not a file torch.save wrote (a zip archive holding"),
    launch("resume/zip-without-data", "trainer.resume_from={t}/checkpoint.pt",
           make=holding("checkpoint.pt", b"PK\3\4" + RANDOM[:200]), said="is not a file torch.save wrote"),
    launch("resume/fifo", "trainer.resume_from={t}/checkpoint.pt", make=fifo("checkpoint.pt"),
           said="trainer.resume_from={t}/checkpoint.pt is not a regular file (a FIFO, a socket or a device)"),
    launch("resume/ddp-file-for-fsdp", "parallel=fsdp", "trainer.resume_from={t}/checkpoint.pt",
           make=holding("checkpoint.pt", RANDOM),
           said="trainer.resume_from={t}/checkpoint.pt is a DDP checkpoint file, which parallel=fsdp cannot load"),
    launch("resume/blank", "trainer.resume_from='  '", said="trainer.resume_from={t}/   does not exist"),

    # parallel: ddp, fsdp, hsdp, and ddp's knobs
    launch("parallel/no-such-option", "parallel=zero",
           said="parallel=zero is not an option of parallel; choose one of: ddp, fsdp, hsdp"),
    launch("parallel/fsdp-param-dtype", "parallel=fsdp", "parallel.param_dtype=fp16",
           said="parallel.param_dtype='fp16' is not allowed; choose one of: auto, fp32, bf16"),
    launch("parallel/fsdp-block-class-with-space", "parallel=fsdp", "parallel.block_classes=['not a class']",
           said="parallel.block_classes: 'not a class' is not allowed; give class names (Block)"),
    launch("parallel/fsdp-reshard-maybe", "parallel=fsdp", "parallel.reshard_after_forward=maybe",
           said="parallel.reshard_after_forward=maybe: Value 'maybe' is not a valid bool"),
    launch("parallel/fsdp-channels-last", "parallel=fsdp", "trainer.channels_last=true",
           said="trainer.channels_last=true is not allowed with parallel=fsdp"),
    launch("parallel/fsdp-replicate", "parallel=fsdp", "parallel.replicate=2",
           said="parallel.replicate is not a key of the parallel chosen here"),
    launch("parallel/hsdp-replicate-0", "parallel=hsdp", "parallel.replicate=0",
           said="parallel.replicate=0 is not allowed; it must be >= 1"),
    launch("parallel/hsdp-replicate-not-dividing", "parallel=hsdp", "parallel.replicate=3", "nodes=2",
           said="parallel.replicate=3 does not divide the 2 ranks (nodes(2) x cluster.tasks_per_node(1))"),
    launch("parallel/ddp-bucket-0", "ddp.bucket_cap_mb=0", said="ddp.bucket_cap_mb=0.0 is not allowed; it must be > 0"),
    launch("parallel/ddp-static-graph-maybe", "ddp.static_graph=maybe",
           said="ddp.static_graph=maybe: Value 'maybe' is not a valid bool"),

    # cluster=local
    launch("cluster/tasks-0", "cluster.tasks_per_node=0",
           said="cluster.tasks_per_node=0 is not allowed; it must be >= 1"),
    launch("cluster/gpus-negative", "cluster.gpus_per_node=-1",
           said="cluster.gpus_per_node=-1 is not allowed; it must be >= 0"),
    launch("cluster/timeout-0", "cluster.timeout_s=0", said="cluster.timeout_s=0 is not allowed; it must be >= 1"),
    launch("cluster/stopped-0", "cluster.stopped_s=0",
           said="cluster.stopped_s=0.0 is not allowed; it must be a positive number"),
    launch("cluster/silent-negative", "cluster.silent_s=-1", said="cluster.silent_s=-1.0 is not allowed"),
    launch("cluster/gpus-shared-by-ranks", "cluster.gpus_per_node=1", "cluster.tasks_per_node=2",
           said="cluster.tasks_per_node=2 ranks would share cluster.gpus_per_node=1 GPU(s)"),
    launch("cluster/slurm-key-on-local", "cluster.partition=gpu",
           said="cluster.partition is not a key of the cluster chosen here (other options of it have one)"),
    launch("cluster/no-such-option", "cluster=aws",
           said="cluster=aws is not an option of cluster; choose one of: local"),

    # cluster=slurm: what reaches sbatch, as a dry run; shell syntax in every value that reaches the script
    slurm("slurm/partition-substitution", "cluster.partition='$(touch MARKER)'",
          said="cluster.partition='$(touch MARKER)' is not allowed"),
    slurm("slurm/account-backticks", "cluster.account='`touch MARKER`'",
          said="cluster.account='`touch MARKER`' is not allowed"),
    slurm("slurm/account-escaped-newline", "cluster.account='a\\nb'", said="cluster.account='a\\\\nb' is not allowed"),
    slurm("slurm/qos-semicolon", "cluster.qos='normal;touch MARKER'",
          said="cluster.qos='normal;touch MARKER' is not allowed"),
    slurm("slurm/constraint-and-and", "cluster.constraint='a100 && touch MARKER'",
          said="cluster.constraint='a100 && touch MARKER' is not allowed: use letters, digits and _ . , : @ % + = / - "
               "[ ] & | ( ) * !"),
    slurm("slurm/mem-unit", "cluster.mem=16X",
          said="cluster.mem='16X' is not allowed: give a size such as 16G, 4000M or 64000"),
    slurm("slurm/mem-semicolon", "cluster.mem='16G; touch MARKER'",
          said="cluster.mem='16G; touch MARKER' is not allowed"),
    slurm("slurm/time-0", "cluster.time=0", said="cluster.time=0 is not allowed: minutes, >= 1"),
    slurm("slurm/cpus-0", "cluster.cpus_per_task=0", said="cluster.cpus_per_task=0 is not allowed: >= 1 or null"),
    slurm("slurm/array-parallelism-0", "cluster.array_parallelism=0",
          said="cluster.array_parallelism=0 is not allowed: >= 1 or null"),
    slurm("slurm/exclusive-maybe", "cluster.exclusive=maybe",
          said="cluster.exclusive=maybe: Value 'maybe' is not a valid bool"),
    slurm("slurm/extra-array", "+cluster.sbatch_extra.array=1-3",
          said="cluster.sbatch_extra.array is not allowed: every point is its own job (or array task)"),
    slurm("slurm/extra-wrap", "+cluster.sbatch_extra.wrap='touch MARKER'",
          said="cluster.sbatch_extra.wrap is not allowed"),
    slurm("slurm/extra-own-option", "+cluster.sbatch_extra.partition=x",
          said="cluster.sbatch_extra key 'partition' is not allowed: an sbatch long option name"),
    slurm("slurm/extra-bad-name", "+cluster.sbatch_extra.Bad_Key=1",
          said="cluster.sbatch_extra key 'Bad_Key' is not allowed"),
    slurm("slurm/extra-substitution", "+cluster.sbatch_extra.comment='$(touch MARKER)'",
          said="cluster.sbatch_extra.comment='$(touch MARKER)' is not allowed: use letters, digits"),
    slurm("slurm/setup-newline", "cluster.setup=['echo a\ntouch MARKER']",
          said="cluster.setup: give one shell line per list item (no embedded newlines)"),
    slurm("slurm/exclude-space", "cluster.exclude=['node 1']",
          said="cluster.exclude: 'node 1' is not allowed: give Slurm node names or host lists"),
    slurm("slurm/exclude-backticks", "cluster.exclude=['`touch MARKER`']",
          said="cluster.exclude: '`touch MARKER`' is not allowed"),
    slurm("slurm/unknown-key", "cluster.nope=1", said="cluster.nope is not a key of the config"),

    # health
    launch("health/threshold-0", "health.threshold=0",
           said="health.threshold=0.0 is not allowed; it must be in (0, 1)"),
    launch("health/resubmits-negative", "health.max_resubmits=-1", said="health.max_resubmits=-1 is not allowed"),
    launch("health/min-link-0", "health.min_link_gb_s=0",
           said="health.min_link_gb_s=0.0 is not allowed; it must be a positive number"),
    launch("health/answer-half-a-second", "health.answer_s=0.5",
           said="health.answer_s=0.5 is not allowed; it must be >= 1.0"),
    launch("health/on-bad-empty", "health.on_bad=''",
           said="health.on_bad='' is not allowed; choose one of: warn, exclude, fail"),

    # evaluate
    launch("evaluate/holdout-negative", "evaluate.holdout=-0.1",
           said="evaluate.holdout=-0.1 is not allowed; it must be in [0, 1)"),
    launch("evaluate/split-blank", "evaluate.split='   '",
           said="evaluate.split='' is not allowed; name the held-out split"),
    launch("evaluate/split-the-data-lacks", "evaluate.split=validation",
           said="evaluate.split='validation': dataset._target_=pipeline.workloads.datasets.Synthetic has no such"),

    # tracking=[mlflow], [wandb]
    launch("tracking/no-such-tracker", "tracking=[nope]",
           said="tracking=nope is not an option of tracking; choose one of: mlflow, wandb"),
    launch("tracking/mlflow-uri-empty", "tracking=[mlflow]", "tracking.mlflow.uri=''",
           said="tracking.mlflow.uri='' is not allowed; give e.g. http://host:5000"),
    launch("tracking/mlflow-uri-scheme", "tracking=[mlflow]", "tracking.mlflow.uri=ftp://host/x",
           said="tracking.mlflow.uri='ftp://host/x': the scheme 'ftp' is not one MLflow's client knows"),
    launch("tracking/mlflow-uri-port-0", "tracking=[mlflow]", "tracking.mlflow.uri=http://host:0",
           said="tracking.mlflow.uri='http://host:0': port 0 is not a server's port"),
    launch("tracking/mlflow-uri-port-string", "tracking=[mlflow]", "tracking.mlflow.uri=http://host:abc",
           said="tracking.mlflow.uri='http://host:abc' is not a URI MLflow can use"),
    launch("tracking/mlflow-uri-substitution", "tracking=[mlflow]", "tracking.mlflow.uri='$(touch MARKER)'",
           said="tracking.mlflow.uri='$(touch MARKER)' is not allowed"),
    launch("tracking/mlflow-experiment-empty", "tracking=[mlflow]", "tracking.mlflow.experiment=''",
           said="tracking.mlflow.experiment='' is not allowed; name the MLflow experiment"),
    launch("tracking/wandb-project-with-entity", "tracking=[wandb]", "tracking.wandb.project=team/x",
           said="tracking.wandb.project='team/x' is not allowed; give a project name (no '/'"),
    launch("tracking/wandb-dir-under-a-file", "tracking=[wandb]", "tracking.wandb.dir={t}/a-file/wandb",
           make=holding("a-file", b""), said="tracking.wandb.dir={t}/a-file/wandb cannot be made: Not a directory"),
    launch("tracking/wandb-not-chosen", "tracking.wandb.project=x",
           said="tracking.wandb.project is a key of tracking.wandb, which this config does not have (null)"),
    launch("tracking/queue-0", "tracking.queue=0", said="tracking.queue=0 is not allowed; it must be >= 1"),
    launch("tracking/close-0", "tracking.close_s=0", said="tracking.close_s=0.0 is not allowed"),
    launch("tracking/damaged-tracking-json", "tracking=[mlflow]", "hydra.run.dir={t}/run",
           make=holding("run/tracking.json", b"\0\1 not json"),
           said="hydra.run.dir={t}/run: its tracking.json cannot be used"),

    # profiler
    launch("profiler/steps-0", "profiler.steps=0", said="profiler.steps=0 is not allowed; it must be >= 1"),
    launch("profiler/rank-negative", "profiler.enabled=true", "profiler.ranks=[-1]",
           said="profiler.ranks=-1 is not allowed; it must be >= 0"),
    launch("profiler/ranks-empty", "profiler.enabled=true", "profiler.ranks=[]",
           said="profiler.ranks=[] is not allowed: this run has ranks 0 to 0"),
    launch("profiler/ranks-string", "profiler.ranks=abc",
           said="profiler.ranks=abc: Invalid value assigned: str is not a ListConfig"),

    # search=optuna: its values, its space, the sampler's and pruner's needs
    launch("search/trials-0", "search=optuna", SPACE, "search.trials=0", said="search.trials=0 is not allowed"),
    launch("search/sampler", "search=optuna", SPACE, "search.sampler=bayes",
           said="search.sampler='bayes' is not allowed; choose one of: tpe, random"),
    launch("search/pruner", "search=optuna", SPACE, "search.pruner=always",
           said="search.pruner='always' is not allowed; choose one of: none, median"),
    launch("search/stale-within-three-heartbeats", "search=optuna", SPACE, "search.stale_after_s=10",
           said="search.stale_after_s=10.0 is not allowed; it must be at least three heartbeats"),
    launch("search/empty-space", "search=optuna", said="search.space is empty: give at least one parameter"),
    launch("search/reversed-interval", "search=optuna", "+search.space.optimizer.lr='interval(0.1, 0.01)'",
           said="search.space.optimizer.lr: interval(0.1, 0.01) is reversed or empty"),
    launch("search/log-from-0", "search=optuna", "+search.space.optimizer.lr='tag(log, interval(0, 1))'",
           said="search.space.optimizer.lr: tag(log, interval(0.0, 1.0)) includes values <= 0"),
    launch("search/key-the-config-lacks", "search=optuna", "+search.space.trainer.nope='interval(0.1, 1)'",
           said="search.space.trainer.nope: the config has no value trainer.nope to search over"),
    launch("search/single-value", "search=optuna", "+search.space.optimizer.lr='0.1'",
           said="search.space.optimizer.lr: '0.1' is a single value, not a distribution"),
    launch("search/malformed", "search=optuna", "+search.space.optimizer.lr='interval(0.01'",
           said="search.space.optimizer.lr='interval(0.01' is malformed"),
    launch("search/empty-range", "search=optuna", "+search.space.trainer.seed='range(5, 1)'",
           said="search.space.trainer.seed: range(5, 1, 1) is empty"),
    launch("search/fractional-nodes", "search=optuna", "+search.space.nodes='interval(0.5, 2)'",
           said="search.space.nodes must be whole node counts of at least 1"),
    launch("search/grid-of-an-interval", "search=optuna", SPACE, "search.sampler=grid",
           said="search.sampler=grid needs every parameter to be choice(...) or range(...); search.space.optimizer.lr "
                "is an interval"),
    launch("search/grid-too-small", "search=optuna", "+search.space.optimizer.lr='choice(0.01, 0.1)'",
           "search.sampler=grid", "search.trials=5",
           said="search.trials=5 is more than the grid's 2 point(s)"),
    launch("search/pruner-without-evaluations", "search=optuna", SPACE, "search.pruner=median",
           said="search.pruner=median needs evaluations during training to judge a trial by: set trainer.eval_every"),
    launch("search/direction", "search=optuna", SPACE, "search.direction=sideways",
           said="search.direction='sideways' is not allowed; choose one of: auto, minimize, maximize"),
    launch("search/directions-too-many", "search=optuna", SPACE, "search.direction=[minimize,maximize]",
           said="search.direction=['minimize', 'maximize'] gives 2 direction(s) for 1 objective(s)"),
    launch("search/no-such-option", "search=grid",
           said="search=grid is not an option of search; choose one of: optuna"),
    sweep("search/in-a-sweep", "model=mlp,cnn", "search=optuna", lines=3,
          said="point #1 (model=cnn search=optuna): search=optuna chooses its trials itself: launch it without -m"),

    # the run's own keys, and its folder
    launch("run/nodes-0", "nodes=0", said="nodes=0 is not allowed; it must be >= 1"),
    launch("run/nodes-string", "nodes=abc",
           said="nodes=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    launch("run/dry-run-maybe", "dry_run=maybe", said="dry_run=maybe: Value 'maybe' is not a valid bool"),
    launch("run/objective-unknown", "objective=nope.figure",
           said="objective='nope.figure' is no figure a record holds"),
    launch("run/objective-twice", "objective=[evaluation.value,evaluation.value]",
           said="objective=['evaluation.value', 'evaluation.value']: a figure is named twice"),
    launch("run/io-output-empty", "io.output=''", said="io.output='' is not allowed"),
    launch("run/io-input-key-blank", "io.input_key=' '", said="io.input_key=' ' is not allowed; give the mapping key"),
    launch("run/param-groups-method", "param_groups.method=1abc",
           said="param_groups.method='1abc' is not allowed; give the name of a method of the model"),
    launch("run/param-groups-function-not-a-config", "param_groups.function=notadict",
           said="param_groups.function='notadict' is not allowed; give a config with a `_target_`"),
    launch("run/new-top-level-key", "+nonsense=1", said="nonsense is not a key of the config; the keys are: "),
    launch("run/folder-with-a-finished-run", "hydra.run.dir={t}/done", make=holding("done/result.json", b"{}"),
           said="hydra.run.dir={t}/done holds a finished run's record (result.json)"),

    # Hydra's own errors: the override grammar, its groups, its flags
    launch("hydra/double-dot", "trainer..batch_size=1", said="trainer..batch_size=1: LexerNoViableAltException"),
    launch("hydra/unbalanced", "nodes=1)", said="nodes=1): Error parsing override 'nodes=1)'; extraneous input ')'"),
    launch("hydra/unquoted-substitution", "dataset.root=$(touch MARKER)",
           said="dataset.root=$(touch MARKER): mismatched input '(' expecting <EOF>"),
    launch("hydra/unquoted-backticks", "dataset.root=`touch MARKER`",
           said="dataset.root=`touch MARKER`: LexerNoViableAltException"),
    launch("hydra/empty-group-choice", "model=", said="model= is not an option of model; choose one of: cnn"),
    launch("hydra/append-existing", "+trainer.batch_size=1",
           said="Could not append to config. An item is already at 'trainer.batch_size'"),
    launch("hydra/delete-missing", "~trainer.nope", said="Could not delete from config. 'trainer.nope' does not exist"),
    launch("hydra/no-such-launcher", "hydra/launcher=nope",
           said="hydra/launcher=nope is not an option of hydra/launcher; choose one of: basic, pipeline"),
    launch("hydra/unknown-hydra-key", "hydra.nope=1", said="hydra.nope is not a key of the config"),
    launch("hydra/sweep-without-m", "model=mlp,cnn", said="Ambiguous value for argument 'model=mlp,cnn'"),
    launch("hydra/package-on-a-value", "model@foo=mlp", said="model@foo is not a key of the config"),
    launch("hydra/list-for-a-group", "trainer=[1,2]", said="trainer=[1,2]: Cannot merge DictConfig with ListConfig"),
    launch("hydra/unknown-flag", "--nope", usage=True, said="unrecognized arguments: --nope"),
    launch("hydra/cfg-choice", "-c", "nope", usage=True, said="argument --cfg/-c: invalid choice: 'nope'"),
    launch("hydra/info-choice", "--info", "nope", usage=True, said="argument --info/-i: invalid choice: 'nope'"),

    # a sweep (-m): every bad point named, nothing launched
    sweep("sweep/every-point-bad", "nodes=0,-1", lines=3,
          said="2 of 2 sweep points cannot run, nothing was launched:\npoint #0 (nodes=0): nodes=0 is not allowed"),
    sweep("sweep/one-point-bad", "optimizer.lr=0.1,-1", lines=2,
          said="point #1 (optimizer.lr=-1): optimizer.lr=-1.0 is not allowed; it must be a positive number"),
    sweep("sweep/strong-batch-for-one-point", "nodes=1,2", "trainer.scaling=strong", "trainer.global_batch_size=3",
          lines=2, said="trainer.global_batch_size=3 does not divide over nodes(2)"),
    sweep("sweep/slurm-value-for-one-point", "cluster=slurm", "dry_run=true", "cluster.partition=a,'b c'", lines=2,
          said="point #1 (cluster=slurm dry_run=True cluster.partition='b c'): cluster.partition='b c' is not allowed"),
    sweep("sweep/slurm-backticks-in-every-point", "nodes=1,2", "cluster=slurm", "dry_run=true",
          "cluster.qos='a`touch MARKER`'", lines=3, said="cluster.qos='a`touch MARKER`' is not allowed"),
    sweep("sweep/allow-partial-with-nothing-left", "trainer.seed=1,2", "allow_partial=true", "nodes=0", lines=3,
          said="2 of 2 sweep points cannot run, nothing was launched"),
    sweep("sweep/option-missing-for-one-point", "scheduler=cosine,nope", lines=2,
          said="scheduler=nope is not an option of scheduler"),
    sweep("sweep/shared-folder", "trainer.seed=1,2", "hydra.sweep.subdir=same",
          said="points #0 and #1 would share the folder {t}/sweep/same; give each point its own (hydra.sweep.subdir)"),
    sweep("sweep/unknown-key", "trainer.seed=1,2", "trainer.nope=3", said="trainer.nope is not a key of the config"),

    # pipeline.status
    program("status", "status/no-folder", usage=True, said="the following arguments are required: sweep_dir"),
    program("status", "status/missing", "{t}/nowhere",
            said="pipeline.status: {t}/nowhere/manifest.json: no manifest; is {t}/nowhere a sweep folder"),
    program("status", "status/empty-folder", "{t}", said="{t}/manifest.json: no manifest"),
    program("status", "status/manifest-random-bytes", "{t}", make=holding("manifest.json", RANDOM),
            said="pipeline.status: {t}/manifest.json cannot be read: "),
    program("status", "status/manifest-fifo", "{t}", make=fifo("manifest.json"),
            said="{t}/manifest.json cannot be read: [Errno 22] not a regular file but a FIFO"),
    program("status", "status/manifest-truncated", "{t}", make=holding("manifest.json", b'{"points": {'),
            said="{t}/manifest.json cannot be read: unexpected end of data"),
    program("status", "status/manifest-a-folder", "{t}", make=folder("manifest.json"),
            said="{t}/manifest.json cannot be read: [Errno 22] not a regular file but a folder"),
    program("status", "status/search-json-damaged", "{t}", make=holding("search.json", b"\0\1garbage"),
            said="pipeline.status: {t}/search.json or its study cannot be read"),
    program("status", "status/unknown-option", "{t}", "--nope", usage=True, said="unrecognized arguments: --nope"),
    program("status", "status/flag-with-a-value", "{t}", "--wait=yes", usage=True,
            said="argument --wait: ignored explicit argument 'yes'"),
    program("status", "status/two-folders", "{t}", "{t}", usage=True, said="unrecognized arguments: {t}"),
    program("status", "status/folder-substitution", "{t}/$(touch MARKER)",
            said="{t}/$(touch MARKER)/manifest.json: no manifest"),

    # pipeline.collect: every option that names a file or a bound, checked before any work
    program("collect", "collect/no-folder", usage=True, said="the following arguments are required: paths"),
    program("collect", "collect/no-records", "{t}", said="no usable result records under {t}"),
    program("collect", "collect/missing-folder", "{t}/nowhere", said="no usable result records under {t}/nowhere"),
    program("collect", "collect/tolerance-nan", "{t}", "--tolerance", "nan", usage=True,
            said="argument --tolerance: 'nan' is not allowed: give the relative drop that counts as a regression"),
    program("collect", "collect/tolerance-negative", "{t}", "--tolerance", "-0.1", usage=True,
            said="argument --tolerance: '-0.1' is not allowed"),
    program("collect", "collect/tolerance-1", "{t}", "--tolerance", "1", usage=True,
            said="argument --tolerance: '1' is not allowed: give the relative drop that counts as a regression, a "
                 "number in [0, 1)"),
    program("collect", "collect/tolerance-inf", "{t}", "--tolerance", "inf", usage=True,
            said="argument --tolerance: 'inf' is not allowed"),
    program("collect", "collect/tolerance-string", "{t}", "--tolerance", "abc", usage=True,
            said="argument --tolerance: 'abc' is not allowed"),
    program("collect", "collect/predict-at-string", "{t}", "--predict-at", "abc", usage=True,
            said="argument --predict-at: 'abc' is not allowed: give node counts >= 1, comma-separated"),
    program("collect", "collect/predict-at-empty-list", "{t}", "--predict-at", ",", usage=True,
            said="argument --predict-at: ',' is not allowed"),
    program("collect", "collect/predict-at-negative", "{t}", "--predict-at=-4", usage=True,
            said="argument --predict-at: '-4' is not allowed"),
    program("collect", "collect/device-memory-unit", "{t}", "--device-memory", "80XB", usage=True,
            said="argument --device-memory: '80XB' is not a size; give e.g. 80GB, 80GiB, 512MB or a number of bytes"),
    program("collect", "collect/device-memory-negative", "{t}", "--device-memory=-1", usage=True,
            said="argument --device-memory: '-1' is not a size"),
    program("collect", "collect/device-memory-empty", "{t}", "--device-memory", "", usage=True,
            said="argument --device-memory: '' is not a size"),
    program("collect", "collect/baseline-missing", "{t}", "--baseline", "{t}/nowhere.json",
            said="pipeline.collect: --baseline {t}/nowhere.json: No such file or directory"),
    program("collect", "collect/baseline-fifo", "{t}", "--baseline", "{t}/old.json", make=fifo("old.json"),
            said="pipeline.collect: --baseline {t}/old.json: not a regular file but a FIFO"),
    program("collect", "collect/baseline-binary", "{t}", "--baseline", "{t}/old.json", make=holding("old.json", RANDOM),
            said="pipeline.collect: --baseline {t}/old.json: "),
    program("collect", "collect/baseline-other-json", "{t}", "--baseline", "{t}/old.json",
            make=holding("old.json", b'{"rows": [{"nodes": "one"}]}'),
            said="--baseline {t}/old.json: not the scaling.json of a collection"),
    program("collect", "collect/baseline-a-folder", "{t}", "--baseline", "{t}/old", make=folder("old"),
            said="--baseline {t}/old: not a regular file but a folder"),
    program("collect", "collect/baseline-substitution", "{t}", "--baseline", "{t}/$(touch MARKER)",
            said="--baseline {t}/$(touch MARKER): No such file or directory"),
    program("collect", "collect/baseline-without-a-file", "{t}", "--baseline", usage=True,
            said="argument --baseline: expected one argument"),
    program("collect", "collect/out-under-a-file", "{t}", "--out", "{t}/a-file/out", make=holding("a-file", b""),
            said="pipeline.collect: --out {t}/a-file/out cannot be written: Not a directory"),
    program("collect", "collect/out-a-file", "{t}", "--out", "{t}/a-file", make=holding("a-file", b""),
            said="--out {t}/a-file cannot be written: File exists"),
    program("collect", "collect/unknown-option", "{t}", "--nope", usage=True, said="unrecognized arguments: --nope"),

    # pipeline.track
    program("track", "track/no-command", usage=True, said="the following arguments are required: command"),
    program("track", "track/unknown-command", "nope", usage=True,
            said="argument command: invalid choice: 'nope' (choose from 'sync')"),
    program("track", "track/sync-no-folder", "sync", usage=True, said="the following arguments are required: paths"),
    program("track", "track/sync-missing", "sync", "{t}/nowhere",
            said="pipeline.track: {t}/nowhere is not a folder: give a sweep, search or point folder"),
    program("track", "track/sync-a-file", "sync", "{t}/a-file", make=holding("a-file", b""),
            said="{t}/a-file is not a folder"),
    program("track", "track/sync-no-point", "sync", "{t}",
            said="pipeline.track: {t} holds no point folder (point.json): nothing to sync"),
    program("track", "track/sync-substitution", "sync", "{t}/$(touch MARKER)",
            said="{t}/$(touch MARKER) is not a folder"),
    program("track", "track/mlflow-uri-scheme", "sync", "{t}", "--mlflow-uri", "ftp://x/y",
            said="pipeline.track: tracking.mlflow.uri='ftp://x/y': the scheme 'ftp' is not one MLflow's client knows"),
    program("track", "track/mlflow-uri-no-host", "sync", "{t}", "--mlflow-uri", "http://:5000",
            said="tracking.mlflow.uri='http://:5000' names no host"),
    program("track", "track/mlflow-uri-port-0", "sync", "{t}", "--mlflow-uri", "http://h:0",
            said="tracking.mlflow.uri='http://h:0': port 0 is not a server's port"),
    program("track", "track/mlflow-uri-substitution", "sync", "{t}", "--mlflow-uri", "$(touch MARKER)",
            said="tracking.mlflow.uri='$(touch MARKER)' is not allowed"),
    program("track", "track/mlflow-experiment-empty", "sync", "{t}", "--mlflow-uri", "http://h:5000",
            "--mlflow-experiment", "", said="tracking.mlflow.experiment='' is not allowed"),
    program("track", "track/unknown-option", "sync", "{t}", "--nope", usage=True,
            said="unrecognized arguments: --nope"),
    # once refused in several lines, or naming no key
    launch("model/deleted", "~model", said="model: Missing mandatory value: model"),
    launch("hydra/interpolation-env-missing", "nodes=${oc.env:NO_SUCH_VARIABLE_HERE}",
           said="nodes: KeyError raised while resolving interpolation"),
    launch("hydra/interpolation-key-missing", "trainer.batch_size=${no_such_key}",
           said="trainer.batch_size: Interpolation key 'no_such_key' not found"),
    launch("hydra/no-such-config-name", "--config-name=nope", said="--config-name: Cannot find primary config 'nope'"),
    launch("hydra/no-such-config-dir", "--config-dir={t}/nowhere",
           said="--config-dir: Additional config directory '{t}/nowhere' not found"),
    launch("run/folder-under-a-file", "hydra.run.dir={t}/a-file/run", make=holding("a-file", b""),
           said="{t}/a-file/run cannot be written (Not a directory): choose a folder this launch can write "
                "(hydra.run.dir"),
    sweep("sweep/folder-under-a-file", "trainer.seed=1,2", "hydra.sweep.dir={t}/a-file/sweep",
          make=holding("a-file", b""), said="{t}/a-file/sweep cannot be written (Not a directory)"),
    # once refused by the ranks only (exit 1), or taken
    launch("scheduler/warmup-negative", "scheduler=warmup_cosine", "scheduler.warmup_steps=-1",
           said="scheduler.warmup_steps=-1 is not allowed: a warm-up takes >= 1 step"),
    launch("scheduler/start-factor-0", "scheduler=warmup_cosine", "scheduler.start_factor=0",
           said="scheduler.start_factor=0 is not allowed: a warm-up starts at a fraction of the learning rate"),
    launch("scheduler/start-factor-2", "scheduler=warmup_cosine", "scheduler.start_factor=2",
           said="scheduler.start_factor=2 is not allowed"),
    launch("scheduler/floor-string", "scheduler=warmup_cosine", "scheduler.then.eta_min=abc",
           said="scheduler.then.eta_min='abc' is not allowed: a learning rate's floor is a number >= 0"),
    launch("model/input-shape-not-the-datasets", "dataset.image_shape=[3,32,32]", "model.input_shape=[1,28,28]",
           said="model.input_shape=[1, 28, 28] is not the dataset's input_shape=[3, 32, 32] (at launch)"),
    slurm("slurm/extra-as-a-mapping", "cluster.sbatch_extra={comment:x}",
          said="cluster.sbatch_extra: its new key 'comment' needs a + on the command line: "
               "+cluster.sbatch_extra.comment=VALUE"),
    sweep("sweep/no-point", "trainer.seed=range(0,0)",
          said="trainer.seed=range(0,0): the sweep has no points: give each swept key one value at least"),
    program("track", "track/mlflow-uri-empty", "sync", "{t}", "--mlflow-uri", "",
            said="pipeline.track: --mlflow-uri='' is not allowed"),
]

# Refused, but not as the rest: each fails a check above (strict: when it is mended, this list says so)
NOT_YET = [
    (launch("hydra/no-key", "=5", said="=5"),
     "Hydra's ValueError (Config group override must be a string or a list. Got int) is a traceback, exit 1"),
    (launch("hydra/rerun-file-missing", "--experimental-rerun", "{t}/nowhere.pickle", said="--experimental-rerun"),
     "Hydra's ValueError (File ... does not exist!) is a traceback, exit 1"),
    (launch("hydra/searchpath-missing", "hydra.searchpath=[file://{t}/nowhere]", "+experiment=x",
            said="hydra.searchpath"),
     ("Hydra's UserWarning (path=... is not available) comes first, two lines of its source, and the error names "
      "experiment=x alone")),
    (launch("run/job-name-with-a-slash", "hydra.job.name=a/b", said="hydra.job.name"),
     "refused as 'RUN_DIR/a/b.log: No such file or directory', naming the log file, not the key"),
    (sweep("sweep/interval-without-a-search", "trainer.seed=interval(1,2)", said="trainer.seed"),
     "refused as 'BasicSweeper does not support sweep type : INTERVAL_SWEEP', naming no key"),
    (program("track", "track/sync-point-json-damaged", "sync", "{t}", make=holding("p0/point.json", b"\0garbage"),
             code=1, said="{t}/p0: not synced: JSONDecodeError"),
     ("exit 1 as documented, but the same error said twice: the second time as 'a sweep's parent run could not be "
      "updated'")),
]

# Taken (a dry run, exit 0), and inert: a run folder or job name with shell syntax reaches the sbatch script only
# quoted, and nothing runs it
ACCEPTED = [
    slurm("accepted/slurm-job-name-substitution", "hydra.job.name='$(touch MARKER)'",
          said="dry run, nothing submitted"),
    slurm("accepted/slurm-run-folder-substitution", "hydra.run.dir='{t}/$(touch MARKER)'",
          said="its sbatch script: {t}/$(touch MARKER)/job.sbatch"),
    slurm("accepted/slurm-run-folder-semicolon", "hydra.run.dir='{t}/a b;touch MARKER'",
          said="its sbatch script: {t}/a b;touch MARKER/job.sbatch"),
    sweep("accepted/slurm-sweep-folder-backticks", "trainer.seed=1,2", "cluster=slurm", "dry_run=true",
          "hydra.sweep.dir='{t}/`touch MARKER`'", said="its sbatch script: {t}/`touch MARKER`/array-0-1.sbatch"),
    launch("accepted/local-job-name-backticks", "dry_run=true", "hydra.job.name='`touch MARKER`'",
           said="dry run, nothing started"),
]
ACCEPTED = [dataclasses.replace(r, code=0, allow=("git",)) for r in ACCEPTED]

EVERY = ROWS + [row for row, _ in NOT_YET] + ACCEPTED
assert len({r.id for r in EVERY}) == len(EVERY), "two rows with one id"


def expanded(text: str, t: Path) -> str:
    return text.replace("{t}", str(t))


def row_argv(row: Row, t: Path) -> list[str]:
    argv = [expanded(a, t) for a in row.argv]
    if row.program == "launch" and not row.usage and not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
                                                             for a in argv):
        argv.append(f"hydra.sweep.dir={t / 'sweep'}" if "-m" in argv else f"hydra.run.dir={t / 'run'}")
    return argv


class Harness:
    """The harness process, running the rows the session's tests ask for, in their order; `outcome` waits for one."""

    def __init__(self, rows: list[Row], base: Path):
        self.base, self.done, self.read = base, {}, 0
        table = []
        for row in rows:
            t = self.folder(row)
            t.mkdir(parents=True)
            if row.make:
                row.make(t)
            table.append({"id": row.id, "program": row.program, "argv": row_argv(row, t), "cwd": str(t),
                          "allow": list(row.allow)})
        (base / "table.json").write_text(json.dumps(table))
        # as from a login shell: no job's variables, no full Hydra traces
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_")) and
               k != "HYDRA_FULL_ERROR"}
        with open(base / "harness.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.bad_inputs_harness", str(base / "table.json"),
                                          str(base / "out.jsonl")], cwd=REPO, env=env, stdout=log, stderr=log)

    def folder(self, row: Row) -> Path:
        return self.base / row.id

    def outcome(self, row: Row) -> tuple[dict, Path]:
        deadline = time.monotonic() + ROW_WAIT_S
        while row.id not in self.done:
            ended = self.proc.poll() is not None
            out = self.base / "out.jsonl"
            if out.is_file():
                with open(out, "rb") as f:
                    f.seek(self.read)
                    lines = f.read().split(b"\n")
                for line in lines[:-1]:  # the last is empty, or a line still being written
                    self.read += len(line) + 1
                    result = json.loads(line)
                    self.done[result["id"]] = result
            if row.id in self.done:
                break
            log = (self.base / "harness.log").read_text(errors="replace")[-3000:]
            assert not ended, f"the harness ended (exit {self.proc.returncode}) without row {row.id}:\n{log}"
            assert time.monotonic() < deadline, f"row {row.id}: no outcome in {ROW_WAIT_S:.0f} s\n{log}"
            time.sleep(0.005)
        return self.done[row.id], self.folder(row)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def outcome(request, tmp_path_factory):
    """What a row did (the harness's record) and its folder. The harness runs the rows of this module's tests that
    the session runs (all, or those -k chose), in the session's order."""
    rows = [item.callspec.params["row"] for item in request.session.items
            if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})]
    harness = Harness(rows, tmp_path_factory.mktemp("bad-inputs"))
    yield harness.outcome
    harness.close()


def markers(t: Path) -> list[Path]:
    """Files a shell running a value would have made: under the row's folder (its cwd) or the repository's."""
    return [p for p in (*t.rglob(f"{MARKER}*"), *REPO.glob(f"{MARKER}*")) if p.name.startswith(MARKER)]


def check_common(row: Row, out: dict, t: Path) -> str:
    """What every row owes, refused or taken; returns what it said, for the row's own checks."""
    said = f"exit {out['code']} in {out['seconds']} s\n--- stderr\n{out['stderr']}--- stdout\n{out['stdout']}"
    assert out["code"] == row.code, said
    assert "Traceback" not in out["stderr"] + out["stdout"], said
    assert "Error executing job" not in out["stderr"] + out["stdout"], said
    assert [s for s in out["started"] if s[1] not in row.allow] == [], said  # no rank, no shell, nothing at all
    assert not any(s[1] in ("sh", "bash", "dash", "zsh") or s[0] == "os.system" for s in out["started"]), said
    assert out["children_left"] == [], said
    assert markers(t) == [], said
    assert not [p for p in t.rglob("logs") if p.is_dir()], said  # no rank wrote its log
    return said


@pytest.mark.parametrize("row", ROWS + [pytest.param(row, marks=pytest.mark.xfail(strict=True, reason=why))
                                        for row, why in NOT_YET], ids=lambda r: r.id)
def test_a_bad_input_is_refused_in_one_line_naming_the_key(row, outcome):
    out, t = outcome(row)
    said = check_common(row, out, t)
    lines = [x for x in out["stderr"].splitlines() if x.strip()]
    if row.usage:  # argparse's: the usage (a first line and its indented continuations), then the error
        prog = "pipeline.launch" if row.program == "launch" else f"python -m pipeline.{row.program}"
        assert lines[0].startswith("usage: ") and all(x.startswith(" ") for x in lines[1:-1]), said
        assert lines[-1].startswith(f"{prog}") and ": error: " in lines[-1], said
        assert expanded(row.said, t) in lines[-1], said
    else:
        assert len(lines) == row.lines, said
        if row.program == "launch":
            assert lines[0].startswith(HEADER), said
        assert expanded(row.said, t) in "\n".join(lines), said
    if row.program == "launch":
        # Hydra may have made the run's folder: nothing of a run is in it (a sweep's summary may be on stdout)
        assert not list(t.rglob("point.json")), said
        assert "-m" in row.argv or out["stdout"] == "", said
    else:
        assert out["stdout"] == "", said


def expanded_by_bash(line: str, text: str) -> bool:
    """Whether bash, running the line, would act on a shell character of `text` where it occurs: a `$` or backtick
    outside single quotes (and not escaped), or a `;`, `|`, `&`, `<`, `>` outside any quotes."""
    single, double, escaped, literal = False, False, False, []
    for ch in line:
        if escaped:
            literal.append("all")
            escaped = False
        elif single:
            literal.append("all")
            single = ch != "'"
        elif ch == "\\":
            literal.append("all")
            escaped = True
        elif ch == "'" and not double:
            literal.append("all")
            single = True
        else:
            double = double != (ch == '"')
            literal.append("separators" if double else "none")
    start = line.find(text)
    while start >= 0:
        for i, ch in enumerate(text, start):
            if ch in "$`" and literal[i] != "all" or ch in ";|&<>" and literal[i] == "none":
                return True
        start = line.find(text, start + 1)
    return False


@pytest.mark.parametrize("row", ACCEPTED, ids=lambda r: r.id)
def test_a_value_with_shell_syntax_that_is_taken_reaches_no_shell(row, outcome):
    out, t = outcome(row)
    said = check_common(row, out, t)
    assert expanded(row.said, t) in out["stderr"] + out["stdout"], said
    scripts, reached = list(t.rglob("*.sbatch")), False
    assert scripts or "cluster=slurm" not in row.argv, said
    for script in scripts:
        for line in script.read_text().splitlines():
            if not line.startswith("#"):  # #SBATCH lines are sbatch's to read, no shell's
                reached = reached or "touch MARKER" in line
                for syntax in ("$(touch MARKER)", "`touch MARKER`", ";touch MARKER"):
                    assert not expanded_by_bash(line, syntax), f"{script}: {line}"
    # a run or sweep folder is on the job's command line (srun's --output, submitit's folder)
    assert reached or not scripts or not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in row.argv)


def test_the_table_is_as_long_as_the_issue_asks():
    """Issue 31: at least 150 bad inputs, every config group and every program among them."""
    assert len(ROWS) + len(NOT_YET) >= 150
    groups = {r.id.split("/")[0] for r in ROWS}
    assert {"model", "dataset", "loader", "optimizer", "scheduler", "loss", "trainer", "resume", "parallel", "cluster",
            "slurm", "health", "evaluate", "tracking", "profiler", "search", "run", "hydra", "sweep", "status",
            "collect", "track"} <= groups
    datasets = {a.split("=")[1] for r in ROWS for a in r.argv if a.startswith("dataset=")} | {"synthetic"}
    assert datasets - {"imagenet"} == {p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml")}, datasets
