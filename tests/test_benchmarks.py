"""Every benchmark runs, on tiny sizes, and prints its figures (smoke runs: the figures themselves are measured by
running the benchmarks as docs/performance.md says, never asserted here)."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.bench


def bench(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=REPO, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("flags, compared, rows", [
    ([], "pipeline / hand-written", ("mlp", "loader", "resnet", "gpt", "gpt_fsdp")),
    (["--aa", "--workload", "mlp"], "hand-written / hand-written", ("mlp",)),
    # W&B offline: no server to start (MLflow's is the same code path here, and tests/test_tracking.py's)
    (["--tracking", "wandb", "--workload", "mlp"], "tracking=[wandb] / untracked", ("mlp",))])
def test_overhead(flags, compared, rows):
    """Every row once, each side one rank (the rows' multi-rank figures are the benchmark's own runs)."""
    out = bench("benchmarks/overhead.py", "--steps", "22", "--repeats", "1", "--ranks", "1", *flags)
    for row in rows:
        assert re.search(rf"^{row} +median ratio {re.escape(compared)}: \d+\.\d{{3}}", out, re.M), out


def test_stream_loader():
    """The three data paths once each, one rank, the MLP row."""
    out = bench("benchmarks/stream_loader.py", "--workload", "mlp", "--steps", "25", "--repeats", "1", "--ranks", "1")
    assert re.search(r"repeat 1: memory +\d+\.\d samples/s \(\d+ MiB\) +dataloader +\d+\.\d samples/s \(\d+ MiB\) +"
                     r"stream +\d+\.\d samples/s", out), out
    assert re.search(r"stream/memory: median \d\.\d{3}", out) and re.search(r"stream/dataloader: median \d\.\d{3}",
                                                                          out), out


def test_step_costs():
    out = bench("benchmarks/step_costs.py", "--steps", "60", "--repeats", "1")
    assert re.search(r"all additions: [+-]\d+\.\d us/step", out) and out.count("us/step") == 9, out


def test_startup():
    out = bench("benchmarks/startup.py", "--repeats", "1", "--ranks", "1", "--no-slurm")
    assert re.search(r"launch -> first training step\s+median\s+\d+\.\d+ s", out), out


def test_probe_cost():
    out = bench("benchmarks/probe_cost.py", "--repeats", "1", "--ranks", "2")
    assert re.search(r"2 gloo ranks .*probe \d+\.\d\d s median", out) and "busbw" in out, out


def test_health_cost():
    out = bench("benchmarks/health_cost.py", "--repeats", "1", "--nodes", "2")
    assert re.search(r"^2 nodes \(serial, 1 machine\(s\)\), 2 runs: health check \d+\.\d\d s median", out, re.M), out
    assert re.search(r"^  compute +\d+\.\d\d s median", out, re.M) and "A/A:" in out and "local2: GEMM" in out, out


def test_collect_speed():
    out = bench("benchmarks/collect_speed.py", "--records", "100", "--repeats", "1")
    assert "process start to exit" in out, out


@pytest.mark.slurm
def test_search_idle(slurm_cluster):
    """Both ways of searching, on the tests' Slurm, two short trials each (and the A/A run)."""
    out = bench("benchmarks/search_idle.py", "--workers", "2", "--steps", "100,200")
    for way in ("Hydra's Optuna sweeper", r"built-in search", r"built-in search \(A/A\)"):
        assert re.search(rf"^{way} +2 trials  wall +\d+\.\d s  busy +\d+\.\d s  idle +-?\d+\.\d%  "
                         r"\(before first \d+\.\d s, between \d+\.\d s, after last \d+\.\d s\)$", out, re.M), out
    assert re.search(r"^wall ratio built-in / Hydra's: \d\.\d{3}; A/A: \d\.\d{3}$", out, re.M), out


SEED_ROW = re.compile(r"^  (\S.*?)\s{2,}(\d+)\s+(\d+\.\d\d)$", flags=re.M)


def test_the_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh's smoke mode, its own steps, with this Python (the project installed) in place of
    the venv it would make and fill; the GPU tests skip, saying why (no GPU is visible, on a GPU machine too). Its
    throughput step takes the CNN's seed rows (channels_last among them) and the large models at a tiny size."""
    out = tmp_path / "results" / "check.txt"
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--out", str(out)], cwd=REPO,
                       env={**os.environ, "GPU_CHECK_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
                       text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert re.match(r"pipeline GPU check, \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \w+, --device cpu\n", text), text
    assert re.findall(r"^-- (\S+): (\w+)", text, flags=re.M) == [("device", "ok"), ("gpu-tests", "ok"),
                                                                  ("throughput", "ok")], text
    assert "device: no CUDA device" in text and re.search(r"^\d+ skipped, \d+ deselected", text, flags=re.M), text
    rows = SEED_ROW.findall(text.split("\ncnn\n")[1].split("\nresnet50")[0])
    assert len(rows) == 7 and all(int(rate) > 0 for _, rate, _ in rows), text  # naive + 6 cumulative options
    assert [name for name, _, _ in rows][4] == "+ channels_last", text
    # MFU: none without a GPU; the pipeline's peak memory per rank (on a CPU its peak resident set)
    for model, tiny, unit, parallel in (("resnet50", "width 8", "images/s", "ddp"),
                                        ("gpt2_small", "layers 2, heads 2, width 64", "tokens/s", "ddp"),
                                        ("gpt2_small_fsdp", "layers 2, heads 2, width 64", "tokens/s", "fsdp")):
        assert re.search(rf"^{model} \(tiny: {tiny}\), batch 2, fp32, compile False, {parallel}\n"
                         rf"  loop +{unit} +MFU +peak memory\n"
                         rf"  hand-written +\d+ +- +-\n  pipeline +\d+ +- +\d+\.\d\d GiB\n"
                         rf"  pipeline / hand-written: \d+\.\d{{3}}$", text, flags=re.M), text
    assert re.search(r"\ngpu check: every step ok, \d+ s in all\n$", text), text
