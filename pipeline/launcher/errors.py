"""Every launch error is reported in one line: a configuration error (bad input, Hydra's own errors, a folder that
cannot be written) exits 2 naming the key, a failed run exits 1 with its message, printed once. With
HYDRA_FULL_ERROR=1 the full traceback comes first, as Hydra would show it.

Hydra prints the errors of a launch itself (hydra/_internal/utils.py `run_and_report`), as a trace, and exits 1,
and it logs "Error executing job" for an exception out of the task function. So the task function and the sweep
launcher report their own errors (`reported`), and `run_reporting` runs the Hydra entry with Hydra's reporter
letting the rest through, to say them in one line here.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import sys
import traceback
from typing import Callable, NoReturn

from pipeline.config import ConfigError, known_keys
from pipeline.launcher.local import RunFailed
from pipeline.rundir import causes

PROGRAM = "pipeline.launch"


def exit_on_config_error(message: object) -> NoReturn:
    """Bad input ends the launch with the message alone (no traceback) and exit code 2."""
    print(f"{PROGRAM}: configuration error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def reported():
    """Around the launch's own steps: a configuration error or a folder that cannot be written exits 2, a failed
    run exits 1, each with its message once (and Hydra, which never sees them, logs no "Error executing job")."""
    try:
        yield
    except ConfigError as e:
        exit_on_config_error(e)
    except RunFailed as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.filename is None:
            raise
        exit_on_config_error(_file_error(e))


def run_reporting(entry: Callable[[], None]) -> None:
    """Run the Hydra entry (`hydra.main`'s function); Hydra's errors (composition, overrides, a config file's YAML,
    the run folder) exit 2 with one line naming what is wrong. Anything else is a bug: its traceback is the
    report."""
    import hydra._internal.utils as hydra_utils

    report = hydra_utils.run_and_report
    hydra_utils.run_and_report = lambda func: func()
    try:
        entry()
    except RunFailed as e:  # raised through a sweeper of Hydra's (a trial that failed), past `reported`
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        line = one_line(e)
        if line is None:
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        exit_on_config_error(line)
    finally:
        hydra_utils.run_and_report = report


def one_line(e: BaseException) -> str | None:
    """A configuration error said in one line, or None for an exception that is none."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import MarkedYAMLError

    if isinstance(e, AssertionError):
        return _under_null(e)
    if not isinstance(e, (HydraException, OmegaConfBaseException, MarkedYAMLError, ConfigError, OSError, ValueError)):
        return None  # a bug, whatever it happened to be handling: its traceback is the report
    chain = causes(e)
    found = {kind: next((x for x in chain if isinstance(x, kind)), None)
             for kind in (MarkedYAMLError, OSError, MissingConfigException, OverrideParseException, ConfigError)}
    if found[MarkedYAMLError] is not None:
        return _yaml(found[MarkedYAMLError])
    if found[MissingConfigException] is not None:
        return _missing_option(found[MissingConfigException])
    if found[OverrideParseException] is not None:
        x = found[OverrideParseException]
        return f"{x.override}: {_joined(x.message)}"
    if found[ConfigError] is not None:
        return str(found[ConfigError])
    if found[OSError] is not None and found[OSError].filename is not None:
        return _file_error(found[OSError])
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return _hydra(e)
    return None


def _joined(text: str) -> str:
    """Hydra's and OmegaConf's multi-line messages in one line, without their where-in-the-schema lines."""
    kept = []
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith(("full_key:", "reference_type=", "object_type=", "Config search path", "provider=")):
            continue
        if line:
            kept.append(line.rstrip("."))
    return "; ".join(kept)


def _hydra(e: BaseException) -> str:
    text = str(e)
    if text.startswith("Additional config directory"):
        return f"--config-dir: {_joined(text)}"
    missing = re.match(r"Could not override '([^']+)'", text)
    if missing:
        new_key = re.search(r"Key '([^']+)' is not in struct", str(e.__cause__ or ""))
        if new_key and missing.group(1) in known_keys() and new_key.group(1) != missing.group(1).split(".")[-1]:
            # a mapping given a new key: `key={new: value}`
            key = missing.group(1)
            return (f"{key}: its new key {new_key.group(1)!r} needs a + on the command line: "
                    f"+{key}.{new_key.group(1)}=VALUE")
        return _unknown_key(missing.group(1))
    merging = re.match(r"Error merging override (.+)", text)
    cause = e.__cause__
    if merging and cause is not None:
        return f"{merging.group(1).strip()}: {_joined(str(cause))}"
    return _joined(text) + (f": {_joined(str(cause))}" if cause is not None else "")


def _under_null(e: AssertionError) -> str | None:
    """`tracking.mlflow.uri=...` without tracking=[mlflow]: OmegaConf's update asserts on the null node it would
    set a key under (an optional part of the config not chosen) and names no key; its frame holds the key."""
    if "Unexpected type for root: NoneType" not in str(e):
        return None
    tb, key = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "update" and isinstance(tb.tb_frame.f_locals.get("key"), str):
            key = tb.tb_frame.f_locals["key"]
        tb = tb.tb_next
    if key is None:
        return None
    parent, group = key.rpartition(".")[0], key.split(".")[0]
    return (f"{key} is a key of {parent}, which this config does not have (null): choose it first, e.g. "
            f"{group}=[{parent.split('.')[-1]}] for {group}.<name>.<key>")


def _unknown_key(key: str) -> str:
    known = known_keys()
    if key in known:  # a key of another option of its group
        return f"{key} is not a key of the {key.split('.')[0]} chosen here (other options of it have one)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key} is not a key of the config; {hint}(to add a key of your own, prefix it with +)"


def _missing_option(e) -> str:
    """`model=foo`, `+experiment=nope`: the group's options (not the schemas that they extend)."""
    group, _, name = (e.missing_cfg_file or "").rpartition("/")
    options = [o for o in (e.options or _conf_options(group)) if not o.endswith("_schema")]
    if not group:  # the primary config: --config-name's
        return (f"--config-name: {_joined(str(e))}" if "primary config" in str(e) else _joined(str(e)))
    choose = f"choose one of: {', '.join(options)}" if options else "that group has no options"
    return f"{group}={name} is not an option of {group}; {choose}"


def _conf_options(group: str) -> list[str]:
    """The shipped options of a group (Hydra names none for a group of several choices, tracking=[...])."""
    from importlib.resources import files

    try:
        return sorted(p.name[:-5] for p in (files("pipeline.conf") / group).iterdir() if p.name.endswith(".yaml"))
    except (OSError, ValueError):
        return []


def _yaml(e) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
    what = "; ".join(filter(None, [e.context, e.problem]))
    return f"{where}: not valid YAML ({what})"


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def _file_error(e: OSError) -> str:
    if e.errno in UNWRITABLE:
        return (f"{e.filename} cannot be written ({e.strerror}): choose a folder this launch can write "
                "(hydra.run.dir, or hydra.sweep.dir for -m)")
    return f"{e.filename}: {e.strerror}"
