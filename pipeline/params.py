"""Load one section of params.yaml into a frozen dataclass.

Every stage reads only its own section (the DVC house style: one params.yaml section per stage), and
every section maps onto one frozen dataclass. A key the dataclass does not know is an error naming the
key and the section, never silently ignored: a typo like `n_trian: 5` must not fall back to a default.
Values of the simple field types (int, float, bool, str, and `X | None` of those) are type-checked
here; range checks belong to each dataclass's `__post_init__`, which sees the values first-hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vpn.config import type_problem

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")
# What a params file or a sweep spec may hold: no real one comes near. Deeper nesting ends in Python's
# recursion limit inside the YAML parser, and a few aliases of aliases (a "billion laughs") expand to
# billions of values in whatever walks the result (a deep copy, json.dumps).
MAX_DEPTH = 32
MAX_VALUES = 100_000


class ParamsError(ValueError):
    """A params file, section or value that a stage cannot run with. The message names the culprit.

    key: the key of the section at fault, where one is (None: the file, or the section as a whole).
    problem: what is wrong, without the message's leading "<source>: " and, where `key` is set,
    without its place: a caller that names places its own way (a sweep spec names the field's path
    in the spec, pipeline.sweep.spec.validate) says the same thing from these two.
    """

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.problem = message if problem is None else problem


def field_named_by(message: str, fields: Collection[str]) -> str | None:
    """The field a config's own error is about, or None.

    A dataclass's __post_init__ starts each message with the field's name (the house convention:
    "lr must be a positive number, got -1", "context=3 must be < seq_len=3"), which is the only
    place that says which field failed.
    """
    first = re.match(r"\w+", message)
    return first.group() if first and first.group() in fields else None


def read_yaml(path: Path) -> Any:
    """The YAML document in the file at `path`, parsed safely (yaml.safe_load) and checked to be small:
    UTF-8, at most MAX_DEPTH levels deep and MAX_VALUES values with every alias expanded.

    Raises ParamsError whose `problem` says what is wrong in one sentence without the file (callers
    name the file their own way).
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); save it as UTF-8"
        raise ParamsError(f"{path} {problem}", problem=problem) from None
    except OSError as e:
        problem = f"cannot be read: {e.strerror or e}"
        raise ParamsError(f"{path} {problem}", problem=problem) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = f"is not valid YAML{where}: {e.problem or e.context}"
        raise ParamsError(f"{path} {problem}", problem=problem) from None
    except yaml.YAMLError as e:
        problem = f"is not valid YAML: {' '.join(str(e).split())}"
        raise ParamsError(f"{path} {problem}", problem=problem) from None
    except RecursionError:  # the parser recurses once per level of nesting
        problem = f"is nested deeper than {MAX_DEPTH} levels"
        raise ParamsError(f"{path} {problem}", problem=problem) from None
    problem = _too_big(data)
    if problem:
        raise ParamsError(f"{path} {problem}", problem=problem)
    return data


def _too_big(data: Any) -> str | None:
    """Why `data` is too deep or too large (every alias counted each time it is used), or None."""
    stack, seen = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"is nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple)):
            children = list(value)
        else:
            continue
        seen += len(children)
        if seen > MAX_VALUES:
            return f"holds more than {MAX_VALUES:,} values (aliases of aliases that expand without end?)"
        stack.extend((child, depth + 1) for child in children)
    return None


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Parse a params.yaml file into its top-level mapping (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    try:
        data = read_yaml(path)
    except ParamsError as e:
        raise ParamsError(f"params file {path} {e.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The runtime types a field annotation admits, or None when this helper does not check it."""
    simple = (bool, int, float, str, type(None))
    if annotation in simple:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(a in simple for a in args):
            return tuple(args)
    return None


def _check_type(value: Any, allowed: tuple[type, ...], where: str, key: str) -> Any:
    """Return `value` (ints promoted to float for float fields) or raise naming `where` (key's place)."""
    problem = type_problem(value, allowed)  # bools are not numbers, numbers are finite, ints fit an int64
    if problem:
        raise ParamsError(f"{where} {problem}", key=key, problem=problem)
    if isinstance(value, int) and not isinstance(value, bool) and int not in allowed:
        return float(value)
    return value


def section_from_mapping(cls: type[T], mapping: Any, section: str, source: str = "params") -> T:
    """Build the frozen dataclass `cls` from the mapping of one params section.

    Unknown keys raise ParamsError naming the key and the section; keys left out take the dataclass
    defaults (a field without a default must be given); simple field types are checked; the
    dataclass's own validation errors (ValueError/TypeError) come back as ParamsError with the
    section named. `source` only labels messages (usually the params file's path). The error's
    `key` is the key at fault: the first unknown one, the mistyped one, or the field a dataclass's
    own error names.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        problem = f"section '{section}' must be a mapping, got {type(mapping).__name__}"
        raise ParamsError(f"{source}: {problem}", problem=problem)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ParamsError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))} in section '{section}'; known keys: {known}",
            key=str(unknown[0]),
            problem=f"unknown key; known keys: {known}",
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        problem = f"section '{section}' is missing key(s) {', '.join(missing)}"
        raise ParamsError(f"{source}: {problem}", problem=problem)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        allowed = _allowed_types(hints.get(key))
        where = f"{source}: {section}.{key}"
        values[key] = _check_type(value, allowed, where, key) if allowed else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        key = field_named_by(str(e), fields)
        problem = str(e) if key else f"section '{section}': {e}"
        raise ParamsError(f"{source}: section '{section}': {e}", key=key, problem=problem) from e


def load_section(cls: type[T], section: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """Read `path` and build `cls` from its `section` (a missing section is an error)."""
    params = read_params(path)
    if section not in params:
        raise ParamsError(f"params file {path} has no section '{section}'")
    return section_from_mapping(cls, params[section], section, source=str(path))


def stage_argparser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the `--params PATH` option every stage takes (default ./params.yaml)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        help="params file to read this stage's section from (default: %(default)s)",
    )
    return parser
