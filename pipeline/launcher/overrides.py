"""A sweep point's value overrides set on plain data: the quick way to each point's config.

Hydra applies a point's value overrides (`trainer.seed=7`) to the composed config, a DictConfig, which the sweep
would copy per point (OmegaConf's deepcopy: 3 to 5 ms for the shipped config, growing with its size) and then turn
into plain data (`to_container`: about 1 ms). Most overrides of a large sweep just change one leaf, whose new value
nothing else reads: the result is then the config of the point's group choice, resolved once into plain data, with
that leaf set to the value OmegaConf would have stored. `PlainBase.apply` does that, taking the value through the
leaf node's own conversion (`"7"` into an int node is 7, `abc` is refused); it says None wherever it cannot be sure
of the same result, and the sweep then composes the point in full, the slow way, which also gives every error its
words.

A change takes the quick way when it is `key=value` (no +, ~ or ++), its value a number, a bool or a string that is
no interpolation, its key a leaf of the config that no interpolation reads (`dataset.seq_len:
${oc.select:model.context_length,64}` reads model.context_length, so `model.context_length=128` is composed in
full), and the config's interpolations are ones whose sources can be read off their text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.types import Override, OverrideType, ValueType
from omegaconf import AnyNode, DictConfig, OmegaConf, ValueNode

from pipeline.config import ConfigError, plain_config

# resolvers whose result depends on nothing but their arguments and the nodes these name; another makes the whole
# config go in full: `hydra:` and a user's own (which may read any node through `_root_`), and `now`, which each
# point's own composition asks again (a config resolved once would have one time for all)
KNOWN_RESOLVERS = frozenset({"oc.select", "oc.env", "oc.decode", "oc.create", "oc.deprecated", "oc.dict.keys",
                             "oc.dict.values", "from_dataset"})
_SEGMENT = re.compile(r"^[\w-]+$")
_PATH = re.compile(r"[\w-]+(?:\.[\w-]+)*")  # a dotted key in an interpolation's text (or a harmless word)
_RESOLVER = re.compile(r"\$\{\s*([^{}:\s]*)\s*:")
_RELATIVE = re.compile(r"(?:\$\{|[:,])\s*\.")  # ${.sibling}, ${..uncle}, ${oc.select:.x}: read relative to the node


class _InFull(Exception):
    """This change cannot be set on plain data with certainty: the point is composed in full."""


def is_plain_change(o: Override) -> bool:
    """`key=value` on a dotted key, the value a number, a bool or a string that OmegaConf stores as it is (no
    interpolation, no escape)."""
    value = o.value() if o.value_type == ValueType.ELEMENT else None
    return (o.type == OverrideType.CHANGE and o.package is None and type(value) in (int, float, bool, str)
            and not (isinstance(value, str) and ("$" in value or "\\" in value))
            and all(_SEGMENT.match(s) for s in o.key_or_group.split(".")))


def commute(changes: list[Override], others: list[Override]) -> bool:
    """Whether the changes can be applied after the point's other value overrides, whatever their order on the
    command line: no change's key is, holds or lies inside one that another override adds, deletes or merges."""
    theirs = [tuple(o.key_or_group.split(".")) for o in others]
    return not any(_overlap(tuple(c.key_or_group.split(".")), key) for c in changes for key in theirs)


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return a[:len(b)] == b or b[:len(a)] == a


def copy_plain(data: Any) -> Any:
    """A copy of plain config data (dicts, lists, values): each point its own, ~100x cheaper than a DictConfig's."""
    if isinstance(data, dict):
        return {k: copy_plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [copy_plain(v) for v in data]
    return data


@dataclass(frozen=True)
class PlainBase:
    """What the points of a group choice that share their other value overrides (+key, ~key, ...) start from: that
    config resolved into plain data once, and the dotted keys its interpolations read; `nodes` is the group choice's
    composed config, whose leaves convert a change's value (the shared overrides touch no key that a change sets:
    commute), kept once for all the group's bases."""

    nodes: DictConfig
    plain: dict
    read: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, cfg: DictConfig, nodes: DictConfig) -> PlainBase | None:
        """None when the config cannot be resolved without Hydra's node (a ${hydra.x} interpolation: ConfigError
        from plain_config), or has an interpolation whose sources its text does not show."""
        texts = list(_interpolations(OmegaConf.to_container(cfg, resolve=False)))
        if not all(_legible(t) for t in texts):
            return None
        try:
            plain = plain_config(cfg)
        except ConfigError:
            return None
        read = {tuple(p.split(".")) for t in texts for p in _PATH.findall(t.replace("[", ".").replace("]", ""))}
        return cls(nodes, plain, tuple(read))

    def apply(self, changes: list[Override]) -> dict | None:
        """The plain config with `changes` set, as OmegaConf would have set them; None if any cannot be set here
        with certainty (the point is then composed in full)."""
        config = copy_plain(self.plain)
        try:
            for c in changes:
                value = self._converted(c)  # which also finds the key's parents, mirrored in the plain data
                *parents, leaf = c.key_or_group.split(".")
                node = config
                for p in parents:
                    node = node[p]
                node[leaf] = value
        except _InFull:
            return None
        return config

    def _converted(self, change: Override) -> Any:
        """The change's value as its leaf's node converts it (its type, its optionality, its flags). _InFull where
        the full composition is to set it: a key that an interpolation reads, a missing key or no plain leaf, or a
        value the node refuses (the full composition then says why, in its own words)."""
        key = tuple(change.key_or_group.split("."))
        if any(_overlap(key, r) for r in self.read):
            raise _InFull
        try:
            parent = self._parent(key)
            target = parent._get_node(key[-1]) if parent is not None else None
            # DictConfig sets a primitive through the node's own _set_value where the node is typed or an AnyNode
            # (else it makes a new node)
            if (isinstance(target, ValueNode) and (target._has_ref_type() or isinstance(target, AnyNode))
                    and not OmegaConf.is_readonly(parent) and not OmegaConf.is_readonly(target)):
                return target.validate_and_convert(change.value())
        except Exception:
            pass
        raise _InFull

    def _parent(self, key: tuple[str, ...]) -> DictConfig | None:
        """The node that holds the key, if every node down to it is a plain DictConfig."""
        node = self.nodes
        for segment in key[:-1]:
            node = node._get_node(segment)
            if not isinstance(node, DictConfig) or node._is_interpolation() or node._is_missing() or node._is_none():
                return None
        return node


def _interpolations(data: Any):
    """Every string of unresolved plain config data that holds an interpolation."""
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, list):
        for v in data:
            yield from _interpolations(v)
    elif isinstance(data, str) and "${" in data:
        yield data


def _legible(text: str) -> bool:
    """Whether an interpolation's text names every key it reads: known resolvers only, no key relative to the node,
    no interpolation inside another (whose result would be a key)."""
    if _RELATIVE.search(text) or any(name not in KNOWN_RESOLVERS for name in _RESOLVER.findall(text)):
        return False
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            if depth and text[i - 1] == "$":
                return False
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
    return True
