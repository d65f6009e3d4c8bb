"""A sweep's grid: its axes (search), their combinations, the trials they become (Point) and their labels.

Pure: nothing here checks a value or builds a config. pipeline.sweep.spec.validate reads `search` into a
Search, and pipeline.sweep.spec.sweep turns each combination into a Point through VPNConfig and TrainConfig.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vpn.config import PRESETS, TrainConfig, VPNConfig

# Axes that a preset fixes; a grid over them next to `preset` would be ambiguous.
PRESET_FIELDS = ("enc_blocks", "dec_blocks", "filter_fraction")
# Short labels of the main axes in trial names: e4-d6-f0.25.
AXIS_LABELS = {"model.enc_blocks": "e", "model.dec_blocks": "d", "model.filter_fraction": "f"}


@dataclass(frozen=True)
class Point:
    """One trial of the grid: its configs and where it came from.

    index: position in the grid (stable: the run's identity within the sweep).
    label: short readable name (e4-d6-f0.25, full, ...), the MLflow run name.
    axes: the searched values of this point, by field path (model.enc_blocks: 4, ...).
    preset: the preset this point was built from, or the one its depths and widths match exactly.
    """

    index: int
    label: str
    model: VPNConfig
    train: TrainConfig
    axes: Mapping[str, Any]
    preset: str | None
    sample: int = 0


@dataclass(frozen=True)
class Row:
    """A named point of `search.rows`: model and train values set together."""

    name: str
    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Search:
    """The grid, or a searched space. Each axis is a non-empty tuple of values (a choice) or, for a
    searcher (algorithm other than grid), a pipeline.sweep.spec.space.Range.

    algorithm: grid (every combination), random, optuna (TPE), bohb (BOHB); seed: the searcher's seed.
    """

    algorithm: str = "grid"
    seed: int = 0
    preset: tuple[str, ...] = ()
    preset_width_scale: float = 1.0
    model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    train: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    rows: tuple[Row, ...] = ()

    @property
    def searched(self) -> bool:
        """Whether a searcher draws the trials (else the grid's combinations are the trials)."""
        return self.algorithm != "grid"

    def axes(self) -> list[tuple[str, tuple[Any, ...]]]:
        """(path, values) of every axis, in the order they cross: row, preset, model.*, train.*."""
        out: list[tuple[str, tuple[Any, ...]]] = []
        if self.rows:
            out.append(("row", tuple(r.name for r in self.rows)))
        if self.preset:
            out.append(("preset", self.preset))
        out += [(f"model.{k}", v) for k, v in self.model.items()]
        out += [(f"train.{k}", v) for k, v in self.train.items()]
        return out


@dataclass(frozen=True)
class Combination:
    """One combination of the axes' values, before it is checked and built.

    axes: the chosen value of each axis, by path, in the axes' order (row: a row's name).
    model, train: the base values with the preset, the row and the axes' values applied, in that order.
    """

    axes: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    preset: str | None


def combinations(search: Search, model: Mapping[str, Any], train: Mapping[str, Any]) -> Iterator[Combination]:
    """Every combination of the axes over the base `model` and `train` values; the last axis varies fastest."""
    axes = search.axes()
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((p for p, _ in axes), combo))
        m = dict(model)
        t = dict(train)
        preset = chosen.get("preset")
        if preset is not None:
            spec_p = PRESETS[preset]
            m.update(spec_p)
            m["filter_fraction"] = spec_p["filter_fraction"] * search.preset_width_scale
        if "row" in chosen:
            row = next(r for r in search.rows if r.name == chosen["row"])
            m.update(row.model)
            t.update(row.train)
        for path, v in chosen.items():
            if path.startswith("model."):
                m[path[6:]] = v
            elif path.startswith("train."):
                t[path[6:]] = v
        yield Combination(chosen, m, t, preset)


def point_label(chosen: Mapping[str, Any], sample: int | None) -> str:
    """A trial's name from its axes' values: e4-d6-f0.25, full-lr=0.001, rmb-s1 (sample 1); base without axes."""
    parts = []
    for path, v in chosen.items():
        if path in ("preset", "row"):
            parts.append(str(v))
        elif path in AXIS_LABELS:
            parts.append(f"{AXIS_LABELS[path]}{v:g}" if isinstance(v, float) else f"{AXIS_LABELS[path]}{v}")
        else:
            parts.append(f"{path.split('.', 1)[1]}={v:g}" if isinstance(v, float) else f"{path.split('.', 1)[1]}={v}")
    if sample is not None:
        parts.append(f"s{sample}")
    return "-".join(parts) or "base"
