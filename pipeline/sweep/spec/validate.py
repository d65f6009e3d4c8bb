"""Reading a spec's sections into typed values, each error named by the spec file and the field path.

    sweeps/x.yaml: search.model.filter_fraction (profile cpu): filter_fraction must be in (0, 1], got 2.0
    sweeps/x.yaml: profiles.cpu.train.steps: steps must be an integer >= 1, got 0

Blame gives the path: a value that a profile set is named through the profile. The settings sections
(run, run.asha, overfit) are read by pipeline.params, whose ParamsError says which key failed; the
model and train values are built by VPNConfig and TrainConfig, the same constructors the trials use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.params import ParamsError, field_named_by, section_from_mapping
from pipeline.sweep.spec.grid import PRESET_FIELDS, Row, Search
from pipeline.sweep.spec.settings import AshaSettings, RunSettings
from pipeline.sweep.spec.space import ALGORITHMS, Range, read_range
from vpn.config import PRESETS, SEED_LIMIT, TrainConfig, VPNConfig

T = TypeVar("T")

SEARCH_KEYS = ("algorithm", "seed", "preset", "preset_width_scale", "rows", "model", "train")
ROW_KEYS = ("name", "model", "train")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(VPNConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A spec that cannot run. The message names the spec file and the field path."""


@dataclass(frozen=True)
class Blame:
    """Where an error in one profile's sweep is: the spec file, then the field's path.

    The path is the profile's own (profiles.cpu.train.steps) where the profile set the value or a
    parent of it, else the base's with the profile after it (train.steps (profile cpu)).

    touched: the paths the profile set (pipeline.sweep.spec.profiles.apply_profile).
    """

    label: str
    profile: str
    touched: Collection[str]

    def where(self, path: str) -> str:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.touched:
                return f"{self.label}: profiles.{self.profile}.{path}"
        return f"{self.label}: {path} (profile {self.profile})"

    def fail(self, path: str, msg: str) -> SpecError:
        return SpecError(f"{self.where(path)}: {msg}")


