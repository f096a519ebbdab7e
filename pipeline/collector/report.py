"""The collector's outputs: a terminal table, CSV and JSON of every row, and a Markdown report with PNG plots."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from itertools import groupby
from pathlib import Path

from pipeline.collector.records import Problem
from pipeline.collector.scaling import DEFINITIONS, Row, ScalingModel, to_dicts
from pipeline.rundir import write_json

MAX_PLOTTED_GROUPS = 6  # beyond this a plot is unreadable (and slow to draw); the tables list every group
COLUMNS = ("nodes", "ranks", "runs", "samples/s", "+-95%", "per rank", "speedup", "efficiency", "model eff",
           "data", "compute", "comm", "skew", "straggler")


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row_cells(r: Row) -> list[str]:
    return [str(r.nodes), str(r.world_size), str(r.runs), _f(r.throughput, ".1f"), _f(r.throughput_ci, ".1f"),
            _f(r.throughput_per_rank, ".1f"), _f(r.speedup, ".2f"),
            _f(r.efficiency, ".1%") + (f" +-{r.efficiency_ci:.1%}" if r.efficiency_ci is not None else ""),
            _f(r.predicted_efficiency, ".1%"), f"{r.share_data:.0%}", f"{r.share_compute:.0%}", f"{r.share_comm:.0%}",
            f"{r.skew:.2f}", f"{r.straggler_host} (rank {r.straggler_rank})"]


def terminal_table(rows: list[Row]) -> str:
    out = []
    for oversubscribed in (False, True):
        selected = [r for r in rows if r.oversubscribed == oversubscribed]
        if not selected:
            continue
        if oversubscribed:
            out.append("\nOVERSUBSCRIBED runs (more processes than cores; not scaling, never a baseline):")
        for group, members in groupby(selected, key=lambda r: r.group):
            table = [list(COLUMNS)] + [row_cells(r) for r in members]
            widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
            out.append(f"\n{group}")
            out += ["  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
    return "\n".join(out).lstrip("\n")


def write_csv(rows: list[Row], path: Path) -> None:
    dicts = to_dicts(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else ["group"])
        writer.writeheader()
        writer.writerows(dicts)


def write_scaling_json(rows: list[Row], models: list[ScalingModel], problems: list[Problem], path: Path) -> None:
    write_json(path, {"schema_version": 1, "definitions": DEFINITIONS, "rows": to_dicts(rows),
                             "models": [asdict(m) for m in models], "problems": [asdict(p) for p in problems]})


def plot(rows: list[Row], out_dir: Path) -> list[str]:
    """speedup.png (with the ideal line), efficiency.png, breakdown.png; returns the file names."""
    from matplotlib.figure import Figure  # without pyplot: no GUI backend, and 0.2 s less to import

    groups = [(g, list(m)) for g, m in groupby([r for r in rows if not r.oversubscribed], key=lambda r: r.group)]
    groups = groups[:MAX_PLOTTED_GROUPS]
    if not groups:
        return []
    names = []
    for metric, ylabel in (("speedup", "speedup vs. baseline"), ("efficiency", "scaling efficiency")):
        fig = Figure(figsize=(8, 5))
        ax = fig.subplots()
        all_nodes = sorted({r.nodes for _, m in groups for r in m})
        for group, members in groups:
            ax.plot([r.nodes for r in members], [getattr(r, metric) for r in members], marker=".", label=group)
        base = min(m[0].nodes for _, m in groups)
        ideal = [n / base for n in all_nodes] if metric == "speedup" else [1.0] * len(all_nodes)
        ax.plot(all_nodes, ideal, "k--", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_nodes, [str(n) for n in all_nodes])
        ax.set_xlabel("nodes")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.savefig(out_dir / f"{metric}.png", dpi=90)
        names.append(f"{metric}.png")
    cols = min(3, len(groups))
    rows_ = -(-len(groups) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.8 * rows_))
    axes = fig.subplots(rows_, cols, squeeze=False)
    fig.subplots_adjust(hspace=0.45, wspace=0.3, left=0.07, right=0.97, top=0.93, bottom=0.1)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (group, members) in zip(axes.flat, groups):
        x = [str(r.nodes) for r in members]
        bottom = [0.0] * len(members)
        for i, (phase, color) in enumerate((("data", "tab:blue"), ("compute", "tab:orange"), ("comm", "tab:red"))):
            heights = [r.breakdown_s[i] * 1e3 for r in members]
            ax.bar(x, heights, bottom=bottom, label=phase, color=color)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(group.replace(" sgd", "\nsgd"), fontsize=6)
        ax.set_xlabel("nodes")
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=6)
    fig.savefig(out_dir / "breakdown.png", dpi=90)
    return names + ["breakdown.png"]


def markdown(rows: list[Row], models: list[ScalingModel], problems: list[Problem], plots: list[str],
             regressions: list[str]) -> str:
    lines = ["# Scaling report", ""]
    if regressions:
        lines += ["## Regressions against the baseline", ""] + [f"- {r}" for r in regressions] + [""]
    lines += ["## Results", ""]
    for group, members in groupby(rows, key=lambda r: r.group):
        lines += [f"### {group}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row_cells(r)) + " |" for r in members]
        lines.append("")
    if plots:
        plotted = len({r.group for r in rows if not r.oversubscribed})
        note = f" (the first {MAX_PLOTTED_GROUPS} of {plotted} groups)" if plotted > MAX_PLOTTED_GROUPS else ""
        lines += ["## Plots" + note, ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## Scaling model", ""]
    for m in models:
        lines.append(f"### {m.group}")
        if not m.fitted:
            lines += ["", f"Not fitted: {m.reason}.", ""]
            continue
        bandwidth = f"{m.bandwidth_gb_s:.3g} GB/s" if m.bandwidth_gb_s else "unbounded (fit gave 0 s/byte)"
        lines += ["", f"alpha (latency per ring step) = {m.alpha_us:.3g} us; effective bandwidth = {bandwidth}; "
                      f"gradient = {m.gradient_bytes:,} bytes", "", "| nodes | measured efficiency | model |",
                  "|---|---|---|"]
        lines += [f"| {n} | {_f(meas, '.1%')} | {_f(pred, '.1%')} |" for n, (meas, pred) in m.measured.items()]
        lines += [f"| {n} (predicted) | | {pred:.1%} |" for n, pred in m.predicted.items()] + [""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()] + [""]
    if problems:
        lines += ["## Records not used", ""] + [f"- `{p.path}`: {p.reason}" for p in problems] + [""]
    return "\n".join(lines)


def write_report(out_dir: Path, rows, models, problems, regressions, with_plots: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "scaling.csv")
    write_scaling_json(rows, models, problems, out_dir / "scaling.json")
    plots = plot(rows, out_dir) if with_plots else []
    report = out_dir / "report.md"
    report.write_text(markdown(rows, models, problems, plots, regressions))
    return report


def load_baseline(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"]
