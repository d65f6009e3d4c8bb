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

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


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


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Parse a params.yaml file into its top-level mapping (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    with path.open() as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ParamsError(f"params file {path} is not valid YAML: {e}") from e
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
    # bool is a subclass of int in Python; `n_train: true` must not pass as 1.
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif value is None and type(None) in allowed or isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    problem = f"must be {names}, got {value!r} ({type(value).__name__})"
    raise ParamsError(f"{where} {problem}", key=key, problem=problem)


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
