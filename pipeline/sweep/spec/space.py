"""A searched sweep's space: the axes a searcher draws from, their ends, and the corners checked before Ray.

Pure: no Ray. For `search.algorithm` other than grid an axis is written as one of

    enc_blocks: [2, 4, 8]                 # a choice among the values
    dec_blocks: {int: [3, 12]}            # an integer range, both ends included
    filter_fraction: {uniform: [0.1, 1]}  # a float range
    lr: {loguniform: [1.0e-4, 1.0e-2]}    # a float range drawn uniformly in log

pipeline.sweep.spec.validate reads each into a tuple (a choice) or a Range; pipeline.sweep.spec.sweep checks both
ends of every range on the base configs, then the low and high corners (every axis at its low end,
then at its high end) as whole points; pipeline.sweep.trials.search turns the axes into Ray Tune domains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vpn.config import type_problem

ALGORITHMS = ("grid", "random", "optuna", "bohb")
RANGE_KINDS = ("int", "uniform", "loguniform")


@dataclass(frozen=True)
class Range:
    """A searched range: kind (int, uniform, loguniform) from low to high, both ends included."""

    kind: str
    low: float
    high: float

    def ends(self) -> tuple[Any, Any]:
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.kind == "int" and (isinstance(value, bool) or int(value) != value):
            return False
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, list[Any]]:
        return {self.kind: [self.low, self.high]}


def read_range(value: Mapping[str, Any]) -> Range:
    """A Range from its spec form {kind: [low, high]}; ValueError says what is wrong."""
    if len(value) != 1 or next(iter(value)) not in RANGE_KINDS:
        forms = "{int: [lo, hi]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}"
        raise ValueError(f"a range is one of {forms}, got {dict(value)!r}")
    kind, ends = next(iter(value.items()))
    if not isinstance(ends, list) or len(ends) != 2:
        raise ValueError(f"{kind}: give [low, high], got {ends!r}")
    if any(type_problem(e, (int, float)) for e in ends):  # no bool, NaN, inf, or int beyond int64
        raise ValueError(f"{kind}: both ends must be finite numbers, got {ends!r}")
    low, high = ends
    if kind == "int" and (int(low) != low or int(high) != high):
        raise ValueError(f"int: both ends must be integers, got {ends!r}")
    if not low < high:
        raise ValueError(f"{kind}: low must be below high, got {ends!r}")
    if kind == "loguniform" and not low > 0:
        raise ValueError(f"loguniform: low must be > 0, got {low!r}")
    if kind == "int":
        return Range(kind, int(low), int(high))
    return Range(kind, float(low), float(high))


def ends(axis: tuple[Any, ...] | Range) -> tuple[Any, ...]:
    """The values of an axis that are checked alone: every value of a choice, both ends of a range."""
    return axis.ends() if isinstance(axis, Range) else tuple(axis)


def corner(axis: tuple[Any, ...] | Range, high: bool) -> Any:
    """An axis at its low (first) or high (last) end."""
    values = ends(axis)
    return values[-1] if high else values[0]


def describe(axes: Mapping[str, tuple[Any, ...] | Range]) -> dict[str, Any]:
    """The space as plain values, by field path: a list for a choice, {kind: [low, high]} for a range."""
    return {path: axis.to_dict() if isinstance(axis, Range) else list(axis) for path, axis in axes.items()}
