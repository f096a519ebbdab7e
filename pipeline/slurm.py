"""What the pipeline knows of Slurm, in one torch-free place that the launcher and the job both use:

    names and values    what may reach an sbatch script (a plain token each: no whitespace, quote, `$`, `;` or
                        newline), the options the pipeline sets itself, those that would break a point's one
                        folder and one job
    rendezvous ports    the range a job's rendezvous port is drawn from, and the port of a job id
    host lists          Slurm's compressed node lists (node[1,3-4]) expanded
    its commands        what `scontrol` says of the cluster (MaxArraySize) and of a job (the nodes it was kept
                        off), whether `sbatch --test-only` would take a script, the jobs' states as squeue and sacct
                        say, and the requeue a job asks for itself after its checkpoint

Submitting (through submitit) stays with the launcher (pipeline.launcher.slurm); reading a job's environment with
the job (pipeline.job.env).
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipeline.checks import ConfigError

DEFAULT_MAX_ARRAY = 1001  # Slurm's default MaxArraySize
EXIT_REQUEUED = 75  # EX_TEMPFAIL: a rank stopped on purpose, to be continued by the requeued job

# ------------------------------------------------------------------------------------------ names and values
# characters Slurm names and values use; no whitespace, quotes, `$`, `;` or newlines
_SAFE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]]+$")
_SAFE_TEXT = "letters, digits and _ . , : @ % + = / - [ ]"
_SAFE_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]&|()*!]+$")
_MEM = re.compile(r"^[0-9]+[KMGT]?B?$")


def mem_bytes(mem: str) -> int:
    """sbatch --mem in bytes: a number with an optional unit, K, M (the default), G or T."""
    digits = mem.rstrip("B").rstrip("KMGT")
    unit = mem.rstrip("B")[len(digits):] or "M"
    return int(digits) * 1024 ** "KMGT".index(unit) * 1024
_OPTION = re.compile(r"^[a-z][a-z0-9-]+$")  # a long option's name (single letters are short options' aliases)
# options the pipeline sets itself from the config; sbatch_extra may not override them
_OWN = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "time", "partition", "account", "qos",
        "constraint", "exclusive", "job-name", "output", "error", "signal", "open-mode", "requeue", "exclude"}
# options that would break one folder and one job (or array task) per point, or the ranks' shape
_BREAKING = {"array", "wrap", "chdir", "ntasks", "ntasks-per-core", "ntasks-per-socket", "ntasks-per-gpu",
             "gpus-per-task", "export", "export-file", "input", "hold", "test-only", "parsable", "wait"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_slurm_values(c: Any) -> None:
    """Every cluster value that reaches the sbatch script is a plain token. Raises ConfigError naming the key."""
    for key, value, pattern, allowed in (("partition", c.partition, _SAFE, _SAFE_TEXT),
                                         ("account", c.account, _SAFE, _SAFE_TEXT), ("qos", c.qos, _SAFE, _SAFE_TEXT),
                                         ("constraint", c.constraint, _SAFE_CONSTRAINT, _SAFE_TEXT + " & | ( ) * !")):
        if value is not None and not pattern.match(value):
            raise ConfigError(f"cluster.{key}={value!r} is not allowed: use {allowed}")
    if c.mem is not None and not _MEM.match(c.mem):
        raise ConfigError(f"cluster.mem={c.mem!r} is not allowed: give a size such as 16G, 4000M or 64000")
    if c.time < 1:
        raise ConfigError(f"cluster.time={c.time} is not allowed: minutes, >= 1")
    if c.cpus_per_task is not None and c.cpus_per_task < 1:
        raise ConfigError(f"cluster.cpus_per_task={c.cpus_per_task} is not allowed: >= 1 or null")
    if c.array_parallelism is not None and c.array_parallelism < 1:
        raise ConfigError(f"cluster.array_parallelism={c.array_parallelism} is not allowed: >= 1 or null")
    for key, value in c.sbatch_extra.items():
        if key in _BREAKING:
            raise ConfigError(f"cluster.sbatch_extra.{key} is not allowed: every point is its own job (or array task) "
                              "with its own folder and the ranks nodes x cluster.tasks_per_node, which these "
                              f"options would change: {', '.join(sorted(_BREAKING))}")
        if not _OPTION.match(str(key)) or key in _OWN:
            raise ConfigError(f"cluster.sbatch_extra key {key!r} is not allowed: an sbatch long option name "
                              f"(lowercase, dashes) other than the ones set from the config: {', '.join(sorted(_OWN))}")
        if value is not True and not _SAFE.match(str(value)):
            raise ConfigError(f"cluster.sbatch_extra.{key}={value!r} is not allowed: use {_SAFE_TEXT}, "
                              "or true for a flag")
    for line in c.setup:
        if "\n" in line or "\r" in line:
            raise ConfigError("cluster.setup: give one shell line per list item (no embedded newlines)")
    check_node_names("cluster.exclude", c.exclude)


def check_node_names(key: str, names: list[str]) -> None:
    """Slurm node names or host lists (`node[1-3]`), each a plain token."""
    for name in names:
        if not _SAFE.match(str(name)):
            raise ConfigError(f"{key}: {name!r} is not allowed: give Slurm node names or host lists (node7, "
                              f"node[1-3]) made of {_SAFE_TEXT}")


def check_script_text(key: str, value: str) -> None:
    """A value that reaches an sbatch script (a job name, a folder): no newline or other control character,
    which would end the line it is on."""
    if _CONTROL.search(value):
        raise ConfigError(f"{key}={value!r} is not allowed: a newline or other control character in it would end a "
                          "line of the sbatch script (and of the logs) that it reaches")


def excluded(exclude: list[str], avoid: tuple[str, ...] = ()) -> list[str]:
    """The nodes a submission keeps off (`--exclude`): cluster.exclude's and those the sweep avoids (its bad-node
    list), each once."""
    return sorted({*exclude, *avoid})


# ---------------------------------------------------------------------------------------- rendezvous ports
# The rendezvous port, derived from the job id (as submitit's helpers.TorchDistributedEnvironment does), below
# Linux's default range of ephemeral ports (32768-60999, net.ipv4.ip_local_port_range): a port in that range can be
# held by any outgoing connection of the node (Slurm's, a previous job's), and the store then fails with EADDRINUSE
# (seen in CI with submitit's range, 20000-60000). Local debug mode draws from the same range for the same reason.
PORT_RANGE = (20000, 32767)


def job_id_from_env() -> str | None:
    """This job as squeue and the manifest name it: an array task's `<array>_<task>`, else the job id (None
    outside Slurm)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def port_for_job(job_id: str) -> int:
    return random.Random(job_id).randint(*PORT_RANGE)


