"""Run a table of command lines through the programs' real entries, in one process: a process start per row costs
half a second, and tests/test_bad_inputs.py has a few hundred rows.

    python -m tests.bad_inputs_harness TABLE.json OUT.jsonl

TABLE.json is a list of rows, each {"id", "program" (launch, status, collect or track), "argv", "cwd", "allow"}.
OUT.jsonl gets a line for each row as soon as it has run (the test of a row waits for its line alone, not the
table): its id, its exit code, what it wrote to stdout and stderr (the file descriptors, so that a logger's or a
child's output counts too), every process it tried to start, the children it left, and its time.

Each row runs in a process forked from this one once the programs are imported and Hydra has composed the config
once (its caches warm): what a row leaves behind (Hydra's global state, the launcher's patch of Hydra.get_mode for
-m, a logging handler, a lock) goes with that process, and rows run side by side, one a core. The launcher is
called as `python -m pipeline.launch` calls it (mode_from_the_command_line, then run_reporting(main)), less the fork
server it warms up before composing (pipeline.launcher.local.prestart), which is no rank and whose start would cost
a second a row; the other programs as their `sys.exit(main())` does.

A row may start no process but those its "allow" names (a dry run asks git for the pipeline's commit): Python's
audit events see every way to start one (subprocess, os.system, os.posix_spawn, os.exec*, os.fork), and the hook
refuses the rest. An input the launch should have refused then fails its row at once, saying what it would have
started, instead of training, and no shell ever runs a row's value.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

ROW_TIMEOUT_S = 30.0  # a refusal takes a fraction of a second; a row that waits (a FIFO opened) is killed
STARTING = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.fork", "os.forkpty",
            "pty.spawn"}


class Refused(RuntimeError):
    """Raised by the audit hook: the row tried to start a process it may not."""


def children_left() -> list[int]:
    """This process's children that are still there, zombies too (from /proc: psutil is not a dependency)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def program_name(args: tuple) -> str:
    """What a start event runs: its executable's or command's first word, without its folder."""
    first = args[0] if args else ""
    if first is None and len(args) > 1:  # subprocess.Popen's executable, when only its args name it
        first = args[1]
    if isinstance(first, (list, tuple)):
        first = first[0] if first else ""
    if isinstance(first, bytes):
        first = first.decode(errors="replace")
    return os.path.basename(str(first).split()[0]) if str(first).strip() else ""


def run_row(row: dict, out: Path) -> None:
    """In the forked process: the row's program, its output into files, what it started, then its result."""
    started: list[list[str]] = []
    allowed = set(row.get("allow", ()))

    def audit(event: str, args: tuple) -> None:
        if event in STARTING:
            name = program_name(args) if event != "os.fork" else "fork"
            started.append([event, name, repr(args[:2])[:300]])
            if name not in allowed:
                raise Refused(f"{event} {args[:2]!r}: this row may start no process but {sorted(allowed)}")

    stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.chdir(row["cwd"])
    program = row["program"]
    sys.argv = [f"pipeline.{program}", *row["argv"]]
    sys.addaudithook(audit)
    began = time.monotonic()
    try:
        if program == "launch":
            from pipeline import launch

            launch.mode_from_the_command_line(sys.argv[1:])
            launch.run_reporting(launch.main)
            code = 0
        else:
            code = __import__(f"pipeline.{program}", fromlist=["main"]).main(row["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # noqa: BLE001  (what Python does with an exception out of __main__: its trace, exit 1)
        traceback.print_exc()
        code = 1
    took = time.monotonic() - began
    sys.stdout.flush()
    sys.stderr.flush()
    out.write_text(json.dumps({"code": code, "stdout": stdout.read_text(errors="replace"),
                               "stderr": stderr.read_text(errors="replace"), "started": started,
                               "children_left": children_left(), "seconds": round(took, 3)}))


def warm_up(programs: set[str]) -> None:
    """Import the programs and compose the config once (Hydra's compose API: no run, no folder), so that each
    forked row starts where a launch is after its first composition."""
    for program in programs:
        __import__(f"pipeline.{program}")
    if "launch" in programs:
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        with initialize_config_module(config_module="pipeline.conf", version_base="1.3"):
            compose("config", return_hydra_config=True)
        GlobalHydra.instance().clear()


def main(table_path: str, out_path: str) -> None:
    rows = json.loads(Path(table_path).read_text())
    warm_up({row["program"] for row in rows})
    parallel = max(1, len(os.sched_getaffinity(0)))
    scratch = Path(out_path).parent / "rows"  # each row's output and result, kept beside OUT.jsonl to be read
    scratch.mkdir(exist_ok=True)
    running, queue = {}, list(enumerate(rows))
    while queue or running:
        while queue and len(running) < parallel:
            i, row = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)  # the row and whatever it started: one group, killed together if it runs over
                try:
                    run_row(row, scratch / f"{i}.json")
                finally:
                    os._exit(0)
            running[pid] = (i, row, time.monotonic())
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (i, row, since) in running.items():
                if time.monotonic() - since > ROW_TIMEOUT_S:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:  # gone already, to be reaped next
                        pass
            time.sleep(0.005)
            continue
        if pid not in running:  # a grandchild handed to us (we are no subreaper: not expected)
            continue
        i, row, since = running.pop(pid)
        try:
            result = json.loads((scratch / f"{i}.json").read_text())
        except (OSError, ValueError):  # killed (or died) before it had written its result
            result = {"code": None, "stdout": "", "stderr": f"bad_inputs_harness: the row ran past {ROW_TIMEOUT_S:.0f} "
                      "s, or died, before it had an exit code", "started": [], "children_left": [],
                      "seconds": round(time.monotonic() - since, 3)}
        with open(out_path, "a") as results:  # a line at a time: the test of a row reads it at once
            results.write(json.dumps({"id": row["id"], **result}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
