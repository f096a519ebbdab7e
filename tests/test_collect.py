"""The collector on hand-made records whose right answers are worked out here, and on a real local sweep."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline.allreduce import fit
from pipeline.collector.records import load_runs
from pipeline.collector.scaling import aggregate, regressions, t975
from tests.conftest import GOLDEN, launch
from pipeline.collector.memory import parse_size
from tests.records_factory import health_of, make_record, memory, sharded, write_record


def collect(tmp_path, records):
    for i, rec in enumerate(records):
        write_record(tmp_path / "runs" / str(i), rec)
    runs, problems = load_runs([tmp_path / "runs"])
    rows, models = aggregate(runs)
    return rows, models, problems


def by_nodes(rows, oversubscribed=False):
    return {r.nodes: r for r in rows if r.oversubscribed == oversubscribed}


def test_weak_scaling_speedup_and_efficiency(tmp_path):
    rows, _, _ = collect(tmp_path, [make_record(nodes=n, throughput=t) for n, t in ((1, 1000), (2, 1800), (4, 3200))])
    r = by_nodes(rows)
    assert [r[n].speedup for n in (1, 2, 4)] == pytest.approx([1.0, 1.8, 3.2])
    # throughput_N / (throughput_base x N / N_base)
    assert [r[n].efficiency for n in (1, 2, 4)] == pytest.approx([1.0, 0.9, 0.8])
    assert r[4].throughput_per_rank == pytest.approx(800)
    assert {x.baseline_nodes for x in rows} == {1}


def test_strong_scaling_efficiency_is_time_based(tmp_path):
    recs = [make_record(nodes=n, throughput=t, scaling="strong", global_batch=256) for n, t in ((2, 1000), (4, 1900))]
    rows, _, _ = collect(tmp_path, recs)
    r = by_nodes(rows)
    # time for fixed work T = W / throughput: T_2 x 2 / (T_4 x 4) = (1/1000 x 2) / (1/1900 x 4) = 0.95
    assert r[4].efficiency == pytest.approx((1 / 1000 * 2) / (1 / 1900 * 4))
    assert r[4].speedup == pytest.approx(1.9) and r[2].baseline_nodes == 2


def test_repeats_give_a_mean_and_95_percent_interval(tmp_path):
    recs = [make_record(nodes=1, throughput=t) for t in (900, 1000, 1100)]
    recs += [make_record(nodes=2, throughput=t) for t in (1700, 1900)]
    rows, _, _ = collect(tmp_path, recs)
    r = by_nodes(rows)
    assert (r[1].runs, r[1].throughput) == (3, pytest.approx(1000))
    assert r[1].throughput_ci == pytest.approx(4.303 * 100 / math.sqrt(3))          # t(0.975, 2) s / sqrt(n)
    ci2 = 12.706 * np.std([1700, 1900], ddof=1) / math.sqrt(2)
    assert r[2].throughput_ci == pytest.approx(ci2)
    assert r[2].efficiency == pytest.approx(1800 / 2000)
    assert r[2].efficiency_ci == pytest.approx(0.9 * math.hypot(r[1].throughput_ci / 1000, ci2 / 1800))
    assert t975(1000) == 1.96 and t975(11) == t975(10)


def test_breakdown_shares_and_stragglers(tmp_path):
    rec = make_record(nodes=4, throughput=100, breakdown=(0.001, 0.006, 0.003), busy=[0.007, 0.007, 0.0105, 0.007],
                      node_names=["a", "b", "slow-node", "d"])
    rows, _, _ = collect(tmp_path, [rec])
    r = rows[0]
    assert (r.share_data, r.share_compute, r.share_comm) == pytest.approx((0.1, 0.6, 0.3))
    assert r.skew == pytest.approx(1.5) and (r.straggler_host, r.straggler_rank) == ("slow-node", 2)


def test_grouping_keeps_experiments_apart(tmp_path):
    recs = [make_record(nodes=n, throughput=100 * n, per_rank_batch=b) for n in (1, 2) for b in (32, 64)]
    recs += [make_record(nodes=2, throughput=150, precision="bf16")]
    rows, _, _ = collect(tmp_path, recs)
    groups = {r.group for r in rows}
    assert len(groups) == 3
    assert all(r.efficiency == pytest.approx(1.0) for r in rows if "bf16" not in r.group)
    # a group with a single node count is its own baseline
    assert [r.efficiency for r in rows if "bf16" in r.group] == [1.0]


def test_oversubscribed_runs_are_apart_and_never_a_baseline(tmp_path):
    recs = [make_record(nodes=1, throughput=1000), make_record(nodes=2, throughput=1900),
            make_record(nodes=4, throughput=1200, oversubscribed=True)]
    rows, models, _ = collect(tmp_path, recs)
    clean, over = by_nodes(rows), by_nodes(rows, oversubscribed=True)
    assert set(clean) == {1, 2} and set(over) == {4}
    assert over[4].speedup is None and over[4].efficiency is None and over[4].baseline_nodes is None
    assert "oversubscribed" in over[4].group
    analysis = [m for m in models if "oversubscribed" in m.group][0]
    assert "oversubscribed" in analysis.fit.missing and not analysis.fit.predictions and analysis.cost is None


ALPHA, BANDWIDTH, NBYTES = 25e-6, 2e9, 4_000_000


def comm_model(p):
    return ALPHA * 2 * (p - 1) + 2 * (p - 1) / p * NBYTES / BANDWIDTH


def test_alpha_beta_parameters_are_recovered():
    ranks = np.array([2, 4, 8, 16, 2, 4], dtype=float)
    alpha, beta = fit(ranks, NBYTES, np.array([comm_model(p) for p in ranks]))
    assert alpha == pytest.approx(ALPHA, rel=1e-6) and 1 / beta == pytest.approx(BANDWIDTH, rel=1e-6)
    # comm falling from 2 to 4 ranks: the unconstrained fit has alpha = -6.7e-4 s. Clamped, the better of the
    # one-parameter fits wins: alpha alone, (2x0.002 + 6x0.001) / (2^2 + 6^2) = 2.5e-4 s, leaves squared residuals
    # 2.5e-6; beta alone, over the columns 2(P-1)/P x bytes = 4e6 and 6e6, (4e6x0.002 + 6e6x0.001) / (4e6^2 +
    # 6e6^2) = 14000 / 52e12 s/byte, leaves 1.23e-6. So alpha = 0 and beta = 14000 / 52e12.
    alpha, beta = fit(np.array([2.0, 4.0]), NBYTES, np.array([0.002, 0.001]))
    assert alpha == 0.0 and beta == pytest.approx(14000 / 52e12, rel=1e-9)


def synthetic_sweep(repeats=2, nodes=(1, 2, 4, 8), jitter=0.02, probe=(ALPHA, BANDWIDTH)):
    """Weak scaling on a synthetic fabric: each run's comm phase and probe follow the ring model exactly; its
    data + compute varies by +-jitter between repeats."""
    work, batch, recs = 0.010, 64, []
    for n in nodes:
        for k in range(repeats):
            w = work * (1 + jitter * (k - (repeats - 1) / 2))
            step = w + comm_model(n)
            recs.append(make_record(nodes=n, throughput=batch * n / step, per_rank_batch=batch,
                                    breakdown=(0.002, w - 0.002, comm_model(n) if n > 1 else 0.0),
                                    gradient_bytes=NBYTES, probe=probe))
    return work, recs


def test_the_probe_model_predicts_from_the_probes_with_intervals(tmp_path):
    work, recs = synthetic_sweep()
    rows, models, _ = collect(tmp_path, recs)
    f = models[0].probes
    assert f.missing == "" and f.latency_us == pytest.approx(25.0) and f.bandwidth_gb_s == pytest.approx(2.0)
    by = {p.nodes: p for p in f.predictions}
    # weak scaling, no overlap: efficiency(N) = step(1) / step(N); the measured runs are exactly that
    assert by[64].predicted == pytest.approx(work / (work + comm_model(64)), rel=1e-3)
    assert by[64].low < by[64].predicted < by[64].high
    assert all(abs(by[n].error) < 1e-3 for n in (2, 4, 8)) and by[1].predicted == 1.0
    assert by_nodes(rows)[8].predicted_efficiency == pytest.approx(by[8].predicted)
    assert "16 nodes" in f.next_measurement


def test_a_sharded_groups_forecast_sums_its_all_gathers_and_reduce_scatters(tmp_path):
    """FSDP, weak scaling, one rank per node: per step 3 all-gathers (3 MB in all) and 2 reduce-scatters (2 MB) over
    every rank, on a fabric of 20 us per ring step and 1 GB/s for both (probed so). Worked out: comm(P) = 5(P-1) x
    20 us + (P-1)/P x 5e6 B / 1e9 B/s, so comm(2) = 2.6 ms, comm(8) = 5.075 ms; with data + compute 7 ms the
    efficiency at 8 nodes is 7 / (7 + 5.075) = 0.5797."""
    def comm(p):
        return 5 * (p - 1) * 20e-6 + (p - 1) / p * 5e6 / 1e9

    assert (comm(2), comm(8)) == pytest.approx((2.6e-3, 5.075e-3))
    recs = [make_record(nodes=n, throughput=64 * n / (0.007 + (comm(n) if n > 1 else 0)),
                        breakdown=(0.001, 0.006, comm(n) if n > 1 else 0.0), parallel=sharded("fsdp", n),
                        probe=(20e-6, 1e9)) for n in (1, 2, 4) for _ in range(2)]
    rows, models, _ = collect(tmp_path, recs)
    assert "fsdp" in rows[0].group and {r.parallel for r in rows} == {"fsdp"}
    f = models[0].probes
    assert f.missing == "" and set(f.fabric) == {"all_gather", "reduce_scatter"}
    assert f.step_bytes == {"all_gather": 3_000_000, "reduce_scatter": 2_000_000}
    by = {p.nodes: p for p in f.predictions}
    assert by[8].predicted == pytest.approx(0.007 / (0.007 + 5.075e-3), rel=1e-9)
    assert all(abs(by[n].error) < 1e-9 for n in (2, 4))  # the validation: the measured runs follow the model
    # the fit to the comm phase recovers the fabric from the same columns
    assert models[0].fit.latency_us == pytest.approx(20.0) and models[0].fit.bandwidth_gb_s == pytest.approx(1.0)


def test_an_hsdp_groups_shard_group_stays_a_node_while_its_replicas_grow(tmp_path):
    """HSDP, 2 ranks per node: all-gathers and reduce-scatters within the node (2 ranks at every node count), the
    all-reduce of each rank's shard (1 MB per step, 2 calls) across the nodes: at 8 nodes comm = 5 x 1 x 20 us
    + 1/2 x 5e6 / 1e9 + 2 calls x 2 x 7 x 20 us + 2 x 7/8 x 1e6 / 1e9 = 0.1 + 2.5 + 0.56 + 1.75 = 4.91 ms."""
    def comm(n):
        across = 2 * 2 * (n - 1) * 20e-6 + 2 * (n - 1) / n * 1e6 / 1e9
        return 5 * 20e-6 + 0.5 * 5e6 / 1e9 + across

    recs = [make_record(nodes=n, tasks_per_node=2, throughput=128 * n / (0.007 + comm(n)),
                        breakdown=(0.001, 0.006, comm(n)), parallel=sharded("hsdp", 2, replicas=n),
                        probe=(20e-6, 1e9)) for n in (1, 2) for _ in range(2)]
    _, models, _ = collect(tmp_path, recs)
    by = {p.nodes: p for p in models[0].probes.predictions}
    assert comm(8) == pytest.approx(4.91e-3)
    assert by[8].predicted == pytest.approx((0.007 + comm(1)) / (0.007 + comm(8)), rel=1e-9)


def of_mode(analyses):
    """The memory forecasts of the FSDP group and of the DDP group."""
    return [next(a.memory for a in analyses if (" fsdp " in a.group) == (kind == "fsdp")) for kind in ("fsdp", "ddp")]


def test_the_memory_forecast_and_where_the_state_fits(tmp_path):
    """Worked out, 2 repeats at 1 and 2 nodes, one rank each. FSDP: 16 GB of sharded state plus 1 MB replicated,
    rests (peak - state) 3.999 and 4.199 GB at both counts. The baseline is 2 nodes, the smallest that communicates:
    8 GB sharded over 2 ranks + 1 MB; rest mean 4.099 GB, t(0.975, 1) = 12.706, half-width 12.706 x 0.1414 GB /
    sqrt 2 = 1.2706 GB. At 8 nodes: state 8 x 2/8 GB + 1 MB = 2.001 GB, peak 6.1 GB +- 1.2706 GB. On a
    10 GB device the state fits from 2 nodes (8.001 GB); the peak's upper bound 16/N + 0.001 + 5.3696 GB from 4
    (3.456 nodes needed). DDP holds all of it everywhere: it never fits."""
    GB = 1e9
    recs = []
    for kind in ("fsdp", "ddp"):
        for n in (1, 2):
            for peak_rest in (3.999 * GB, 4.199 * GB):
                shard = n if kind == "fsdp" else 1
                state = int(16 * GB / shard + 1e6)
                held = memory(state, int(16 * GB / shard) if kind == "fsdp" else 0, int(state + peak_rest),
                              device=int(99 * GB))
                recs.append(make_record(nodes=n, throughput=100.0 * n, memory=held,
                                        parallel=sharded("fsdp", n) if kind == "fsdp" else None))
    rows, models, _ = collect(tmp_path, recs)
    fsdp, ddp = of_mode(models)
    by = {p.nodes: p for p in fsdp.predictions}
    assert by[8].shard_ranks == 8 and by[8].state_bytes == int(2.001 * GB)
    assert by[8].peak_bytes == pytest.approx(6.1 * GB)
    half = 12.706 * np.std([3.999, 4.199], ddof=1) / math.sqrt(2) * GB
    assert by[8].high - by[8].peak_bytes == pytest.approx(half) and half == pytest.approx(1.2706 * GB, rel=1e-4)
    assert by[2].measured_state == int(8 * GB + 1e6)
    assert by[1].state_bytes == int(16 * GB + 1e6) and abs(by[1].error) < 1e-9  # back to 1 node: its measurement
    assert (fsdp.device_bytes, fsdp.fits_state_at, fsdp.fits_peak_at) == (99 * GB, 1, 1)  # the measured device's
    _, analyses = aggregate(load_runs([tmp_path / "runs"])[0], device_bytes=parse_size("10GB"))  # --device-memory
    fsdp, ddp = of_mode(analyses)
    assert (fsdp.fits_state_at, fsdp.fits_peak_at) == (2, 4) and "from 2 node(s)" in fsdp.fits
    assert ddp.fits_state_at is None and "try parallel=fsdp" in ddp.fits
    assert {p.state_bytes for p in ddp.predictions} == {int(16 * GB + 1e6)}
    # the report's rows carry the state per rank, and the same model under both modes is compared side by side
    assert {r.family for r in rows} == {rows[0].family} and {r.parallel for r in rows} == {"ddp", "fsdp"}
    assert (parse_size("80GiB"), parse_size("512MB"), parse_size("4096")) == (80 * 2**30, 512e6, 4096)


def test_the_fitted_model_recovers_latency_and_bandwidth_with_resampled_intervals(tmp_path):
    work, recs = synthetic_sweep()
    _, models, _ = collect(tmp_path, recs)
    f = models[0].fit
    assert f.latency_us == pytest.approx(25.0, rel=1e-6) and f.bandwidth_gb_s == pytest.approx(2.0)
    by = {p.nodes: p for p in f.predictions}
    assert by[64].predicted == pytest.approx(work / (work + comm_model(64)), rel=1e-3)
    assert by[64].low <= by[64].predicted <= by[64].high


def test_intervals_widen_with_fewer_repeats_and_go_without_them(tmp_path):
    widths = []
    for repeats in (4, 2):
        _, recs = synthetic_sweep(repeats=repeats, jitter=0.05)
        _, models, _ = collect(tmp_path / str(repeats), recs)
        p64 = [p for p in models[0].probes.predictions if p.nodes == 64][0]
        widths.append(p64.high - p64.low)
    assert widths[1] > widths[0] > 0
    _, recs = synthetic_sweep(repeats=1)
    _, models, _ = collect(tmp_path / "once", recs)
    for f in (models[0].probes, models[0].fit):
        assert "needs two runs" in f.missing and all(p.predicted is None for p in f.predictions if p.nodes > 1)
        assert "repeat the measured node counts" in f.next_measurement


def test_too_few_points_or_no_probes_are_said(tmp_path):
    _, models, _ = collect(tmp_path, [make_record(nodes=1, throughput=100), make_record(nodes=2, throughput=190)])
    assert "too few points to fit" in models[0].fit.missing and "no fabric probes" in models[0].probes.missing
    # more runs at the measured node counts would not give the fit a second point: a new node count would
    assert models[0].fit.next_measurement.startswith("4 nodes: the fit needs multi-rank runs at two node counts")


def test_the_cost_view_names_the_knee(tmp_path):
    # 1 -> 2 nodes adds 900 samples/s (90% of a baseline node's 1000), 2 -> 4 adds 600 per node (60%),
    # 4 -> 8 adds 150 per node (15%): beyond 4 nodes each added node buys less than half its cost
    recs = [make_record(nodes=n, throughput=t, steps_per_epoch=1000 // n, per_rank_batch=64, device="cuda")
            for n, t in ((1, 1000), (2, 1900), (4, 3100), (8, 3700))]
    _, models, _ = collect(tmp_path, recs)
    cost = models[0].cost
    assert cost.knee == 4 and "beyond 4 node(s)" in cost.summary
    assert [round(p.marginal, 3) if p.marginal else None for p in cost.points] == [None, 0.9, 0.6, 0.15]
    # an epoch at 1 node: 1000 steps x 64 samples = 64,000 samples; at 1000 samples/s, 64 s on 1 GPU
    assert cost.points[0].epoch_s == pytest.approx(64.0) and cost.points[0].gpu_hours == pytest.approx(64 / 3600)


def test_a_run_of_one_rank_has_no_comm_phase(tmp_path):
    from pipeline.collector.report import COLUMNS, row_cells

    # a record of one rank whose comm phase is not 0 (older workers timed DDP's own bookkeeping as comm)
    rows, _, _ = collect(tmp_path, [make_record(nodes=1, throughput=100, breakdown=(0.001, 0.006, 0.003))])
    assert rows[0].share_comm == 0.0 and row_cells(rows[0])[COLUMNS.index("comm")] == "-"


def test_fabric_flags(tmp_path):
    recs = [make_record(nodes=2, throughput=1000, probe=(5e-6, 10e9), backend="nccl", transport="infiniband"),
            make_record(nodes=2, throughput=1000, probe=(5e-6, 10e9), backend="nccl", transport="infiniband"),
            make_record(nodes=2, throughput=900, probe=(5e-6, 1e9), backend="nccl", transport="sockets",
                        per_rank_batch=32)]
    rows, _, _ = collect(tmp_path, recs)
    slow = [r for r in rows if r.fabric_flag]
    assert len(slow) == 1 and "TCP sockets" in slow[0].fabric_flag and "below 50%" in slow[0].fabric_flag


def test_bad_records_are_listed_and_the_rest_aggregated(tmp_path):
    good = make_record(nodes=2, throughput=100)
    write_record(tmp_path / "runs/a_good", good)
    write_record(tmp_path / "runs/b_dup", good)
    (tmp_path / "runs/corrupt").mkdir()
    (tmp_path / "runs/corrupt/result.json").write_text("{not json")
    (tmp_path / "runs/truncated").mkdir()
    (tmp_path / "runs/truncated/result.json").write_text(json.dumps(good.to_json())[:200])
    write_record(tmp_path / "runs/old", {**good.to_json(), "run_id": "x", "schema_version": 0})
    write_record(tmp_path / "runs/partial", {k: v for k, v in good.to_json().items() if k != "ranks"} | {"run_id": "y"})
    mistyped = good.to_json() | {"run_id": "z"}
    mistyped["ranks"][1]["busy_time_median_s"] = "fast"
    write_record(tmp_path / "runs/mistyped", mistyped)
    runs, problems = load_runs([tmp_path / "runs"])
    assert len(runs) == 1
    reasons = {p.path.split("/")[-2]: p.reason for p in problems}
    assert set(reasons) == {"b_dup", "corrupt", "truncated", "old", "partial", "mistyped"}
    assert "duplicate" in reasons["b_dup"] and "not valid JSON" in reasons["corrupt"]
    assert "not valid JSON" in reasons["truncated"] and "schema_version 0" in reasons["old"]
    assert reasons["partial"] == "missing field ranks"
    assert reasons["mistyped"] == "ranks[1].busy_time_median_s: expected a number, got str"
    r = subprocess.run([sys.executable, "-m", "pipeline.collect", str(tmp_path / "runs"), "--out",
                        str(tmp_path / "out"), "--no-plots"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.count("skipped") == 6
    assert "Records not used" in (tmp_path / "out/report.md").read_text()


def test_the_golden_record_of_a_real_run_is_read():
    """tests/golden/local-2rank/result.json: a real 2-rank local run, as the code of commit cf33c15 wrote it."""
    runs, problems = load_runs([GOLDEN / "local-2rank"])
    assert problems == [] and len(runs) == 1
    run = runs[0]
    assert (run.nodes, run.world_size, run.global_batch, run.gradient_bytes) == (2, 2, 128, 407_080)
    assert run.throughput == pytest.approx(28337.352080890294)
    assert run.group.model == "mlp" and run.group.batch == 64 and run.group.git_sha.startswith("cf33c15")
    assert sum(run.breakdown) == pytest.approx(0.004477392687499915)
    rows, models = aggregate(runs)
    assert rows[0].efficiency == 1.0 and models[0].fit.missing and models[0].probes.missing


def test_regression_check_against_a_baseline(tmp_path):
    rows_old, _, _ = collect(tmp_path / "old", [make_record(nodes=n, throughput=1000 * n, sha="1" * 40)
                                                for n in (1, 2)])
    baseline = [{"experiment": r.experiment, "nodes": r.nodes, "throughput": r.throughput,
                 "efficiency": r.efficiency} for r in rows_old]
    new = [make_record(nodes=1, throughput=950, sha="2" * 40), make_record(nodes=2, throughput=1500, sha="2" * 40)]
    rows_new, _, _ = collect(tmp_path / "new", new)
    found = regressions(rows_new, baseline, tolerance=0.1)
    # 1 node: -5% is within tolerance; 2 nodes: throughput -25%, efficiency 0.79 vs 1.0
    assert len(found) == 2 and all("2 node(s)" in f for f in found)
    assert regressions(rows_new, baseline, tolerance=0.3) == []


@pytest.mark.e2e
def test_cli_on_a_real_local_sweep_with_a_regression_gate(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # a local sweep gives its points the same threads per rank
    r = launch("-m", "nodes=1,2", "trainer.max_steps=30", "trainer.log_every=1000", "dataset.train_size=2048",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "collect"
    c = subprocess.run([sys.executable, "-m", "pipeline.collect", str(sweep), "--out", str(out)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    assert "2 runs in 1 groups" in c.stdout and "MLP 0.102M params/synthetic weak per-rank batch 64" in c.stdout
    assert f"1/node {max(1, (os.cpu_count() or 1) // 2)} thread" in c.stdout
    for name in ("scaling.csv", "scaling.json", "report.md", "speedup-1.png", "efficiency-1.png",
                 "breakdown-1.png", "cost-1.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "![speedup-1](speedup-1.png)" in report and "## Definitions" in report and "too few points" in report
    assert "## Cost" in report and "gloo:tcp" in (out / "scaling.csv").read_text()
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [row["nodes"] for row in rows] == [1, 2] and rows[0]["efficiency"] == 1.0
    # against itself with an impossible bar: every point "regressed"
    doctored = json.loads((out / "scaling.json").read_text())
    for row in doctored["rows"]:
        row["throughput"] *= 10
    (tmp_path / "better.json").write_text(json.dumps(doctored))
    g = subprocess.run([sys.executable, "-m", "pipeline.collect", str(sweep), "--out", str(tmp_path / "c2"),
                        "--baseline", str(tmp_path / "better.json"), "--no-plots"], capture_output=True, text=True)
    assert g.returncode == 1 and g.stderr.count("REGRESSION") == 2


# ------------------------------------------------------------------------------------------- the reasons
def reasons(rows, oversubscribed=False):
    return {r.nodes: (r.reason, r.evidence, r.implausible) for r in rows if r.oversubscribed == oversubscribed}


def test_a_slow_link_shows_as_exposed_communication_with_the_health_checks_flag(tmp_path):
    # base: 1 node, 7 ms of work; 4 nodes: the same work and 30 ms of exposed comm: 30 / 37 = 81% of the step, and
    # the job's health check flagged node3's links
    flagged = health_of({f"node{i}": (100.0, 0.06 if i == 3 else 1.9) for i in range(1, 5)},
                        {"node3": "links 0.03 x the median node's (best pair 0.06 vs 1.9 GB/s)"})
    recs = [make_record(nodes=1, throughput=64 / 0.007),
            make_record(nodes=4, throughput=256 / 0.037, breakdown=(0.001, 0.006, 0.030), health=flagged)]
    rows, _, _ = collect(tmp_path, recs)
    reason, evidence, implausible = reasons(rows)[4]
    assert reason == "exposed communication" and not implausible
    assert evidence.startswith("comm 30 ms more per step than the baseline's: 81% of the step")
    assert "the health check flagged node3: links 0.03 x the median node's" in evidence
    assert reasons(rows)[1][0] == "baseline"


def test_a_data_bound_run(tmp_path):
    # 2 nodes: the data phase grew from 1 to 12 ms: 11 ms of a 19 ms step, 58%
    recs = [make_record(nodes=1, throughput=64 / 0.007),
            make_record(nodes=2, throughput=128 / 0.019, breakdown=(0.012, 0.006, 0.001))]
    rows, _, _ = collect(tmp_path, recs)
    reason, evidence, _ = reasons(rows)[2]
    assert reason == "data-bound steps" and evidence == ("data 11 ms more per step than the baseline's: 58% of the "
                                                          "step (data 63% of it)")


def test_an_oversubscribed_run_says_so(tmp_path):
    recs = [make_record(nodes=1, throughput=1000), make_record(nodes=4, throughput=900, oversubscribed=True,
                                                               threads=1, host_cores=2, processes_on_host=4)]
    rows, _, _ = collect(tmp_path, recs)
    reason, evidence, _ = reasons(rows, oversubscribed=True)[4]
    assert reason == "oversubscription"
    assert "4 rank(s) x 1 thread(s) on 2 core(s) of h (2.0 threads per core)" in evidence


def test_a_superlinear_efficiency_is_flagged_with_its_likely_cause(tmp_path):
    """The colleague's sweep: the 1-rank baseline's steps held up now and then by outside load (p95 2.43 s
    against a 0.51 s mean here), so its throughput is low, and 2 nodes read 845.8%."""
    base_thr = 64 / 0.51
    recs = [make_record(nodes=1, throughput=base_thr, breakdown=(0.01, 0.5, 0.0), step_p95=2.43),
            make_record(nodes=2, throughput=2 * base_thr * 8.458, breakdown=(0.001, 0.058, 0.001))]
    rows, _, _ = collect(tmp_path, recs)
    by = {r.nodes: r for r in rows}
    assert by[2].efficiency == pytest.approx(8.458)
    assert by[2].implausible.startswith("efficiency 845.8% is above 110%, which is not physically plausible: the "
                                        "baseline (1 node(s)) is noisy: its steps spread: p95 4.8 x the median in ")
    assert by[2].implausible.endswith("/runs/0/result.json, so its throughput is too low")
    from pipeline.collector.report import COLUMNS, row_cells
    assert row_cells(by[2])[COLUMNS.index("efficiency")] == "845.8% IMPLAUSIBLE"  # never bare


def test_threads_per_rank_are_part_of_the_group(tmp_path):
    """The colleague's two sweeps: the 1-node point with 2 threads, the 2-node one with 1, and a rerun with 1 thread
    throughout. Grouped by threads, no point is another's repeat."""
    recs = [make_record(nodes=1, throughput=1000, threads=2), make_record(nodes=2, throughput=1900, threads=1),
            make_record(nodes=1, throughput=600, threads=1), make_record(nodes=2, throughput=1100, threads=1)]
    rows, _, _ = collect(tmp_path, recs)
    groups = {r.group: [(x.nodes, x.runs) for x in rows if x.group == r.group] for r in rows}
    assert sorted(groups.values()) == [[(1, 1)], [(1, 1), (2, 2)]]
    assert any("2 threads/rank" in g for g in groups) and any("1 thread/rank" in g for g in groups)


