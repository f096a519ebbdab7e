"""A `_target_`'s definition read from its module's source, not imported: the launch imports no torch (it runs on
login nodes), yet a misspelt class, a keyword its constructor does not take or a class that is not a model should
be refused before any job is submitted, not by every rank minutes later.

    definition(target)      the class or function the dotted path names (Found), MISSING where its module has no
                            such name, or None where the source cannot tell (a compiled module, a lazy module's
                            __getattr__, a decorated function, too many files to follow)
    signature_of(found)     its parameters (Signature), or None where they cannot be read without running it
    is_module_class(found)  whether a class derives from torch.nn.Module: True, False, or None (cannot tell)
    returns_nothing(found)  whether a function never returns a value (no `return x`, no `yield`)

Whatever the source cannot tell is left to the ranks, which import the target and report a failure as the config
key's (pipeline.targets). Every answer here is one the import would give, so nothing is refused that would build.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Any, Union

from pipeline.checks import ConfigError

# what a class's body may bind that changes what calling it takes, otherwise than by a plain `def __init__`
SETTLING = ("__init__", "__new__", "__init_subclass__", "__signature__")
MAX_FILES = 40  # files followed for one target: a lazy package's star imports reach hundreds
MAX_BYTES = 4 << 20  # a source file larger than this is not read
TORCH_MODULE = ("torch.nn.modules.module", "Module")


@dataclass(frozen=True)
class Found:
    """A name's definition: a class or function (its AST node), a module, or something else (a variable)."""

    kind: str  # "class" | "function" | "module" | "other"
    module: str  # the module that defines it (for kind "module": the module itself)
    path: str = ""
    node: Union[ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, None] = None
    in_class: bool = False  # a class's attribute (a method), not a module's

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.node.lineno}" if self.node is not None else self.path


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
Lookup = Union[Found, _Missing, None]


@dataclass(frozen=True)
class Signature:
    """What a callable takes: by keyword (`names`), how many positionally, which have no default."""

    names: tuple[str, ...]  # taken by keyword
    positional: tuple[str, ...]  # taken by position, in order
    required: tuple[str, ...]
    var_positional: bool
    var_keyword: bool


@dataclass
class _Namespace:
    """A module's top-level names as its source binds them (in `if`/`try` blocks too), its star imports, and
    whether it makes names the source does not show (a module __getattr__, sys.modules replaced, globals())."""

    path: str
    package: str  # what relative imports are relative to
    bindings: dict[str, list[tuple[ast.stmt, bool]]]  # each binding, and whether it runs unconditionally
    stars: list[str]
    dynamic: bool
    imports: list[tuple[str, int]]  # the modules it imports unconditionally, with the line
    moves_path: bool = False  # it changes sys.path, so what it imports may be found only then


def find_module(dotted: str):
    """The module spec `import dotted` would find, found without running any package's code: each level is
    looked up in its parent's search path through the finders on sys.meta_path (so editable installs count),
    the way the import system does, but nothing is executed. None if not found."""
    spec = None
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            spec = sys.modules[name].__spec__
            continue
        if depth == 1:
            spec = importlib.util.find_spec(name)  # a top-level name: finding it imports nothing
        elif spec is None or spec.submodule_search_locations is None:
            return None  # the parent is a plain module: no submodules
        else:
            path = spec.submodule_search_locations
            spec = next((s for f in sys.meta_path if hasattr(f, "find_spec")
                         and (s := f.find_spec(name, path)) is not None), None)
        if spec is None:
            return None
    return spec


def module_part(target: str) -> int:
    """How many of a dotted target's parts name its module: the longest prefix that is one (0: none is); the
    rest are attributes."""
    parts = target.split(".")
    return next((n for n in range(len(parts) - 1, 0, -1) if find_module(".".join(parts[:n]))), 0)


class _Budget:
    def __init__(self) -> None:
        self.files = 0


