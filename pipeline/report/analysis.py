"""Reading a sweep's results tables and the analysis on them (pure functions): a label per config,
iterations to converge, plateaus, the Pareto front, and one summary row per trial.

The definitions these follow are in pipeline/report/build.py's docstring (and printed in each report).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report.params import ReportParams


class ResultsError(ValueError):
    """A results table is missing or malformed."""


def tables_folder(results_dir: Path, sweep: str, profile: str | None = None) -> Path:
    """The folder of a sweep's tables: <results_dir>/<sweep>/<profile> (pipeline.sweep.record.results);
    without a profile the only one there, else <results_dir>/<sweep> itself (tables written there by
    --results-dir or before the tables had a folder per profile)."""
    folder = Path(results_dir) / sweep
    if profile:
        return folder / profile
    profiles = sorted(p.parent.name for p in folder.glob("*/trials.parquet"))
    if len(profiles) > 1:
        raise ResultsError(f"{folder}: tables of profiles {', '.join(profiles)}; give --profile")
    return folder / profiles[0] if profiles else folder


def load_results(results_dir: Path, sweep: str, profile: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) of a sweep (of `profile`: tables_folder), with the short column names the report
    uses; empty frames if the sweep has no runs. Raises ResultsError naming the file that is missing,
    unreadable or short of a column."""
    folder = tables_folder(results_dir, sweep, profile)
    tables = []
    for name in ("trials.parquet", "curves.parquet"):
        path = folder / name
        if not path.is_file():
            raise ResultsError(f"{path}: missing; run the sweep stage (python -m pipeline.sweep) first")
        try:
            tables.append(pd.read_parquet(path))
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise ResultsError(f"{path}: not a readable Parquet table: {err}") from err
    trials, curves = tables
    # pipeline.sweep.record.results' names -> the short names used in the figures and the table
    # (`steps` there is the trial's step budget; the table shows the steps it actually ran.)
    if "steps_completed" in trials:
        trials = trials.rename(columns={"steps": "step_budget"})
    renames = {"mean_steps_per_second": "steps_per_second", "steps_completed": "steps", "checkpoint_uri": "checkpoint"}
    trials = trials.rename(columns={k: v for k, v in renames.items() if k in trials and v not in trials})
    for col in ("run_id", "status", "enc_blocks", "dec_blocks", "filter_fraction"):
        if len(trials) and col not in trials.columns:
            raise ResultsError(f"{folder / 'trials.parquet'}: no column {col!r}")
    for col in ("run_id", "step", "train_nats_per_frame"):
        if len(curves) and col not in curves.columns:
            raise ResultsError(f"{folder / 'curves.parquet'}: no column {col!r}")
    return trials, curves


def config_label(row: pd.Series) -> str:
    """A trial's name in the figures and tables: "[preset (]enc E / dec D / f F[ / decoder][)]"."""
    preset = row.get("preset")
    base = f"enc {int(row['enc_blocks'])} / dec {int(row['dec_blocks'])} / f {row['filter_fraction']:g}"
    if isinstance(row.get("decoder"), str) and row["decoder"] != "pixelcnn":  # the paper's decoder is unnamed
        base += f" / {row['decoder']}"
    return f"{preset} ({base})" if isinstance(preset, str) and preset else base


def iterations_to_converge(steps: np.ndarray, losses: np.ndarray, fraction: float) -> int | None:
    """First step with L(s) - L_end <= fraction * (L_0 - L_end); None if the curve never went down."""
    if len(losses) < 2:
        return None
    first, last = float(losses[0]), float(losses[-1])
    drop = first - last
    if not drop > 0:
        return None
    hit = np.nonzero(losses - last <= fraction * drop)[0]
    return int(steps[hit[0]])


