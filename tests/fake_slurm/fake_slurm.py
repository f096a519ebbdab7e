"""A fake Slurm for tests on machines without one (no root, no daemons): `sbatch`, `squeue`, `sacct`, `scontrol`
and `srun` on PATH, as submitit's own tests fake them. Jobs live in a JSON file ($FAKE_SLURM_STATE); every call
is appended to $FAKE_SLURM_CALLS (one JSON argv per line), so a test can count them. Nothing runs: a test sets
the states it wants with `set_state` and reads the scripts sbatch was given.

    FAKE_SLURM_MAX_NODES      sbatch --test-only rejects a job asking for more nodes (default 4) than this less the
                              ones its --exclude names
    FAKE_SLURM_MAX_ARRAY      scontrol show config's MaxArraySize (default 1001)
    FAKE_SRUN_EXIT            srun's exit status (default 1: nothing runs)
    FAKE_SRUN_PYXIS           srun --help lists pyxis's --container-image
"""

import contextlib
import fcntl
import json
import os
import re
import sys
from pathlib import Path

def _state() -> Path:
    return Path(os.environ.get("FAKE_SLURM_STATE", "/tmp/fake-slurm.json"))


def load() -> dict:
    return json.loads(_state().read_text()) if _state().is_file() else {"next_id": 1000, "jobs": {}}


def save(state: dict) -> None:
    tmp = _state().with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state())


@contextlib.contextmanager
def changing():
    """The state, read and written back with no other change in between: a launch submits its arrays at once, and
    slurmctld takes one submission at a time."""
    with open(_state().with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load()
        yield state
        save(state)


def option(script: str, name: str) -> str | None:
    found = re.search(rf"^#SBATCH --{name}(?:=(.*))?$", script, re.M)
    return None if found is None else (found.group(1) or "")


def tasks_of(spec: str | None) -> list[int]:
    """`0-9%4` -> 0..9; `1,3,5-6` -> 1, 3, 5, 6; no array -> [None] (a plain job)."""
    if spec is None:
        return [None]
    ids = []
    for part in spec.split("%")[0].split(","):
        a, _, b = part.partition("-")
        ids += list(range(int(a), int(b or a) + 1))
    return ids


def sbatch(args: list[str]) -> int:
    script_path = args[-1]
    script = Path(script_path).read_text()
    nodes = int(option(script, "nodes") or 1)
    excluded = [n for n in (option(script, "exclude") or "").split(",") if n]
    if "--test-only" in args:
        if nodes > int(os.environ.get("FAKE_SLURM_MAX_NODES", 4)) - len(excluded):
            print("sbatch: error: Batch job submission failed: Requested node configuration is not available",
                  file=sys.stderr)
            return 1
        print("sbatch: Job 99999 to start at 2026-01-01T00:00:00 using 1 processors on nodes node1",
              file=sys.stderr)
        return 0
    with changing() as state:
        job_id = str(state["next_id"])
        state["next_id"] += 1
        state["jobs"][job_id] = {"script": script, "nodes": nodes,
                                 "tasks": {str(t): ["PENDING"] for t in tasks_of(option(script, "array"))}}
    print(job_id if "--parsable" in args else f"Submitted batch job {job_id}")
    return 0


def job_rows(ids: list[str]):
    """(printed id, history) of every task of the asked jobs ("123" asks for all of an array's tasks)."""
    state = load()
    for asked in ids:
        base, _, task = asked.partition("_")
        job = state["jobs"].get(base)
        if job is None:
            continue
        for t, history in job["tasks"].items():
            if task and t != task:
                continue
            yield (base if t == "None" else f"{base}_{t}"), history


def squeue(args: list[str]) -> int:
    ids = args[args.index("-j") + 1].split(",") if "-j" in args else list(load()["jobs"])
    live = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED"}
    for printed, history in job_rows(ids):
        if history[-1] in live:
            print(f"{printed}|{history[-1]}")
    return 0


def sacct(args: list[str]) -> int:
    ids = args[args.index("-j") + 1].split(",")
    for printed, history in job_rows(ids):
        for state in history:
            print(f"{printed}|{state}")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "config"]:
        print(f"MaxArraySize            = {os.environ.get('FAKE_SLURM_MAX_ARRAY', '1001')}")
        return 0
    if args[:1] == ["requeue"]:
        return 0
    print(f"fake scontrol: {' '.join(args)} is not faked", file=sys.stderr)
    return 1


def set_state(job_id: str, *history: str) -> None:
    """For tests: `job_id` ("123" or "123_4") went through these states, the current one last."""
    base, _, task = job_id.partition("_")
    with changing() as state:
        state["jobs"][base]["tasks"][task or "None"] = list(history)


def install(bin_dir: Path, state: Path, calls: Path) -> dict:
    """Put the fake commands in `bin_dir`; returns the environment variables that make them the ones found."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "squeue", "sacct", "scontrol", "srun"):
        (bin_dir / name).write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} {name} \"$@\"\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_STATE": str(state), "FAKE_SLURM_CALLS": str(calls)}


def calls(path: Path, name: str | None = None) -> list[list[str]]:
    """For tests: the calls made so far (of one command, if named)."""
    made = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [c for c in made if name is None or c[0] == name]


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]  # the command's name, then its arguments (see install)
    calls = os.environ.get("FAKE_SLURM_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(json.dumps([name, *args]) + "\n")
    commands = {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scontrol": scontrol}
    if name == "srun":  # a step: the exit status a test asks for (FAKE_SRUN_EXIT); with FAKE_SRUN_PYXIS, the
        # plugin's options in its help, as pyxis adds them
        if args == ["--help"] and os.environ.get("FAKE_SRUN_PYXIS"):
            print("      --container-image=[USER@][REGISTRY#]IMAGE[:TAG]|PATH")
            return 0
        return int(os.environ.get("FAKE_SRUN_EXIT", "1"))
    if name not in commands:
        print(f"fake {name}: not faked (nothing runs on the fake Slurm)", file=sys.stderr)
        return 1
    return commands[name](args)


if __name__ == "__main__":
    sys.exit(main())