def definition(target: str) -> Lookup:
    """The class or function `target` names (its longest prefix that is a module, then attributes)."""
    parts, depth = target.split("."), module_part(target)
    if not depth:
        return None
    budget = _Budget()
    found: Lookup = Found("module", ".".join(parts[:depth]))
    for attribute in parts[depth:]:
        found = _attribute(found, attribute, budget)
        if not isinstance(found, Found):
            return found
    return found


def _attribute(owner: Found, name: str, budget: _Budget) -> Lookup:
    if owner.kind == "module":
        return _lookup(owner.module, name, budget)
    if owner.kind == "class":
        return _class_attribute(owner, name, budget)
    return None


@functools.lru_cache(maxsize=256)
def _namespace(module: str) -> _Namespace | None:
    spec = find_module(module)
    path = getattr(spec, "origin", None) if spec is not None else None
    if not path or not path.endswith(".py"):
        return None  # compiled, built in, or a namespace package: its names are not in a source
    try:
        if os.path.getsize(path) > MAX_BYTES:
            return None
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None  # the import reports it, with the key (pipeline.targets)
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    space = _Namespace(path, package, {}, [], False, [])
    _bind(tree.body, space)
    return space


def _bind(body: list[ast.stmt], space: _Namespace, top: bool = True) -> None:
    """Record the names `body` binds; `top`: run unconditionally at import (not in an if/try block)."""
    for stmt in body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            space.bindings.setdefault(stmt.name, []).append((stmt, top))
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if top:
                space.imports += [(_absolute(stmt, space.package), stmt.lineno)] if isinstance(stmt, ast.ImportFrom) \
                    else [(alias.name, stmt.lineno) for alias in stmt.names]
            for alias in stmt.names:
                if alias.name == "*":
                    space.stars.append(_absolute(stmt, space.package))
                else:
                    bound = alias.asname or alias.name.split(".")[0]
                    space.bindings.setdefault(bound, []).append((stmt, top))
        elif isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)) or \
                type(stmt).__name__ == "TryStar":
            for block in ("body", "orelse", "finalbody"):
                _bind(getattr(stmt, block, []), space, top=False)
            for handler in getattr(stmt, "handlers", []):
                _bind(handler.body, space, top=False)
            if isinstance(stmt, (ast.For, ast.With)):
                _bind_targets(stmt, space, top=False)
        else:
            _bind_targets(stmt, space, top)
        if type(stmt).__name__ == "Match":
            space.dynamic = True  # names bound by its patterns
        for node in ast.walk(stmt):
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules" or \
                    isinstance(node, ast.Call) and \
                    isinstance(node.func, ast.Name) and node.func.id in ("globals", "vars", "locals", "setattr",
                                                                        "exec") or \
                    isinstance(node, (ast.Global, ast.NamedExpr)) or \
                    isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    "sys.modules" in ast.unparse(node.value):
                space.dynamic = True  # sys.modules[__name__] = a lazy module, globals().update(...), `global X`
            space.moves_path |= isinstance(node, ast.Attribute) and node.attr in ("path", "addsitedir") and \
                isinstance(node.value, ast.Name) and node.value.id in ("sys", "site") or \
                isinstance(node, ast.Name) and node.id in ("__path__", "extend_path")
    space.dynamic |= "__getattr__" in space.bindings  # a lazy module's, however bound (lazy_loader's attach)


def _bind_targets(stmt: ast.stmt, space: _Namespace, top: bool) -> None:
    """The names an assignment (a for loop's, a with's) binds: plain names and unpacked ones, not `X.attr = ...`."""
    targets = list(getattr(stmt, "targets", None) or [t for t in (getattr(stmt, "target", None),) if t is not None])
    targets += [item.optional_vars for item in getattr(stmt, "items", []) if item.optional_vars is not None]
    while targets:
        target = targets.pop()
        if isinstance(target, ast.Name):
            space.bindings.setdefault(target.id, []).append((stmt, top))
        elif isinstance(target, (ast.Tuple, ast.List)):
            targets += target.elts
        elif isinstance(target, ast.Starred):
            targets.append(target.value)