# A job step that runs a point of its own (a search's trial) restarts when its point does, not when its job does:
# the worker gives the step its point's count here, which the job reads before SLURM_RESTART_COUNT
RESTART_COUNT_VAR = "PIPELINE_RESTART_COUNT"


# ------------------------------------------------------------------------------------------------ host lists
def expand_job_ids(job: str) -> list[str]:
    """Slurm folds an array's pending tasks into one id: 123_[4-6,9%2] -> 123_4, 123_5, 123_6, 123_9."""
    base, sep, tasks = job.partition("_[")
    if not sep:
        return [job]
    out = []
    for part in tasks.rstrip("]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        out += [f"{base}_{t}" for t in range(int(first), int(last or first) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's host list: qnode[1,3-4],gpu7 -> qnode1, qnode3, qnode4, gpu7."""
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            names += [f"{prefix}{i:0{width}d}" for i in range(int(first), int(last or first) + 1)]
    return names


# -------------------------------------------------------------------------------------------- its commands
def excluded_nodes(job_id: str | None) -> list[str]:
    """The nodes Slurm was told to keep this job off (its ExcNodeList), as `scontrol show job` says; empty where
    it cannot say."""
    if not job_id:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = re.search(r"\bExcNodeList=(\S+)", out)
    if not found or found.group(1) == "(null)":
        return []
    return expand_hostlist(found.group(1))


@functools.cache
def max_array_size() -> int:
    """The cluster's MaxArraySize (task ids run 0 .. MaxArraySize - 1); Slurm's default where it cannot say. Asked
    at most once per launch: the preflight and the submission split arrays alike."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY


def would_accept(script: str) -> str | None:
    """Whether Slurm would take this sbatch script (`sbatch --test-only`): None, or its reason not to."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: submit from a Slurm login node (or use cluster=local)"
    with tempfile.TemporaryDirectory(prefix="pipeline-preflight-") as tmp:
        path = Path(tmp) / "job.sbatch"
        path.write_text(script)
        try:
            out = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "sbatch --test-only did not answer within 60 s (is slurmctld reachable? is SLURM_CONF right?)"
    if out.returncode != 0:
        return (out.stderr.strip() or out.stdout.strip()).replace("sbatch: error: ", "")
    return None


def job_states(job_ids: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({job: live state} from squeue, {job: every state in its history, oldest first} from sacct), each for
    every job and array task of `job_ids` in one call, however many points the sweep has."""
    if not job_ids:
        return {}, {}
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))  # an array's id stands for all of its tasks
    live = {}
    # -r: one line per array task, pending ones too
    for line in (_run(["squeue", "-h", "-r", "--states=all", "-j", ids, "-o", "%i|%T"]) or "").splitlines():
        job, _, state = line.partition("|")
        for one in expand_job_ids(job.strip()):
            live[one] = state.strip()
    history: dict[str, list[str]] = {}
    # -D lists each requeued run of a job as its own row
    for line in (_run(["sacct", "-n", "-P", "-X", "-D", "-j", ids, "-o", "JobID,State"]) or "").splitlines():
        job, _, state = line.partition("|")
        for one in expand_job_ids(job.strip()):
            history.setdefault(one, []).append(state.split()[0] if state.strip() else "UNKNOWN")
    return live, history


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def requeue(job_id: str) -> None:
    """Put the job back in the queue (`scontrol requeue`): a job of a plain sbatch, with no submitit to do it, after
    its checkpoint. Raises where scontrol fails."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
