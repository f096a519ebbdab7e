"""The run folder's files: every one round-trips, the golden files of a real run keep reading, a missing or
mistyped field is named, and writes are atomic (and durable where asked)."""

import json
import os

import pytest

from pipeline.result import Result
from pipeline.rundir import (SCHEMA_VERSION, Failure, Manifest, ManifestPoint, Point, Progress, Submission,
                             write_atomic, write_json)
from pipeline.typed import SchemaError
from tests.conftest import GOLDEN
from tests.records_factory import make_record

RUN = GOLDEN / "local-2rank"


def through_json_text(obj):
    return type(obj).from_json(json.loads(json.dumps(obj.to_json())))


def test_the_golden_files_of_a_real_run_read():
    result, point = Result.read(RUN), Point.read(RUN)
    assert (result.schema_version, result.world_size, result.backend) == (SCHEMA_VERSION, 2, "gloo")
    assert [r.node_name for r in result.ranks] == ["local1", "local2"] and len(result.ranks[1].timing.step_times_s) == 8
    assert result.device.name == "x86_64 CPU" and result.device.tf32 is None  # absent on CPUs: defaults
    assert result.provenance.slurm.simulated and result.run_id == point.run_id
    assert point.config == result.config and point.git.sha == result.provenance.git.sha
    # every field of the golden record is a field of Result; Result's others came later, with defaults
    golden = set(json.loads((RUN / "result.json").read_text()))
    assert set(result.to_json()) - golden == {"evaluation", "loader", "tokens_per_sample", "fabric", "startup",
                                             "status", "diverged_at_step", "missing", "model_label", "io", "optimizer",
                                             "parallel", "micro_batch", "grad_accum_steps", "health", "evaluations",
                                             "pruned_at_step"}
    assert result.health is None and result.ranks[0].host.machine is None  # added later: their defaults
    assert result.evaluation is None and result.test_accuracy == 0.625
    # records from before sharding: all DDP, one micro-batch per step, no memory
    assert (result.parallel, result.micro_batch, result.grad_accum_steps) == (None, None, 1)
    assert all(r.memory is None for r in result.ranks)
    assert through_json_text(result) == result and through_json_text(point) == point


@pytest.mark.parametrize("path, value, message", [
    (["ranks", 1, "busy_time_median_s"], "7", "ranks[1].busy_time_median_s: expected a number, got str"),
    (["ranks", 0, "step_times_s", 3], None, "ranks[0].step_times_s[3]: expected a number, got null"),
    (["provenance", "git", "dirty"], 1, "provenance.git.dirty: expected true or false, got int"),
    (["breakdown_s"], [1, 2, 3], "breakdown_s: expected an object, got list"),
    (["world_size"], 2.0, "world_size: expected an integer, got float"),
])
def test_a_mistyped_field_is_named(path, value, message):
    data = json.loads((RUN / "result.json").read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SchemaError) as e:
        Result.from_json(data)
    assert str(e.value) == message


def test_a_renamed_field_is_a_missing_one():
    data = json.loads((RUN / "result.json").read_text())
    data["ranks"][1]["busy_median_s"] = data["ranks"][1].pop("busy_time_median_s")
    with pytest.raises(SchemaError, match=r"^ranks\[1\]: missing field busy_time_median_s$"):
        Result.from_json(data)
    data = json.loads((RUN / "result.json").read_text())
    with pytest.raises(SchemaError, match="schema_version 2, this reader reads 1"):
        Result.from_json(data | {"schema_version": 2})


def test_every_file_round_trips():
    assert through_json_text(make_record(nodes=2, throughput=10.0, tasks_per_node=2)).world_size == 4
    progress = Progress(step=3, total_steps=9, samples_per_s=1.5, eta_s=4.0, loss=0.5, updated_at="t",
                        updated_unix=1.0)
    assert through_json_text(progress) == progress
    manifest = Manifest(points={0: ManifestPoint(dir="0", overrides=["nodes=1"], nodes=1,
                                                 jobs=[Submission(job_id="7", submitted_at="t")]),
                                3: ManifestPoint(dir=None, overrides=[], nodes=None, jobs=[], skipped="why")})
    assert manifest.to_json()["points"].keys() == {0, 3}  # JSON writes the point numbers as strings
    assert through_json_text(manifest) == manifest


