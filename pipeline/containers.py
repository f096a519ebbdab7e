"""The ranks in the cluster's container image: `cluster.container` (docs/containers.md). Torch-free: the launch
uses it on login nodes.

    check_container(c)           the config's values, before anything else (ConfigError naming the key)
    binds(c, run_paths)          what the container sees of the host: the user's mounts, then the sweep folder and
                                 the dataset roots at their own paths
    wrapped(c, binds, gpus)      how a rank's Python is started through the runtime, as its users write it:
                                 pyxis by srun's own --container-* options, Apptainer by `apptainer exec`,
                                 Charliecloud by `ch-run`; every token shell-quoted where it reaches a script
    preflight(c, binds, ...)     before any job is submitted: the image is there, the runtime is on PATH, and the
                                 image's Python imports torch and this project (else the project's source is
                                 bound in and put on PYTHONPATH, said)

A rank in a container cannot requeue its job (`scontrol` is not in the image: pyxis #129, submitit #1601): it
leaves a mark and exits with EXIT_REQUEUED, and the batch script, on the host, requeues the job (pipeline.launcher.
slurm.host_lines). The ranks also find the runtime's name in their environment (IN_CONTAINER).
"""

from __future__ import annotations

import os
import re
import functools
import glob
import json
import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checks import ConfigError, check_choice

log = logging.getLogger(__name__)

