"""A profiled 2-rank run's traces, read by Holistic Trace Analysis (installed from PyPI into a folder of the
test's own; the test skips, saying why, where it cannot be installed)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

# HTA and what its trace loading imports (its jupyterlab and pytest requirements are not needed to read traces)
HTA = ["HolisticTraceAnalysis", "pandas", "plotly", "networkx", "pydot", "pytz", "tzdata", "python-dateutil", "six",
       "pyparsing", "narwhals", "packaging", "psutil"]

READ = """
import json, sys
from hta.trace_analysis import TraceAnalysis

analyzer = TraceAnalysis(trace_dir=sys.argv[1])
names = analyzer.t.symbol_table.get_sym_table()
out = {}
for rank in analyzer.t.get_ranks():
    trace = analyzer.t.get_trace(rank)
    out[rank] = {"world_size": analyzer.t.meta_data[rank]["distributedInfo"]["world_size"],
                 "iterations": [int(i) for i in analyzer.t.get_iterations(rank)],
                 "names": sorted({names[i] for i in trace["name"].unique()})}
overlap = analyzer.get_comm_comp_overlap(visualize=False)
out["overlap_ranks"] = sorted(int(r) for r in overlap["rank"])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hta_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("hta")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *HTA],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"HolisticTraceAnalysis could not be installed here: {r.stderr.strip()[-500:]}")
    return target


def test_a_profiled_two_rank_run_loads_in_hta(profiled_run, hta_path):
    """The test run's profiled 2-rank run (tests/conftest.py): 4 steps profiled after a warm-up of 3."""
    read = subprocess.run([sys.executable, "-c", READ, str(profiled_run / "profile")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(hta_path)})
    assert read.returncode == 0, read.stderr[-3000:]
    result = json.loads(read.stdout.split("RESULT ", 1)[1])
    assert result.pop("overlap_ranks") == [0, 1]  # one analysis over both ranks
    assert sorted(result) == ["0", "1"]  # the ranks, from the distributed metadata of one folder's traces
    for rank in result.values():
        assert rank["world_size"] == 2
        # the profiled steps after the warm-up (HTA leaves out the last, which a trace may cut short)
        assert rank["iterations"] == [3, 4, 5]
        assert {"data", "forward", "backward", "allreduce_wait", "optimizer", "gloo:all_reduce"} <= set(rank["names"])
