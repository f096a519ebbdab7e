"""A sweep (`python -m pipeline.launch -m ...`), run by the Hydra plugins in hydra_plugins/.

Every point is composed once, typed and checked (its config, its dataset files) and, on Slurm, each distinct
allocation is asked of Slurm once, before any point runs or is submitted. When a point cannot run, nothing is
launched, unless that point's own `allow_partial=true`, which skips it. Then the points are started from the
configs of that first pass (`points.start`): Slurm points submitted as one job array per distinct allocation (the
launch returns once they all are, or waits with `wait=true`), local points run here one after another. Launch
options are read from each point's own config, so `-m cluster=local,slurm` does what it says.

Composition is what a large sweep costs: Hydra composes a config in about 80 ms. Here Hydra composes once per
distinct choice of config groups; a point's value overrides that change a leaf (`trainer.seed=7`) are set on the
plain data of that composition (pipeline/launcher/overrides.py: tens of microseconds a point), the others applied to
a copy, as Hydra itself applies them once it has composed (milliseconds a point). A point's folder is the sweep's
folder and its number (hydra.sweep.subdir's default), or else is resolved in Hydra's node, set for the point.
"""

from __future__ import annotations

import copy
from collections import Counter
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pipeline.config import ConfigError, RunConfig, plain_config
from pipeline.launcher.errors import exit_on_config_error, one_line, reported
from pipeline.launcher.local import RunFailed
from pipeline.launcher.logs import first_failed_log
from pipeline.launcher.manifest import add_skipped
from pipeline.launcher.overrides import PlainBase, commute, is_plain_change
from pipeline.launcher.points import check_allocations, resubmit_without_bad_nodes, start
from pipeline.point import PlannedPoint, check_folder, check_job_name, prepare_run
from pipeline.rundir import RECORD_NAME
from pipeline.launcher.status import check_completed, wait_for_sweep

log = logging.getLogger(__name__)


@dataclass
class SweepPoint:
    index: int
    overrides: list[str]
    point_dir: Path | None
    run: RunConfig | None  # None when the config could not be typed
    problem: str | None  # why the point cannot run, if it cannot
    allow_partial: bool

    @property
    def label(self) -> str:
        return f"point #{self.index} ({' '.join(filter_overrides(self.overrides))})"

    def planned(self) -> PlannedPoint:
        return PlannedPoint(self.index, self.overrides, self.run, self.point_dir)


@dataclass
class PointOutcome:
    """What became of a point, for a sweeper that chooses the next points from it (Hydra's optimisation sweepers):
    its objective's values, read from its record, or why it has none (it failed, diverged, was cancelled, or could
    not run)."""

    index: int
    overrides: list[str]
    point_dir: Path | None
    values: list[float] | None
    failure: str | None = None


def _emptied(config: DictConfig) -> str:
    """The sweep overrides that swept no value (`trainer.seed=range(0,0)`), said as a prefix."""
    try:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:  # parsed before by Hydra; nothing more to say
        return ""
    empty = [o.input_line for o in overrides if o.is_sweep_override() and not list(o.sweep_string_iterator())]
    return f"{', '.join(empty)}: " if empty else ""