RUNTIMES = ("charliecloud", "apptainer", "pyxis")
RUNTIME_COMMAND = {"charliecloud": "ch-run", "apptainer": "apptainer", "pyxis": "srun"}
IN_CONTAINER = "PIPELINE_CONTAINER"  # set to the runtime's name in the ranks' environment
# what a path, an image reference or a runtime option may hold: no whitespace, quotes, `$`, `;`, backquotes or
# newlines (a registry reference has `#` and `:`)
_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-#~]+$")
_TOKEN_TEXT = "letters, digits and _ . , : @ % + = / - # ~"
# a mount's path or a variable's value: Apptainer's --bind and --env, and pyxis's --container-mounts, split lists
# of them at commas
_LISTED = re.compile(r"^[A-Za-z0-9_.:@%+=/\-#~]+$")
_LISTED_TEXT = "letters, digits and _ . : @ % + = / - # ~"
# folders an image's software lives in: a bind over one of them would hide it
SYSTEM_FOLDERS = ("/usr", "/usr/local", "/opt", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/var")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a runtime option that would take the ranks out of the folders they write, or the image away from them
_BREAKING = {"charliecloud": ("--cd", "-c", "--write", "-w", "--unset-env"),
             "apptainer": ("--pwd", "--cleanenv", "-e", "--contain", "-c", "--containall", "-C", "--no-home"),
             "pyxis": ("--container-workdir", "--container-mounts", "--container-image", "--container-name",
                       "--no-container-mount-home")}
IMPORT_CHECK = "import torch, pipeline"


def check_container(c: Any) -> None:
    """`cluster.container`'s values: each a plain token (they reach a script), absolute paths, no mount onto `/`,
    a runtime there is, no option that would break one folder per point. Raises ConfigError naming the key."""
    if c.image is None:
        given = [k for k in ("runtime", "workdir") if getattr(c, k) is not None] + \
            [k for k in ("mounts", "env", "options") if getattr(c, k)]
        if given:
            raise ConfigError(f"cluster.container.{given[0]} is set but cluster.container.image is not; give the "
                              "image the ranks run in, or leave cluster.container alone")
        return
    if c.runtime is None:
        raise ConfigError(f"cluster.container.image={c.image!r} needs cluster.container.runtime; choose one of: "
                          f"{', '.join(RUNTIMES)}")
    check_choice("cluster.container.runtime", c.runtime, RUNTIMES)
    for key, value in (("image", c.image), ("python", c.python), ("workdir", c.workdir)):
        if value is not None and not _TOKEN.match(value):
            raise ConfigError(f"cluster.container.{key}={value!r} is not allowed: use {_TOKEN_TEXT} (it reaches the "
                              "job's script)")
    if c.workdir is not None and not os.path.isabs(c.workdir):
        raise ConfigError(f"cluster.container.workdir={c.workdir!r} is not allowed: give an absolute path")
    for mount in c.mounts:
        source, _, target = str(mount).partition(":")
        target = target or source
        if not _LISTED.match(str(mount)) or str(mount).count(":") > 1:
            raise ConfigError(f"cluster.container.mounts: {mount!r} is not allowed: give HOST_PATH or "
                              f"HOST_PATH:CONTAINER_PATH, made of {_LISTED_TEXT} less ':'")
        if not (os.path.isabs(source) and os.path.isabs(target)):
            raise ConfigError(f"cluster.container.mounts: {mount!r} is not allowed: both paths must be absolute "
                              "(a relative one would be the job's working directory's, on another node)")
        if os.path.normpath(target) == "/":
            raise ConfigError(f"cluster.container.mounts: {mount!r} is not allowed: a mount onto / would hide the "
                              "image")
    for name, value in c.env.items():
        if not _ENV_NAME.match(str(name)):
            raise ConfigError(f"cluster.container.env: {name!r} is not allowed: give a variable's name (letters, "
                              "digits and _, not first a digit)")
        if not _LISTED.match(str(value)):
            raise ConfigError(f"cluster.container.env.{name}={value!r} is not allowed: use {_LISTED_TEXT} (the "
                              "runtimes take lists of them split at commas)")
    for option in c.options:
        if not str(option).startswith("-") or not _TOKEN.match(str(option)):
            raise ConfigError(f"cluster.container.options: {option!r} is not allowed: give the runtime's own options "
                              f"(starting with -), each made of {_TOKEN_TEXT}")
        name = str(option).split("=")[0]
        if name in _BREAKING[c.runtime]:
            raise ConfigError(f"cluster.container.options: {option!r} is not allowed: the pipeline sets where the "
                              f"ranks run and what they see ({', '.join(_BREAKING[c.runtime])}); use "
                              "cluster.container.workdir, mounts or env")


def binds(c: Any, paths: list[str]) -> list[tuple[str, str]]:
    """(host, container) pairs: the user's mounts, then each of `paths` (the sweep folder, the dataset roots,
    this project's source) at its own path, unless one already covers it. Charliecloud mounts its image read-only
    and cannot make a mount point in it: a path the image directory lacks is reached through its deepest folder
    that the image has (the host's /tmp for /tmp/x/y, its /work for /work/x), bound over the image's; broad binds
    first, as ch-run needs them."""
    pairs = [(m.partition(":")[0], m.partition(":")[2] or m.partition(":")[0]) for m in map(str, c.mounts)]
    for path in paths:
        if c.runtime == "charliecloud" and os.path.isdir(c.image):
            path = _present_in(c.image, path)
        if not any(_within(path, host) and host == target for host, target in pairs):
            pairs = [(h, t) for h, t in pairs if not (h == t and _within(h, path))] + [(path, path)]
    # a bind inside another's target after it; otherwise in the order given
    return sorted(pairs, key=lambda pair: sum(_within(pair[1], t) for _, t in pairs if t != pair[1]))


def _present_in(image: str, path: str) -> str:
    """`path`, or its deepest parent folder that the image directory has (never / itself, nor a folder the
    image's software lives in, which the bind would hide)."""
    parts = Path(path).parts
    for n in range(len(parts), 1, -1):
        if os.path.isdir(os.path.join(image, *parts[1:n])):
            folder = str(Path(*parts[:n]))
            if folder in SYSTEM_FOLDERS and folder != path:
                raise ConfigError(f"cluster.container.image={image} has no folder {path} to bind it onto, and "
                                  f"binding the host's {folder} over the image's would hide the image's own "
                                  f"software (Charliecloud mounts its image read-only): make {path} in the image, "
                                  "or bind the folder elsewhere with cluster.container.mounts")
            return folder
    raise ConfigError(f"cluster.container.image={image} has no folder of {path} to bind it onto (Charliecloud "
                      f"mounts its image read-only and cannot make one): make /{parts[1]} in the image, or bind "
                      "the folder elsewhere with cluster.container.mounts")


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


@dataclass(frozen=True)
class Wrapped:
    """A rank's start through the runtime: options for srun (pyxis), and the command that replaces `python`."""

    srun_args: list[str]
    python: list[str]

    @property
    def python_text(self) -> str:
        return shlex.join(self.python)


def wrapped(c: Any, pairs: list[tuple[str, str]], gpus: bool, name: str,
            env: dict[str, str] | None = None, workdir: str | None = None) -> Wrapped:
    """The runtime's own way of running `c.python` in `c.image` with these binds, as its users write it; `name`
    names pyxis's container (a requeued job on the same node reuses it instead of importing the image again);
    `workdir`, where the ranks start without cluster.container.workdir (the launch's folder, as for a job outside
    a container: ch-run would start in /, pyxis in the image's folder; Apptainer starts in the current one)."""
    env = {IN_CONTAINER: c.runtime, **c.env, **(env or {})}
    if c.runtime == "pyxis":  # srun's plugin options; the environment passes through srun
        args = [f"--container-image={c.image}", f"--container-name={name}",
                f"--container-mounts={','.join(f'{h}:{t}' for h, t in pairs)}", *map(str, c.options)]
        if c.workdir or workdir:
            args.append(f"--container-workdir={c.workdir or workdir}")
        return Wrapped(args, ["env", *(f"{k}={v}" for k, v in env.items()), c.python])
    if c.runtime == "apptainer":
        command = ["apptainer", "exec", *(["--nv"] if gpus else []),
                   "--bind", ",".join(f"{h}:{t}" for h, t in pairs), *(["--pwd", c.workdir] if c.workdir else []),
                   *(x for k, v in env.items() for x in ("--env", f"{k}={v}")), *map(str, c.options), c.image,
                   c.python]
        return Wrapped([], command)
    cd = c.workdir or workdir
    command = ["ch-run", *(x for h, t in pairs for x in ("-b", f"{h}:{t}")), *(["--cd", cd] if cd else []),
               *(f"--set-env={k}={v}" for k, v in env.items()), *map(str, c.options), c.image, "--", c.python]
    return Wrapped([], command)


# ---------------------------------------------------------------------------------------------- one run's start
SOURCE_ROOT = str(Path(__file__).resolve().parents[1])  # the folder that holds this project's `pipeline` package


def host_paths(run: Any, sweep_dir: Path | None) -> list[str]:
    """The host folders a run's ranks read or write, bound in at their own paths: the sweep folder, this project's
    source (the ranks run the launcher's own code: point.json is its schema's), the generated datasets' cache, the
    launch's folder (where the ranks start, as a Slurm job does in the folder it was submitted from), the
    dataset's root, data_dir and data_files' folders, and trainer.resume_from's folder."""
    from pipeline.workloads.datasets import cache_dir

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # the launch's folder, where the job starts (a module of the user's there is imported as on the host)
    paths = [*([os.path.abspath(sweep_dir)] if sweep_dir is not None else []), SOURCE_ROOT, str(cache), os.getcwd()]
    node = run.dataset
    get = node.get if isinstance(node, dict) else lambda key: getattr(node, key, None)
    for key in ("root", "data_dir"):
        if isinstance(get(key), str) and os.path.isdir(get(key)):
            paths.append(os.path.abspath(get(key)))
    files = get("data_files")
    for pattern in (files.values() if isinstance(files, dict) else [files]):
        for one in [pattern] if isinstance(pattern, str) else pattern or []:
            if isinstance(one, str) and "://" not in one:
                paths += sorted({os.path.dirname(os.path.abspath(m)) for m in glob.glob(one, recursive=True)})
    if run.trainer.resume_from:
        paths.append(os.path.dirname(os.path.abspath(run.trainer.resume_from)))
    if "/" in paths:
        raise ConfigError("a file directly under / (a dataset's, trainer.resume_from) would bind the host's whole root "
                          "folder into the container: move it into a folder")
    unique = []
    for path in paths:  # a folder inside another bound one is bound with it
        if not any(_within(path, other) for other in unique):
            unique = [u for u in unique if not _within(u, path)] + [path]
    return unique


def start_for(runs: list[Any], sweep_dir: Path | None, name: str) -> Wrapped:
    """How these runs' ranks (one job, or one job array's points: one script) start in their container: the
    binds every point needs, GPUs where asked for, this project's source on PYTHONPATH and the datasets' cache
    where the launch has it."""
    from pipeline.workloads.datasets import cache_dir

    c = runs[0].cluster.container
    paths = [p for run in runs for p in host_paths(run, sweep_dir)]
    return wrapped(c, binds(c, list(dict.fromkeys(paths))), gpus=bool(runs[0].cluster.gpus_per_node), name=name,
                   env={"PYTHONPATH": SOURCE_ROOT, "PIPELINE_CACHE_DIR": str(cache_dir())}, workdir=os.getcwd())


# ch-run refuses to start without $USER (Charliecloud 0.31), which a batch job has only when its submitter had it
USER_LINE = 'export USER="${USER:-$(id -un)}"'


def host_env() -> dict[str, str]:
    """What the runtime itself needs of the host's environment (the local launcher's ranks)."""
    import getpass

    return {"USER": os.environ.get("USER") or getpass.getuser()}


def preflight(run: Any) -> None:
    """Before any job is submitted or rank started: the image is there (a path; a registry reference is the
    runtime's to pull), the runtime is on this machine's PATH (pyxis: srun knows --container-image), and, for
    Charliecloud and Apptainer, the image's Python imports torch and this project (its source bound in) through
    the runtime. A dry run checks the image only. Raises ConfigError naming the key and the fix."""
    c = run.cluster.container
    if c.image is None:
        return
    if c.runtime == "pyxis" and run.cluster.kind != "slurm":
        raise ConfigError("cluster.container.runtime=pyxis runs through srun's plugin: local debug mode cannot use it; "
                          "debug locally with cluster.container.runtime=charliecloud or apptainer and the same image")
    _check_image(c)
    if run.dry_run:
        return
    _check_runtime(c.runtime)
    if c.runtime != "pyxis":
        targets = [node["_target_"] for node in (run.model, run.dataset, run.optimizer, run.scheduler, run.loss)
                   if isinstance(node, dict)]
        _check_imports(start_for([run], None, "preflight"), c, targets)


def _check_image(c: Any) -> None:
    reference = "://" in c.image or (c.runtime == "pyxis" and not c.image.startswith(("/", ".")))
    if reference:  # docker://..., library://..., a registry's image: the runtime pulls it
        return
    path = Path(c.image)
    if not path.exists():
        raise ConfigError(f"cluster.container.image={c.image} does not exist here; give the image's path (an image "
                          "directory or SquashFS file for Charliecloud, a .sif or sandbox folder for Apptainer, a "
                          ".sqsh file or a registry reference for pyxis)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"cluster.container.image={c.image} cannot be read by this user")
    if c.runtime == "charliecloud" and path.is_dir() and not (path / "bin").exists():
        raise ConfigError(f"cluster.container.image={c.image} is a folder but no image (no bin/ in it); give an "
                          "image directory (ch-convert makes one) or a SquashFS file")
    if not (path.is_dir() or path.is_file()):
        raise ConfigError(f"cluster.container.image={c.image} is no file or folder (a FIFO, a socket or a device)")


@functools.cache
def _check_runtime(runtime: str) -> None:
    command = RUNTIME_COMMAND[runtime]
    if shutil.which(command) is None:
        raise ConfigError(f"cluster.container.runtime={runtime}: `{command}` is not on this machine's PATH, where "
                          "the launch checks the image; install it, or load its module before launching")
    if runtime == "pyxis":
        helped = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=30).stdout
        if "--container-image" not in helped:
            raise ConfigError("cluster.container.runtime=pyxis: this cluster's srun has no --container-image "
                              "(the pyxis plugin is not loaded here); use apptainer or charliecloud")


_imports_checked: set[str] = set()


def _check_imports(start: Wrapped, c: Any, targets: list[str]) -> None:
    """The image's Python imports torch, this project and the run's own targets (Hydra's get_object: the module,
    then the attribute), through the runtime, once per launch, container and targets."""
    key = f"{start.python_text} {targets}"
    if key in _imports_checked:
        return
    code = (f"{IMPORT_CHECK}, json, sys\nfrom hydra.utils import get_object\nfor t in json.loads(sys.argv[1]):\n"
            "    try:\n        get_object(t)\n    except Exception as e:\n"
            "        while e.__cause__ is not None:\n            e = e.__cause__\n"
            "        sys.exit(f'{t}: {type(e).__name__}: {e}')\n")  # the innermost error, in one line
    try:
        r = subprocess.run([*start.python, "-c", code, json.dumps(targets)], capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, **host_env()})
        said = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1] if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        said = f"{type(e).__name__}: {e}"
    if said:
        runtime_said = said.startswith(RUNTIME_COMMAND[c.runtime])  # "ch-run[123]: error: ..."
        fix = (f"the runtime's own error, from `{start.python_text}`" if runtime_said
               else "install torch, this project's dependencies and your targets' packages in the image (this "
               f"project's own source is bound in from {SOURCE_ROOT} and put on PYTHONPATH)")
        also = f" and the run's targets ({', '.join(targets)})" if targets else ""
        raise ConfigError(f"cluster.container.image={c.image}: its Python ({c.python}, through {c.runtime}) cannot "
                          f"`{IMPORT_CHECK}`{also}: {said}; {fix}")
    _imports_checked.add(key)
    log.info("container: %s through %s imports torch and this project's source, bound in from %s (PYTHONPATH)",
             c.image, c.runtime, SOURCE_ROOT)