def test_a_straggler_node_and_whether_the_health_check_flagged_it(tmp_path):
    # 4 nodes: compute grew by 4.5 ms; slow-node's busy time is 11.5 ms against the median rank's 7: 1.64
    flagged = health_of({n: (30.0 if n == "slow-node" else 100.0, 1.9) for n in ("a", "b", "slow-node", "d")},
                        {"slow-node": "compute 0.30 x the median"})
    straggling = dict(nodes=4, throughput=256 / 0.0125, breakdown=(0.001, 0.0105, 0.001),
                      busy=[0.007, 0.007, 0.0115, 0.007], node_names=["a", "b", "slow-node", "d"])
    for health, said in ((flagged, "the health check flagged it: compute 0.30 x the median"),
                         (None, "no health check ran")):
        rows, _, _ = collect(tmp_path / said[:8], [make_record(nodes=1, throughput=64 / 0.007),
                                                   make_record(**straggling, health=health)])
        reason, evidence, _ = reasons(rows)[4]
        assert reason == "straggler node" and "slow-node (rank 2) took 1.64 x the median rank's busy time" in evidence
        assert evidence.endswith(said)


def test_threads_that_oversubscribe_the_cores_are_named(tmp_path):
    # local debug mode with 2 threads per rank on 2 cores: 1 rank fits, 2 ranks put 4 threads on 2 cores
    recs = [make_record(nodes=1, throughput=64 / 0.007, threads=2, host_cores=2, processes_on_host=1),
            make_record(nodes=2, throughput=128 / 0.014, breakdown=(0.001, 0.012, 0.001), threads=2, host_cores=2,
                        processes_on_host=2)]
    rows, _, _ = collect(tmp_path, recs)
    reason, evidence, _ = reasons(rows)[2]
    assert reason == "threads oversubscribe the cores" and "2 rank(s) x 2 thread(s) on 2 core(s) of h" in evidence