def launch_sweep(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int = 0, outcomes: bool = False) -> list[PointOutcome]:
    """Check, start and (on Slurm) submit the points; numbered from `initial_job_idx`, which a sweeper that
    launches batch after batch advances, so no folder is used twice. With `outcomes` (a sweeper that reads them),
    a point that fails is an outcome, not the launch's end: the launch waits for Slurm's points and returns each
    point's outcome, in order."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    composer = Composer(hydra_context, config)
    if not job_overrides and not outcomes:
        raise ConfigError(f"{_emptied(config)}the sweep has no points: give each swept key one value at least")
    points = [composer.point(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
    by_index = {p.index: p for p in points}
    check_job_name(str(config.hydra.job.name))
    sweep_dir = check_folder("hydra.sweep.dir", Path(str(config.hydra.sweep.dir)).absolute(),
                             str(config.hydra.sweep.dir))
    ok = [p for p in points if not p.problem]
    for index, problem in check_allocations([p.planned() for p in ok], sweep_dir).items():
        by_index[index].problem = f"Slurm would reject it: {problem}"
    for p in points:  # a search's points are its own: it runs them itself
        if p.run is not None and p.run.search is not None and not p.problem:
            p.problem = ("search=optuna chooses its trials itself: launch it without -m (docs/searching.md)"
                         if not outcomes else "search=optuna cannot run under another sweeper: set search=null")
    runnable = refuse_or_skip(points, sweep_dir, failing_is_an_outcome=outcomes)
    log.info("%d point(s): %s", len(runnable), ", ".join(
        f"{n} {kind}" for kind, n in Counter(p.run.cluster.kind for p in runnable).items()))
    with reported():  # a folder that cannot be used (nothing was started), a point that failed
        try:
            start([p.planned() for p in runnable], sweep_dir)
        except RunFailed:
            if not outcomes:
                raise  # the points' outcomes are read below, from their records
    submitted = [p for p in runnable if p.run.cluster.kind == "slurm" and not p.run.dry_run]
    if submitted:
        log.info("%d point(s) submitted; sweep folder %s; follow with: python -m pipeline.status %s",
                 len(submitted), sweep_dir, sweep_dir)
        if outcomes or any(p.run.wait for p in submitted):
            statuses = wait_for_sweep(sweep_dir, resubmit_without_bad_nodes)
            if not outcomes:  # an optimisation sweeper is told each point's outcome instead
                check_completed(sweep_dir, statuses)
    return [outcome_of(p) for p in points] if outcomes else []


def outcome_of(p: SweepPoint) -> PointOutcome:
    """The point's objective from its record (pipeline/objective.py), or why there is none."""
    from pipeline.collector.records import Problem, read_record
    from pipeline.objective import NoValue, value_of

    def failed(why: str) -> PointOutcome:
        return PointOutcome(p.index, p.overrides, p.point_dir, None, f"{p.label}: {why}")

    if p.problem:
        return failed(p.problem)
    if p.run.dry_run:
        return failed("a dry run: nothing was trained")
    path = p.point_dir / RECORD_NAME
    if not (path.exists() or path.is_symlink()):
        return failed(f"it ended without a record ({first_failed_log(p.point_dir) or 'no rank log'})")
    rec = read_record(str(path))
    if isinstance(rec, Problem):
        return failed(rec.reason)
    names = p.run.objective if isinstance(p.run.objective, list) else [p.run.objective]
    try:
        return PointOutcome(p.index, p.overrides, p.point_dir, [value_of(rec, name) for name in names])
    except NoValue as e:
        return failed(str(e))


