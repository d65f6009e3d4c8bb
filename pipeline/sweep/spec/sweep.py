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
      gpus_per_trial: 0            # fractions allowed; refused where the cluster has no GPU torch can use
      workers_per_trial: 1         # N > 1: N data-parallel workers (Ray Train), train.batch_size split
      cpus_per_worker: null        # each worker's CPUs (null: cpus_per_trial)
      gpus_per_worker: null        # each worker's GPUs (null: gpus_per_trial); 0 or 1 when N > 1
      max_concurrent: 0            # 0: as many as the resources allow
      seeds: 1                     # each point runs this often, with train.seed + 0, 1, ...
      num_samples: null            # a searcher's draw count (search.algorithm random, optuna, bohb)
      budget_gpu_hours: null       # a searcher stops starting trials past this estimate
      cpu_memory_gb: null          # a CPU trial's memory for the plan (null: this machine's per trial)
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

This module holds the spec and the sweep (SweepSpec, Sweep, load_spec) and resolves a profile in
named steps; the pieces live next to it: profiles.py (how a profile merges), validate.py (each
section read, its errors named by field: SpecError, Blame), grid.py (Search, Row, Point: the axes,
their combinations and labels) and settings.py (RunSettings, AshaSettings, OverfitSettings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.params import ParamsError, read_yaml
from pipeline.paths import repo_root
from pipeline.sweep.spec.budget import check_budget, trial_gpu_hours
from pipeline.sweep.spec.grid import PRESET_FIELDS, Point, Row, Search, combinations, point_label
from pipeline.sweep.spec.inputs import local_path
from pipeline.sweep.spec.profiles import apply_profile
from pipeline.sweep.spec.settings import AshaSettings, OverfitSettings, RunSettings
from pipeline.sweep.spec.space import corner, describe, ends
from pipeline.sweep.spec.validate import (
    MODEL_FIELDS,
    NAME_RE,
    TRAIN_FIELDS,
    Blame,
    SpecError,
    check_points,
    model_config,
    read_mapping,
    read_run,
    read_search,
    read_settings,
    train_config,
)
from vpn.config import TrainConfig

# The names other modules import from here (Point, Row, Search: grid.py; SpecError: validate.py; the settings).
__all__ = [
    "AshaSettings",
    "OverfitSettings",
    "Point",
    "Row",
    "RunSettings",
    "Search",
    "SpecError",
    "Sweep",
    "SweepSpec",
    "load_spec",
]

MODES = ("train", "overfit")
TOP_KEYS = ("name", "description", "mode", "data", "model", "train", "search", "run", "overfit", "profiles")
PROFILE_KEYS = ("description", "mode", "data", "model", "train", "search", "run", "overfit")


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
            # A searched sweep (not in the dict for a grid, so that grids keep their identity): the
            # space, the searcher and its seed, the draw count, the repeats and the budget.
            **({"search": self.search_identity()} if self.search.searched else {}),
            "points": [
                {"label": p.label, "model": p.model.to_dict(), "train": p.train.to_dict(), "preset": p.preset}
                for p in self.points
            ],
        }

    @property
    def trial_count(self) -> int:
        """The trials the sweep runs at most: the grid's points, or num_samples x seeds drawn."""
        return len(self.points) if not self.search.searched else self.run.num_samples * self.run.seeds

    def search_identity(self) -> dict[str, Any]:
        """A searched sweep's space and searcher as plain values (the parent run and the identity hold it)."""
        return {
            "algorithm": self.search.algorithm,
            "seed": self.search.seed,
            "space": describe(dict(self.search.axes())),
            "num_samples": self.run.num_samples,
            "seeds": self.run.seeds,
            "budget_gpu_hours": self.run.budget_gpu_hours,
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
        merged, from_profile = apply_profile(self.raw, profiles[profile] or {})
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
    try:  # UTF-8, valid YAML, at most MAX_DEPTH levels and MAX_VALUES values (aliases expanded)
        raw = read_yaml(path)
    except ParamsError as e:
        raise SpecError(f"{label}: {e.problem}") from None
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


# -- building one profile -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sections:
    """One profile's sections, each read and checked on its own (the grid not yet expanded)."""

    mode: str
    description: str
    data: Path
    model: dict[str, Any]
    train: dict[str, Any]
    run: RunSettings
    overfit: OverfitSettings
    search: Search


def _build(
    label: str,
    root: Path,
    profile: str,
    spec: Mapping[str, Any],
    touched: set[str],
    data_override: str | Path | None,
) -> Sweep:
    """The sweep of one profile's merged `spec`; `touched`: the paths the profile set (for Blame)."""
    blame = Blame(label, profile, touched)
    sections = _read_sections(spec, root, data_override, blame)
    _check_values_alone(sections, blame)
    _check_trial_count(sections, blame)
    points = _corner_points(sections, blame) if sections.search.searched else _grid_points(sections, blame)
    _check_sweep(sections, points, blame)
    check_points(sections.run, sections.search, sections.train, points, blame)  # devices, labels, batch splits
    if sections.run.budget_gpu_hours is not None:
        try:  # the corners' costs: each range's low and high ends (cost rises with depth, width, steps)
            costs = [trial_gpu_hours(None, p) for p in points]
            check_budget(sections.run.budget_gpu_hours, costs, sections.search.searched)
        except ValueError as e:
            raise blame.fail("run.budget_gpu_hours", str(e)) from e
    return Sweep(
        source=label,
        name=spec["name"],
        profile=profile,
        description=sections.description.strip(),
        mode=sections.mode,
        data=sections.data,
        model=sections.model,
        train=sections.train,
        search=sections.search,
        run=sections.run,
        overfit=sections.overfit,
        points=tuple(points),
    )


def _read_sections(spec: Mapping[str, Any], root: Path, data_override: str | Path | None, blame: Blame) -> _Sections:
    """Every section read into its typed value; data made absolute (relative: to `root`)."""
    mode = spec.get("mode", "train")
    if mode not in MODES:
        raise blame.fail("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise blame.fail("description", "must be a string")

    data = data_override if data_override is not None else spec.get("data", "data/moving_mnist")
    if not isinstance(data, (str, Path)) or not str(data):
        raise blame.fail("data", f"must be a path to the moving_mnist folder, got {data!r}")
    try:
        data_path = local_path(data, root)
    except ValueError as e:
        given = " (given by --data or VPN_DATA)" if data_override is not None else ""
        raise blame.fail("data", f"{e}{given}") from None

    model = read_mapping(spec.get("model"), "model", blame)
    train = read_mapping(spec.get("train"), "train", blame)
    for key in model:
        if key not in MODEL_FIELDS:
            raise blame.fail(f"model.{key}", f"unknown VPNConfig key; known keys: {', '.join(MODEL_FIELDS)}")
    for key in train:
        if key not in TRAIN_FIELDS:
            raise blame.fail(f"train.{key}", f"unknown TrainConfig key; known keys: {', '.join(TRAIN_FIELDS)}")

    run = read_run(spec.get("run"), blame)
    if run.storage_path and "://" not in run.storage_path:  # s3://, gs://: Ray's to reach
        try:
            local_path(run.storage_path)
        except ValueError as e:
            raise blame.fail("run.storage_path", str(e)) from None
    overfit_raw = spec.get("overfit")
    if overfit_raw is not None and mode != "overfit":
        raise blame.fail("overfit", "only applies to mode: overfit")
    overfit = read_settings(OverfitSettings, overfit_raw, "overfit", blame)
    search = read_search(spec.get("search"), blame)
    return _Sections(mode, description, data_path, model, train, run, overfit, search)


def _check_values_alone(s: _Sections, blame: Blame) -> None:
    """The base, each row and each axis value on its own on top of the base, before any combination.

    So an impossible value is named where it was written (train.lr, search.rows[1].model,
    search.model.filter_fraction), not by the first grid point it spoils.
    """
    model_config(s.model, blame, "model")
    train_config(s.train, blame, "train")
    for k, row in enumerate(s.search.rows):
        for section, values in (("model", row.model), ("train", row.train)):
            for key in values:
                if key in (s.search.model if section == "model" else s.search.train):
                    raise blame.fail(
                        f"search.rows[{k}].{section}.{key}",
                        f"row {row.name!r} sets a field that search.{section}.{key} also searches",
                    )
        if s.search.preset and any(f in row.model for f in PRESET_FIELDS):
            raise blame.fail(
                f"search.rows[{k}].model",
                "a row may not set enc_blocks, dec_blocks or filter_fraction next to search.preset",
            )
        model_config({**s.model, **row.model}, blame, f"search.rows[{k}].model")
        train_config({**s.train, **row.train}, blame, f"search.rows[{k}].train")
    for path, values in s.search.axes():
        if path in ("preset", "row"):
            continue
        section, key = path.split(".", 1)
        for v in ends(values):  # a choice's every value, a range's two ends
            if section == "model":
                model_config({**s.model, key: v}, blame, f"search.{path}")
            else:
                train_config({**s.train, key: v}, blame, f"search.{path}")


def _check_trial_count(s: _Sections, blame: Blame) -> None:
    """run.num_samples is a searcher's draw count; a grid repeats its points with run.seeds."""
    if not s.search.searched and s.run.num_samples is not None:
        raise blame.fail(
            "run.num_samples",
            "a grid runs every point; repeats with train.seed + 0, 1, ... are run.seeds "
            "(num_samples is the number of configs a searcher draws, search.algorithm random, optuna or bohb)",
        )
    if s.search.searched and s.run.num_samples is None:
        raise blame.fail("run.num_samples", f"search.algorithm {s.search.algorithm} needs the number of trials to draw")
    if s.search.searched and s.mode == "overfit":
        raise blame.fail("search.algorithm", "a searcher learns from validation scores; mode: overfit has none")
    if s.search.algorithm == "bohb":
        _check_bohb(s, blame)


def _check_bohb(s: _Sections, blame: Blame) -> None:
    """BOHB brings its own early stopping (HyperBandForBOHB) and learns from each trial's every rung."""
    if s.run.asha.enabled:
        raise blame.fail(
            "run.asha.enabled",
            "search.algorithm bohb stops trials early with its own scheduler (HyperBandForBOHB: max_t "
            "train.steps, eta run.asha.reduction_factor); ASHA cannot run beside it: set run.asha.enabled: false",
        )
    if s.run.seeds > 1:
        raise blame.fail(
            "run.seeds",
            f"search.algorithm bohb runs each config once (got run.seeds={s.run.seeds}): BOHB learns from "
            "every trial's score at every HyperBand rung, which Ray Tune's Repeater does not pass on (it tells "
            "the searcher only the mean at the end), and HyperBand would stop a config's seeds one by one; "
            "use search.algorithm optuna for repeats",
        )


def _corner_points(s: _Sections, blame: Blame) -> list[Point]:
    """A searched space's low and high corners (every axis at its low end, then its high end) as Points:
    checked like grid points (they build, they fit the data) and never run; the trials are drawn."""
    points: list[Point] = []
    for high in (False, True):
        chosen = {path: corner(axis, high) for path, axis in s.search.axes()}
        where = f" (the space's {'high' if high else 'low'} corner: {', '.join(f'{k}={v}' for k, v in chosen.items())})"
        m = {**s.model, **{p[6:]: v for p, v in chosen.items() if p.startswith("model.")}}
        t = {**s.train, **{p[6:]: v for p, v in chosen.items() if p.startswith("train.")}}
        model_cfg = model_config(m, blame, "search", where)
        label = "high" if high else "low"
        points.append(Point(len(points), label, model_cfg, train_config(t, blame, "search", where), chosen, None))
    return points


def _grid_points(s: _Sections, blame: Blame) -> list[Point]:
    """Every combination of the grid, run.seeds times each (train.seed + 0, 1, ...), as Points."""
    samples = s.run.seeds
    points: list[Point] = []
    for combo in combinations(s.search, s.model, s.train):
        context = ", ".join(f"{k}={v}" for k, v in combo.axes.items()) or "the base configs"
        model_cfg = model_config(combo.model, blame, "search", f" (grid point {context})")
        t = combo.train
        base_seed = t.get("seed", TrainConfig.seed)
        for sample in range(samples):
            if samples > 1:
                t = {**t, "seed": base_seed + sample}
            train_cfg = train_config(t, blame, "search", f" (grid point {context})")
            points.append(
                Point(
                    index=len(points),
                    label=point_label(combo.axes, sample if samples > 1 else None),
                    model=model_cfg,
                    train=train_cfg,
                    axes=combo.axes,
                    preset=combo.preset or model_cfg.matching_preset(),
                    sample=sample,
                )
            )
    return points


def _check_sweep(s: _Sections, points: list[Point], blame: Blame) -> None:
    """What only the whole sweep shows: distinct labels, the mode's limits, each batch split over the workers."""
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        dup = next(lab for lab in labels if labels.count(lab) > 1)
        raise blame.fail("search", f"two grid points share the label {dup!r}: an axis repeats a value")
    if s.mode == "overfit" and s.run.asha.enabled:
        raise blame.fail("run.asha.enabled", "ASHA needs validation scores; mode: overfit has none")
    workers = s.run.workers_per_trial
    if workers > 1 and s.mode == "overfit":
        raise blame.fail(
            "run.workers_per_trial", f"mode: overfit trains on one sequence: it runs one worker, got {workers}"
        )
    for p in points:
        if workers > 1 and p.train.seq_len == 2:
            # Two frames give the ConvLSTM one step, from a zero state: its recurrent convolution gets
            # no gradient, and DDP (find_unused_parameters=False) fails on the second step.
            raise blame.fail(
                "train.seq_len",
                f"train.seq_len=2 (point {p.label}) leaves the ConvLSTM's recurrent convolution unused, which "
                f"data-parallel training (run.workers_per_trial={workers}) cannot all-reduce; use seq_len >= 3",
            )
        if p.train.batch_size % workers:
            raise blame.fail(
                "train.batch_size",
                f"train.batch_size={p.train.batch_size} (point {p.label}) is the global "
                f"batch: it must be a multiple of run.workers_per_trial={workers}",
            )