def _absolute(stmt: ast.ImportFrom, package: str) -> str:
    if not stmt.level:
        return stmt.module or ""
    base = package.split(".")
    base = base[:len(base) - stmt.level + 1] if stmt.level > 1 else base
    return ".".join([*base, *([stmt.module] if stmt.module else [])])


def _lookup(module: str, name: str, budget: _Budget) -> Lookup:
    budget.files += 1
    if budget.files > MAX_FILES:
        return None
    space = _namespace(module)
    if space is None:
        return None
    bindings = space.bindings.get(name)
    if bindings:
        last, top = bindings[-1]
        if len(bindings) > 1 and not top:  # bound in an if/else or a try: it exists, which one cannot be told
            return Found("other", module, space.path)
        return _bound(module, space, name, last, budget)  # the last one run (an @overload's implementation)
    unknown = space.dynamic
    for star in space.stars:  # before a submodule of the name: `from .alexnet import *` binds alexnet the function
        found = _lookup(star, name, budget)
        if isinstance(found, Found):
            return None if find_module(f"{module}.{name}") else found
        unknown |= found is None
    if find_module(f"{module}.{name}"):
        return None if unknown else Found("module", f"{module}.{name}")
    return None if unknown else MISSING


def _bound(module: str, space: _Namespace, name: str, stmt: ast.stmt, budget: _Budget) -> Lookup:
    if isinstance(stmt, ast.ClassDef):
        return Found("class", module, space.path, stmt)
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return Found("function", module, space.path, stmt)
    if isinstance(stmt, ast.Import):
        alias = next(a for a in stmt.names if (a.asname or a.name.split(".")[0]) == name)
        return Found("module", alias.name if alias.asname else name)
    if isinstance(stmt, ast.ImportFrom):
        alias = next(a for a in stmt.names if (a.asname or a.name) == name)
        source = _absolute(stmt, space.package)
        found = _lookup(source, alias.name, budget)
        if find_module(f"{source}.{alias.name}"):  # a submodule, unless the package binds that name itself
            return Found("module", f"{source}.{alias.name}") if found is MISSING else None
        return None if found is MISSING else found  # a broken import is the import's to report
    return Found("other", module, space.path)


def _class_attribute(owner: Found, name: str, budget: _Budget) -> Lookup:
    """A name in a class's body, or in its bases' (followed while they can be read); None, never MISSING, where
    it is not found: a class gets attributes in ways a source does not show (a decorator, `Net.build = ...` after
    the class, a base's __init_subclass__)."""
    for stmt in owner.node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == name:
            return Found("class" if isinstance(stmt, ast.ClassDef) else "function", owner.module, owner.path, stmt,
                         in_class=True)
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return Found("other", owner.module, owner.path)
    bases = _bases(owner, budget)
    if bases is None:
        return None
    for base in bases:
        found = _class_attribute(base, name, budget)
        if found is not None:
            return found
    return None


def _bases(cls: Found, budget: _Budget) -> list[Found] | None:
    """A class's bases as definitions (object's, none), or None where one cannot be read (a metaclass, a base
    made by a call, one from a compiled module)."""
    if cls.node.keywords:
        return None  # metaclass=..., or keywords for __init_subclass__
    bases = []
    space = _namespace(cls.module)
    for expr in cls.node.bases:
        if isinstance(expr, ast.Name) and expr.id == "object":
            continue
        if isinstance(expr, ast.Name) and space is not None and len(space.bindings.get(expr.id, [])) > 1:
            return None  # which binding the class statement saw depends on where it stands
        found = _expression(cls.module, expr, budget)
        if not isinstance(found, Found) or found.kind != "class" or found.node.decorator_list or \
                not _plain_body(found.node):
            return None  # a dataclass or attrs base, or one whose body a source does not settle
        bases.append(found)
    return bases


