"""Slurm through submitit: one job per sweep point, its allocation taken from that point's config.

`sbatch_parameters` is the one mapping from config to sbatch options; submitit renders them (its own
whitelisted, quoted `#SBATCH` lines). Values that reach the script are checked here first, since a newline in a
quoted `#SBATCH` value would still start a new shell line. `cluster.setup` is the one place for raw shell.
Nothing here imports torch: it runs on login nodes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from pipeline.config import ConfigError, RunConfig
from pipeline.rundir import LOG_DIR, SRUN_LOG_PATTERN, SUBMITIT_DIR

# characters Slurm names and values use; no whitespace, quotes, `$`, `;` or newlines
_SAFE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]]+$")
_SAFE_TEXT = "letters, digits and _ . , : @ % + = / - [ ]"
_SAFE_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]&|()*!]+$")
_MEM = re.compile(r"^[0-9]+[KMGT]?B?$")
_OPTION = re.compile(r"^[a-z][a-z0-9-]*$")
# options the pipeline sets itself from the config; sbatch_extra may not override them
_OWN = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "time", "partition", "account", "qos",
        "constraint", "exclusive", "job-name", "output", "error", "signal", "open-mode", "requeue"}
SIGNAL_DELAY_S = 90  # Slurm sends the preemption / time-limit signal this long before the end


def check_slurm_values(run: RunConfig) -> None:
    """Every config value that reaches the sbatch script is a plain token. Raises ConfigError naming the key."""
    c = run.cluster
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
    for key, value in c.sbatch_extra.items():
        if not _OPTION.match(str(key)) or key in _OWN:
            raise ConfigError(f"cluster.sbatch_extra key {key!r} is not allowed: an sbatch long option name "
                              f"(lowercase, dashes) other than the ones set from the config: {', '.join(sorted(_OWN))}")
        if value is not True and not _SAFE.match(str(value)):
            raise ConfigError(f"cluster.sbatch_extra.{key}={value!r} is not allowed: use {_SAFE_TEXT}, "
                              "or true for a flag")
    for line in c.setup:
        if "\n" in line or "\r" in line:
            raise ConfigError("cluster.setup: give one shell line per list item (no embedded newlines)")


def sbatch_parameters(run: RunConfig, job_name: str, log_dir: Path) -> dict:
    """submitit's SlurmExecutor parameters for one point (its allocation, requeue on preemption, fail fast,
    per-rank logs in `log_dir`)."""
    c = run.cluster
    params = {
        "job_name": job_name,
        "nodes": run.nodes,
        "ntasks_per_node": c.tasks_per_node,
        "time": c.time,
        "signal_delay_s": SIGNAL_DELAY_S,
        "setup": list(c.setup),
        # one failing rank ends the whole step instead of leaving the others waiting in a collective; each rank's
        # stdout and stderr go to POINT_DIR/logs/node{N}-rank{R}.log, appended to across requeues
        "srun_args": ["--kill-on-bad-exit=1", "--open-mode=append", f"--output={log_dir}/{SRUN_LOG_PATTERN}"],
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **c.sbatch_extra},
    }
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos, "cpus_per_task": c.cpus_per_task,
                "mem": c.mem, "constraint": c.constraint, "gpus_per_node": c.gpus_per_node or None,
                "exclusive": True if c.exclusive else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


class _ScriptWriter(submitit.SlurmExecutor):
    """submitit's executor, used only to write the script: it does not ask for `srun` on PATH (submitit's own
    check for a cluster), so a dry run works where no Slurm is installed."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def make_executor(run: RunConfig, point_dir: Path, job_name: str,
                  kind: type[submitit.SlurmExecutor] = submitit.SlurmExecutor) -> submitit.SlurmExecutor:
    """submitit's files (script, pickles, the batch step's log) go to POINT_DIR/submitit."""
    executor = kind(folder=point_dir / SUBMITIT_DIR, max_num_timeout=3)
    executor.update_parameters(**sbatch_parameters(run, job_name, point_dir / LOG_DIR))
    return executor


def render_sbatch(run: RunConfig, point_dir: Path, job_name: str) -> str:
    """The exact script submitit submits for this point (its job-specific paths keep Slurm's %j pattern)."""
    executor = make_executor(run, point_dir, job_name, kind=_ScriptWriter)
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def preflight(run: RunConfig, job_name: str) -> str | None:
    """Ask Slurm whether it would accept this point (`sbatch --test-only`); the reason if not, else None."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: submit from a Slurm login node (or use cluster=local)"
    with tempfile.TemporaryDirectory(prefix="pipeline-preflight-") as tmp:
        script = Path(tmp) / "job.sbatch"
        script.write_text(render_sbatch(run, Path(tmp), job_name))
        try:
            out = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "sbatch --test-only did not answer within 60 s (is slurmctld reachable? is SLURM_CONF right?)"
    if out.returncode != 0:
        return (out.stderr.strip() or out.stdout.strip()).replace("sbatch: error: ", "")
    return None


class TrainingJob(Checkpointable):
    """What submitit runs on every task. On the preemption / time-limit signal the worker saves a checkpoint at
    a step boundary and then calls submitit's handler, which calls `checkpoint` (inherited: resubmit this same
    call) and requeues the job; the requeued run finds the checkpoint and resumes."""

    def __call__(self, point_dir: str) -> str:
        from pipeline.job.run import run_point  # torch is imported on the compute node only

        return str(run_point(point_dir))


def submit(run: RunConfig, point_dir: Path, job_name: str) -> str:
    """Submit one point; returns the Slurm job id. submitit's files go to POINT_DIR/submitit."""
    (point_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    job = make_executor(run, point_dir, job_name).submit(TrainingJob(), str(point_dir))
    return job.job_id