def test_the_nodes_section_follows_each_slurm_node_over_every_run(tmp_path):
    from pipeline.badnodes import add_bad_nodes
    from pipeline.collector.nodes import find_bad_node_lists, node_histories
    from pipeline.rundir import BadNodeEntry

    def check(slow):
        return health_of({"n1": (100.0, 2.0), "n2": (90.0, 1.8), "n3": (slow, 1.9)},
                         {"n3": f"compute {slow / 95:.2f} x the median"} if slow < 50 else {})
    recs = [make_record(nodes=3, throughput=1000, node_names=["n1", "n2", "n3"], health=check(g),
                        busy=[0.007, 0.007, b]) for g, b in ((30.0, 0.012), (35.0, 0.012), (95.0, 0.007))]
    recs.append(make_record(nodes=2, throughput=900, node_names=["local1", "local2"], slurm=False))
    for i, rec in enumerate(recs):
        write_record(tmp_path / "runs" / str(i), rec)
    add_bad_nodes(tmp_path / "runs", [BadNodeEntry(node="n3", reason="compute 0.2 x the median", job_id="7",
                                                   run_id="r", point=0, at="t", simulated=False)])
    runs, _ = load_runs([tmp_path / "runs"])
    lists, unreadable = find_bad_node_lists([tmp_path / "runs"])
    histories = {h.node: h for h in node_histories(runs, lists)}
    assert set(histories) == {"n1", "n2", "n3"} and not unreadable  # local debug mode's nodes are not Slurm's
    n3 = histories["n3"]
    assert (n3.runs, n3.straggler, n3.checks, n3.flagged, n3.stopped) == (3, 2, 3, 2, 1)
    assert n3.gemm_gflops == 35.0 and n3.last_flag == "compute 0.2 x the median"
    assert list(histories)[0] == "n3"  # the most suspect first
    assert (histories["n1"].flagged, histories["n1"].straggler, histories["n1"].gemm_gflops) == (0, 0, 100.0)


