"""The collector's outputs: a terminal table, CSV and JSON of every row and analysis, and a Markdown report with
PNG plots (speedup, efficiency, step breakdown, cost; every group, a few to a figure)."""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path

from pipeline.collector.cost import COST_FRACTION
from pipeline.collector.memory import size_text as _size
from pipeline.collector.nodes import DEFINITIONS as NODES, NodeHistory
from pipeline.collector.records import Diverged, Problem, Pruned
from pipeline.collector.study import study_lines
from pipeline.collector.scaling import DEFINITIONS, GroupAnalysis, Row, to_dicts
from pipeline.rundir import parse_json, read_small, write_json

GROUPS_PER_FIGURE = 4  # beyond this a figure's legend crowds its lines; more groups make more figures
COLUMNS = ("nodes", "ranks", "runs", "samples/s", "+-95%", "per rank", "tokens/s", "speedup", "efficiency",
           "probe model",
           "data", "compute", "comm", "skew", "straggler", "busbw GB/s", "main reason")


@dataclass
class Collected:
    """What a collection found: the rows and analyses of its groups, the records it could not use, its nodes."""

    rows: list[Row]
    analyses: list[GroupAnalysis]
    problems: list[Problem]
    nodes: list[NodeHistory] = field(default_factory=list)
    searches: list[Path] = field(default_factory=list)  # search folders (search=optuna): a study section each


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row_cells(r: Row) -> list[str]:
    return [str(r.nodes), str(r.world_size), str(r.runs), _f(r.throughput, ".1f"), _f(r.throughput_ci, ".1f"),
            _f(r.throughput_per_rank, ".1f"), _f(r.tokens_per_s, ".0f"), _f(r.speedup, ".2f"),
            _f(r.efficiency, ".1%") + (f" +-{r.efficiency_ci:.1%}" if r.efficiency_ci is not None else "")
            + (" IMPLAUSIBLE" if r.implausible else ""),  # never bare: its cause is said below the table
            _f(r.predicted_efficiency, ".1%"), f"{r.share_data:.0%}", f"{r.share_compute:.0%}",
            f"{r.share_comm:.0%}" if r.world_size > 1 else "-",  # one rank: no communication
            f"{r.skew:.2f}", f"{r.straggler_host} (rank {r.straggler_rank})", _f(r.busbw_gb_s, ".3g"),
            r.reason or "-"]


def why_lines(r: Row) -> list[str]:
    """A row's reason with its evidence, and an implausible efficiency's cause."""
    lines = []
    if r.implausible:
        lines.append(f"{r.nodes} node(s): IMPLAUSIBLE {r.implausible}")
    if r.reason and (r.evidence or r.reason not in ("baseline", "none")):
        lines.append(f"{r.nodes} node(s): {r.reason}" + (f": {r.evidence}" if r.evidence else ""))
    return lines