def read_mapping(value: Any, path: str, blame: Blame) -> dict[str, Any]:
    """A copy of the mapping at `path` (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise blame.fail(path, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def read_settings(cls: type[T], value: Any, path: str, blame: Blame) -> T:
    """The settings dataclass `cls` from the section at `path`; an error names the key at fault."""
    try:
        return section_from_mapping(cls, value, path, source="spec")
    except ParamsError as e:
        raise blame.fail(f"{path}.{e.key}" if e.key else path, e.problem) from e


def read_run(value: Any, blame: Blame) -> RunSettings:
    """The `run` section, with its `asha` subsection."""
    raw = read_mapping(value, "run", blame)
    asha_raw = raw.pop("asha", None)
    if isinstance(asha_raw, bool):  # `asha: true` is shorthand for the defaults
        asha_raw = {"enabled": asha_raw}
    asha = read_settings(AshaSettings, asha_raw, "run.asha", blame)
    settings = read_settings(RunSettings, raw, "run", blame)
    return dataclasses.replace(settings, asha=asha)


def read_search(value: Any, blame: Blame) -> Search:
    """The `search` section: its keys and axes known, each axis a non-empty list of distinct values."""
    raw = read_mapping(value, "search", blame)
    for key in raw:
        if key not in SEARCH_KEYS:
            raise blame.fail(f"search.{key}", f"unknown key; known keys: {', '.join(SEARCH_KEYS)}")
    algorithm, seed = raw.get("algorithm", "grid"), raw.get("seed", 0)
    if algorithm not in ALGORITHMS:
        raise blame.fail("search.algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        # numpy's legacy generators, which the searchers seed (optuna's samplers, hpbandster), take 32 bits
        raise blame.fail("search.seed", f"must be an integer in [0, 2**32), got {seed!r}")
    searched = algorithm != "grid"
    for key in ("preset", "rows"):
        if searched and raw.get(key) is not None:
            raise blame.fail(f"search.{key}", "only with algorithm: grid; a searcher draws search.model/train axes")
    presets = raw.get("preset")
    if presets is not None:
        presets = _read_axis(presets, "search.preset", blame)
        for p in presets:
            if p not in PRESETS:
                raise blame.fail("search.preset", f"unknown preset {p!r}; presets: {', '.join(PRESETS)}")
    scale = raw.get("preset_width_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1 or not math.isfinite(scale):
        raise blame.fail("search.preset_width_scale", f"must be a number in (0, 1], got {scale!r}")
    if scale != 1.0 and not presets:
        raise blame.fail("search.preset_width_scale", "only applies with search.preset")
    grids: dict[str, dict[str, tuple[Any, ...]]] = {}
    for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
        axes = read_mapping(raw.get(section), f"search.{section}", blame)
        for key, values in axes.items():
            if key not in fields:
                kind = "VPNConfig" if section == "model" else "TrainConfig"
                raise blame.fail(f"search.{section}.{key}", f"unknown {kind} key; known keys: {', '.join(fields)}")
            axes[key] = _read_axis(values, f"search.{section}.{key}", blame, ranges=searched)
        grids[section] = axes
    if presets:
        clash = [k for k in PRESET_FIELDS if k in grids["model"]]
        if clash:
            raise blame.fail(
                f"search.model.{clash[0]}",
                "conflicts with search.preset (a preset fixes enc_blocks, dec_blocks and filter_fraction)",
            )
    rows = _read_rows(raw.get("rows"), blame)
    return Search(algorithm, seed, tuple(presets or ()), float(scale), grids["model"], grids["train"], rows)


def _read_rows(value: Any, blame: Blame) -> tuple[Row, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise blame.fail("search.rows", f"must be a non-empty list of rows ({{name, model, train}}), got {value!r}")
    rows: list[Row] = []
    for k, raw in enumerate(value):
        path = f"search.rows[{k}]"
        if not isinstance(raw, dict):
            raise blame.fail(path, f"a row must be a mapping with name, model and train, got {raw!r}")
        for key in raw:
            if key not in ROW_KEYS:
                raise blame.fail(f"{path}.{key}", f"unknown key; known keys: {', '.join(ROW_KEYS)}")
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise blame.fail(f"{path}.name", f"must be a name of letters, digits, '_', '.', '-', got {name!r}")
        if any(r.name == name for r in rows):
            raise blame.fail(f"{path}.name", f"two rows are named {name!r}")
        sections = {}
        for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
            values = read_mapping(raw.get(section), f"{path}.{section}", blame)
            for key in values:
                if key not in fields:
                    kind = "VPNConfig" if section == "model" else "TrainConfig"
                    raise blame.fail(f"{path}.{section}.{key}", f"unknown {kind} key; known keys: {', '.join(fields)}")
            sections[section] = values
        rows.append(Row(name, sections["model"], sections["train"]))
    return tuple(rows)


def _read_axis(values: Any, path: str, blame: Blame, ranges: bool = False) -> Any:
    """A list of distinct values (a choice), or for a searcher (`ranges`) a space.Range too."""
    if isinstance(values, dict):
        if not ranges:
            searchers = "random, optuna or bohb"
            raise blame.fail(path, f"a range ({values!r}) needs search.algorithm {searchers}; a grid takes a list")
        try:
            return read_range(values)
        except ValueError as e:
            raise blame.fail(path, str(e)) from e
    if not isinstance(values, list):
        raise blame.fail(path, f"a grid axis must be a list of values, got {values!r}")
    if not values:
        raise blame.fail(path, "empty grid: give at least one value")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise blame.fail(path, f"repeated value in {values!r}")
    return tuple(values)


def model_config(values: Mapping[str, Any], blame: Blame, path: str, context: str = "") -> VPNConfig:
    """VPNConfig from `values`; an error is named at `path`, and `context` follows its message."""
    try:
        return VPNConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise blame.fail(_config_field(path, e, MODEL_FIELDS), f"{e}{context}") from e


def train_config(values: Mapping[str, Any], blame: Blame, path: str, context: str = "") -> TrainConfig:
    """TrainConfig from `values`; an error is named at `path`, and `context` follows its message."""
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise blame.fail(_config_field(path, e, TRAIN_FIELDS), f"{e}{context}") from e


def _config_field(path: str, error: Exception, fields: Collection[str]) -> str:
    """model -> model.<field> where the base config's error names one of its fields.

    Only the base sections: a row's or an axis's path already names the value, and a grid point's
    message names the point.
    """
    if path in ("model", "train"):
        key = field_named_by(str(error), fields)
        if key:
            return f"{path}.{key}"
    return path


# -- what only the points together with the run section show -------------------------------------
# A trial's label names its Ray folder (trial_dirname_creator): letters, digits and _ . = + : - only.
LABEL_RE = re.compile(r"^[A-Za-z0-9_.=+:-]+$")
RANGE_VALUES_CHECKED = 10_000  # a searched range of batch sizes is checked value by value up to this width


def check_points(run: RunSettings, search: Search, base_train: Mapping[str, Any], points: list, blame: Blame) -> None:
    """Each point's device against the GPUs its trial gets, its label, its micro-batch against each
    worker's share, and a searcher's draws of batch sizes and seeds (its points are only the corners)."""
    gpus, workers = run.worker_gpus, run.workers_per_trial
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    devices = {p.train.device: p.label for p in points}
    for d in search.train.get("device", ()) if not isinstance(search.train.get("device"), Range) else ():
        devices.setdefault(d, "every draw")
    for device, label in devices.items():
        if gpus > 0 and device == "cpu":
            raise blame.fail(
                "train.device",
                f"train.device=cpu (point {label}) would leave idle the GPU that run.{gpu_field}={gpus:g} reserves "
                f"for each trial; use device auto or cuda, or set run.{gpu_field}: 0",
            )
        if gpus <= 0 and device.startswith("cuda"):
            raise blame.fail(
                "train.device",
                f"train.device={device} (point {label}) needs a GPU, but run.{gpu_field}=0 gives the trial none "
                f"(Ray hides every GPU from it); set run.{gpu_field}, or device auto or cpu",
            )
        if gpus > 0 and workers == 1 and device.startswith("cuda:") and device != "cuda:0":
            raise blame.fail(
                "train.device",
                f"train.device={device} (point {label}), but a trial sees only the GPU Ray granted it, as cuda:0",
            )
    for p in points:
        if not LABEL_RE.match(p.label):
            raise blame.fail("search", f"the trial label {p.label!r} names a folder: letters, digits, _ . = + : - only")
        m, share = p.train.micro_batch_size, p.train.batch_size // workers
        if isinstance(m, int) and share % m:
            raise blame.fail(
                "train.micro_batch_size",
                f"train.micro_batch_size={m} (point {p.label}) must divide each worker's share of the batch: "
                f"{share} sequences (train.batch_size={p.train.batch_size} over run.workers_per_trial={workers})",
            )
    if search.searched:
        _check_draws(run, search, base_train, points, blame)


def _values(axis: Any) -> Any:
    return range(int(axis.low), int(axis.high) + 1) if isinstance(axis, Range) else axis


def _check_draws(run: RunSettings, search: Search, base_train: Mapping[str, Any], points: list, blame: Blame) -> None:
    """A searcher draws any value of a range and of a choice, where the corners show only the ends."""
    workers = run.workers_per_trial
    b_axis, m_axis = search.train.get("batch_size"), search.train.get("micro_batch_size")
    batches = b_axis if b_axis is not None else (base_train.get("batch_size", TrainConfig.batch_size),)
    micros = m_axis if m_axis is not None else (base_train.get("micro_batch_size", TrainConfig.micro_batch_size),)
    b_path = "search.train.batch_size" if b_axis is not None else "train.batch_size"
    m_path = "search.train.micro_batch_size" if m_axis is not None else "train.micro_batch_size"
    splits = workers > 1 or any(isinstance(m, int) and m > 1 for m in _values(micros))
    if splits:  # else every batch size is one pass on one worker
        for axis, path in ((batches, b_path), (micros, m_path)):
            if isinstance(axis, Range) and axis.high - axis.low >= RANGE_VALUES_CHECKED:
                wide = f"a range of {axis.high - axis.low + 1:g} values is too wide to check; list the values"
                raise blame.fail(path, wide)
        for b in _values(batches):
            if b % workers:
                raise blame.fail(
                    b_path,
                    f"the searcher may draw train.batch_size={b}, which run.workers_per_trial={workers} workers cannot "
                    "split evenly; list batch sizes that are multiples of it (a choice, not a range)",
                )
            for m in _values(micros):
                if isinstance(m, int) and (b // workers) % m:
                    raise blame.fail(
                        m_path if m_axis is not None else b_path,
                        f"the searcher may draw train.batch_size={b} with train.micro_batch_size={m}, which does not "
                        f"divide each worker's share ({b // workers} sequences); list values that divide it",
                    )
    seed_axis = search.train.get("seed")
    top = max(p.train.seed for p in points)
    if seed_axis is not None:
        top = max(top, int(seed_axis.high) if isinstance(seed_axis, Range) else max(seed_axis))
    if top + run.seeds - 1 >= SEED_LIMIT:
        raise blame.fail(
            "run.seeds",
            f"a trial's seed is train.seed + 0..{run.seeds - 1} (run.seeds={run.seeds}), which passes 2**32 "
            f"from train.seed={top}; lower train.seed",
        )
