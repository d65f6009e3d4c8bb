"""Sweep specs: one YAML file under sweeps/ describes a grid search over VPNConfig and TrainConfig.

A spec is checked completely before Ray starts: every key of every section and of every profile is
known, every grid is a non-empty list, and every grid point of every profile builds a VPNConfig and a
TrainConfig (the same constructors the trials use, so "it validated" means "it builds"). Errors are
SpecError, named by the spec file and the field path, e.g.

    sweeps/x.yaml: search.model.filter_fraction: filter_fraction must be in (0, 1], got 2.0

and a value that a profile set is named through the profile (profiles.cpu.search.model....).

Format (all sections but `name` optional; see sweeps/depth_width.yaml for a commented example):

    name: depth_width              # MLflow experiment and results/<name>/; [A-Za-z0-9_.-]
    description: ...
    mode: train                    # train | overfit (the blog post's one-sequence experiment)
    data: data/moving_mnist        # relative to the repository root
    model: {output: bernoulli}     # base VPNConfig fields
    train: {steps: 2000}           # base TrainConfig fields
    search:                        # a grid: every combination of the lists is one trial
      preset: [full, mini, micro]  # optional: whole presets (depths and widths) as one axis
      preset_width_scale: 1.0      # presets' filter_fraction times this (CPU profiles shrink widths)
      rows:                        # optional: named points, each a set of model/train values
        - {name: baseline, model: {decoder: baseline}}
        - {name: rmb, model: {block: rmb}}
      model: {enc_blocks: [2, 4]}  # lists of VPNConfig values
      train: {lr: [3.0e-4]}        # lists of TrainConfig values
    run:                           # how the trials run, not what they compute
      cpus_per_trial: 1
      gpus_per_trial: 0            # fractions allowed; requested only where the cluster has GPUs
      workers_per_trial: 1         # N > 1: N data-parallel workers (Ray Train), train.batch_size split
      cpus_per_worker: null        # each worker's CPUs (null: cpus_per_trial)
      gpus_per_worker: null        # each worker's GPUs (null: gpus_per_trial); 0 or 1 when N > 1
      max_concurrent: 0            # 0: as many as the resources allow
      num_samples: 1               # each point runs this often, with train.seed + 0, 1, ...
      max_failures: 2              # a crashed trial is retried from its checkpoint this often
      storage_path: null           # Ray results (null: <repo>/ray_results; s3://, NFS on a cluster)
      asha: {enabled: false, grace_steps: 100, reduction_factor: 3}
      sample_frames: 1             # frames sampled at each validation for MLflow's image view (0: none)
      system_metrics: true         # MLflow's CPU, memory (and GPU) metrics every 10 s, per trial
    overfit: {split: train, index: 0, tol_per_subpixel: 0.01}   # mode: overfit only
    profiles:                      # named overrides of the sections above
      cpu: {train: {steps: 300}, search: {model: {filter_fraction: [0.0625]}}}
      gpu: {}

A profile merges key by key into model, train, run, run.asha and overfit; in search it replaces
whole axes (an axis set to null is removed, and `rows` is replaced as a whole), and it may replace
data, mode and description.

Rows (the paper's ablation table is a list of rows, not a grid): `search.rows` is one more axis whose
values are named bundles of model and train values, crossed with the other axes like any axis. A
row may not set a field that another axis searches, and rows need distinct names: a row's name is
its trial's label (with the other axes' labels after it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import ParamsError, section_from_mapping
from pipeline.paths import repo_root
from vpn.config import PRESETS, TrainConfig, VPNConfig

MODES = ("train", "overfit")
TOP_KEYS = ("name", "description", "mode", "data", "model", "train", "search", "run", "overfit", "profiles")
PROFILE_KEYS = ("description", "mode", "data", "model", "train", "search", "run", "overfit")
SEARCH_KEYS = ("preset", "preset_width_scale", "rows", "model", "train")
ROW_KEYS = ("name", "model", "train")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(VPNConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Axes that a preset fixes; a grid over them next to `preset` would be ambiguous.
PRESET_FIELDS = ("enc_blocks", "dec_blocks", "filter_fraction")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Short labels of the main axes in trial names: e4-d6-f0.25.
AXIS_LABELS = {"model.enc_blocks": "e", "model.dec_blocks": "d", "model.filter_fraction": "f"}


class SpecError(ValueError):
    """A spec that cannot run. The message names the spec file and the field path."""


@dataclass(frozen=True)
class AshaSettings:
    """ASHA early stopping (Li et al. 2018), deciding on validation NLL at each report.

    grace_steps: training steps every trial runs before it can be stopped.
    reduction_factor: 1/reduction_factor of the trials survive each rung.
    """

    enabled: bool = False
    grace_steps: int = 100
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_steps < 1:
            raise ValueError(f"grace_steps must be >= 1, got {self.grace_steps}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class RunSettings:
    """How the trials run (resources, retries, storage); never what they compute.

    A trial runs workers_per_trial training processes. One (the default) is today's trial: the Tune
    trial trains, with cpus_per_trial CPUs and gpus_per_trial GPUs. N > 1 is data parallel
    (pipeline.sweep.distributed): N Ray Train workers of cpus_per_worker CPUs and gpus_per_worker GPUs each
    (null: the per-trial values, so a profile that only raises workers_per_trial runs N copies of the
    one-worker trial's resources), splitting train.batch_size, the global batch, N ways.
    """

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    max_concurrent: int = 0
    num_samples: int = 1
    max_failures: int = 2
    storage_path: str | None = None
    asha: AshaSettings = field(default_factory=AshaSettings)
    # What a trial logs besides its curves (neither changes what it computes, so neither is part of
    # the sweep's identity): frames drawn from the model at each validation, for MLflow's image view
    # (pipeline.sweep.pictures; 0: none), and MLflow's system metrics (CPU, memory, disk, network, NVIDIA
    # GPUs with nvidia-ml-py). Both costs are measured in docs/sweeps.md: 2% and 0.4% of a cpu trial.
    sample_frames: int = 1
    system_metrics: bool = True

    def __post_init__(self) -> None:
        if self.sample_frames < 0:
            raise ValueError(f"sample_frames must be >= 0, got {self.sample_frames}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        # Ray accepts fractions of one GPU, or whole GPUs.
        g = self.gpus_per_trial
        if g < 0 or (g > 1 and g != int(g)):
            raise ValueError(f"gpus_per_trial must be 0, a fraction in (0, 1] or a whole number, got {g}")
        n = self.workers_per_trial
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers_per_trial must be an integer >= 1, got {n!r}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0 or null, got {self.cpus_per_worker}")
        g = self.gpus_per_worker
        if g is not None and (g < 0 or (g > 1 and g != int(g))):
            raise ValueError(f"gpus_per_worker must be null, 0, a fraction in (0, 1] or a whole number, got {g}")
        if n > 1 and self.worker_gpus not in (0, 1):
            # NCCL runs one rank per GPU; a rank holding several would use only one of them.
            field_name = "gpus_per_worker" if self.gpus_per_worker is not None else "gpus_per_trial"
            raise ValueError(
                f"{field_name} must be 0 (CPU workers, gloo) or 1 (one GPU per worker, NCCL) with "
                f"workers_per_trial={n}, got {self.worker_gpus:g}"
            )
        for name in ("max_concurrent", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    @property
    def worker_cpus(self) -> float:
        """CPUs of each training process (the trial itself when workers_per_trial is 1)."""
        return self.cpus_per_trial if self.cpus_per_worker is None else float(self.cpus_per_worker)

    @property
    def worker_gpus(self) -> float:
        """GPUs of each training process, before the cluster is asked (none there: CPU)."""
        return self.gpus_per_trial if self.gpus_per_worker is None else float(self.gpus_per_worker)


@dataclass(frozen=True)
class OverfitSettings:
    """The one-sequence experiment: sequence `index` of `split`, converged when the training NLL is
    within tol_per_subpixel * C*H*W nats/frame of that sequence's floor (vpn.train.overfit)."""

    split: str = "train"
    index: int = 0
    tol_per_subpixel: float = 0.01

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")
        if not self.tol_per_subpixel > 0:
            raise ValueError(f"tol_per_subpixel must be > 0, got {self.tol_per_subpixel}")


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
    """The grid. Each axis is a non-empty tuple of values."""

    preset: tuple[str, ...] = ()
    preset_width_scale: float = 1.0
    model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    train: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    rows: tuple[Row, ...] = ()

    def axes(self) -> list[tuple[str, tuple[Any, ...]]]:
        out: list[tuple[str, tuple[Any, ...]]] = []
        if self.rows:
            out.append(("row", tuple(r.name for r in self.rows)))
        if self.preset:
            out.append(("preset", self.preset))
        out += [(f"model.{k}", v) for k, v in self.model.items()]
        out += [(f"train.{k}", v) for k, v in self.train.items()]
        return out


@dataclass(frozen=True)
class Sweep:
    """A spec with one profile applied: everything a run needs, validated.

    data is absolute (trials run with their working directory under /tmp/ray).
    """

    source: str
    name: str
    profile: str
    description: str
    mode: str
    data: Path
    model: Mapping[str, Any]
    train: Mapping[str, Any]
    search: Search
    run: RunSettings
    overfit: OverfitSettings
    points: tuple[Point, ...]

    def identity(self) -> dict[str, Any]:
        """What determines the results (not resources, retries or storage): the fingerprint's input."""
        return {
            "name": self.name,
            "profile": self.profile,
            "mode": self.mode,
            "data": str(self.data),
            "overfit": dataclasses.asdict(self.overfit) if self.mode == "overfit" else None,
            "asha": dataclasses.asdict(self.run.asha),
            # N workers compute one worker's curve only up to float rounding: another N is another
            # sweep (not in the dict for N = 1, so that one-worker sweeps keep their identity).
            **({"workers_per_trial": self.run.workers_per_trial} if self.run.workers_per_trial > 1 else {}),
            "points": [
                {"label": p.label, "model": p.model.to_dict(), "train": p.train.to_dict(), "preset": p.preset}
                for p in self.points
            ],
        }

    def fingerprint(self, *extra: str) -> str:
        """sha256 over identity() and `extra` strings (the data's and the code's identity)."""
        h = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode())
        for e in extra:
            h.update(b"\0" + e.encode())
        return h.hexdigest()


