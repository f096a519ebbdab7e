"""The health check before training (pipeline/job/health/): its pure pieces with worked-out answers, and real
local runs whose check finds a rank that raises in it (a fault injected through sitecustomize, in that process
only) under each policy. The same on a real Slurm, with a real slow link (tc) and a real slow node (a CPU-quota
cgroup): tests/test_slurm.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.config import HealthConfig
from pipeline.job.health.schedule import tournament, turns_of
from pipeline.job.health.verdict import below, node_link_scores, suspect_links, verdict_of
from pipeline.job.placement import binding_problem, cpu_list, parse_cpu_list
from pipeline.result import BadNode, Health, LinkHealth
from pipeline.slurm import expand_hostlist

FAST = ["trainer.max_steps=8", "trainer.warmup_steps=2", "trainer.log_every=1000", "dataset.train_size=2048",
        "dataset.test_size=64", "trainer.tensorboard=false"]


def test_the_tournament_pairs_every_node_with_every_other_once_in_disjoint_rounds():
    for n in range(2, 12):
        rounds = tournament(n, max_rounds=99)
        assert len(rounds) == (n - 1 if n % 2 == 0 else n)
        pairs = [p for rd in rounds for p in rd]
        assert sorted(pairs) == sorted((a, b) for a in range(n) for b in range(a + 1, n))  # each pair once
        assert all(len({x for p in rd for x in p}) == 2 * len(rd) for rd in rounds)  # a node once per round
    # capped: each node still meets 8 others, in 8 rounds, at any size
    big = tournament(64)
    assert len(big) == 8 and all(sum(r in p for rd in big for p in rd) == 8 for r in range(64))


def test_turns_keep_nodes_of_one_machine_apart_and_others_together():
    machines = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "c1": "C"}
    assert turns_of(list(machines), machines) == [["a1", "b1", "c1"], ["a2"], ["a3"]]
    assert turns_of(["n1", "n2"], {"n1": "X", "n2": "Y"}) == [["n1", "n2"]]  # real nodes: one turn, at once


def test_below_compares_with_the_median_or_with_the_other_of_two():
    # 4 nodes: the median of 100, 90, 110 and 20 is 95; 20 / 95 = 0.21
    low = below({"a": 100, "b": 90, "c": 110, "d": 20}, 0.5)
    assert set(low) == {"d"} and low["d"] == pytest.approx((20 / 95, 95))
    # a bad node among 3 still leaves the median clean; one of 2 is compared with the other
    assert set(below({"a": 100, "b": 30}, 0.5)) == {"b"} and below({"a": 100, "b": 60}, 0.5) == {}
    assert below({"a": 100, "b": None, "c": 90}, 0.5) == {}  # a node without a figure is judged by its error


def test_a_node_whose_every_link_is_slow_is_the_slow_one():
    def link(a, b, gb_s):
        return LinkHealth(nodes=[a, b], gb_s=gb_s, latency_us=30.0)
    # n3's links are all slow (its own interface, shaped); the others' best pairs are fast
    links = [link("n1", "n2", 2.0), link("n3", "n4", 0.12), link("n1", "n3", 0.11), link("n2", "n4", 1.8),
             link("n1", "n4", 1.9), link("n2", "n3", 0.12)]
    scores = node_link_scores(links, ["n1", "n2", "n3", "n4"])
    assert scores == {"n1": 2.0, "n2": 2.0, "n3": 0.12, "n4": 1.9}
    # the median node's score is 1.95, the median pair's 1.0: the slow node drags the pairs, not the node scores
    assert set(below(scores, 0.5)) == {"n3"}
    # the suspects measured again: the pairs below 0.5 x 1.95
    assert {tuple(x.nodes) for x in suspect_links(links, 0.5)} == {("n3", "n4"), ("n1", "n3"), ("n2", "n3")}


def test_the_policy_makes_of_the_flags():
    health = Health(policy="warn", threshold=0.5, device="cpu", mode="serial", machines=1, seconds=1.0, phases={},
                    nodes=[], links=[], bad=[BadNode(node="n3", reason="links 0.06 x the median node's")], notes=[])
    for policy, stop in (("warn", False), ("fail", True), ("exclude", True)):
        verdict = verdict_of(health, HealthConfig(on_bad=policy))
        assert verdict.stop == stop and "n3: links 0.06 x the median node's" in verdict.message
        assert f"health.on_bad={policy}" in verdict.message
    healthy = Health(**{**health.__dict__, "bad": []})
    assert not verdict_of(healthy, HealthConfig(on_bad="fail")).stop


def test_a_rank_not_bound_to_its_gpus_numa_node_is_warned_about():
    assert binding_problem([0, 1, 2, 3], [0], gpu=0) is None and binding_problem([0, 1], [0], gpu=None) is None
    said = binding_problem([0, 1, 2, 3, 32, 33], [0, 1], gpu=1)
    assert said.startswith("bound to CPUs 0-3,32-33 on NUMA node(s) 0,1, but its GPU is on NUMA node 1") and \
        "1-10%" in said


def test_host_and_cpu_lists():
    assert expand_hostlist("qnode[1,3-4],gpu7") == ["qnode1", "qnode3", "qnode4", "gpu7"]
    assert expand_hostlist("n[08-10]") == ["n08", "n09", "n10"]
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def injected(tmp_path, node: str, once: bool = False) -> dict:
    """An environment whose ranks on simulated node `node` raise in the health check's GEMM (the first run only,
    with `once`: a marker file says it has)."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if b'pipeline.worker' in open('/proc/self/cmdline', 'rb').read():\n"
        "    import pipeline.job.health.measure as h\n"
        "    gemm = h.gemm\n"
        "    def failing_gemm(device, seconds):\n"
        f"        if os.environ.get('SLURMD_NODENAME') == {node!r}:\n"
        f"            if not {once} or not os.path.exists({str(inject / 'done')!r}):\n"
        f"                open({str(inject / 'done')!r}, 'w').close()\n"
        "                raise RuntimeError('injected failure in the GEMM')\n"
        "        return gemm(device, seconds)\n"
        "    h.gemm = failing_gemm\n")
    return {**os.environ, "PYTHONPATH": f"{inject}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def run_launch(tmp_path, env, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.launch", "nodes=3", *FAST, *args,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.e2e
@pytest.mark.alone  # every other node must measure clean: no test beside it
def test_a_rank_that_raises_in_the_check_is_named_and_each_policy_acts(tmp_path):
    """warn: the record names local2 and training goes on; fail: the run stops before training, exit 1, naming
    local2 and why (the ranks exit 3)."""
    env = injected(tmp_path, "local2")
    r = run_launch(tmp_path, env, "health.on_bad=warn")
    assert r.returncode == 0, r.stderr
    health = json.loads((tmp_path / "run/result.json").read_text())["health"]
    (bad,) = health["bad"]
    assert bad == {"node": "local2", "reason": "its check failed: RuntimeError: injected failure in the GEMM"}
    nodes = {n["node"]: n for n in health["nodes"]}
    assert nodes["local2"]["error"] and nodes["local2"]["gemm_gflops"] is None and nodes["local1"]["gemm_gflops"] > 0
    assert health["mode"] == "serial" and health["machines"] == 1  # 3 simulated nodes, one machine: node by node
    # its links are left out: a failed node would only time out
    assert {tuple(x["nodes"]) for x in health["links"]} == {("local1", "local3")}
    t0 = time.monotonic()
    r = run_launch(tmp_path, env, "health.on_bad=fail", "overwrite=true")
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    assert "failed first: exit code 3 (BadNodesFound: health check: local2: its check failed: RuntimeError: " \
           "injected failure in the GEMM (health.on_bad=fail: stopping before training))" in r.stderr
    assert not (tmp_path / "run/result.json").exists() and not (tmp_path / "run/bad-nodes.json").exists()


@pytest.mark.e2e
@pytest.mark.alone  # every other node must measure clean: no test beside it
def test_exclude_in_local_mode_runs_the_point_again_and_its_record_says_why(tmp_path):
    """Local debug mode cannot leave a simulated node out (they are all this machine): under exclude the point
    runs again, said; here the fault happens once, so the second run trains, and its record names the first."""
    r = run_launch(tmp_path, injected(tmp_path, "local3", once=True), "health.on_bad=exclude")
    assert r.returncode == 0, r.stderr
    assert "its health check found local3: its check failed: RuntimeError: injected failure in the GEMM; local " \
           "debug mode's nodes are all this machine, so none can be left out: running it again (1 of 2" in \
        r.stdout + r.stderr
    listed = json.loads((tmp_path / "run/bad-nodes.json").read_text())["entries"]
    assert [(e["node"], e["simulated"]) for e in listed] == [("local3", True)]
    health = json.loads((tmp_path / "run/result.json").read_text())["health"]
    assert health["bad"] == [] and health["left_out"] == []
    assert [(e["node"], e["job_id"]) for e in health["earlier"]] == [("local3", listed[0]["job_id"])]
