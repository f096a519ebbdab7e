"""Sharded training through the real CLI, in local debug mode (real processes, real gloo process groups): FSDP and
HSDP train to DDP's weights, gradient accumulation and activation checkpointing change nothing but memory and
time, each rank's state is counted from its shards (FSDP's half DDP's on 2 ranks), FSDP's comm phase agrees with a
profiler trace of the same run, a preempted sharded run resumes to an uninterrupted run's weights and its DCP
checkpoint continues on 1 and on 4 ranks, and FSDP finds the blocks of the built-in models."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import parse_run_config
from pipeline.launcher.local import run_local
from pipeline.result import Result
from pipeline.rundir import Point
from tests.conftest import launch, rank_pid

pytestmark = pytest.mark.e2e

# the tiny GPT (no BatchNorm, no dropout) on the synthetic language, 8 steps of SGD with momentum, 2 of warm-up
# (the nodes' health check, tests/test_health.py's subject, left out of these multi-node runs: 2 s each)
GPT = ["model=gpt_tiny", "dataset=synthetic_tokens", "dataset.train_size=1024", "dataset.test_size=64",
       "trainer.max_steps=8", "trainer.warmup_steps=2", "trainer.log_every=1000", "trainer.tensorboard=false",
       "probe.enabled=false", "health.enabled=false"]
# the runs compared, each on 2 ranks (HSDP's and its DDP reference on 2 nodes x 2 tasks); 64 samples per rank per step
RUNS = {
    "ddp": ["nodes=2", "trainer.batch_size=64"],
    # profiled on rank 0 over exactly its 6 timed steps, for the trace check
    "fsdp": ["nodes=2", "parallel=fsdp", "trainer.batch_size=64", "profiler.enabled=true", "profiler.ranks=[0]",
             "profiler.steps=6"],
    "ddp_accum": ["nodes=2", "trainer.batch_size=32", "trainer.grad_accum_steps=2"],
    "fsdp_accum_ac": ["nodes=2", "parallel=fsdp", "trainer.batch_size=32", "trainer.grad_accum_steps=2",
                      "trainer.activation_checkpointing=true"],
    "ddp_ac": ["nodes=2", "trainer.batch_size=64", "trainer.activation_checkpointing=true"],
    "ddp_2x2": ["nodes=2", "cluster.tasks_per_node=2", "trainer.batch_size=64"],
    "hsdp_2x2": ["nodes=2", "cluster.tasks_per_node=2", "parallel=hsdp", "trainer.batch_size=64", "probe.enabled=true"],
}
# fp32, 8 SGD steps: measured bitwise equal for DDP and FSDP on 2 ranks, within 2e-8 on 4; stated tolerance
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of RUNS, once: its folder."""
    root = tmp_path_factory.mktemp("sharding")
    folders = {}
    for name, overrides in RUNS.items():
        folders[name] = root / name
        r = launch(*GPT, *overrides, f"hydra.run.dir={folders[name]}", cwd=root)
        assert r.returncode == 0, name + r.stderr[-3000:]
    return folders


def weights(folder):
    return torch.load(folder / "model.pt", weights_only=True)


def assert_same_weights(a, b, atol=ATOL):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)


def test_fsdp_trains_to_ddps_weights_and_its_weights_load_without_the_project(runs):
    assert_same_weights(runs["ddp"], runs["fsdp"])
    rec = Result.read(runs["fsdp"])
    assert (rec.parallel.kind, rec.parallel.shard_ranks, rec.parallel.blocks, rec.parallel.block_classes) == \
        ("fsdp", 2, 2, ["Block"])
    # model.pt is the whole state dict, tied weights and all: a plain load_state_dict into the model as built
    from pipeline.workloads.models import GPT as Model

    model = Model(vocab_size=256, layers=2, heads=4, width=128, context_length=64, dropout=0.0)
    model.load_state_dict(torch.load(runs["fsdp"] / "model.pt", weights_only=True), strict=True)
    assert model.out.weight is model.tokens.weight
    # the collectives FSDP issued (timed on rank 0) are the ones planned from the groups' sizes
    assert [(c.op, c.calls, c.bytes) for c in rec.parallel.measured] == \
        [(c.op, c.calls, c.bytes) for c in rec.parallel.collectives]


