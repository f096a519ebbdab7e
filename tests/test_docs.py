"""The docs stay true to the repository: README.md and docs/*.md link only to files that exist, every page in docs/
is reachable from README, each page opens with a command, README keeps the two commands and the test command that
CI runs, and every config key the docs name in inline code is a key of the schema (so renaming or removing a key
without the docs fails here). Reads files only: no training, no Hydra composition."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import known_keys
from tests.conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES]
KEYS = set(known_keys())
TOPS = sorted({k.split(".")[0] for k in KEYS if "." in k})  # the config's nodes: trainer, loader, cluster, ...

# Keys named in inline code that are not schema keys, and why. A key of a shipped config file of an open
# `_target_` (one with no schema) names that file, and must stay one of its top-level keys.
NOT_SCHEMA_KEYS = {
    "scheduler.warmup_steps": ("warmup_cosine is an open target (pipeline.workloads.schedules.with_warmup): its "
                               "keys are its config file's", "conf/scheduler/warmup_cosine.yaml"),
    "scheduler.then": ("the schedule after warmup_cosine's warm-up, a key of that open target's config file",
                       "conf/scheduler/warmup_cosine.yaml"),
}
# schema keys whose value is a mapping of the user's own keys (`+cluster.sbatch_extra.mail-type=END`)
OPEN_KEYS = {"cluster.sbatch_extra", "param_groups.function", "loader.collate_fn"}
# spans that name a file, not a key (`model.pt`, `trainer.py`, `ddp.sbatch`)
FILE_SUFFIXES = ("py", "pt", "sbatch", "json", "yaml", "log", "txt", "png", "md", "sh")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
KEY = re.compile(r"^[+~]*(?P<key>(?:%s)\.[A-Za-z_*][\w*-]*(?:\.[A-Za-z_*][\w*-]*)*)" % "|".join(TOPS))


def prose(path: Path) -> str:
    """A page without its fenced code blocks: what is left is prose, inline code and links."""
    return FENCE.sub("", path.read_text())


def inline_code(path: Path) -> list[str]:
    """The page's inline code spans, each on one line."""
    text = re.sub(r"``[^`]+``", "", prose(path))  # none in these pages; keep them from pairing single backticks
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"`[^`]*`", "", prose(path))
    targets = LINK.findall(text) + REF_LINK.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto:


def key_of(span: str) -> str | None:
    """The config key a span names (`trainer.batch_size`, `+cluster.sbatch_extra.mail-type=END`,
    `${dataset.seq_len}`, `ddp.bucket_cap_mb >= 1`), or None when it names none."""
    span = span.strip("\"'")
    span = re.sub(r"^\$\{(.*)\}$", r"\1", span)
    m = KEY.match(span)
    if not m or m["key"].rsplit(".", 1)[1] in FILE_SUFFIXES:
        return None
    return m["key"]


def mentions() -> dict[str, list[str]]:
    """Every key named in inline code, with the pages that name it."""
    found: dict[str, list[str]] = {}
    for page in DOCS:
        for span in inline_code(page):
            if (key := key_of(span)) is not None:
                found.setdefault(key, []).append(str(page.relative_to(REPO)))
    return found


def known(key: str) -> bool:
    if key in KEYS or key in NOT_SCHEMA_KEYS:
        return True
    if key.endswith(".*"):  # `ddp.*`: the keys under a node
        return any(k.startswith(key[:-1]) for k in KEYS)
    return any(key.startswith(open_key + ".") for open_key in OPEN_KEYS)


def test_the_pages_exist():
    assert README.exists() and PAGES, "README.md and docs/*.md"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file(page):
    bad = []
    for target in relative_links(page):
        if "#" in target:
            bad.append(f"{target}: links point at files, not anchors (headings get renamed)")
        elif not (page.parent / target).is_file():
            bad.append(f"{target}: no such file")
    assert not bad, f"{page.relative_to(REPO)}: " + "; ".join(bad)


def test_every_page_in_docs_is_linked_from_readme():
    linked = {(README.parent / t).resolve() for t in relative_links(README)}
    assert not [p.name for p in PAGES if p.resolve() not in linked]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_opens_with_a_command(page):
    blocks = [line for line in page.read_text().splitlines() if line.strip() and not line.startswith("# ")]
    assert blocks and blocks[0].startswith("```"), f"{page.name}: a command block before any prose"


def test_every_config_key_named_in_the_docs_is_a_schema_key():
    found = mentions()
    assert len(found) > 50, "the key mentions were not found: is the span pattern still right?"
    unknown = {key: pages for key, pages in found.items() if not known(key)}
    assert not unknown, f"keys the schema does not have (pipeline.config.known_keys()): {unknown}"


def test_the_exceptions_are_still_needed_and_still_true():
    found = mentions()
    assert not [k for k in NOT_SCHEMA_KEYS if k not in found], "an exception no page needs: remove it"
    assert not [k for k in NOT_SCHEMA_KEYS if k in KEYS], "an exception that is a schema key now: remove it"
    for key, (_, config_file) in NOT_SCHEMA_KEYS.items():
        if config_file:
            assert key.split(".", 1)[1] in yaml.safe_load((REPO / config_file).read_text()), (key, config_file)
    assert OPEN_KEYS <= KEYS


def test_readme_keeps_the_two_commands_and_the_test_command_ci_runs():
    text = README.read_text()
    assert "make run " in text and "make test " in text
    assert "make test" in (REPO / ".ci/run").read_text()
    assert re.search(r"`\.ci/run`[^.]*runs `make test`", " ".join(text.split())), "README: .ci/run runs make test"
    assert len(text.splitlines()) <= 110, "README fits on two screens"


def test_the_key_pattern_reads_spans_as_the_docs_write_them():
    assert key_of("trainer.batch_size") == "trainer.batch_size"
    assert key_of("+cluster.sbatch_extra.mail-type=END") == "cluster.sbatch_extra.mail-type"
    assert key_of("${dataset.seq_len}") == "dataset.seq_len"
    assert key_of("ddp.bucket_cap_mb >= 1") == "ddp.bucket_cap_mb"
    assert key_of("\"cluster.setup=['module load cuda']\"") == "cluster.setup"
    assert key_of("model.pt") is None and key_of("trainer.py") is None
    assert key_of("pipeline.workloads.schedules.with_warmup") is None and key_of("nodes=1,2,4") is None
    assert not known("trainer.batch_sise") and not known("cluster.sbatch_extras.x")