def terminal_table(rows: list[Row]) -> str:
    out = []
    for oversubscribed in (False, True):
        selected = [r for r in rows if r.oversubscribed == oversubscribed]
        if not selected:
            continue
        if oversubscribed:
            out.append("\nOVERSUBSCRIBED runs (more processes than cores; not scaling, never a baseline):")
        for group, members in groupby(selected, key=lambda r: r.group):
            members = list(members)
            table = [list(COLUMNS)] + [row_cells(r) for r in members]
            widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
            out.append(f"\n{group}")
            out += ["  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
            out += [f"  FABRIC {r.nodes} node(s): {r.fabric_flag}" for r in members if r.fabric_flag]
            out += [f"  WHY {line}" for r in members for line in why_lines(r)]
    return "\n".join(out).lstrip("\n")


def write_csv(rows: list[Row], path: Path) -> None:
    dicts = to_dicts(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else ["group"])
        writer.writeheader()
        writer.writerows(dicts)


def write_scaling_json(c: Collected, path: Path) -> None:
    write_json(path, {"schema_version": 1, "definitions": {**DEFINITIONS, **NODES}, "rows": to_dicts(c.rows),
                      "analyses": [asdict(a) for a in c.analyses],
                      "problems": [{"path": p.path, "reason": p.reason} for p in c.problems],
                      "nodes": [asdict(n) for n in c.nodes]})


# ------------------------------------------------------------------------------------------------- plots
def plot(rows: list[Row], analyses: list[GroupAnalysis], out_dir: Path) -> list[str]:
    """speedup-K.png, efficiency-K.png, breakdown-K.png and cost-K.png for every GROUPS_PER_FIGURE groups;
    returns the file names. Drawing is most of a large collection's time (benchmarks/collect_speed.py), so the figures
    of more than one chunk of groups are drawn on every core."""
    by_group = {a.group: a for a in analyses}
    groups = [(g, list(m)) for g, m in groupby([r for r in rows if not r.oversubscribed], key=lambda r: r.group)]
    jobs = [(groups[k:k + GROUPS_PER_FIGURE], {g: by_group[g] for g, _ in groups[k:k + GROUPS_PER_FIGURE]},
             out_dir, k // GROUPS_PER_FIGURE + 1) for k in range(0, len(groups), GROUPS_PER_FIGURE)]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [name for job in jobs for name in _plot_chunk(*job)]
    with ProcessPoolExecutor(workers) as pool:
        return [name for names in pool.map(_plot_chunk, *zip(*jobs)) for name in names]


def _plot_chunk(chunk, by_group: dict[str, GroupAnalysis], out_dir: Path, part: int) -> list[str]:
    from matplotlib.figure import Figure  # without pyplot: no GUI backend, and 0.2 s less to import

    names = []
    for metric in ("speedup", "efficiency"):
        fig = Figure(figsize=(9, 5.5), layout="constrained")
        _scaling_axes(fig.subplots(), chunk, by_group, metric)
        names.append(_save(fig, out_dir, f"{metric}-{part}.png"))
    names.append(_save(_panels(Figure, chunk, _breakdown_axes), out_dir, f"breakdown-{part}.png"))
    names.append(_save(_panels(Figure, chunk, lambda ax, group, _: _cost_axes(ax, group, by_group[group].cost)),
                       out_dir, f"cost-{part}.png"))
    names.append(_save(_panels(Figure, chunk, lambda ax, group, _: _memory_axes(ax, group, by_group[group].memory)),
                       out_dir, f"memory-{part}.png"))
    return names


def _panels(Figure, chunk, draw):
    """A figure with one panel per group, two to a row; draw(ax, group, members) fills each."""
    rows, cols = (len(chunk) + 1) // 2, min(len(chunk), 2)
    fig = Figure(figsize=(4.6 * cols, 3.9 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (group, members) in zip(axes, chunk):
        draw(ax, group, members)
    for ax in axes[len(chunk):]:
        ax.set_visible(False)
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=100)  # constrained layout keeps every label and legend inside the figure
    return name


def _log2_nodes(ax, nodes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(nodes, [str(n) for n in nodes])
    ax.set_xlabel("nodes")
    ax.grid(alpha=0.3)


def _scaling_axes(ax, chunk, by_group: dict[str, GroupAnalysis], metric: str) -> None:
    """Measured points with their 95% intervals, the ideal line, and the probe model's prediction (with its
    interval as a band) where it has one. Speedup and efficiency are never negative: intervals stop at 0 (at an
    eighth of the value on the speedup's log axis)."""
    nodes = sorted({r.nodes for _, m in chunk for r in m})
    predicted_any = False
    for i, (group, members) in enumerate(chunk):
        color = f"C{i}"
        x = [r.nodes for r in members]
        if metric == "speedup":
            y = [r.speedup for r in members]
            err = [r.speedup * r.efficiency_ci / r.efficiency if r.efficiency_ci and r.efficiency else 0.0
                   for r in members]
        else:
            y, err = [r.efficiency for r in members], [r.efficiency_ci or 0.0 for r in members]
        floor = [v / 8 if metric == "speedup" else 0.0 for v in y]  # a log axis has no 0
        ax.errorbar(x, y, yerr=[[min(e, v - f) for e, v, f in zip(err, y, floor)], err], marker="o", capsize=3,
                    color=color, label=group)
        base = members[0].nodes
        predictions = [p for p in by_group[group].probes.predictions if p.predicted is not None]
        if predictions:
            predicted_any = True
            px = [p.nodes for p in predictions]
            scale = [n / base if metric == "speedup" else 1.0 for n in px]
            ax.plot(px, [p.predicted * k for p, k in zip(predictions, scale)], "--", color=color)
            ax.fill_between(px, [max(p.low, p.predicted / 8) * k for p, k in zip(predictions, scale)],
                            [p.high * k for p, k in zip(predictions, scale)], color=color, alpha=0.12)
            nodes = sorted(set(nodes) | set(px))
    base = min(m[0].nodes for _, m in chunk)
    ax.plot(nodes, [n / base if metric == "speedup" else 1.0 for n in nodes], "k:", label="ideal")
    if predicted_any:  # one legend entry for every group's dashed line: its colour names the group
        ax.plot([], [], "--", color="gray", label="predicted from the fabric probes (lower bound: no overlap of the "
                                                  "all-reduce with backward); band: its 95% interval")
    _log2_nodes(ax, nodes)
    if metric == "speedup":  # log-log, so that ideal scaling is a straight line
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(_plain_numbers())
        ax.set_ylabel("speedup vs. the group's smallest node count")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("scaling efficiency")
    ax.legend(fontsize=7, loc="upper left")


def _breakdown_axes(ax, group: str, members: list[Row]) -> None:
    x = [str(r.nodes) for r in members]
    bottom = [0.0] * len(members)
    for i, (phase, color) in enumerate((("data", "tab:blue"), ("compute", "tab:orange"), ("comm", "tab:red"))):
        heights = [r.breakdown_s[i] * 1e3 for r in members]
        ax.bar(x, heights, bottom=bottom, label=phase, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title(group, fontsize=7, wrap=True)
    ax.set_xlabel("nodes")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=3)


def _cost_axes(ax, group: str, cost) -> None:
    """One group: what an epoch costs (bars, node-hours or GPU-hours) and how long it takes (line, right axis),
    with the knee marked. One panel per group, since groups' costs differ by orders of magnitude."""
    ax.set_title(group, fontsize=7, wrap=True)
    if cost is None or not cost.points:
        why = cost.summary if cost is not None and cost.summary else "no measured throughput"
        ax.text(0.5, 0.5, f"no cost view: {why}", ha="center", va="center", transform=ax.transAxes)
        return
    x = [str(p.nodes) for p in cost.points]
    gpu = cost.points[0].gpu_hours is not None
    hours = [p.gpu_hours if gpu else p.node_hours for p in cost.points]
    ax.bar(x, hours, color="tab:blue", alpha=0.7, label="GPU-hours per epoch" if gpu else "node-hours per epoch")
    ax.set_ylabel("GPU-hours per epoch" if gpu else "node-hours per epoch")
    ax.set_xlabel("nodes")
    time_ax = ax.twinx()
    time_ax.plot(x, [p.epoch_s / 60 for p in cost.points], marker="o", color="black", label="minutes per epoch")
    time_ax.set_ylabel("minutes per epoch (time to result)")
    time_ax.set_ylim(bottom=0)
    for axis in (ax, time_ax):
        axis.yaxis.set_major_formatter(_plain_numbers())
    if cost.knee is not None:
        ax.axvline(x.index(str(cost.knee)), color="tab:red", linestyle="--",
                   label=f"knee at {cost.knee}: a node more buys < {COST_FRACTION:.0%} of its cost")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = time_ax.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncols=2)


def _memory_axes(ax, group: str, memory) -> None:
    """One group: each rank's training state and peak against nodes, measured (markers) and predicted from the
    baseline (dotted, the peak's 95% interval as a band), and the device's memory."""
    ax.set_title(group, fontsize=7, wrap=True)
    if memory is None or not memory.predictions:
        ax.text(0.5, 0.5, "no memory in these records", ha="center", va="center", transform=ax.transAxes)
        return
    ps = memory.predictions
    x = [p.nodes for p in ps]
    measured = [p for p in ps if p.measured_state is not None]
    ax.plot([p.nodes for p in measured], [p.measured_state / 1e9 for p in measured], "o-", color="tab:blue",
            label="state per rank, measured")
    ax.plot(x, [p.state_bytes / 1e9 for p in ps], ":", color="tab:blue", label="state, predicted")
    peaks = [p for p in measured if p.measured_peak is not None]
    if peaks:
        ax.plot([p.nodes for p in peaks], [p.measured_peak / 1e9 for p in peaks], "s-", color="tab:orange",
                label=f"peak per rank ({memory.peak_kind}), measured")
    banded = [p for p in ps if p.peak_bytes is not None]
    if banded:
        ax.plot([p.nodes for p in banded], [p.peak_bytes / 1e9 for p in banded], ":", color="tab:orange",
                label="peak, predicted (band: 95%)")
        ax.fill_between([p.nodes for p in banded], [p.low / 1e9 for p in banded], [p.high / 1e9 for p in banded],
                        color="tab:orange", alpha=0.15)
    if memory.device_bytes:
        ax.axhline(memory.device_bytes / 1e9, color="tab:red", linestyle="--", label="device memory")
    _log2_nodes(ax, x)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_numbers())
    ax.set_ylabel("GB per rank")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2)


def _plain_numbers():
    """Tick labels with 3 significant digits and no offset text (which collides with titles)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:.3g}")


# ------------------------------------------------------------------------------------------------ report
def markdown(c: Collected, plots: list[str], regressions: list[str], studies: list[str] = ()) -> str:
    rows, analyses, problems = c.rows, c.analyses, c.problems
    lines = ["# Scaling report", ""]
    if regressions:
        lines += ["## Regressions against the baseline", ""] + [f"- {r}" for r in regressions] + [""]
    lines += list(studies)
    flagged = [r for r in rows if r.fabric_flag]
    if flagged:
        lines += ["## Fabric warnings", ""] + [f"- {r.group}, {r.nodes} node(s) ({r.transport}): {r.fabric_flag}"
                                                for r in flagged] + [""]
    lines += ["## Results", ""]
    for group, members in groupby(rows, key=lambda r: r.group):
        members = list(members)
        lines += [f"### {group}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row_cells(r)) + " |" for r in members]
        lines.append("")
        why = [line for r in members for line in why_lines(r)]
        if why:
            lines += ["Why it does not scale:", ""] + [f"- {line}" for line in why] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## Forecast", ""]
    for a in analyses:
        lines += [f"### {a.group}", ""]
        for forecast in (a.probes, a.fit):
            lines += _forecast_lines(forecast)
        if a.hosts:
            lines += ["Ranks at the largest node count: " +
                      ", ".join(f"{r} on {h}" for r, h in sorted(a.hosts.items())), ""]
    lines += _memory_lines(analyses)
    lines += _comparison_lines(rows)
    lines += node_lines(c.nodes)
    lines += ["## Cost", ""]
    for a in analyses:
        if a.cost is None:
            continue
        gpu = any(p.gpu_hours is not None for p in a.cost.points)
        lines += [f"### {a.group}", "", f"{a.cost.summary}.", "",
                  f"| nodes | time per epoch | {'GPU-hours' if gpu else 'node-hours'} per epoch | marginal value |",
                  "|---|---|---|---|"]
        lines += [f"| {p.nodes} | {p.epoch_s / 60:.3g} min | {(p.gpu_hours if gpu else p.node_hours):.3g} | "
                  f"{_f(p.marginal, '.0%')} |" for p in a.cost.points] + [""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in {**DEFINITIONS, **NODES}.items()] + [""]
    diverged = [p for p in problems if isinstance(p, Diverged)]
    pruned = [p for p in problems if isinstance(p, Pruned)]
    unusable = [p for p in problems if not isinstance(p, (Diverged, Pruned))]
    for title, listed in (("Diverged runs", diverged), ("Pruned trials", pruned), ("Records not used", unusable)):
        if listed:
            lines += [f"## {title}", ""] + [f"- `{p.path}`: {p.reason}" for p in listed] + [""]
    return "\n".join(lines)


def _memory_lines(analyses: list[GroupAnalysis]) -> list[str]:
    lines = ["## Memory per rank", ""]
    for a in analyses:
        m = a.memory
        if m is None or not m.predictions:
            continue
        lines += [f"### {a.group}", "", f"{m.fits}." if m.fits else "", ""]
        if m.missing:
            lines += [f"No peak prediction where an interval is missing: {m.missing}.", ""]
        lines += [f"| nodes | shard ranks | parameters | gradients | optimizer | state | peak ({m.peak_kind}) | "
                  "predicted state | predicted peak (95% interval) | error |", "|" + "---|" * 10]
        for p in m.predictions:
            parts = p.measured_parts or (None, None, None)
            peak = (f"{_size(p.peak_bytes)} ({_size(p.low)} to {_size(p.high)})" if p.peak_bytes is not None
                    else "-")
            lines.append(f"| {p.nodes} | {p.shard_ranks} | " + " | ".join(_size(v) for v in parts) +
                         f" | {_size(p.measured_state)} | {_size(p.measured_peak)} | {_size(p.state_bytes)} | {peak} |"
                         f" {_f(p.error, '+.1%')} |")
        lines.append("")
    return lines if len(lines) > 2 else []


def _comparison_lines(rows: list[Row]) -> list[str]:
    """The same experiment under several parallel modes, side by side per node count."""
    families: dict[str, list[Row]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    lines = []
    for family, members in families.items():
        if len({(r.parallel, r.group) for r in members}) < 2:
            continue
        lines += [f"### {family}", "", "| nodes | parallel | samples/s | +-95% | efficiency | state per rank | "
                  "peak per rank |", "|---|---|---|---|---|---|---|"]
        for r in sorted(members, key=lambda r: (r.nodes, r.parallel, r.accumulation)):
            mode = r.parallel + (f", accumulation {r.accumulation}" if r.accumulation != "1" else "")
            lines.append(f"| {r.nodes} | {mode} | {r.throughput:.1f} | {_f(r.throughput_ci, '.1f')} | "
                         f"{_f(r.efficiency, '.1%')}" + (f" +-{r.efficiency_ci:.1%}" if r.efficiency_ci else "") +
                         f" | {_size(r.state_bytes)} | {_size(r.peak_bytes)} |")
        lines.append("")
    return ["## Parallel modes compared", "", *lines] if lines else []


def node_lines(nodes: list[NodeHistory]) -> list[str]:
    """The Nodes section: every Slurm node over the whole collection."""
    lines = ["## Nodes", ""]
    if not nodes:
        return lines + ["No Slurm node in these records (local debug mode's nodes are simulated: this machine).", ""]
    lines += ["| node | runs | straggler | checks | flagged | GEMM GFLOP/s | best link GB/s | memory GB/s | "
              "stopped for it | last flagged for |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n.node} | {n.runs} | {n.straggler} | {n.checks} | {n.flagged} | {_f(n.gemm_gflops, '.3g')} | "
              f"{_f(n.link_gb_s, '.3g')} | {_f(n.membw_gb_s, '.3g')} | {n.stopped} | {n.last_flag or '-'} |"
              for n in nodes]
    return lines + [""]


def _forecast_lines(f) -> list[str]:
    title = ("From the fabric probes" if f.source == "probes" else "Fitted to the measured comm phase")
    lines = [f"**{title}**"]
    if f.fabric:
        def bandwidth(gb_s):
            return f"{gb_s:.3g} GB/s" if gb_s else "unbounded (no bandwidth term)"
        lines.append("; ".join(f"{op.replace('_', '-')}: latency {lat:.3g} us per ring step, bandwidth "
                               f"{bandwidth(bw)}, {f.step_bytes.get(op, 0):,} bytes per step"
                               for op, (lat, bw) in f.fabric.items()))
    if f.missing:
        lines.append(f"No numbers where an interval is missing: {f.missing}.")
    rows = [p for p in f.predictions if p.predicted is not None]
    if rows:
        lines += ["", "| nodes | measured efficiency | predicted (95% interval) | error | from |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p.nodes} | {_f(p.measured, '.1%')} | {p.predicted:.1%} ({p.low:.1%} to {p.high:.1%}) | "
                  f"{_f(p.error, '+.1%')} | {p.source or '-'} |" for p in rows]
    h = f.held_out
    if h is not None:
        lines += ["", f"Held out: {h.nodes} nodes predicted from the smaller node counts alone ({h.source}): "
                      f"{h.predicted:.1%} ({h.low:.1%} to {h.high:.1%}) against {h.measured:.1%} measured, error "
                      f"{h.error:+.1%}, {'inside' if h.inside else 'OUTSIDE'} its interval."]
    elif f.held_out_missing:
        lines += ["", f"Held out: none ({f.held_out_missing})."]
    if f.next_measurement:
        lines += ["", f"Next to measure: {f.next_measurement}."]
    return lines + [""]


def write_report(out_dir: Path, c: Collected, regressions: list[str], with_plots: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(c.rows, out_dir / "scaling.csv")
    write_scaling_json(c, out_dir / "scaling.json")
    plots = plot(c.rows, c.analyses, out_dir) if with_plots else []
    prefixes = ["study"] if len(c.searches) == 1 else [f"study{i + 1}" for i in range(len(c.searches))]
    studies = [line for d, p in zip(c.searches, prefixes) for line in study_lines(d, out_dir, with_plots, p)]
    report = out_dir / "report.md"
    report.write_text(markdown(c, plots, regressions, studies))
    return report


def load_baseline(path: Path) -> list[dict]:
    """The rows of an earlier collection's scaling.json. OSError: missing, unreadable, not a regular file (a FIFO
    would block the reader); ValueError: not that file's JSON."""
    data = parse_json(read_small(Path(path)))
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("experiment"), str)
                                             and isinstance(r.get("nodes"), int) for r in rows):
        raise ValueError("not the scaling.json of a collection (a list of rows, each with experiment and nodes)")
    return rows