def test_hsdp_on_two_nodes_of_two_trains_to_ddps_weights(runs):
    assert_same_weights(runs["ddp_2x2"], runs["hsdp_2x2"])
    rec = Result.read(runs["hsdp_2x2"])
    assert (rec.parallel.shard_ranks, rec.parallel.replicas) == (2, 2)
    planned = {c.op: c for c in rec.parallel.collectives}
    assert (planned["all_reduce"].group, planned["all_reduce"].ranks) == ("replicate", 2)
    assert sorted((c.op, c.calls, c.bytes) for c in rec.parallel.measured) == \
        sorted((c.op, c.calls, c.bytes) for c in rec.parallel.collectives)
    # the probe measured FSDP's collectives on the groups FSDP uses
    probed = {(c.op, c.group, c.ranks) for c in rec.fabric.collectives}
    assert probed == {("all_gather", "shard", 2), ("reduce_scatter", "shard", 2), ("all_reduce", "replicate", 2)}
    for c in rec.fabric.collectives:
        factor = (2 if c.op == "all_reduce" else 1) * (c.ranks - 1) / c.ranks
        assert all(p.busbw_gb_s == pytest.approx(p.algbw_gb_s * factor) for p in c.points)


def test_two_micro_batches_of_32_equal_one_of_64_under_ddp_and_fsdp(runs):
    """And activation checkpointing on top (FSDP): nothing changes but memory and time."""
    assert_same_weights(runs["ddp"], runs["ddp_accum"])
    assert_same_weights(runs["ddp"], runs["fsdp_accum_ac"])
    for name, micro, accum in (("ddp", 64, 1), ("ddp_accum", 32, 2), ("fsdp_accum_ac", 32, 2)):
        rec = Result.read(runs[name])
        assert (rec.micro_batch, rec.grad_accum_steps, rec.per_rank_batch, rec.global_batch) == \
            (micro, accum, 64, 128), name
    # under FSDP, with the sync switched off on the first micro-batch: the parameters gathered for both, the
    # gradients reduce-scattered once
    one, two = (Result.read(runs[n]).parallel for n in ("fsdp", "fsdp_accum_ac"))
    calls = {c.op: c.calls for c in two.measured}
    assert calls == {"all_gather": 2 * {c.op: c.calls for c in one.measured}["all_gather"],
                     "reduce_scatter": {c.op: c.calls for c in one.measured}["reduce_scatter"]}
    assert two.activation_checkpointing and two.blocks == 2


def test_activation_checkpointing_gives_the_same_weights(runs):
    wa, wb = weights(runs["ddp"]), weights(runs["ddp_ac"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # recomputed exactly: bitwise
    assert Result.read(runs["ddp_ac"]).parallel.activation_checkpointing


def test_fsdp_holds_half_of_ddps_state_per_rank_on_two_ranks(runs):
    ddp, fsdp = (Result.read(runs[n]) for n in ("ddp", "fsdp"))
    for rank_ddp, rank_fsdp in zip(ddp.ranks, fsdp.ranks):
        d, f = rank_ddp.memory, rank_fsdp.memory
        # SGD's momentum is sharded with its parameter; FSDP pads a parameter's rows to a multiple of 2 (stated
        # tolerance: 1% of DDP's)
        assert f.state_bytes == pytest.approx(d.state_bytes / 2, rel=0.01)
        assert (f.sharded_bytes, d.sharded_bytes) == (f.state_bytes, 0)
        assert d.parameter_bytes == d.gradient_bytes == d.optimizer_bytes == 4 * ddp.model_parameters
        assert f.peak_kind == "cpu_rss" and f.peak_bytes > f.baseline_bytes > 0 and f.device_bytes > 0


def test_fsdps_comm_phase_lies_within_a_profiler_trace_of_the_same_run(runs):
    """On a CPU every FSDP collective blocks the step, and the comm phase is the time inside them. In rank 0's trace
    of its 6 timed steps, each call's own events (its dispatch, c10d::_allgather_base_ or _reduce_scatter_base_,
    through the gloo op it waits for) lie inside the call, and the call inside FSDP's range around it
    (FSDP::all_gather, FSDP::post_backward_reduce): the comm phase must lie between their sums."""
    rec = Result.read(runs["fsdp"])
    ours = rec.ranks[0].timing.comm_mean_s * rec.timing.timed_steps
    (trace,) = (runs["fsdp"] / "profile").glob("rank0.*.pt.trace.json")
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e),
                    key=lambda e: e["ts"])
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    assert len(steps) == rec.timing.timed_steps == 6

    def named(name):  # FSDP's ranges name their module after the op: "FSDP::all_gather (blocks.0)"
        return [e for e in events if e["name"] == name or e["name"].startswith(f"{name} (")]

    def calls(dispatch, work):
        """Each call's span from its dispatch to the end of the gloo op it waited for (which runs on gloo's
        thread), in seconds."""
        total = 0.0
        for d in named(dispatch):
            w = next(e for e in named(work) if e["ts"] >= d["ts"])
            total += max(d["ts"] + d["dur"], w["ts"] + w["dur"]) - d["ts"]
        return total / 1e6

    inner = calls("c10d::_allgather_base_", "gloo:all_gather") + \
        calls("c10d::_reduce_scatter_base_", "gloo:all_reduce")  # gloo's reduce-scatter runs as an all-reduce
    outer = sum(e["dur"] for e in named("FSDP::all_gather") + named("FSDP::post_backward_reduce")) / 1e6
    assert inner * 0.98 <= ours <= outer * 1.02, (inner, ours, outer)
    assert rec.comm_measurement.startswith("parallel=fsdp|hsdp: comm = the time the step waits")