def _plain_body(cls: ast.ClassDef) -> bool:
    """A class body of plain definitions and assignments: no method bound by an if/try or an assignment
    (`__init__ = _init`), no __new__, no __init_subclass__ (which may change what subclasses take)."""
    for stmt in cls.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if stmt.name in SETTLING and stmt.name != "__init__":
                return False
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(not isinstance(t, ast.Name) or t.id in SETTLING for t in targets):
                return False
        elif not isinstance(stmt, (ast.Expr, ast.Pass, ast.ClassDef)):
            return False
    return True


def _expression(module: str, expr: ast.expr, budget: _Budget) -> Lookup:
    """What a name or dotted name in `module` refers to (`Base`, `nn.Module`, `torch.nn.Module`)."""
    if isinstance(expr, ast.Name):
        return _lookup(module, expr.id, budget)
    if isinstance(expr, ast.Attribute):
        owner = _expression(module, expr.value, budget)
        return _attribute(owner, expr.attr, budget) if isinstance(owner, Found) else None
    return None


def signature_of(found: Found) -> Signature | None:
    """The parameters a call of `found` takes: a function's own (less `self`/`cls` of a method), a class's
    __init__ (its own, or the first base's that has one, through single inheritance), or object's (none)."""
    if found.kind == "function":
        return _parameters(found.node, found.in_class)
    if found.kind != "class" or found.node.decorator_list or not _plain_body(found.node):
        return None  # a dataclass, a class a decorator changes, or one whose __init__ a source does not settle
    budget, cls = _Budget(), found
    while True:
        names = {s.name: s for s in cls.node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if "__init__" in names:
            return _parameters(names["__init__"], method=True)
        bases = _bases(cls, budget)
        if bases is None or len(bases) > 1:
            return None
        if not bases:
            return Signature((), (), (), False, False)  # object's: takes nothing
        cls = bases[0]


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> Signature | None:
    """A function's parameters; a method's as called on its class (a classmethod's less `cls`, an __init__'s less
    `self`); None for a plain method called on its class, or a function a decorator may change (functools.wraps,
    a registry's)."""
    decorators = [d.id if isinstance(d, ast.Name) else None for d in node.decorator_list]
    if any(d not in ("staticmethod", "classmethod") for d in decorators) or \
            method and not decorators and node.name != "__init__":
        return None
    a = node.args
    positional = [p.arg for p in (*a.posonlyargs, *a.args)]
    if method and "staticmethod" not in decorators:
        positional = positional[1:]
    defaults = len(a.defaults)
    required = list(positional[:len(positional) - defaults] if defaults else positional)
    required += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    by_keyword = [p for p in positional if p not in {q.arg for q in a.posonlyargs}] + [p.arg for p in a.kwonlyargs]
    return Signature(tuple(by_keyword), tuple(positional), tuple(required), a.vararg is not None,
                     a.kwarg is not None)


def is_module_class(found: Found, budget: _Budget | None = None) -> bool | None:
    """Whether a class derives from torch.nn.Module, by its bases as the sources name them."""
    budget = budget or _Budget()
    if (found.module, found.node.name) == TORCH_MODULE:
        return True
    if any(isinstance(s, ast.FunctionDef) and s.name == "__new__" for s in found.node.body):
        return None  # it may make something else than itself
    bases = _bases(found, budget)
    if bases is None:
        return None
    answers = [is_module_class(base, budget) for base in bases]
    return True if True in answers else None if None in answers else False


def returns_nothing(found: Found) -> bool:
    """A function whose body has no `return <value>` and no `yield` (nested functions and classes aside): it
    returns None, whatever it is called with."""
    if found.node.decorator_list:
        return False

    def walk(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(node, (ast.Yield, ast.YieldFrom)) or isinstance(node, ast.Return) and \
                    node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
                return True
            if walk(ast.iter_child_nodes(node)):
                return True
        return False

    return not walk(found.node.body)


# ---------------------------------------------------------------------------------------------- checking a config
@dataclass(frozen=True)
class Passes:
    """What the pipeline gives a key's target besides its config: `positional` arguments first (an optimizer's
    parameters, a schedule's optimizer), any of `keywords` the target takes (a model's num_classes from the
    dataset), and what it must make: "model" (a torch.nn.Module), "value" (not None), or anything. With
    `object_called`, a class is built with its config alone and the object it makes is what gets the positional
    arguments (a collate_fn's batch)."""

    positional: int = 0
    keywords: tuple[str, ...] = ()
    makes: str = ""
    object_called: bool = False
    standard_library: bool = True  # a target in Python's standard library may be right for this key


def check_target(key: str, target: Any) -> None:
    """A `_target_` names a class or function in a module that can be imported here (its longest importable
    prefix is the module; the rest are attributes, which check_definition reads). Raises ConfigError naming the
    key."""
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}={target!r} is not allowed; give a dotted path such as mypackage.models.Net")
    parts = target.split(".")
    if not module_part(target):
        raise ConfigError(f"{key}={target}: no module of it can be imported here ({parts[0]!r} is not installed "
                          f"and not on PYTHONPATH); install the package that holds it or add its folder to PYTHONPATH")


def check_target_node(key: str, node: Any, passes: Passes) -> None:
    """A `_target_` config of a key that is not a group (loader.collate_fn): a mapping whose `_target_`'s module
    can be found, its definition checked."""
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{key}={node!r} is not allowed; give a config with a `_target_` (e.g. "
                          f"{key}._target_=mypackage.module.function, with _partial_: true for a function)")
    check_target(f"{key}._target_", node["_target_"])
    check_definition(key, node, passes)


HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def check_definition(key: str, node: dict, passes: Passes) -> None:
    """A config's `_target_` (a dict with one, the module found) checked against its source, with every nested
    `_target_` in its values: the attribute exists, the config's keys are arguments it takes, what it needs is
    given, and what it makes can be what the key needs. Raises ConfigError naming the key; where the source
    cannot tell, the ranks will."""
    target = node["_target_"]
    top = target.split(".")[0]
    if not passes.standard_library and _standard_library(top) and target != "functools.partial":
        raise ConfigError(f"{key}._target_={target} is in Python's standard library ({top}), which makes no "
                          f"{key}; give the class or function of yours (or of a library) that makes one")
    _check_imports(key, target)
    found = definition(target)
    if found is MISSING:
        raise ConfigError(_missing(key, target))
    if isinstance(found, Found):
        _check_made(key, target, found, passes)
        partial = node.get("_partial_") is True and not passes.positional and not passes.keywords
        positional = 0 if passes.object_called and found.kind == "class" else passes.positional
        _check_call(key, node, found, positional + len(node.get("_args_") or ()), passes.keywords, partial)
    if node.get("_recursive_") is False:
        return  # the target instantiates its nested configs itself, with arguments of its own
    for name, value in node.items():
        for nested_key, nested in _nested_targets(f"{key}.{name}", value):
            check_target(f"{nested_key}._target_", nested["_target_"])
            check_definition(nested_key, nested, Passes())


def _check_imports(key: str, target: str) -> None:
    """The target's module imports, unconditionally, only packages that are installed here: one that is not fails
    its import on every rank (ModuleNotFoundError), whatever the target. Only the top-level name is looked for
    (a submodule may be made by its parent's import: torch._C's, six.moves), and nothing where the module or its
    package moves the search path."""
    module = ".".join(target.split(".")[:module_part(target)])
    space = _namespace(module)
    packages = [_namespace(".".join(module.split(".")[:n])) for n in range(1, module.count(".") + 1)]
    if space is None or any(p is not None and p.moves_path for p in [space, *packages]):
        return
    for imported, line in space.imports:
        imported = imported.split(".")[0]
        if imported and not find_module(imported):
            raise ConfigError(f"{key}._target_={target}: its module {module} ({space.path}, line {line}) imports "
                              f"{imported}, which is not installed here (the import would fail with "
                              "ModuleNotFoundError on every rank); install it, or add its folder to PYTHONPATH")


def _standard_library(top: str) -> bool:
    """Whether the module `import top` finds is Python's own (not a user's package of the same name)."""
    if top not in sys.stdlib_module_names:
        return False
    spec = find_module(top)
    origin = getattr(spec, "origin", None) or ""
    return origin in ("built-in", "frozen") or origin.startswith(sysconfig.get_paths()["stdlib"])


def _nested_targets(key: str, value: Any):
    if isinstance(value, dict):
        if isinstance(value.get("_target_"), str):
            yield key, value
        else:
            for name, inner in value.items():
                yield from _nested_targets(f"{key}.{name}", inner)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _nested_targets(f"{key}[{i}]", inner)


def _missing(key: str, target: str) -> str:
    """`key._target_=a.b.C`: a.b has no C, with the names it has that come close."""
    parts = target.split(".")
    depth = module_part(target)
    owner = definition(".".join(parts[:-1])) if len(parts) - depth > 1 else Found("module", ".".join(parts[:depth]))
    names, where = [], ""
    if isinstance(owner, Found) and owner.kind == "module" and (space := _namespace(owner.module)) is not None:
        names, where = list(space.bindings), f" ({space.path})"
    elif isinstance(owner, Found) and owner.kind == "class":
        names, where = [s.name for s in owner.node.body if isinstance(s, (ast.FunctionDef, ast.ClassDef))], \
            f" ({owner.where})"
    close = difflib.get_close_matches(parts[-1], names, n=3)
    return (f"{key}._target_={target}: {'.'.join(parts[:-1])}{where} has no {parts[-1]}"
            + (f"; did you mean {' or '.join('.'.join(parts[:-1] + [c]) for c in close)}?" if close else ""))


def _check_made(key: str, target: str, found: Found, passes: Passes) -> None:
    if found.kind == "module":
        raise ConfigError(f"{key}._target_={target} is a module, not a class or function; name the class or "
                          "function in it that makes the object")
    if passes.makes == "model" and found.kind == "class" and is_module_class(found) is False:
        raise ConfigError(f"{key}._target_={target} is a class that does not derive from torch.nn.Module "
                          f"({found.where}): the pipeline trains an nn.Module; give a subclass of torch.nn.Module "
                          "or a function that returns one")
    if passes.makes and found.kind == "function" and returns_nothing(found):
        raise ConfigError(f"{key}._target_={target} returns nothing ({found.where}: no `return` with a value), "
                          f"so the {key} it makes would be None; return the object it builds")


def _check_call(key: str, node: dict, found: Found, positional: int, keywords: tuple[str, ...],
                partial: bool) -> None:
    """The config's keys are arguments the target takes; what it needs is in the config or given by the
    pipeline (the first `positional`, any of `keywords`). `partial`: the rest comes later (`_partial_: true`)."""
    signature = signature_of(found)
    if signature is None:
        return
    target = node["_target_"]
    given = [k for k in node if k not in HYDRA_KEYS]
    if not signature.var_keyword:
        for name in given:
            if name not in signature.names:
                close = difflib.get_close_matches(name, signature.names, n=1)
                raise ConfigError(f"{key}.{name}={node[name]!r}: {target} takes no argument {name!r} "
                                  f"({found.where}; it takes: {', '.join(signature.names) or 'none'})"
                                  + (f"; did you mean {key}.{close[0]}?" if close else ""))
    if positional > len(signature.positional) and not signature.var_positional:
        raise ConfigError(f"{key}._target_={target} takes {len(signature.positional)} positional argument(s) "
                          f"({found.where}), and the pipeline passes {positional}")
    if partial:
        return
    passed = set(signature.positional[:positional])
    lacking = [name for name in signature.required if name not in passed | set(given) | set(keywords)]
    if lacking:
        first = signature.positional[:positional]
        passed_as = f" (the pipeline passes its first {positional} argument(s) by position, here {', '.join(first)})" \
            if first else ""
        raise ConfigError(f"{key}._target_={target} needs {', '.join(lacking)} ({found.where}), which neither the "
                          f"config nor the pipeline gives{passed_as}; set {key}.{lacking[0]}")