def test_progress_is_none_until_it_is_usable(tmp_path):
    assert Progress.latest(tmp_path) is None
    (tmp_path / "progress.json").write_text('{"step": 1')
    assert Progress.latest(tmp_path) is None
    Progress(step=1, total_steps=2, samples_per_s=3.0, eta_s=4.0, loss=5.0, updated_at="t",
             updated_unix=6.0).write(tmp_path, durable=False)
    assert Progress.latest(tmp_path).step == 1


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"v": 1})

    def fail_half_way(f):
        f.write(b'{"v": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, fail_half_way)
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["result.json"]


def test_a_durable_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    write_json(tmp_path / "a.json", {}, durable=True)
    assert len(synced) == 2 and synced[1] == str(tmp_path) and synced[0].startswith(str(tmp_path / ".a.json."))
    synced.clear()
    write_json(tmp_path / "b.json", {}, durable=False)
    assert synced == []


def test_the_rank_that_failed_first_is_told_by_its_failure_record(tmp_path):
    """Rank 2 raised first; rank 0, failing because of it, wrote its record later but exited sooner (as when gloo
    aborts a rank in its teardown): rank 2 is named. A first exit with no record (a rank killed by a signal) is
    named itself."""
    from types import SimpleNamespace

    from pipeline.launcher.local import first_failure
    from pipeline.launcher.logs import first_failed_log

    ranks = [SimpleNamespace(rank=r) for r in range(4)]
    assert first_failure(ranks[3], ranks, tmp_path) is ranks[3] and first_failed_log(tmp_path) is None
    Failure(rank=2, node_rank=1, at_unix=100.0, error="RuntimeError: injected").write(tmp_path)
    Failure(rank=0, node_rank=0, at_unix=100.5, error="RuntimeError: connection closed").write(tmp_path)
    assert [f.rank for f in Failure.read_all(tmp_path)] == [2, 0]
    assert first_failure(ranks[0], ranks, tmp_path) is ranks[2]
    assert first_failure(ranks[3], ranks, tmp_path) is ranks[3]  # killed before it could raise
    assert first_failed_log(tmp_path) == tmp_path / "logs/node1-rank2.log"


def test_metrics_read_each_step_once_across_restarts(tmp_path):
    """metrics.jsonl as two processes leave it: the first reported steps 10-30 and was killed mid-line; the second
    (the job's own writer) resumed from step 20's checkpoint and reported 30 and 40 again. Each step once, the
    second's where both wrote; the cut line and a non-finite loss (written as null) do not stop the reading."""
    from pipeline.job.observe import MetricsFile
    from pipeline.rundir import METRICS_NAME, MetricsRow, read_metrics

    def row(step, loss):
        return MetricsRow(step=step, segment="a", start_step=0, unix=0.0, values={"train/loss": loss}).line()

    (tmp_path / METRICS_NAME).write_bytes(row(10, 1.0) + row(20, 0.5) + row(30, 0.4) + row(40, 0.2)[:30])
    again = MetricsFile(tmp_path)
    again.start(20)
    again.log({"train/loss": 0.3}, 30)
    again.log({"train/loss": float("nan")}, 40)
    again.close()
    assert read_metrics(tmp_path) == {10: {"train/loss": 1.0}, 20: {"train/loss": 0.5}, 30: {"train/loss": 0.3},
                                      40: {"train/loss": None}}
    assert read_metrics(tmp_path / "none") == {}


def test_a_metrics_file_that_cannot_be_written_is_said_not_hidden(tmp_path, caplog):
    """metrics.jsonl cannot be opened (here a folder stands in its place): a warning, and what the record's
    missing will say; reporting goes on without it."""
    from pipeline.job.observe import MetricsFile
    from pipeline.rundir import METRICS_NAME

    (tmp_path / METRICS_NAME).mkdir()
    sink = MetricsFile(tmp_path)
    sink.start(0)
    sink.log({"train/loss": 1.0}, 10)
    assert "cannot be written" in caplog.text and "could not be written" in sink.failures()["metrics"]