def task_part(cfg: DictConfig) -> DictConfig:
    """A composed config less Hydra's node."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


# interpolations that give every point of a sweep the same value (Hydra caches `now` for the launch)
_SAME_FOR_EVERY_POINT = re.compile(r"\$\{(?:now|oc\.env):[^${}\\]*\}")


def numbered_in(full: DictConfig) -> Path | None:
    """hydra.sweep.dir, resolved, when the point's folder is that and the point's number: hydra.sweep.subdir is
    `${hydra.job.num}` (Hydra's default) and hydra.sweep.dir the same for every point (no interpolation but
    ${now:...} and ${oc.env:...})."""
    raw = OmegaConf.to_container(full.hydra.sweep, resolve=False)
    if raw.get("subdir") != "${hydra.job.num}" or "${" in _SAME_FOR_EVERY_POINT.sub("", str(raw.get("dir"))):
        return None
    try:
        return Path(str(full.hydra.sweep.dir))
    except Exception:  # (an unset variable) each point's folder is resolved, and its error said, as without this
        return None


class Composer:
    """Each point's config, typed and checked. Hydra composes once per distinct choice of config groups (and of
    Hydra's own settings). A point's value overrides then go the quick way where they can (overrides.PlainBase: set
    on the plain data of its group choice, resolved once), else they are applied to a copy of that config's task
    part, as Hydra applies them after composing (ConfigLoaderImpl._apply_overrides_to_config: the same code, the
    same errors). A point whose config reaches into Hydra's node (an interpolation of hydra.*) is composed in
    full."""

    def __init__(self, hydra_context: HydraContext, master: DictConfig):
        self.loader, self.master = hydra_context.config_loader, master
        self.parser = OverridesParser.create(config_loader=self.loader)
        # the config groups: the top-level ones, and every group the defaults list chose from (nested ones too)
        self.groups = set(self.loader.list_groups("")) | set(master.hydra.runtime.choices)
        self.composed: dict[tuple[str, ...], tuple[DictConfig, DictConfig]] = {}
        self.numbered: dict[tuple[str, ...], Path | None] = {}
        self.bases: dict[tuple[tuple[str, ...], tuple[str, ...]], PlainBase | None] = {}
        self.fixed = self._fixed()

    def point(self, idx: int, overrides: list[str]) -> SweepPoint:
        cfg, point_dir, run, problem = None, None, None, None
        try:
            cfg, point_dir = self.compose(idx, overrides)
            run = prepare_run(cfg)
        except ConfigError as e:
            problem = str(e)
        except Exception as e:  # Hydra's override errors (a missing key, a wrong type) name the key
            problem = one_line(e) or f"{type(e).__name__}: {e}"
        allow = run.allow_partial if run else isinstance(cfg, dict) and cfg.get("allow_partial") is True
        return SweepPoint(idx, overrides, point_dir, run, problem, allow)

    def compose(self, idx: int, overrides: list[str]) -> tuple[dict, Path]:
        """(the point's config as plain data, its folder)."""
        parsed = [self._parse(o) for o in overrides]
        choices = tuple(o.input_line for o in parsed if self._is_choice(o))
        values = [o for o in parsed if not self._is_choice(o)]
        config = self._quickly(choices, values)
        numbered = self._numbered_in(choices) if config is not None else None
        if numbered is not None:
            return config, check_folder("hydra.sweep.dir", (numbered / str(idx)).absolute())
        full, task = self._composed(choices)
        point_dir = self._point_dir(full, idx, parsed)  # before _in_full, which may read the node
        if config is None:
            config = self._in_full(full, task, values)
        return config, point_dir

    def _composed(self, choices: tuple[str, ...]) -> tuple[DictConfig, DictConfig]:
        """The config of a choice of groups (Hydra's node included), and its task part."""
        if choices not in self.composed:
            full = self.loader.load_sweep_config(self.master, list(choices))
            HydraConfig.instance().set_config(full)  # for ${hydra:...} resolvers in the points' configs
            self.composed[choices] = (full, task_part(full))
        return self.composed[choices]

    def _fixed(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(choices, other value overrides) of what every point is given as it is, not swept: the overrides Hydra
        composed the sweep's own config with (`master`, its sweeps left out), written as the sweeper writes them into
        each point's overrides. None where the sweeper may put them in another order (a key given twice)."""
        given = [self._parse(o) for o in self.master.hydra.overrides.task]
        if len({o.get_key_element() for o in given}) < len(given):
            return None
        fixed = [self._parse(f"{o.get_key_element()}={o.get_value_element_as_str()}")
                 for o in given if not o.is_sweep_override()]
        return (tuple(o.input_line for o in fixed if self._is_choice(o)),
                tuple(o.input_line for o in fixed if not self._is_choice(o) and not is_plain_change(o)))

    def _numbered_in(self, choices: tuple[str, ...]) -> Path | None:
        """The folder of each point of this group choice when that is all its number makes it (numbered_in);
        Hydra's node is the sweep's own where that is the same."""
        if choices not in self.numbered:
            fixed = self.fixed is not None and choices == self.fixed[0]
            self.numbered[choices] = numbered_in(self.master if fixed else self._composed(choices)[0])
        return self.numbered[choices]

    def _point_dir(self, full: DictConfig, idx: int, parsed: list[Override]) -> Path:
        """The point's folder, resolved in Hydra's node set for the point: what the folder name may use is its
        number and overrides (HydraConfig leaves the node read-only). 1 to 2 ms a point."""
        with read_write(full.hydra), open_dict(full.hydra):
            full.hydra.job.num = full.hydra.job.id = idx
            full.hydra.overrides.task = [o.input_line for o in parsed]
            full.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed, kv_sep=full.hydra.job.config.override_dirname.kv_sep,
                item_sep=full.hydra.job.config.override_dirname.item_sep,
                exclude_keys=full.hydra.job.config.override_dirname.exclude_keys)
        return check_folder("hydra.sweep.dir",
                            (Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir)).absolute())

    def _quickly(self, choices: tuple[str, ...], values: list[Override]) -> dict | None:
        """The point's config with its plain changes set on plain data (overrides.PlainBase), after its other value
        overrides (+key, ~key, ...), which points often share (`+cluster.sbatch_extra.begin=...` on every point) and
        are applied once for all of them; None where this is not certain to give what _in_full gives."""
        changes, others = [], []
        for o in values:
            (changes if is_plain_change(o) else others).append(o)
        if not commute(changes, others):
            return None
        key = (choices, tuple(o.input_line for o in others))
        if key not in self.bases:
            self.bases[key] = self._base(key, others)
        return self.bases[key].apply(changes) if self.bases[key] else None

    def _base(self, key: tuple[tuple[str, ...], tuple[str, ...]], others: list[Override]) -> PlainBase | None:
        """The plain base of the points that share a group choice and these other value overrides: the sweep's own
        config where these are the overrides it was composed with (Hydra composed it before the sweep: it applied
        its plain changes too, which the points set again), else the group choice's with these applied."""
        if key == self.fixed:
            task = task_part(self.master)
            return PlainBase.of(task, nodes=task)
        task = self._composed(key[0])[1]
        if not others:
            return PlainBase.of(task, nodes=task)
        cfg = copy.deepcopy(task)
        try:
            ConfigLoaderImpl._apply_overrides_to_config(others, cfg)
        except Exception:  # said by _in_full, which the point is composed with
            return None
        return PlainBase.of(cfg, nodes=task)

    @staticmethod
    def _in_full(full: DictConfig, task: DictConfig, values: list[Override]) -> dict:
        """The point's config the slow way: its value overrides applied to a copy of the task part, or of the whole
        config where the task part cannot be resolved alone."""
        cfg = copy.deepcopy(task)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        try:
            return plain_config(cfg)
        except ConfigError:  # an interpolation into hydra.*, which the task part lacks: the point in full
            cfg = copy.deepcopy(full)
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
            return plain_config(cfg)

    @functools.lru_cache(maxsize=None)
    def _parse(self, override: str) -> Override:
        """Hydra's override grammar is slow to run (a millisecond an override); a sweep repeats its overrides."""
        return self.parser.parse_overrides([override])[0]

    def _is_choice(self, override: Override) -> bool:
        """A choice of config group (model=cnn, +experiment=x, ~model) or of Hydra's own settings; the rest set
        values."""
        return override.is_hydra_override() or override.key_or_group.split("@")[0] in self.groups


def refuse_or_skip(points: list[SweepPoint], sweep_dir: Path, failing_is_an_outcome: bool = False
                   ) -> list[SweepPoint]:
    """The points that can run. If some cannot, nothing is launched (exit 2, listing them), unless each of them
    says allow_partial=true, or `failing_is_an_outcome` (a sweeper's trial whose parameters cannot run is a failed
    trial), and some other point can run; those are then skipped and listed in the manifest."""
    bad = [p for p in points if p.problem]
    allowed = all(p.allow_partial or failing_is_an_outcome for p in bad)
    if bad and (not allowed or len(bad) == len(points)):
        exit_on_config_error(ConfigError(f"{len(bad)} of {len(points)} sweep points cannot run, nothing was launched:"
                                         "\n" + "\n".join(f"{p.label}: {p.problem}" for p in bad)))
    for p in bad:
        log.warning("%s, skipping %s: %s", "allow_partial=true" if p.allow_partial else "a failed trial", p.label,
                    p.problem)
        add_skipped(sweep_dir, p.index, p.overrides, f"{p.label}: {p.problem}")
    return [p for p in points if not p.problem]