def test_the_held_out_forecast_of_the_largest_node_count_from_the_smaller_ones(tmp_path):
    work, recs = synthetic_sweep(nodes=(1, 2, 4, 8))
    _, models, _ = collect(tmp_path, recs)
    h = models[0].probes.held_out
    # from 1, 2 and 4 nodes alone: the probes of 4 nodes extrapolated to 8, kappa 1 (comm is the ring exactly)
    assert h.nodes == 8 and h.predicted == pytest.approx(work / (work + comm_model(8)), rel=1e-3)
    assert abs(h.error) < 1e-3 and h.inside
    assert "probes of 4 node(s); kappa 1.00 and the work from 4 node(s)" in h.source
    # the fit needs two multi-rank node counts below 8: it has 2 and 4
    assert models[0].fit.held_out is not None and abs(models[0].fit.held_out.error) < 1e-3
    _, models, _ = collect(tmp_path / "two", synthetic_sweep(nodes=(1, 2))[1])
    assert models[0].probes.held_out is None and "give no prediction" in models[0].probes.held_out_missing


def test_kappa_carries_what_ddp_hides_or_adds_to_the_all_reduce(tmp_path):
    """Runs whose exposed comm is 60% of what their probes say (DDP hides the rest behind backward): the raw probe
    would under-predict the efficiency; kappa, measured at the node counts below, carries the 0.6 up."""
    work, recs = 0.010, []
    for n in (1, 2, 4, 8):
        for k in range(2):
            comm = 0.6 * comm_model(n) if n > 1 else 0.0
            recs.append(make_record(nodes=n, throughput=64 * n / (work + comm), breakdown=(0.002, work - 0.002, comm),
                                    gradient_bytes=NBYTES, probe=(ALPHA, BANDWIDTH)))
    _, models, _ = collect(tmp_path, recs)
    by = {p.nodes: p for p in models[0].probes.predictions}
    assert by[2].kappa == 1.0 and by[2].error < -0.05  # nothing below 2 nodes to learn it from: the raw probe
    assert by[4].kappa == pytest.approx(0.6) and abs(by[4].error) < 1e-6 and abs(by[8].error) < 1e-6
    assert by[64].predicted == pytest.approx(work / (work + 0.6 * comm_model(64)), rel=1e-6)