def find_plateaus(
    steps: np.ndarray, losses: np.ndarray, until: int | None, min_fraction: float, progress: float
) -> list[tuple[int, int]]:
    """Stretches (first step, last step) where the loss is stuck on its way down (module docstring).

    steps, losses: (N,) a train curve. On the curve up to `until` (the convergence step), smoothed by
    a running median, a stretch [a, b] is a plateau when the loss falls by less than `progress` times
    the drop still to come after it, L(a) - L(b) < progress (L(b) - L_end), for at least
    `min_fraction` of the steps and at least four logged points, and it lies outside the first and the
    last 5% of the total drop. Measuring against the drop still to come is what separates being stuck
    (much left to learn, little progress) from the slow final approach (little left to learn).
    """
    if until is not None:
        keep = steps <= until
        steps, losses = steps[keep], losses[keep]
    n = len(losses)
    if n < 8:
        return []
    window = max(3, n // 50)
    smooth = pd.Series(losses).rolling(window, center=True, min_periods=1).median().to_numpy()
    end = smooth[-1]
    total = smooth[0] - end
    if not total > 0:
        return []
    margin = 0.05 * total
    span = steps[-1] - steps[0]

    def inside(k: int) -> bool:  # past the first 5% of the drop and before the last 5%
        return smooth[0] - smooth[k] >= margin and smooth[k] - end >= margin

    found: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if not inside(i):
            i += 1
            continue
        j = i
        while j + 1 < n and inside(j + 1) and smooth[i] - smooth[j + 1] < progress * (smooth[j + 1] - end):
            j += 1
        if j - i >= 3 and steps[j] - steps[i] >= min_fraction * span:
            if found and i > 0 and found[-1][1] == int(steps[i - 1]):  # touching: one plateau
                found[-1] = (found[-1][0], int(steps[j]))
            else:
                found.append((int(steps[i]), int(steps[j])))
            i = j + 1
        else:
            i += 1
    return found


def pareto_front(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Boolean mask of points no other point beats on both cost and loss (lower is better)."""
    mask = np.ones(len(cost), dtype=bool)
    for k in range(len(cost)):
        better = (cost <= cost[k]) & (loss <= loss[k]) & ((cost < cost[k]) | (loss < loss[k]))
        mask[k] = not better.any()
    return mask


def is_overfit_sweep(trials: pd.DataFrame) -> bool:
    """An overfit sweep (pipeline.sweep mode "overfit") reports converged steps, not validation."""
    if "mode" in trials.columns and trials["mode"].notna().any():
        return bool((trials["mode"] == "overfit").any())
    return "converged_step" in trials.columns and trials["converged_step"].notna().any()


def summarise(trials: pd.DataFrame, curves: pd.DataFrame, params: ReportParams) -> pd.DataFrame:
    """One row per trial with label, final NLL, iterations to converge and plateaus added."""
    rows = []
    varied_decoder = "decoder" in trials.columns and trials["decoder"].nunique() > 1
    overfit = is_overfit_sweep(trials)
    for _, trial in trials.iterrows():
        curve = curves[curves["run_id"] == trial["run_id"]].sort_values("step")
        steps = curve["step"].to_numpy()
        train = curve["train_nats_per_frame"].to_numpy(dtype=float)
        val = curve["val_nats_per_frame"].dropna() if "val_nats_per_frame" in curve else pd.Series(dtype=float)
        final = float(val.iloc[-1]) if len(val) else (float(train[-1]) if len(train) else math.nan)
        overfit_step = trial.get("converged_step")
        if overfit:
            converge = None if pd.isna(overfit_step) else int(overfit_step)
        else:
            converge = iterations_to_converge(steps, train, params.converge_fraction)
        plateaus = find_plateaus(steps, train, converge, params.plateau_min_fraction, params.plateau_progress)
        depth = f"enc {int(trial['enc_blocks'])} / dec {int(trial['dec_blocks'])}"
        row_name = trial.get("row")
        has_row = isinstance(row_name, str) and bool(row_name)
        rows.append(
            {
                **trial.to_dict(),
                "config": f"{row_name} ({config_label(trial)})" if has_row else config_label(trial),
                "depth": depth,
                # The figures' colour: the paper's row where the sweep has rows (they share a depth),
                # depth and decoder where the decoders differ, else the depth.
                "series": row_name if has_row else (f"{depth} / {trial['decoder']}" if varied_decoder else depth),
                "excess": trial.get("test_excess_nats_per_frame", math.nan),
                "width": f"{trial['filter_fraction']:g}",
                "final_nll": final,
                "iterations_to_converge": converge,
                "plateaus": plateaus,
                "logged_steps": len(steps),
            }
        )
    return pd.DataFrame(rows)
