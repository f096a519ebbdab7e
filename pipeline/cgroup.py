"""This process's cgroups, as the kernel lists them (/proc/self/cgroup) and exposes them (/sys/fs/cgroup: v1's
hierarchy per controller, v2's unified one, or both in a hybrid): the counters a rank's health check and the local
launcher's diagnosis read. Where nothing can be read (another OS, a container without the files), None: the callers
then say less, never fail."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

ROOT = Path("/sys/fs/cgroup")


def folders(controller: str) -> Iterator[Path]:
    """The folders of this process's cgroups where `controller`'s files may be ("cpu", "memory"), in the kernel's
    order: v1's `ROOT/<controller>/<path>`, v2's `ROOT/<path>` (and a hybrid's `ROOT/unified/<path>`)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2's unified hierarchy
            yield ROOT / relative
            yield ROOT / "unified" / relative
        elif controller in controllers.split(","):
            yield ROOT / controller / relative


def counter(controller: str, files: tuple[str, ...], key: str) -> int | None:
    """The first readable `key` of a flat-keyed file among `files` (`nr_throttled 5` lines) in this process's
    cgroups for `controller`; None where none can be read."""
    for folder in folders(controller):
        for name in files:
            try:
                counts = dict(line.split() for line in (folder / name).read_text().splitlines() if line.strip())
                return int(counts[key])
            except (OSError, KeyError, ValueError):
                continue
    return None


def throttled_periods() -> int | None:
    """CFS periods this process's CPU cgroup was throttled in, so far: a CPU quota at work."""
    return counter("cpu", ("cpu.stat",), "nr_throttled")


def oom_kills() -> int | None:
    """Processes the kernel's OOM killer has killed in this process's memory cgroup, so far (v2's memory.events,
    v1's memory.oom_control)."""
    return counter("memory", ("memory.events", "memory.oom_control"), "oom_kill")
