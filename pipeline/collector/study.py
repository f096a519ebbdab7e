"""A search's study in the report (`pipeline.collect SEARCH_DIR`): its trials table, the best trial's parameters
(on the Pareto front where there are several objectives), and Optuna's own plots of it, drawn by
optuna.visualization.matplotlib: the optimisation history, the parameters' importances (for each objective), the
intermediate values where trials reported them (trainer.eval_every), and the Pareto front. Optuna is imported only
when a search folder is collected; no torch.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from pipeline.rundir import SEARCH_NAME, SearchPlan

log = logging.getLogger(__name__)
MAX_PARAMS_SHOWN = 8  # columns of the trials table; the rest are in the study itself


def find_searches(paths: list[Path]) -> list[Path]:
    """The search folders (those holding search.json) at or under `paths`, each once."""
    found = {p.parent.resolve() for root in paths if Path(root).is_dir()
             for p in [Path(root) / SEARCH_NAME, *Path(root).rglob(f"*/{SEARCH_NAME}")] if p.is_file()}
    return sorted(found)


def study_lines(search_dir: Path, out_dir: Path, with_plots: bool, prefix: str = "study") -> list[str]:
    """The report's section on one search, its plots named `prefix`-<study>-<kind>.png (searches collected
    together need prefixes of their own: their studies may share a name); a study that cannot be read is said so,
    the rest of the report kept."""
    try:
        from pipeline.config import parse_run_config
        from pipeline.search import study as studies

        plan = SearchPlan.read(search_dir)
        settings = parse_run_config(plan.config).search
        study = studies.open_study(plan, settings)
        trials = study.get_trials(deepcopy=False)
    except Exception as e:  # no Optuna, an unreadable journal, a database out of reach
        return [f"## Study of {search_dir}", "", f"Not read: {type(e).__name__}: {e}", ""]
    lines = [f"## Study {plan.study}", "",
             f"Search folder `{search_dir}`; {settings.trials} trial(s) asked of {settings.workers} worker(s); "
             f"sampler {settings.sampler}, pruner {settings.pruner}; objective(s): "
             + ", ".join(f"`{o}` ({d})" for o, d in zip(plan.objectives, plan.directions)) + ".", ""]
    lines += _state_line(trials, studies) + _best_lines(study, plan, search_dir, studies)
    lines += _trials_table(trials, plan, studies)
    if with_plots:
        plots = _plots(study, plan, trials, out_dir, prefix)
        lines += [f"![{p[:-4]}]({p})" for p in plots] + ([""] if plots else [])
    return lines


def _state_line(trials, studies) -> list[str]:
    from optuna.trial import TrialState

    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    retried = sum(studies.retried(t) for t in trials)
    return [f"{count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned, "
            f"{count[TrialState.FAIL] - retried} failed, {count[TrialState.RUNNING]} running"
            + (f"; {retried} failed with their worker and tried again" if retried else "") + ".", ""]


def _best_lines(study, plan: SearchPlan, search_dir: Path, studies) -> list[str]:
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return ["No trial has completed: no best parameters yet.", ""]
    single = len(plan.objectives) == 1
    best = [study.best_trial] if single else study.best_trials
    lines = ["### Best parameters" if single else f"### The Pareto front ({len(best)} trial(s))", ""]
    for t in best:
        values = ", ".join(f"{o} = {v:.6g}" for o, v in zip(plan.objectives, t.values))
        params = ", ".join(f"`{k}={_v(v)}`" for k, v in t.params.items())
        folder = search_dir / t.user_attrs.get(studies.FOLDER_ATTR, "?")
        lines.append(f"- trial {t.number} ({values}): {params}; folder `{folder}`")
    return lines + [""]


def _trials_table(trials, plan: SearchPlan, studies) -> list[str]:
    names = [p.name for p in plan.space][:MAX_PARAMS_SHOWN]
    head = ["trial", "state", *plan.objectives, *names, "time", "note"]
    lines = ["### Trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        values = [_v(v) for v in t.values] if t.values else ["-"] * len(plan.objectives)
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            values[0], note = _v(t.intermediate_values[step]), f"pruned after step {step}"
        else:
            note = t.user_attrs.get(studies.FAILURE_ATTR, "")
        if t.user_attrs.get(studies.RETRY_OF_ATTR) is not None:
            note = f"retry of trial {t.user_attrs[studies.RETRY_OF_ATTR]}; {note}".rstrip("; ")
        took = _duration((t.datetime_complete - t.datetime_start).total_seconds()) \
            if t.datetime_complete and t.datetime_start else "-"
        cells = [str(t.number), t.state.name.lower(), *values, *(_v(t.params.get(n, "-")) for n in names), took,
                 note.replace("|", "/").replace("\n", " ")[:160]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _v(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study, plan: SearchPlan, trials, out_dir: Path, prefix: str) -> list[str]:
    """Optuna's figures of the study, as PNGs in out_dir; one that cannot be drawn (too few complete trials, a
    single value of every parameter) is skipped, and the log says why."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws with pyplot: no display on a login node
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as draw

    name, single = re.sub(r"[^\w.-]", "_", plan.study), len(plan.objectives) == 1
    figures = []
    if single:
        figures += [("history", lambda: draw.plot_optimization_history(study, target_name=plan.objectives[0])),
                    ("importances", lambda: draw.plot_param_importances(study, target_name=plan.objectives[0]))]
        if any(t.intermediate_values for t in trials):
            figures.append(("intermediate", lambda: draw.plot_intermediate_values(study)))
    else:
        figures.append(("pareto", lambda: draw.plot_pareto_front(study, target_names=plan.objectives)))
        for i, objective in enumerate(plan.objectives):
            figures.append((f"importances-{i}", lambda i=i, o=objective: draw.plot_param_importances(
                study, target=lambda t: t.values[i], target_name=o)))
    out = []
    for kind, make in figures:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for its matplotlib module
                ax = make()
            file = f"{prefix}-{name}-{kind}.png"
            ax.figure.savefig(out_dir / file, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            out.append(file)
        except Exception as e:
            log.warning("study %s: its %s plot was not drawn: %s: %s", name, kind, type(e).__name__, e)
    return out
