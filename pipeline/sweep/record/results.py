"""Results tables of a sweep, read back from MLflow (never from the driver's memory).

    python -m pipeline.sweep.record.results sweeps/depth_width.yaml [--profile cpu] [--sweep-id ID] [--out DIR]
    python -m pipeline.sweep.record.results depth_width --profile cpu

writes results/<sweep name>/<profile>/ (one folder per profile, so that the cpu and gpu sweeps of one
spec keep their own tables; the three files replaced together, vpn.files.atomic_dir):
- trials.parquet: one row per trial (TRIAL_COLUMNS): identity and status, the configs, the size
  (parameters, FLOPs per frame at the frame size used), how far it got, final and best NLLs, the
  test NLL with its floor and the excess over it (train mode), mean speed, the overfit convergence
  step, and the URI of its final checkpoint artifact;
- curves.parquet: one row per trial per logged step (CURVE_COLUMNS);
- metrics.json: for `dvc metrics`: counts, the best trial (train mode: the least excess of test NLL
  over its floor, else the least validation NLL), and per preset its best validation NLL and test
  excess (train mode) or the step at which it converged (overfit mode).

Which sweep: --sweep-id, else the latest one run for the profile (the experiment's tag
latest_sweep_id.<profile>, set by pipeline.sweep). Without --profile, the only profile that was run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.paths import repo_root
from pipeline.sweep.record import forecasting, tracking
from pipeline.sweep.spec.sweep import SpecError, load_spec
from vpn.config import TrainConfig, VPNConfig
from vpn.files import atomic_dir

log = logging.getLogger(__name__)

MODEL_COLUMNS = tuple(f.name for f in dataclasses.fields(VPNConfig))
TRAIN_COLUMNS = tuple(f.name for f in dataclasses.fields(TrainConfig))
TRIAL_COLUMNS = (
    "run_id", "trial", "point", "sweep", "sweep_id", "profile", "mode", "status", "error",
    "non_finite_step", "stopped_early", "resumed_from_step", "preset", "row", "preset_width_scale",
    *MODEL_COLUMNS, "mu_channels", "lstm_channels", *TRAIN_COLUMNS, "sample",
    "data_path", "overfit_split", "overfit_index", "overfit_tol_per_subpixel",
    "parameters", "flops_per_frame", "frame_height", "frame_width",
    "steps_completed", "final_train_nats_per_frame", "best_train_nats_per_frame",
    "final_val_nats_per_frame", "best_val_nats_per_frame",
    "test_nats_per_frame", "test_floor_nats_per_frame", "test_excess_nats_per_frame", "test_sequences_scored",
    *forecasting.SCALAR_KEYS, *forecasting.BY_FRAME_KEYS,
    "mean_steps_per_second", "est_gpu_hours",
    "converged_step", "floor_nats_per_frame", "tol_nats_per_frame",
    "checkpoint_uri", "artifact_uri", "start_time", "end_time", "duration_s",
)  # fmt: skip
TABLES = ("trials.parquet", "curves.parquet", "metrics.json")  # a sweep's results folder holds these only
CURVE_COLUMNS = ("run_id", "trial", "step", tracking.TRAIN_KEY, tracking.VAL_KEY, tracking.SPEED_KEY)

# Column dtypes (pandas); the rest of TRIAL_COLUMNS follow the two dataclasses' field types.
_DTYPES: dict[str, str] = {
    "point": "Int64", "non_finite_step": "Int64", "stopped_early": "boolean", "resumed_from_step": "Int64",
    "preset_width_scale": "float64", "mu_channels": "Int64", "lstm_channels": "Int64", "sample": "Int64",
    "parameters": "Int64", "flops_per_frame": "Int64", "frame_height": "Int64", "frame_width": "Int64",
    "steps_completed": "Int64", "converged_step": "Int64", "mean_steps_per_second": "float64",
    "est_gpu_hours": "float64",  # searched trials only (pipeline.sweep.trials.searched_runs)
    "final_train_nats_per_frame": "float64", "best_train_nats_per_frame": "float64",
    "final_val_nats_per_frame": "float64", "best_val_nats_per_frame": "float64",
    "test_nats_per_frame": "float64", "test_floor_nats_per_frame": "float64",
    "test_excess_nats_per_frame": "float64", "test_sequences_scored": "Int64",
    "floor_nats_per_frame": "float64", "tol_nats_per_frame": "float64", "duration_s": "float64",
    "start_time": "datetime64[ms, UTC]", "end_time": "datetime64[ms, UTC]",
    **{k: "float64" for k in forecasting.SCALAR_KEYS},
    # one float per predicted frame (a list; None without free-running scores)
    **{k: "object" for k in forecasting.BY_FRAME_KEYS},
    "data_path": "string", "row": "string",
    "overfit_split": "string", "overfit_index": "Int64", "overfit_tol_per_subpixel": "float64",
}  # fmt: skip
for _cls in (VPNConfig, TrainConfig):
    for _name, _hint in typing.get_type_hints(_cls).items():
        _base = [a for a in typing.get_args(_hint) if a is not type(None)] or [_hint]
        # A field of one type (or None) gets that type's column; a union of several (e.g. bool | str for
        # activation_checkpointing, whose value may be "auto") holds strings.
        _DTYPES[_name] = (
            {bool: "boolean", int: "Int64", float: "float64"}.get(_base[0], "string") if len(_base) == 1 else "string"
        )


def _parse(value: str | None) -> Any:
    """A param as logged (str(v), repr for floats) back to a Python value."""
    if value is None or value == "None":
        return None
    if value in ("True", "False"):
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value of one metric (the last value if a step were ever logged twice)."""
    points = sorted(tracking.retrying(client.get_metric_history, run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


def _by_frame(client, run_id: str, metrics: dict[str, float]) -> dict[str, list[float] | None]:
    """test_<metric>_by_frame: the values of steps 1..horizon, or None where the run has none."""
    out: dict[str, list[float] | None] = {}
    for key in forecasting.BY_FRAME_KEYS:
        history = _history(client, run_id, key) if key in metrics else {}
        out[key] = [history[s] for s in sorted(history)] or None
    return out


def _has_checkpoint(client, run_id: str) -> bool:
    try:
        names = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    except Exception as e:  # an unreachable artifact store must not lose the table
        log.warning("could not list the artifacts of run %s: %s", run_id, e)
        return False
    return tracking.CHECKPOINT_ARTIFACT in names


def tables(client, runs: Iterable[Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) DataFrames of the given MLflow runs."""
    trial_rows, curve_rows = [], []
    for run in runs:
        info, params, tags = run.info, run.data.params, run.data.tags
        run_id = info.run_id
        label = tags.get(tracking.TAG_LABEL, info.run_name)
        curves = {key: _history(client, run_id, key) for key in tracking.CURVE_KEYS}
        train, val, speed = (curves[k] for k in tracking.CURVE_KEYS)
        for step in sorted(set().union(*curves.values())):
            values = {k: curves[k].get(step, math.nan) for k in tracking.CURVE_KEYS}
            curve_rows.append({"run_id": run_id, "trial": label, "step": step, **values})
        converged = run.data.metrics.get("converged_step")
        test = run.data.metrics.get(tracking.TEST_KEY, math.nan)
        floor = run.data.metrics.get(tracking.TEST_FLOOR_KEY, math.nan)
        scored = run.data.metrics.get(tracking.TEST_SEQUENCES_KEY)
        started = _parse(tags.get(tracking.TAG_STARTED))  # the trial's first start, epoch ms
        row: dict[str, Any] = {
            "run_id": run_id,
            "trial": label,
            "point": _parse(tags.get(tracking.TAG_POINT)),
            "sweep": tags.get(tracking.TAG_SWEEP),
            "sweep_id": tags.get(tracking.TAG_SWEEP_ID),
            "profile": tags.get(tracking.TAG_PROFILE),
            "mode": tags.get(tracking.TAG_MODE),
            "status": info.status,
            "error": tags.get(tracking.TAG_ERROR),
            "non_finite_step": _parse(tags.get(tracking.TAG_NON_FINITE_STEP)),
            "stopped_early": tags.get(tracking.TAG_STOPPED_EARLY) == "true",
            "resumed_from_step": _parse(tags.get(tracking.TAG_RESUMED_FROM)),
            **{k: _parse(params.get(k)) for k in TRIAL_COLUMNS if k in params},
            "steps_completed": max(train, default=0),
            "final_train_nats_per_frame": train[max(train)] if train else math.nan,
            "best_train_nats_per_frame": min(train.values(), default=math.nan),
            "final_val_nats_per_frame": val[max(val)] if val else math.nan,
            "best_val_nats_per_frame": min(val.values(), default=math.nan),
            "test_nats_per_frame": test,
            "test_floor_nats_per_frame": floor,
            "test_excess_nats_per_frame": test - floor,
            "test_sequences_scored": int(scored) if scored is not None else None,
            **{k: run.data.metrics.get(k, math.nan) for k in forecasting.SCALAR_KEYS},
            **_by_frame(client, run_id, run.data.metrics),
            "mean_steps_per_second": sum(speed.values()) / len(speed) if speed else math.nan,
            "converged_step": int(converged) if converged is not None else None,
            "floor_nats_per_frame": _parse(tags.get("floor_nats_per_frame")),
            "tol_nats_per_frame": _parse(tags.get("tol_nats_per_frame")),
            "checkpoint_uri": f"runs:/{run_id}/{tracking.CHECKPOINT_ARTIFACT}"
            if _has_checkpoint(client, run_id)
            else None,
            "artifact_uri": info.artifact_uri,
            "start_time": pd.Timestamp(started, unit="ms", tz="UTC") if started else None,
            "end_time": pd.Timestamp(info.end_time, unit="ms", tz="UTC") if info.end_time else None,
            "duration_s": (info.end_time - started) / 1000 if info.end_time and started else math.nan,
        }
        trial_rows.append(row)
    trials = pd.DataFrame(trial_rows, columns=list(TRIAL_COLUMNS))
    for col in TRIAL_COLUMNS:
        trials[col] = trials[col].astype(_DTYPES.get(col, "string"))
    curves = pd.DataFrame(curve_rows, columns=list(CURVE_COLUMNS)).astype(
        {"run_id": "string", "trial": "string", "step": "int64", **{k: "float64" for k in tracking.CURVE_KEYS}}
    )
    return trials, curves


# The column that says how good a trial is, when any trial has it: the test NLL's excess over its
# floor (test split, train mode). It compares across frame sizes, and with the paper's 87.6 - 86.3 = 1.3.
EXCESS = "test_excess_nats_per_frame"


def rank_column(trials: pd.DataFrame, fallback: str, by_excess: bool = True) -> str:
    """The column whose least value is the best trial: EXCESS where any trial has one (and `by_excess`),
    else `fallback` (the best validation NLL in train mode, the best train NLL in overfit mode, the
    report's final NLL).

    trials: trials.parquet's rows (the report's summary rows carry the same columns).
    """
    if by_excess and EXCESS in trials.columns and trials[EXCESS].notna().any():
        return EXCESS
    return fallback


def best_trial(trials: pd.DataFrame, fallback: str, by_excess: bool = True) -> pd.Series | None:
    """The row with the least rank_column value (trials without one left out); None if no trial has one."""
    rank = rank_column(trials, fallback, by_excess)
    scored = trials.dropna(subset=[rank])
    if scored.empty:
        return None
    return scored.loc[scored[rank].idxmin()]


def summary(trials: pd.DataFrame, name: str, profile: str, sweep_id: str, mode: str) -> dict[str, Any]:
    """metrics.json: counts, the best trial, and per preset its best val NLL or convergence step."""

    out: dict[str, Any] = {
        "sweep": name,
        "profile": profile,
        "sweep_id": sweep_id,
        "trials": len(trials),
        "finished": int((trials["status"] == "FINISHED").sum()),
        "failed": int((trials["status"] == "FAILED").sum()),
    }
    key = "best_val_nats_per_frame" if mode == "train" else "best_train_nats_per_frame"
    # An overfit trial is scored on the sequence it memorises, never on the test split.
    best = best_trial(trials, key, by_excess=mode == "train")
    if best is not None:
        out["best"] = {"trial": str(best["trial"]), "run_id": str(best["run_id"]), key: float(best[key])}
        if mode == "train":
            out["best"].update(
                {k: _number(best[k]) for k in ("test_nats_per_frame", "test_floor_nats_per_frame", EXCESS)}
            )
    presets: dict[str, Any] = {}
    for preset, group in trials.dropna(subset=["preset"]).groupby("preset"):
        low = group[key].min()
        entry: dict[str, Any] = {key: None if pd.isna(low) else float(low)}
        if mode == "train":
            entry[EXCESS] = _number(group[EXCESS].min())
        if mode == "overfit":
            steps = group["converged_step"].dropna()
            entry["converged_step"] = int(steps.min()) if len(steps) else None
        presets[str(preset)] = entry
    if presets:
        out["presets"] = presets
    return out


def _number(value: Any) -> float | None:
    return None if pd.isna(value) else float(value)


def results_folder(name: str, profile: str, parent: str | Path | None = None) -> Path:
    """Where a sweep's tables go by default: <parent>/<name>/<profile>, parent <repo>/results."""
    return Path(parent or repo_root() / "results") / name / profile


def check_results_folder(out: Path) -> None:
    """Refuse a folder that holds anything but the tables: write_results replaces it whole."""
    others = sorted(p.name for p in out.iterdir() if p.name not in TABLES) if out.is_dir() else []
    if others:
        raise SpecError(f"{out}: holds {', '.join(others)} besides the results tables; give them a folder of their own")


def write_results(client, name: str, profile: str, sweep_id: str, mode: str, out_dir: Path | None = None) -> Path:
    """Write trials.parquet, curves.parquet and metrics.json for one sweep id, replacing the folder's
    three tables together (out_dir, default results_folder(name, profile)); returns the folder."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise SpecError(f"no MLflow experiment {name!r} in {client.tracking_uri}")
    runs = tracking.sweep_runs(client, exp.experiment_id, sweep_id)
    trials, curves = tables(client, runs)
    out = Path(out_dir) if out_dir else results_folder(name, profile)
    check_results_folder(out)
    with atomic_dir(out) as tmp:
        trials.to_parquet(tmp / "trials.parquet", index=False)
        curves.to_parquet(tmp / "curves.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(summary(trials, name, profile, sweep_id, mode), indent=2) + "\n")
    log.info("results of %s: %d trial(s), %d curve point(s) -> %s", sweep_id, len(trials), len(curves), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.sweep.record.results SPEC_OR_NAME [--profile P] [--sweep-id ID] [--out DIR]`."""
    parser = argparse.ArgumentParser(description="Rebuild a sweep's results tables from MLflow.")
    parser.add_argument("sweep", help="sweep spec YAML or sweep name")
    parser.add_argument("--profile", help="profile (default: the only one run)")
    parser.add_argument("--sweep-id", help="a specific sweep id (default: the latest of the profile)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<name>/<profile>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        name = load_spec(args.sweep).name if args.sweep.endswith((".yaml", ".yml")) else args.sweep
        uri = tracking.absolute_uri(tracking.tracking_uri())
        client = tracking.client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise SpecError(f"no MLflow experiment {name!r} in {uri}")
        prefix = tracking.EXPERIMENT_LATEST.format(profile="")
        latest = {k[len(prefix) :]: v for k, v in exp.tags.items() if k.startswith(prefix)}
        sweep_id = args.sweep_id
        if sweep_id is None:
            profile = args.profile or (next(iter(latest)) if len(latest) == 1 else None)
            if profile is None or profile not in latest:
                known = ", ".join(sorted(latest)) or "none run yet"
                raise SpecError(f"experiment {name!r}: give --profile, one of: {known}")
            sweep_id = latest[profile]
        runs = tracking.sweep_runs(client, exp.experiment_id, sweep_id)
        if not runs:
            raise SpecError(f"experiment {name!r} holds no runs of sweep {sweep_id!r}")
        tags = runs[0].data.tags
        out = write_results(client, name, tags[tracking.TAG_PROFILE], sweep_id, tags[tracking.TAG_MODE], args.out)
    except SpecError as e:
        log.error("%s", e)
        return 2
    print(f"results: {out} ({len(runs)} trials of {sweep_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
