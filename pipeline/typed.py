"""From plain data (JSON, a composed config's container) to typed dataclasses, every value's type checked: the one
decoder of the project, for the run folder's files (pipeline.rundir) and the run configuration (pipeline.config).

    decoder(tp)               the run folder's files: keys the class does not know are left alone (a newer
                              writer's), the instance is filled directly (no __init__: reading 10,000 records
                              takes under 2 s), `schema_version` is checked
    decoder(tp, strict=True)  a config: an unknown key is an error that lists the known ones, and the class is
                              built through its __init__, so its __post_init__ checks the values

A field marked `flat()` holds a dataclass whose own fields sit in the parent's object: the code hands typed parts
to each other while the file stays one flat object. A SchemaError names the field that failed
(`ranks[1].busy_time_median_s: expected a number, got str`) and keeps the value and what was expected, for a
config's message (`trainer.batch_size='abc' is not allowed; it must be an integer`).

Imports no torch: the launcher and the collector run on login nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable

SCHEMA_VERSION = 1  # every record written since the project began; a reader for the old layout stays when it changes
EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class SchemaError(ValueError):
    """Plain data that does not match its dataclass; the message names the field."""

    def __init__(self, problem: str, path: list | None = None, value: Any = None, expected: str | None = None):
        self.problem, self.path, self.value, self.expected = problem, path or [], value, expected
        super().__init__(problem)

    @property
    def where(self) -> str:
        return dotted(self.path)

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem


def dotted(path: list) -> str:
    """Where a value is, as a key: ["ranks", 1, "step_times_s"] -> ranks[1].step_times_s."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def flat(**kwargs) -> Any:
    """A dataclass field whose own fields are written into, and read from, its parent's JSON object."""
    return dataclasses.field(metadata={"flat": True}, **kwargs)


def encode(obj: Any) -> Any:
    """A dataclass (and what it holds) as plain data, `flat()` fields merged into their parent's object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = encode(getattr(obj, f.name))
            if f.metadata.get("flat"):
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _exact(tp: type) -> Callable[[Any], Any]:
    def decode(value):
        if type(value) is not tp:
            raise SchemaError(f"expected {EXPECTED[tp]}, got {_kind(value)}", value=value, expected=EXPECTED[tp])
        return value
    return decode


def _number(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise SchemaError(f"expected a number, got {_kind(value)}", value=value, expected="a number")


def _numbers(value: Any) -> list:
    """A list of numbers, checked in C: records carry thousands of step times, and the collector reads 10,000
    records in under 2 s. fsum raises TypeError on anything that is not a number (bools pass, as 0 and 1)."""
    if type(value) is not list:
        raise SchemaError(f"expected a list of numbers, got {_kind(value)}", value=value, expected="a list of numbers")
    try:
        math.fsum(value)
    except TypeError:
        bad = next(i for i, v in enumerate(value) if type(v) not in (int, float))
        raise SchemaError(f"expected a number, got {_kind(value[bad])}", [bad], value[bad], "a number") from None
    return value


def _in_field(path_part: Any, decode: Callable[[Any], Any], value: Any) -> Any:
    try:
        return decode(value)
    except SchemaError as e:
        e.path.insert(0, path_part)
        raise


def _first_failure(items, decode_item: Callable[[Any], Any]) -> None:
    """Decode item by item to name the one that failed (the fast path decodes all at once)."""
    for key, value in items:
        _in_field(key, decode_item, value)


@functools.cache
def decoder(tp: Any, strict: bool = False) -> Callable[[Any], Any]:
    """A function that checks a value against the type `tp` and converts it; built once per type."""
    if tp is Any:
        return lambda value: value
    if tp is float:
        return _number
    if tp in EXPECTED:
        return _exact(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp, strict)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        decode_inner = decoder(inner, strict)
        return lambda value: None if value is None else decode_inner(value)
    if origin is list:
        return _numbers if args[0] is float else _list_decoder(decoder(args[0], strict))
    if origin is dict:
        return _dict_decoder(args[0], decoder(args[1], strict))
    raise TypeError(f"no decoder for {tp!r}")


def _list_decoder(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    def decode_list(value):
        if type(value) is not list:
            raise SchemaError(f"expected a list, got {_kind(value)}", value=value, expected="a list")
        try:
            return [item(v) for v in value]
        except SchemaError:
            _first_failure(enumerate(value), item)
            raise
    return decode_list


def _dict_decoder(key_type: type, item: Callable[[Any], Any]) -> Callable[[Any], dict]:
    def decode_dict(value):
        if type(value) is not dict:
            raise SchemaError(f"expected an object, got {_kind(value)}", value=value, expected="a mapping")
        try:
            if key_type is int:  # JSON keys are strings; an int-keyed dict is written with str(key)
                return {int(k): item(v) for k, v in value.items()}
            return {k: item(v) for k, v in value.items()}
        except SchemaError:
            _first_failure(value.items(), item)
            raise
        except ValueError:  # int(k)
            raise SchemaError(f"expected integer keys, got {list(value)}") from None
    return decode_dict


def _dataclass_decoder(cls: type, strict: bool) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    flats = [(f.name, decoder(hints[f.name], strict)) for f in fields if f.metadata.get("flat")]
    named = [(f.name, decoder(hints[f.name], strict)) for f in fields if not f.metadata.get("flat")]
    flat_keys = {n for f in fields if f.metadata.get("flat") for n in _keys(hints[f.name])}
    known = {n for n, _ in named} | flat_keys
    required = [f.name for f in fields if not f.metadata.get("flat") and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    factories = [(f.name, f.default_factory) for f in fields if f.default_factory is not dataclasses.MISSING]
    versioned = "schema_version" in defaults and not strict

    def decode(value):
        if type(value) is not dict:
            raise SchemaError(f"expected an object, got {_kind(value)}", value=value, expected="a mapping")
        if versioned and value.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"schema_version {value.get('schema_version')!r}, this reader reads {SCHEMA_VERSION}")
        if strict and (unknown := [k for k in value if k not in known]):
            raise SchemaError(f"{unknown[0]!r} is not a key here; the keys are: {', '.join(sorted(known))}",
                              [unknown[0]], expected="a known key")
        missing = [name for name in required if name not in value]
        if missing:
            raise SchemaError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        try:
            values = {name: decode_field(value[name]) for name, decode_field in named if name in value}
        except SchemaError:
            for name, decode_field in named:  # again, field by field, to name the one that failed
                if name in value:
                    _in_field(name, decode_field, value[name])
            raise
        values.update({name: decode_part(value) for name, decode_part in flats})
        if strict:  # through __init__: __post_init__ checks the values
            return cls(**values)
        # The fields are checked, and these classes have no __post_init__: fill the instance directly, since a
        # frozen dataclass's __init__ sets each field through object.__setattr__, which is most of the cost of
        # reading 10,000 records.
        obj = object.__new__(cls)
        obj.__dict__.update({**defaults, **{name: make() for name, make in factories}, **values})
        return obj
    return decode


def _keys(tp: type) -> list[str]:
    """The JSON keys a flat part's dataclass contributes to its parent's object."""
    hints = typing.get_type_hints(tp)
    return [n for f in dataclasses.fields(tp) if f.init
            for n in (_keys(hints[f.name]) if f.metadata.get("flat") else [f.name])]