@dataclass(frozen=True)
class SweepSpec:
    """A parsed spec file: the base sections and the raw profile overrides (validated on load)."""

    path: str
    raw: Mapping[str, Any]
    root: Path

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def profiles(self) -> tuple[str, ...]:
        return tuple(self.raw.get("profiles") or {})

    def resolve(self, profile: str, data: str | Path | None = None) -> Sweep:
        """The sweep under `profile`; `data` replaces the spec's data path (relative: to the root)."""
        profiles = self.raw.get("profiles") or {}
        if profile not in profiles:
            known = ", ".join(profiles) or "none"
            raise SpecError(f"{self.path}: profiles: no profile {profile!r} (the spec has: {known})")
        merged, from_profile = _apply_profile(self.raw, profiles[profile] or {})
        return _build(self.path, self.root, profile, merged, from_profile, data)


# -- loading --------------------------------------------------------------------------------------
def load_spec(path: str | Path, root: str | Path | None = None) -> SweepSpec:
    """Read and fully validate a spec: every profile is resolved once, so errors surface here.

    root: the folder relative data paths start from (default: the repository root).
    """
    label = str(path)
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{label}: no such spec file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{label}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{label}: a spec must be a mapping of sections, got {type(raw).__name__}")
    _check_keys(label, "", raw, TOP_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{label}: name: must be a string of letters, digits, '_', '.', '-', got {name!r}")
    profiles = raw.get("profiles")
    if profiles is not None and not isinstance(profiles, dict):
        raise SpecError(f"{label}: profiles: must be a mapping of profile names to overrides")
    if not profiles:
        raise SpecError(f"{label}: profiles: a spec needs at least one profile (cpu, gpu)")
    for pname, override in profiles.items():
        if not isinstance(pname, str) or not NAME_RE.match(pname):
            raise SpecError(f"{label}: profiles: bad profile name {pname!r}")
        if override is not None and not isinstance(override, dict):
            raise SpecError(f"{label}: profiles.{pname}: must be a mapping, got {type(override).__name__}")
        _check_keys(label, f"profiles.{pname}.", override or {}, PROFILE_KEYS)
    spec = SweepSpec(label, raw, Path(root) if root is not None else repo_root())
    for pname in profiles:
        spec.resolve(pname)
    return spec


def _check_keys(label: str, prefix: str, mapping: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise SpecError(f"{label}: {prefix}{unknown[0]}: unknown key; known keys here: {', '.join(known)}")


def _apply_profile(base: Mapping[str, Any], override: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Merge a profile into the base sections; returns the merged spec and the paths the profile set."""
    merged = copy.deepcopy({k: v for k, v in base.items() if k != "profiles"})
    touched: set[str] = set()
    for key, value in override.items():
        if key in ("model", "train", "overfit", "run") and isinstance(value, dict):
            section = merged.get(key) or {}
            if not isinstance(section, dict):
                section = {}
            for k, v in value.items():
                if key == "run" and k == "asha" and isinstance(v, dict) and isinstance(section.get("asha"), dict):
                    section["asha"] = {**section["asha"], **copy.deepcopy(v)}
                    touched.update(f"run.asha.{kk}" for kk in v)
                    continue
                section[k] = copy.deepcopy(v)
                touched.add(f"{key}.{k}")
            merged[key] = section
        elif key == "search" and isinstance(value, dict):
            search = merged.get("search") or {}
            if not isinstance(search, dict):
                search = {}
            for k, v in value.items():
                if k in ("model", "train") and isinstance(v, dict):
                    axes = dict(search.get(k) or {})
                    for axis, values in v.items():
                        if values is None:
                            axes.pop(axis, None)
                        else:
                            axes[axis] = copy.deepcopy(values)
                        touched.add(f"search.{k}.{axis}")
                    search[k] = axes
                else:
                    search[k] = copy.deepcopy(v)
                    touched.add(f"search.{k}")
            merged["search"] = search
        else:
            merged[key] = copy.deepcopy(value)
            touched.add(key)
    return merged, touched


# -- building one profile -------------------------------------------------------------------------
def _build(
    label: str,
    root: Path,
    profile: str,
    spec: Mapping[str, Any],
    touched: set[str],
    data_override: str | Path | None,
) -> Sweep:
    def where(path: str) -> str:
        # The profile's own path when the profile set this value (or a parent of it).
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in touched:
                return f"{label}: profiles.{profile}.{path}"
        return f"{label}: {path} (profile {profile})"

    def fail(path: str, msg: str) -> SpecError:
        return SpecError(f"{where(path)}: {msg}")

    mode = spec.get("mode", "train")
    if mode not in MODES:
        raise fail("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", "must be a string")

    data = data_override if data_override is not None else spec.get("data", "data/moving_mnist")
    if not isinstance(data, (str, Path)) or not str(data):
        raise fail("data", f"must be a path to the moving_mnist folder, got {data!r}")
    data_path = Path(data).expanduser()
    data_path = (data_path if data_path.is_absolute() else root / data_path).resolve()

    model = _mapping(spec.get("model"), "model", fail)
    train = _mapping(spec.get("train"), "train", fail)
    for key in model:
        if key not in MODEL_FIELDS:
            raise fail(f"model.{key}", f"unknown VPNConfig key; known keys: {', '.join(MODEL_FIELDS)}")
    for key in train:
        if key not in TRAIN_FIELDS:
            raise fail(f"train.{key}", f"unknown TrainConfig key; known keys: {', '.join(TRAIN_FIELDS)}")

    run = _run_settings(spec.get("run"), fail)
    overfit_raw = spec.get("overfit")
    if overfit_raw is not None and mode != "overfit":
        raise fail("overfit", "only applies to mode: overfit")
    overfit = _section(OverfitSettings, overfit_raw, "overfit", fail)
    search = _search(spec.get("search"), fail)

    # Base configs alone first, so an error in the base is named as the base's field.
    base_model = _model_config(model, fail, "model")
    _train_config(train, fail, "train")
    del base_model

    # Each axis value on its own on top of the base: an impossible value is named by its axis.
    for row in search.rows:  # each row on its own on top of the base: a bad value is named by its row
        k = search.rows.index(row)
        for section, values in (("model", row.model), ("train", row.train)):
            for key in values:
                if key in (search.model if section == "model" else search.train):
                    raise fail(
                        f"search.rows[{k}].{section}.{key}",
                        f"row {row.name!r} sets a field that search.{section}.{key} also searches",
                    )
        if search.preset and any(f in row.model for f in PRESET_FIELDS):
            raise fail(
                f"search.rows[{k}].model",
                "a row may not set enc_blocks, dec_blocks or filter_fraction next to search.preset",
            )
        _model_config({**model, **row.model}, fail, f"search.rows[{k}].model")
        _train_config({**train, **row.train}, fail, f"search.rows[{k}].train")
    for path, values in search.axes():
        for v in values:
            if path in ("preset", "row"):
                continue
            section, key = path.split(".", 1)
            if section == "model":
                _model_config({**model, key: v}, fail, f"search.{path}")
            else:
                _train_config({**train, key: v}, fail, f"search.{path}")

    axes = search.axes()
    points: list[Point] = []
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
        context = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "the base configs"
        model_cfg = _model_config(m, fail, "search", f" (grid point {context})")
        base_seed = t.get("seed", TrainConfig.seed)
        for sample in range(run.num_samples):
            if run.num_samples > 1:
                t = {**t, "seed": base_seed + sample}
            train_cfg = _train_config(t, fail, "search", f" (grid point {context})")
            points.append(
                Point(
                    index=len(points),
                    label=_label(chosen, sample if run.num_samples > 1 else None),
                    model=model_cfg,
                    train=train_cfg,
                    axes=chosen,
                    preset=preset or model_cfg.matching_preset(),
                    sample=sample,
                )
            )
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        dup = next(lab for lab in labels if labels.count(lab) > 1)
        raise fail("search", f"two grid points share the label {dup!r}: an axis repeats a value")
    if mode == "overfit" and run.asha.enabled:
        raise fail("run.asha.enabled", "ASHA needs validation scores; mode: overfit has none")
    workers = run.workers_per_trial
    if workers > 1 and mode == "overfit":
        raise fail("run.workers_per_trial", f"mode: overfit trains on one sequence: it runs one worker, got {workers}")
    for p in points:
        if p.train.batch_size % workers:
            raise SpecError(
                f"{where('train.batch_size')}: train.batch_size={p.train.batch_size} (point {p.label}) is the global "
                f"batch: it must be a multiple of run.workers_per_trial={workers}"
            )
    return Sweep(
        source=label,
        name=spec["name"],
        profile=profile,
        description=description.strip(),
        mode=mode,
        data=data_path,
        model=model,
        train=train,
        search=search,
        run=run,
        overfit=overfit,
        points=tuple(points),
    )


def _mapping(value: Any, path: str, fail) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(path, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def _section(cls, value: Any, path: str, fail):
    try:
        return section_from_mapping(cls, value, path, source="spec")
    except ParamsError as e:
        # "spec: overfit.index must be ..." / "spec: section 'overfit': ..." -> the field path.
        msg = str(e).removeprefix("spec: ")
        m = re.match(rf"{re.escape(path)}\.(\w+) (.*)", msg)
        if m:
            raise fail(f"{path}.{m.group(1)}", m.group(2)) from e
        m = re.search(r"unknown key\(s\) '(\w+)'", msg)
        if m:
            raise fail(f"{path}.{m.group(1)}", f"unknown key; known keys: {msg.split('known keys: ')[-1]}") from e
        m = re.match(r"section '[\w.]+': (\w+) (.*)", msg)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            raise fail(f"{path}.{m.group(1)}", f"{m.group(1)} {m.group(2)}") from e
        raise fail(path, msg) from e


def _run_settings(value: Any, fail) -> RunSettings:
    raw = _mapping(value, "run", fail)
    asha_raw = raw.pop("asha", None)
    if isinstance(asha_raw, bool):  # `asha: true` is shorthand for the defaults
        asha_raw = {"enabled": asha_raw}
    asha = _section(AshaSettings, asha_raw, "run.asha", fail)
    settings = _section(RunSettings, raw, "run", fail)
    return dataclasses.replace(settings, asha=asha)


def _search(value: Any, fail) -> Search:
    raw = _mapping(value, "search", fail)
    for key in raw:
        if key not in SEARCH_KEYS:
            raise fail(f"search.{key}", f"unknown key; known keys: {', '.join(SEARCH_KEYS)}")
    presets = raw.get("preset")
    if presets is not None:
        presets = _axis(presets, "search.preset", fail)
        for p in presets:
            if p not in PRESETS:
                raise fail("search.preset", f"unknown preset {p!r}; presets: {', '.join(PRESETS)}")
    scale = raw.get("preset_width_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1 or not math.isfinite(scale):
        raise fail("search.preset_width_scale", f"must be a number in (0, 1], got {scale!r}")
    if scale != 1.0 and not presets:
        raise fail("search.preset_width_scale", "only applies with search.preset")
    grids: dict[str, dict[str, tuple[Any, ...]]] = {}
    for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
        axes = _mapping(raw.get(section), f"search.{section}", fail)
        for key, values in axes.items():
            if key not in fields:
                kind = "VPNConfig" if section == "model" else "TrainConfig"
                raise fail(f"search.{section}.{key}", f"unknown {kind} key; known keys: {', '.join(fields)}")
            axes[key] = _axis(values, f"search.{section}.{key}", fail)
        grids[section] = axes
    if presets:
        clash = [k for k in PRESET_FIELDS if k in grids["model"]]
        if clash:
            raise fail(
                f"search.model.{clash[0]}",
                "conflicts with search.preset (a preset fixes enc_blocks, dec_blocks and filter_fraction)",
            )
    return Search(tuple(presets or ()), float(scale), grids["model"], grids["train"], _rows(raw.get("rows"), fail))


def _rows(value: Any, fail) -> tuple[Row, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise fail("search.rows", f"must be a non-empty list of rows ({{name, model, train}}), got {value!r}")
    rows: list[Row] = []
    for k, raw in enumerate(value):
        path = f"search.rows[{k}]"
        if not isinstance(raw, dict):
            raise fail(path, f"a row must be a mapping with name, model and train, got {raw!r}")
        for key in raw:
            if key not in ROW_KEYS:
                raise fail(f"{path}.{key}", f"unknown key; known keys: {', '.join(ROW_KEYS)}")
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise fail(f"{path}.name", f"must be a name of letters, digits, '_', '.', '-', got {name!r}")
        if any(r.name == name for r in rows):
            raise fail(f"{path}.name", f"two rows are named {name!r}")
        sections = {}
        for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
            values = _mapping(raw.get(section), f"{path}.{section}", fail)
            for key in values:
                if key not in fields:
                    kind = "VPNConfig" if section == "model" else "TrainConfig"
                    raise fail(f"{path}.{section}.{key}", f"unknown {kind} key; known keys: {', '.join(fields)}")
            sections[section] = values
        rows.append(Row(name, sections["model"], sections["train"]))
    return tuple(rows)


def _axis(values: Any, path: str, fail) -> tuple[Any, ...]:
    if not isinstance(values, list):
        raise fail(path, f"a grid axis must be a list of values, got {values!r}")
    if not values:
        raise fail(path, "empty grid: give at least one value")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
        raise fail(path, f"repeated value in {values!r}")
    return tuple(values)


def _model_config(d: Mapping[str, Any], fail, path: str, context: str = "") -> VPNConfig:
    try:
        return VPNConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise fail(_field_path(path, str(e)), f"{e}{context}") from e


def _train_config(d: Mapping[str, Any], fail, path: str, context: str = "") -> TrainConfig:
    try:
        return TrainConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise fail(_field_path(path, str(e)), f"{e}{context}") from e


def _field_path(path: str, msg: str) -> str:
    """model -> model.<field> when the config's message starts with a field name it knows."""
    if path in ("model", "train"):
        fields = MODEL_FIELDS if path == "model" else TRAIN_FIELDS
        first = re.match(r"(\w+)", msg)
        if first and first.group(1) in fields:
            return f"{path}.{first.group(1)}"
    return path


def _label(chosen: Mapping[str, Any], sample: int | None) -> str:
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