def wait_for(run_dir, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    progress = run_dir / "progress.json"
    while not (progress.is_file() and json.loads(progress.read_text() or "{}").get("step", 0) >= step):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def test_a_preempted_fsdp_run_resumes_exactly_and_its_checkpoint_continues_on_1_and_4_ranks(tmp_path):
    """Strong scaling (a global batch of 32), so every world size takes the same samples in each step: USR2 to both
    ranks mid-run, every rank saves its shards (DCP), the run resumes on the same 2 ranks to the uninterrupted
    run's weights, bitwise; the same checkpoint (trainer.resume_from) continues on 1 rank and on 4 ranks, which
    differ from it only in the order of their float sums (stated tolerance 1e-5; SGD with momentum, whose state is
    sharded too: Adam turns rounding differences in near-zero gradients into whole steps of lr)."""
    common = [*GPT[:4], "trainer.scaling=strong", "trainer.global_batch_size=32", "trainer.max_steps=30",
              "trainer.warmup_steps=2", "trainer.log_every=5", "trainer.tensorboard=false", "probe.enabled=false",
              "health.enabled=false", "parallel=fsdp",
              "trainer.finite_check_every=2"]  # the ranks agree on the signal at each check
    straight = tmp_path / "straight"
    r = launch(*common, "nodes=2", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "preempted"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.launch", *common, "nodes=2", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(run_dir, 10, proc)
    for rank in (0, 1):
        os.kill(rank_pid(run_dir, rank), signal.SIGUSR2)
    proc.communicate(timeout=120)
    checkpoint = run_dir / "checkpoint.dcp"
    saved = json.loads((checkpoint / "checksums.json").read_text())
    assert 10 <= saved["step"] < 30 and not (run_dir / "result.json").exists()
    assert {".metadata", "extra.pt", "__0_0.distcp", "__1_0.distcp"} <= set(saved["files"])
    run_local(run_dir, parse_run_config(Point.read(run_dir).config), job_id="local-again", position="again")
    rec = Result.read(run_dir)
    assert rec.resumed_from_step == saved["step"] and rec.steps == 30
    ws, wr = weights(straight), weights(run_dir)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    for nodes, tasks in ((1, 1), (2, 2)):
        other = tmp_path / f"resumed-{nodes * tasks}"
        r = launch(*common, f"nodes={nodes}", f"cluster.tasks_per_node={tasks}", f"trainer.resume_from={checkpoint}",
                   f"hydra.run.dir={other}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        rec = Result.read(other)
        assert (rec.world_size, rec.resumed_from_step, rec.steps) == (nodes * tasks, saved["step"], 30)
        assert_same_weights(straight, other)


@pytest.mark.parametrize("model, data, blocks, dtype", [
    ("mlp", [], (0, []), "bf16"),  # no repeated blocks: warned, sharded as one group; FSDP's bf16 policy
    # BatchNorm's fp32 statistics refuse bf16 weights on a CPU: fp32 parameters under bf16 autocast instead
    ("resnet18", ["dataset.image_shape=[3,32,32]", "trainer.batch_size=8", "trainer.max_steps=3",
                  "trainer.warmup_steps=1"], (8, ["BasicBlock"]), "fp32"),
])
def test_fsdp_finds_the_blocks_of_the_built_in_models_or_says_it_found_none(tmp_path, model, data, blocks, dtype):
    """In bf16 (trainer.precision=bf16), each by the mixed-precision path that suits it."""
    r = launch(f"model={model}", "parallel=fsdp", "nodes=2", "dataset.train_size=512", "dataset.test_size=64",
               "trainer.max_steps=4", "trainer.warmup_steps=1", "trainer.tensorboard=false", "probe.enabled=false",
               "trainer.precision=bf16", *data, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = Result.read(tmp_path / "run")
    assert (rec.parallel.blocks, rec.parallel.block_classes) == blocks and rec.status == "completed"
    assert (rec.precision, rec.parallel.param_dtype, rec.parallel.reduce_dtype) == ("bf16", dtype, "fp32")
    assert rec.final_train_loss is not None
    rank0 = (tmp_path / "run/logs/node0-rank0.log").read_text()
    said = "no repeated blocks found in MLP: FSDP shards it as one group" in rank0
    assert said == (model == "mlp") and (not said or "parallel.block_classes=[ClassName]" in rank0)
