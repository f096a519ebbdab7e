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
OPEN_KEYS = {"cluster.sbatch_extra", "cluster.container.env", "param_groups.function", "loader.collate_fn"}
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


# ------------------------------------------------------------------------------------------ pointers in any text
# Every text of the repository that points somewhere (docs, configs' comments, docstrings, scripts): a pointer to a
# file, to a name in a file, to a module's name or to a section of a page must land on something that is there, so
# moving a file, a class or a section without the pointers that name it fails here.
# (the tests are not among them: they build paths of their own, in temporary folders)
TEXTS = sorted({README, *PAGES, REPO / "Makefile", REPO / "pyproject.toml",
                *(p for top in ("pipeline", "conf", "benchmarks", "slurm", "hydra_plugins")
                  for p in (REPO / top).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh",
                                                                                    ".sbatch"))})
TOPS_OF_THE_TREE = "pipeline|docs|conf|slurm|benchmarks|tests|hydra_plugins"
# a path of the tree (not the tail of another path, nor a pattern), and a name that follows it: `path, Name`
PATH = re.compile(rf"(?<![\w/.$*<>{{}}-])((?:{TOPS_OF_THE_TREE})/[\w/.-]*\w\.(?:py|md|yaml|sh|sbatch))(?![\w/*<>-])"
                  r"(?:`?,? `?([A-Z]\w+)`?(?=[\s,.);`]|$))?")
# a module or a name in one, dotted: pipeline.job.health, pipeline.result.Result
DOTTED = re.compile(r"(?<![\w./-])(pipeline(?:\.\w+)+)")
# a section of a page, by its heading: README, "The two commands"; docs/slurm.md, "Status"
SECTION = re.compile(r"(README(?:\.md)?|docs/[\w-]+\.md),? (?:section )?\"([^\"]+)\"")


def texts_pointing(pattern: re.Pattern):
    for path in TEXTS:
        for line_number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in pattern.finditer(line):
                yield f"{path.relative_to(REPO)}:{line_number}", match


def defines(path: Path, name: str) -> bool:
    """`name` is defined in the module (a class, a function, an assignment), imported into it, or one of the names
    it exports lazily (a key of its table of them)."""
    found = rf"^\s*(?:class|def) {name}\b|^{name}\b[^=\n]*=|^\s*from \S+ import [^\n]*\b{name}\b|[\"']{name}[\"']:"
    return re.search(found, path.read_text(), re.M) is not None


def test_every_file_a_text_points_to_is_there_with_the_name_it_names():
    bad = []
    for where, match in texts_pointing(PATH):
        target, name = REPO / match[1], match[2]
        if not target.is_file():
            bad.append(f"{where}: {match[1]} is not a file of the repository")
        elif name and target.suffix == ".py" and not defines(target, name):
            bad.append(f"{where}: {match[1]} defines no {name}")
    assert not bad, "\n".join(bad)


def module_and_rest(dotted: str) -> tuple[Path | None, list[str]]:
    """The longest prefix of a dotted name that is a module of the tree (its file), and the names after it. conf/ is
    installed as the package pipeline.conf (pyproject's package-dir)."""
    parts = dotted.split(".")
    if parts[:2] == ["pipeline", "conf"]:
        parts = ["conf", *parts[2:]]
    for n in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:n])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[n:]
    return None, parts


def test_every_module_and_name_a_text_names_dotted_is_there():
    bad = []
    for where, match in texts_pointing(DOTTED):
        dotted = match[1].rstrip(".")
        module, rest = module_and_rest(dotted)
        if module is None:
            bad.append(f"{where}: {dotted} is no module of the repository")
        elif rest and not defines(module, rest[0]):
            bad.append(f"{where}: {dotted}: {module.relative_to(REPO)} has no {rest[0]}")
    assert not bad, "\n".join(bad)


def headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in FENCE.sub("", page.read_text()).splitlines() if line.startswith("#")}


def test_every_section_a_text_points_to_is_a_heading_of_its_page():
    bad = []
    for where, match in texts_pointing(SECTION):
        page = README if match[1].startswith("README") else REPO / match[1]
        if not page.is_file() or match[2] not in headings(page):
            bad.append(f"{where}: {match[1]} has no section \"{match[2]}\"")
    assert not bad, "\n".join(bad)


def test_the_pointer_patterns_read_pointers_as_the_texts_write_them():
    assert PATH.search("see pipeline/workloads/models/__init__.py, MLPConfig (the").groups() == (
        "pipeline/workloads/models/__init__.py", "MLPConfig")
    assert PATH.search("defaults in `pipeline/config.py`, `DDPParallelConfig`,").groups() == (
        "pipeline/config.py", "DDPParallelConfig")
    assert PATH.search("$PIPELINE_SLURM_DIR/env.sh") is None and PATH.search("SWEEP_DIR/array-*.sbatch") is None
    assert SECTION.search('see README, "Your model, your data".').groups() == ("README", "Your model, your data")
    assert DOTTED.search("(pipeline.job.health):").group(1) == "pipeline.job.health"
    assert not defines(REPO / "pipeline/rundir.py", "Result") and defines(REPO / "pipeline/result.py", "Result")