def test_predict_at_the_node_counts_asked_for(tmp_path):
    _, recs = synthetic_sweep(nodes=(1, 2, 4))
    for i, rec in enumerate(recs):
        write_record(tmp_path / "runs" / str(i), rec)
    c = subprocess.run([sys.executable, "-m", "pipeline.collect", str(tmp_path / "runs"), "--out",
                        str(tmp_path / "out"), "--no-plots", "--predict-at", "3,6,12"], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    report = (tmp_path / "out/report.md").read_text()
    for n in (3, 6, 12):
        assert re.search(rf"^\| {n} \| - \| \d+\.\d%", report, re.M), n
    assert "| 8 | -" not in report and "Held out: 4 nodes predicted from the smaller node counts alone" in report
    assert "## Nodes" in report and "## Why" not in report
    bad = subprocess.run([sys.executable, "-m", "pipeline.collect", str(tmp_path / "runs"), "--predict-at", "0,8"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--predict-at: '0,8' is not allowed" in bad.stderr


def test_every_option_that_names_a_file_or_a_bound_is_checked_first(tmp_path):
    """A baseline that is missing, a FIFO (which would block the reader), binary, or another JSON; an output that
    cannot be written; a tolerance that would turn the gate off: exit 2, said in a line, within the time limit."""
    _, recs = synthetic_sweep(nodes=(1, 2))
    for i, rec in enumerate(recs):
        write_record(tmp_path / "runs" / str(i), rec)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "binary.json").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "other.json").write_text('{"rows": [{"nodes": "one"}]}')
    (tmp_path / "a-file").write_text("")
    cases = [(["--baseline", str(tmp_path / "nowhere.json")], "--baseline", "No such file or directory"),
             (["--baseline", str(tmp_path / "fifo.json")], "--baseline", "not a regular file but a FIFO"),
             (["--baseline", str(tmp_path / "binary.json")], "--baseline", ""),
             (["--baseline", str(tmp_path / "other.json")], "--baseline", "not the scaling.json of a collection"),
             (["--out", str(tmp_path / "a-file" / "out")], "--out", "cannot be written: Not a directory"),
             (["--tolerance", "nan"], "--tolerance", "'nan' is not allowed"),
             (["--tolerance", "-0.1"], "--tolerance", "in [0, 1)")]
    for args, key, said in cases:
        c = subprocess.run([sys.executable, "-m", "pipeline.collect", str(tmp_path / "runs"), "--no-plots", *args],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert c.returncode == 2 and key in c.stderr and said in c.stderr and "Traceback" not in c.stderr, (args,
                                                                                                         c.stderr)
        if key != "--tolerance":
            assert len(c.stderr.strip().splitlines()) == 1, c.stderr
