"""A run whose loss stops being finite is stopped, on every rank together, and says so: a record with status
diverged and the step, and no NaN or Infinity in any file the run wrote."""

import json
import math

import pytest

from pipeline.result import Result
from pipeline.rundir import finite, write_json
from pipeline.typed import dotted
from tests.conftest import launch

FAST = ["trainer.log_every=2", "dataset.train_size=2048", "dataset.test_size=256", "trainer.tensorboard=false"]


def strict_json(path):
    """json.loads that refuses NaN and Infinity, which are not JSON (Python's own parser accepts them)."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.e2e
def test_a_diverging_run_stops_within_the_check_interval_and_says_where(tmp_path):
    out = tmp_path / "run"
    r = launch("optimizer.lr=1e10", "nodes=2", "trainer.max_steps=60", "trainer.finite_check_every=8", *FAST,
               f"hydra.run.dir={out}", cwd=tmp_path)
    logs = "".join(p.read_text() for p in (out / "logs").glob("node*-rank*.log"))
    rec = Result.read(out)
    assert rec.status == "diverged" and rec.diverged_at_step is not None, r.stderr + logs
    # the launch fails, saying so once, with no traceback
    assert r.returncode == 1 and r.stderr.count(f"its loss was not finite at step {rec.diverged_at_step}") == 1
    assert "Traceback" not in r.stderr
    # stopped at the first check after the first non-finite loss, on both ranks: both ranks' timings end there
    assert rec.steps == 8 * math.ceil((rec.diverged_at_step + 1) / 8) < 60
    assert {len(x.timing.step_times_s) for x in rec.ranks} == {rec.steps - rec.warmup_steps}
    assert rec.final_train_loss is None and rec.evaluation is None and rec.weights is None
    assert f"the run diverged at step {rec.diverged_at_step}" in rec.missing["evaluation"]
    assert f"at step {rec.diverged_at_step}: the run diverged" in logs
    assert not (out / "model.pt").exists()
    # every JSON file the run wrote is strict JSON
    written = [p for p in out.rglob("*.json")]
    assert {p.name for p in written} >= {"result.json", "point.json", "progress.json"}
    for path in written:
        strict_json(path)


def test_files_hold_no_non_finite_numbers(tmp_path):
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN", "e": 2}
    clean, found = finite(data)
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": "NaN", "e": 2}
    assert [(dotted(path), str(value)) for path, value in found] == [("a", "nan"), ("b[1]", "inf"), ("b[2].c", "-inf")]
    replaced = write_json(tmp_path / "x.json", data)
    assert replaced == ["a", "b[1]", "b[2].c"] and strict_json(tmp_path / "x.json")["b"] == [1.0, None, {"c": None}]
