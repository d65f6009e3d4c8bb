"""Report stage: a sweep's results tables -> reports/<sweep>/report.md, report.html and PNG figures.

Reads results/<sweep>/trials.parquet (one row per trial) and curves.parquet (one row per trial and
logged step), which pipeline.sweep.results reads back from MLflow, so every number here is MLflow's.

Figures (seaborn):
- curves.png: nats/frame against step, one line per config, colour = depth, style = width;
- converge_heatmaps.png: iterations to converge against encoder blocks, decoder blocks, filter fraction;
- pareto.png: final NLL against parameters and against FLOPs per frame, Pareto front marked;
- speed.png: training steps per second of each config;
- samples.png: frames sampled by the best run beside the ground truth.
For an overfit sweep (the blog post's experiment) also overfit.png: iterations each preset needed,
against the post's numbers, and each curve with its plateaus shaded.

For a sweep of the paper's rows (sweeps/paper_ablation.yaml) also ablation.png and a table of each
row's test NLL, floor and excess beside the paper's Table 2 numbers.

Definitions (also printed in the report):
- final NLL: the last logged validation nats/frame (train nats/frame where no validation ran).
- test NLL, floor, excess: the test split scored at the end of each trial, the entropy of the same
  frames (the least any model can score), and test minus floor. Trials are ranked by the excess: it
  compares across frame sizes, and with the paper's 87.6 - 86.3 = 1.3 nats/frame.
- iterations to converge (train sweeps): first logged step whose train NLL is within
  `converge_fraction` of the run's total drop from its final value: L(s) - L_end <= f (L_0 - L_end).
  For overfit sweeps it is the trial's own converged_step (NLL within tol of the sequence's floor).
- plateau: a stretch of at least `plateau_min_fraction` of the steps before convergence (and at
  least four logged points) over which the smoothed train loss falls by less than `plateau_progress`
  times the drop still to come after it, outside the first and the last 5% of the total drop. The blog
  post's "stuck in a local optimum before converging": much left to learn, little progress.
"""

from __future__ import annotations

import html
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vpn.files import atomic_path, write_text

log = logging.getLogger(__name__)

# The paper's Moving MNIST results (Kalchbrenner et al. 2016, Tables 1-2; test nats/frame, 64x64,
# frames 10..19 given 0..9), keyed by (decoder, block, dilation); the baseline's block is not stated.
PAPER_LOWER_BOUND = 86.3
PAPER_ROWS = {
    ("baseline", None, None): ("Baseline", 110.1),
    ("pixelcnn", "rmb", False): ("VPN, RMB, no dilation", 89.2),
    ("pixelcnn", "relu", False): ("VPN, ReLU, no dilation", 89.1),
    ("pixelcnn", "relu", True): ("VPN, ReLU, dilation", 87.7),
    ("pixelcnn", "rmb", True): ("VPN, RMB, dilation", 87.6),
}
# The scale the paper's numbers come from, stated beside ours.
PAPER_SCALE = "64x64 frames, 20-frame sequences scored on frames 10..19, c = 128, 19.2M training sequences, all 10,000 test sequences"

# The blog post's overfitting result (iterations to converge), shown next to ours.
BLOG_OVERFIT_ITERATIONS = {"full": 600, "mini": 5000, "micro": 3000}
BLOG_PLATEAU = {"full": False, "mini": True, "micro": True}


@dataclass(frozen=True)
class ReportParams:
    """params.yaml section `report`.

    sweeps: sweep names to report (folders under results_dir).
    results_dir / out_dir: where the tables are read and the reports written (relative to the repo).
    data: Moving MNIST folder, for the ground truth beside the best run's samples.
    sample_split, sample_index, sample_context, sample_frames, sample_seed: the sample strip.
    converge_fraction, plateau_min_fraction, plateau_progress: see the module docstring.
    """

    sweeps: tuple[str, ...] = ("depth_width",)
    results_dir: str = "results"
    out_dir: str = "reports"
    data: str = "data/moving_mnist"
    sample_split: str = "test"
    sample_index: int = 0
    sample_context: int = 5
    sample_frames: int = 5
    sample_seed: int = 0
    converge_fraction: float = 0.05
    plateau_min_fraction: float = 0.05
    plateau_progress: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweeps", tuple(self.sweeps))
        if not self.sweeps:
            raise ValueError("report.sweeps must name at least one sweep")
        for name in ("converge_fraction", "plateau_min_fraction", "plateau_progress"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("sample_context", "sample_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be >= 1, got {getattr(self, name)!r}")


# -- reading --------------------------------------------------------------------------------------
class ResultsError(ValueError):
    """A results table is missing or malformed."""


def load_results(results_dir: Path, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) of a sweep; empty frames (with a logged warning) if the sweep has no runs."""
    folder = Path(results_dir) / sweep
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
    # pipeline.sweep.results' names -> the short names used in the figures and the table
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


# -- analysis (pure functions) ------------------------------------------------------------------------
def config_label(row: pd.Series) -> str:
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
    for _, trial in trials.iterrows():
        curve = curves[curves["run_id"] == trial["run_id"]].sort_values("step")
        steps = curve["step"].to_numpy()
        train = curve["train_nats_per_frame"].to_numpy(dtype=float)
        val = curve["val_nats_per_frame"].dropna() if "val_nats_per_frame" in curve else pd.Series(dtype=float)
        final = float(val.iloc[-1]) if len(val) else (float(train[-1]) if len(train) else math.nan)
        overfit_step = trial.get("converged_step")
        if is_overfit_sweep(trials):
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


# -- figures ------------------------------------------------------------------------------------------
def _orders(summary: pd.DataFrame) -> dict[str, Any]:
    """Hue/style orders and palette shared by every figure, so one depth has one colour throughout.

    Sorted numerically (a string sort would put "enc 12" before "enc 2").
    """
    import seaborn as sns

    # Rows keep the spec's order (the trials come in grid order); depths sort by depth.
    has_rows = "row" in summary and summary["row"].notna().any()
    by_depth = (
        summary
        if has_rows
        else summary.sort_values(["enc_blocks", "dec_blocks"] + (["decoder"] if "decoder" in summary else []))
    )
    depths = list(dict.fromkeys(by_depth["series"]))
    widths = list(dict.fromkeys(summary.sort_values("filter_fraction")["width"]))
    palette = dict(zip(depths, sns.color_palette("tab10" if len(depths) <= 10 else "husl", len(depths))))
    return {"hue_order": depths, "palette": palette, "style_order": widths}


def series_name(summary: pd.DataFrame) -> str:
    """What the figures' colour (the `series` column) stands for in this sweep."""
    if "row" in summary and summary["row"].notna().any():
        return "row"
    return "depth / decoder" if summary["series"].ne(summary["depth"]).any() else "depth"


def _name_series(legend, summary: pd.DataFrame) -> None:
    # seaborn titles the hue entry with the column's name; say what it stands for instead.
    for text in legend.get_texts() if legend is not None else []:
        if text.get_text() == "series":
            text.set_text(series_name(summary))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_curves(summary: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    orders = _orders(summary)
    data = curves.merge(summary[["run_id", "config", "series", "width"]], on="run_id")
    long = data.melt(
        id_vars=["run_id", "step", "config", "series", "width"],
        value_vars=[c for c in ("train_nats_per_frame", "val_nats_per_frame") if c in data],
        var_name="split",
        value_name="nats_per_frame",
    ).dropna(subset=["nats_per_frame"])
    long["split"] = long["split"].str.replace("_nats_per_frame", "")
    splits = sorted(long["split"].unique())
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sns.lineplot(
            data=long[long["split"] == split],
            x="step",
            y="nats_per_frame",
            hue="series",
            style="width",
            units="run_id",
            estimator=None,
            ax=ax,
            **orders,
        )
        ax.set_yscale("log")
        ax.set_title(f"{split} NLL (nats/frame)")
    for ax in axes[0][:-1]:
        ax.get_legend().remove()  # one legend, outside the last panel, hides no curve
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    _name_series(axes[0][-1].get_legend(), summary)
    return _save(fig, out)


def plot_converge_heatmaps(summary: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    pairs = [("enc_blocks", "dec_blocks"), ("enc_blocks", "filter_fraction"), ("dec_blocks", "filter_fraction")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ok = summary[summary["status"] == "FINISHED"].copy()
    ok["iterations_to_converge"] = pd.to_numeric(ok["iterations_to_converge"], errors="coerce")
    for ax, (rows, cols) in zip(axes, pairs):
        grid = ok.pivot_table(index=rows, columns=cols, values="iterations_to_converge", aggfunc="mean")
        if grid.empty:
            ax.text(0.5, 0.5, "no converged runs", ha="center", va="center")
            ax.set_axis_off()
            continue
        sns.heatmap(grid, annot=True, fmt=".0f", cmap="viridis_r", ax=ax, cbar_kws={"label": "steps"})
        ax.set_title(f"iterations to converge: {rows} x {cols}\n(mean over the other axis)")
    return _save(fig, out)


def plot_pareto(summary: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = summary[(summary["status"] == "FINISHED") & summary["final_nll"].notna()]
    orders = _orders(ok) if len(ok) else {}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, cost, label in (
        (axes[0], "parameters", "parameters"),
        (axes[1], "flops_per_frame", "FLOPs per frame (forward, at the trained size)"),
    ):
        if ok.empty or cost not in ok:
            ax.set_axis_off()
            continue
        front = pareto_front(ok[cost].to_numpy(float), ok["final_nll"].to_numpy(float))
        sns.scatterplot(data=ok, x=cost, y="final_nll", hue="series", style="width", s=70, ax=ax, **orders)
        line = ok[front].sort_values(cost)
        ax.plot(line[cost], line["final_nll"], "k--", lw=1, label="Pareto front")
        ax.scatter(line[cost], line["final_nll"], s=160, facecolors="none", edgecolors="k")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("final NLL (nats/frame)")
        _name_series(ax.legend(fontsize=7), summary)
    return _save(fig, out)


def plot_speed(summary: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = (
        summary[summary["steps_per_second"].notna()].sort_values("steps_per_second")
        if "steps_per_second" in summary
        else summary.iloc[:0]
    )
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(ok), 3) + 1))
    if len(ok):
        orders = _orders(ok)
        sns.barplot(
            data=ok,
            y="config",
            x="steps_per_second",
            hue="series",
            dodge=False,
            ax=ax,
            hue_order=orders["hue_order"],
            palette=orders["palette"],
        )
    ax.set_xlabel("training steps per second")
    ax.set_ylabel("")
    return _save(fig, out)


def paper_row(trial: pd.Series) -> tuple[str, float] | None:
    """The paper's row (its name, its test nats/frame) that a trial's architecture reproduces, or None."""
    decoder = trial.get("decoder", "pixelcnn")
    if decoder == "baseline":
        return PAPER_ROWS[("baseline", None, None)]
    block, dilation = trial.get("block", "rmb"), trial.get("dilation")
    if pd.isna(dilation) or decoder != "pixelcnn":
        return None
    return PAPER_ROWS.get((decoder, block, bool(dilation)))


def is_ablation_sweep(summary: pd.DataFrame) -> bool:
    """A sweep over the paper's rows: named rows, or more than one architecture of the paper's table."""
    if "row" in summary and summary["row"].notna().any():
        return True
    names = {p[0] for p in (paper_row(r) for _, r in summary.iterrows()) if p is not None}
    return len(names) > 1


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Each trial beside the paper's row it reproduces: our test NLL, floor and excess; the paper's
    NLL and its excess over the paper's lower bound of 86.3 (nats/frame)."""
    rows = []
    for _, r in summary.iterrows():
        paper = paper_row(r)
        rows.append(
            {
                "row": r["row"] if isinstance(r.get("row"), str) else r["config"],
                "paper's row": paper[0] if paper else "-",
                "status": r["status"],
                "test NLL": r.get("test_nats_per_frame", math.nan),
                "floor": r.get("test_floor_nats_per_frame", math.nan),
                "excess": r.get("excess", math.nan),
                "paper NLL": paper[1] if paper else math.nan,
                "paper excess": paper[1] - PAPER_LOWER_BOUND if paper else math.nan,
            }
        )
    return pd.DataFrame(rows)


def scale_statement(summary: pd.DataFrame) -> str:
    """The scale the trials ran at, in the paper's terms, from the trials' own configs."""
    parts = []
    for _, r in summary.drop_duplicates(
        ["frame_height", "seq_len", "context", "steps", "batch_size", "filter_fraction"]
    ).iterrows():
        frames = f"{int(r['frame_height'])}x{int(r['frame_width'])}" if pd.notna(r.get("frame_height")) else "?"
        clip = int(r["seq_len"]) if pd.notna(r.get("seq_len")) else None
        seen = int(r["step_budget"]) * int(r["batch_size"]) if pd.notna(r.get("step_budget")) else None
        tested = r.get("test_sequences_scored")
        parts.append(
            f"{frames} frames, {clip or 'all'}-frame clips scored on the frames after {int(r['context'])}, "
            f"c = {round(128 * float(r['filter_fraction']))}, {int(r['enc_blocks'])} encoder and {int(r['dec_blocks'])} decoder blocks, "
            f"{seen:,} training sequences ({'streamed' if r.get('data') == 'stream' else 'drawn from the fixed set'})"
            + (f", {int(tested):,} test sequences" if pd.notna(tested) else "")
        )
    return "; ".join(parts)


def plot_ablation(table: pd.DataFrame, out: Path) -> Path:
    """Excess over the floor per row: this sweep's beside the paper's (nats/frame, log scale)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = table.melt(id_vars="row", value_vars=["excess", "paper excess"], var_name="source", value_name="nats")
    long["source"] = long["source"].map({"excess": "this sweep", "paper excess": "paper (64x64, full scale)"})
    long = long.dropna(subset=["nats"])
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(table) + 1.5))
    if len(long):
        sns.barplot(data=long, y="row", x="nats", hue="source", order=list(table["row"]), ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
    ax.set_xlabel("test NLL minus its floor (nats/frame; lower is better)")
    ax.set_ylabel("")
    ax.set_title("the paper's rows: excess over the data's floor")
    return _save(fig, out)


def _preset_name(row: pd.Series) -> str:
    return row["preset"] if isinstance(row.get("preset"), str) else row["config"]


def overfit_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The blog post's result beside this run's: iterations to converge and plateaus, per preset."""
    rows = []
    for _, r in summary.iterrows():
        name = _preset_name(r)
        post = BLOG_PLATEAU.get(name)
        rows.append(
            {
                "preset": name,
                "iterations": r["iterations_to_converge"],
                "iterations (post)": BLOG_OVERFIT_ITERATIONS.get(name),
                "plateau": ", ".join(f"{a}-{b}" for a, b in r["plateaus"]) or "no",
                "plateau (post)": "-" if post is None else ("yes" if post else "no"),
            }
        )
    return pd.DataFrame(rows)


def plot_overfit(summary: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path:
    """The blog post's figure: iterations to converge per preset, and the curves with plateaus."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (bar_ax, curve_ax) = plt.subplots(1, 2, figsize=(14, 4.5))
    table = overfit_table(summary)
    sources = {"iterations": "this run", "iterations (post)": "blog post (TF, 64x64)"}
    bars = table.rename(columns=sources).melt(
        id_vars="preset", value_vars=list(sources.values()), var_name="source", value_name="iterations"
    )
    bars["iterations"] = pd.to_numeric(bars["iterations"], errors="coerce")
    sns.barplot(data=bars, x="preset", y="iterations", hue="source", order=list(table["preset"]), ax=bar_ax)
    bar_ax.set_title("iterations to converge on one sequence")
    # under each preset: did it sit on a plateau, here and in the post
    ticks = [
        f"{r['preset']}\nplateau: {'no' if r['plateau'] == 'no' else 'yes'} (post: {r['plateau (post)']})"
        for _, r in table.iterrows()
    ]
    bar_ax.set_xticks(range(len(ticks)), ticks)
    for _, r in summary.iterrows():
        curve = curves[curves["run_id"] == r["run_id"]].sort_values("step")
        curve_ax.plot(curve["step"], curve["train_nats_per_frame"], label=_preset_name(r))
        for a, b in r["plateaus"]:
            curve_ax.axvspan(a, b, alpha=0.15, color=curve_ax.lines[-1].get_color())
    curve_ax.set_yscale("log")
    curve_ax.set_xlabel("step")
    curve_ax.set_ylabel("train NLL (nats/frame)")
    curve_ax.set_title("overfitting curves (shaded: plateaus)")
    curve_ax.legend()
    return _save(fig, out)


def sample_strip(best: pd.Series, params: ReportParams, repo: Path, out: Path) -> Path | None:
    """Frames sampled by the best run after a context, beside the ground truth (None: no checkpoint)."""
    drawn = sample_frames(best, params, repo)
    if drawn is None:
        return None
    truth, sampled, context, label = drawn
    if best.get("output") == "bernoulli":  # say why the samples are black and white and the truth grey
        label += "\nBernoulli output: each drawn pixel is 0 or 255; the grey truth is its target probability"
    return plot_samples(truth, sampled, context, label, out)


def sample_frames(best: pd.Series, params: ReportParams, repo: Path):
    """(truth uint8 (T, C, H, W), sampled uint8 (T - context, C, H, W), context, label), or None.

    The best run's checkpoint, from MLflow, draws frames after the first `context` frames of a
    sequence prepared as that run trained (clip length, pooling); None if it logged no checkpoint.
    """
    import torch

    from vpn.checkpoint import load_checkpoint, load_model
    from vpn.config import TrainConfig
    from vpn.data import MovingMNIST
    from vpn.evaluate import prepare

    uri = best.get("checkpoint")
    if not isinstance(uri, str) or not uri:
        return None
    import mlflow.artifacts

    from pipeline.sweep.tracking import tracking_uri

    with tempfile.TemporaryDirectory(prefix="vpn-report-") as dest:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest, tracking_uri=tracking_uri()))
        if path.is_dir():
            found = sorted(path.rglob("*.pt"))
            if not found:
                raise ResultsError(f"{uri}: no checkpoint file in the artifact")
            path = found[0]
        tcfg = TrainConfig.from_dict(load_checkpoint(path)["train_config"])
        model = load_model(path)
    # Clip length and pooling as the trial trained (its row; an overfit trial's checkpoint holds the
    # already-prepared sequence's config). An overfit run is shown on the sequence it memorised.
    prep = {
        f: int(best[f]) if f in best and not pd.isna(best[f]) else getattr(tcfg, f) for f in ("seq_len", "downsample")
    }
    tcfg = TrainConfig(context=1, **prep)  # prepare() reads only these two fields
    split, index = params.sample_split, params.sample_index
    if isinstance(best.get("overfit_split"), str) and not pd.isna(best.get("overfit_index")):
        split, index = best["overfit_split"], int(best["overfit_index"])
    data = MovingMNIST(repo / params.data, split)
    truth = prepare(data[index][None], tcfg)  # (1, T, C, H, W)
    ctx = min(params.sample_context, truth.shape[1] - 1)
    n = min(params.sample_frames, truth.shape[1] - ctx)
    video = model.sample(truth[:, :ctx], n, generator=torch.Generator().manual_seed(params.sample_seed))
    return truth[0, : ctx + n], video[0], ctx, f"{best['config']}, {split} sequence {index}"


def plot_samples(truth, sampled, context: int, label: str, out: Path) -> Path:
    """Two rows of frames: the ground truth, and the context followed by the model's samples.

    truth: uint8 (T, C, H, W), the first `context` frames given to the model; sampled: uint8
    (T - context, C, H, W), what the model drew for the rest.
    """
    import matplotlib.pyplot as plt

    frames = [np.asarray(truth), np.concatenate([np.asarray(truth[:context]), np.asarray(sampled)])]
    n_t = len(frames[0])
    fig, axes = plt.subplots(2, n_t, figsize=(1.6 * n_t + 0.8, 4.2), squeeze=False, layout="constrained")
    for r, (row, name) in enumerate(zip(frames, ("ground truth", "sampled"))):
        for t in range(n_t):
            ax = axes[r, t]
            image = np.transpose(row[t], (1, 2, 0))
            ax.imshow(
                image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():  # frames the model drew get a red border
                spine.set_color("tab:red" if (r == 1 and t >= context) else "0.6")
                spine.set_linewidth(2 if (r == 1 and t >= context) else 1)
            if r == 0:
                ax.set_title(f"t={t}" + (" (context)" if t < context else ""), fontsize=8)
            if t == 0:
                ax.set_ylabel(name, fontsize=9)
    title = f"best run: {label}\nred: frames drawn by the model, pixel by pixel"
    fig.suptitle(title, fontsize=9)  # constrained layout keeps it clear of the column titles
    return _save(fig, out)


# -- the report ---------------------------------------------------------------------------------------
TABLE_COLUMNS = [
    "config",
    "status",
    "parameters",
    "flops_per_frame",
    "steps",
    "step_budget",
    "final_nll",
    "test_nats_per_frame",
    "test_floor_nats_per_frame",
    "excess",
    "iterations_to_converge",
    "plateaus",
    "steps_per_second",
    "error",
    "run_id",
]


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{a}-{b}" for a, b in value) if value else "none"
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"  # parameters and FLOPs: thousands separated
    if isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"  # integer columns that pandas holds as float because of a NaN
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            text = _fmt(row[c]).replace("|", "/").replace("\n", " ")
            if c == "status" and row[c] != "FINISHED":
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(sweep: str, params: ReportParams, repo: Path) -> dict[str, Any]:
    """Write reports/<sweep>/ and return the report's metrics (also written as metrics.json)."""
    out = repo / params.out_dir / sweep
    out.mkdir(parents=True, exist_ok=True)
    trials, curves = load_results(repo / params.results_dir, sweep)
    lines = [f"# Sweep report: {sweep}", ""]
    metrics: dict[str, Any] = {"sweep": sweep, "trials": len(trials)}

    if trials.empty:
        lines += ["**This sweep has no runs.** MLflow holds no trial for it: run the sweep stage first.", ""]
        metrics.update(finished=0, failed=0, best_nll=None)
        _finish(out, lines, metrics)
        return metrics

    summary = summarise(trials, curves, params)
    finished = summary[summary["status"] == "FINISHED"]
    failed = summary[summary["status"] != "FINISHED"]
    metrics.update(finished=len(finished), failed=len(failed))
    lines += [
        f"{len(summary)} trials: {len(finished)} finished, {len(failed)} did not"
        + (" (marked in bold in the table)." if len(failed) else "."),
        "",
    ]
    if "profile" in summary and summary["profile"].notna().any():
        lines += [f"Profile: {', '.join(sorted(summary['profile'].dropna().astype(str).unique()))}.", ""]
    if "sweep_id" in summary and summary["sweep_id"].notna().any():
        ids = ", ".join(f"`{i}`" for i in sorted(summary["sweep_id"].dropna().astype(str).unique()))
        lines += [
            f"MLflow: experiment `{sweep}`, runs tagged `sweep_id` = {ids} (run ids in the last column below).",
            "",
        ]
    if {"frame_height", "frame_width"} <= set(summary) and summary["frame_height"].notna().any():
        sizes = sorted(
            {
                f"{int(h)}x{int(w)}"
                for h, w in zip(summary["frame_height"], summary["frame_width"])
                if pd.notna(h) and pd.notna(w)
            }
        )
        lines += [
            f"Frames trained on: {', '.join(sizes)}; NLLs are nats per frame of that size, FLOPs per frame at that size.",
            "",
        ]
    if len(failed):
        lines += ["## Trials that did not finish", ""]
        for _, r in failed.iterrows():
            lines.append(
                f"- **{r['config']}**: {r['status']}"
                + (f" ({r['error']})" if isinstance(r.get("error"), str) and r["error"] else "")
            )
        lines.append("")

    figures: list[tuple[str, str]] = []
    # Ranked by the excess of the test NLL over its floor where the trials were scored on the test
    # split (train sweeps), else by the final NLL (overfit sweeps).
    ranked = finished["excess"].notna().any()
    rank = "excess" if ranked else "final_nll"
    if len(finished) and len(curves):
        best = finished.loc[finished[rank].idxmin()]
        metrics["best_nll"] = float(best["final_nll"])
        metrics["best_config"] = best["config"]
        if ranked:
            metrics.update(
                best_test_nats_per_frame=float(best["test_nats_per_frame"]),
                best_test_floor_nats_per_frame=float(best["test_floor_nats_per_frame"]),
                best_excess_nats_per_frame=float(best["excess"]),
            )
            lines += [
                (
                    f"Best: **{best['config']}**, test NLL **{best['test_nats_per_frame']:.2f} nats/frame** against a "
                    f"floor of {best['test_floor_nats_per_frame']:.2f}: **{best['excess']:.2f} nats/frame above the floor** "
                    f"(the paper's best VPN: {87.6 - PAPER_LOWER_BOUND:.1f}, at {PAPER_SCALE.split(',')[0]}). Final validation NLL "
                    f"{best['final_nll']:.2f}."
                ),
                "",
            ]
        else:
            lines += [f"Best final NLL: **{best['final_nll']:.2f} nats/frame**, by {best['config']}.", ""]
        metrics["iterations_to_converge"] = {
            r["config"]: (None if pd.isna(r["iterations_to_converge"]) else int(r["iterations_to_converge"]))
            for _, r in summary.iterrows()
        }
        if is_ablation_sweep(summary):
            table = ablation_table(summary)
            lines += [
                "## The paper's rows",
                "",
                (
                    f"This sweep ran at: {scale_statement(summary)}. The paper's numbers are at: {PAPER_SCALE}. "
                    "Test NLLs at different frame sizes do not compare; the excess over each one's own floor is "
                    f"the closest comparison (the paper's lower bound is {PAPER_LOWER_BOUND})."
                ),
                "",
                markdown_table(table, list(table.columns)),
                "",
            ]
            figures.append(
                (
                    "The paper's rows: excess over the floor, ours beside the paper's",
                    plot_ablation(table, out / "ablation.png").name,
                )
            )
            metrics["rows"] = {
                r["row"]: {
                    "test_nats_per_frame": _json_number(r["test NLL"]),
                    "floor": _json_number(r["floor"]),
                    "excess": _json_number(r["excess"]),
                    "paper_nats_per_frame": _json_number(r["paper NLL"]),
                }
                for _, r in table.iterrows()
            }
        colour = series_name(summary)
        figures.append(
            (
                f"Convergence curves (colour: {colour}, style: width)",
                plot_curves(summary, curves[curves["run_id"].isin(finished["run_id"])], out / "curves.png").name,
            )
        )
        best_curve = curves[curves["run_id"] == best["run_id"]].sort_values("step")
        cols = [c for c in ("step", "train_nats_per_frame", "val_nats_per_frame") if c in best_curve]
        write_text(out / "best_curve.csv", best_curve[cols].to_csv(index=False))
        if is_overfit_sweep(trials):
            figures.append(
                (
                    "Overfitting one sequence: the blog post's figure",
                    plot_overfit(summary, curves, out / "overfit.png").name,
                )
            )
            metrics["plateau"] = {r["config"]: bool(len(r["plateaus"])) for _, r in summary.iterrows()}
            lines += ["Overfitting one sequence, against the blog post (64x64, the presets' full widths):", ""]
            table = overfit_table(summary)
            lines += [markdown_table(table, list(table.columns)), ""]
        figures.append(("Iterations to converge", plot_converge_heatmaps(summary, out / "converge_heatmaps.png").name))
        figures.append(("Final NLL against cost, Pareto front marked", plot_pareto(summary, out / "pareto.png").name))
        if "decoder" in summary and summary["decoder"].nunique() > 1:  # e.g. sweeps/decoders.yaml
            from pipeline.report.decoders import decoder_comparison

            decoder_lines, decoder_figures = decoder_comparison(summary, out)
            lines, figures = lines + decoder_lines, figures + decoder_figures
        figures.append(("Training speed", plot_speed(summary, out / "speed.png").name))
        try:
            strip_path = sample_strip(best, params, repo, out / "samples.png")
        except Exception as err:  # a report without samples beats no report; say why
            log.warning("no sample strip: %s", err)
            lines += [f"_No sample strip: {html.escape(str(err))}_", ""]
            strip_path = None
        if strip_path is None and not any("No sample strip" in line for line in lines):
            lines += [f"_No sample strip: the best run ({best['config']}) logged no checkpoint._", ""]
        if strip_path is not None:
            figures.append(
                (
                    f"Samples of the best run ({best['config']}): ground truth above, context + sampled frames below",
                    strip_path.name,
                )
            )
    else:
        metrics["best_nll"] = None
        lines += ["No trial finished, so there are no curves to compare.", ""]

    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    order = ["excess", "final_nll"] if summary["excess"].notna().any() else ["final_nll"]
    lines += ["## Every trial", "", markdown_table(summary.sort_values(order), TABLE_COLUMNS), ""]
    lines += [
        "## Definitions",
        "",
        (
            "- NLL: nats per frame (sum over pixels), as in Kalchbrenner et al. 2016; final NLL is the last "
            "validation value (train where no validation ran)."
        ),
        (
            "- test NLL (test_nats_per_frame): the test split scored at the end of the trial with the trial's own frame "
            "preparation, frames context..T-1 given the ones before; floor (test_floor_nats_per_frame): the entropy of "
            "exactly those frames' grey levels, the least any model can score; excess: test NLL minus floor. Trials "
            "are ranked by the excess."
        ),
        (
            f"- iterations to converge: first step with L(s) - L_end <= {params.converge_fraction} (L_0 - L_end) "
            "on the train curve; for overfit sweeps, the step at which the NLL came within tolerance of the "
            "sequence's floor."
        ),
        (
            f"- plateau: a stretch of >= {params.plateau_min_fraction:.0%} of the steps before convergence in which "
            f"the smoothed train NLL falls by < {params.plateau_progress:.0%} of the drop still to come after it, "
            "away from the first and last 5% of the total drop."
        ),
        "",
    ]
    _finish(out, lines, metrics)
    return metrics


def _json_number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _finish(out: Path, lines: list[str], metrics: dict[str, Any]) -> None:
    import markdown

    text = "\n".join(lines)
    write_text(out / "report.md", text)
    body = markdown.markdown(text, extensions=["tables"])
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
    title = html.escape(lines[0].lstrip("# "))
    write_text(
        out / "report.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>{body}</body></html>",
    )
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    from pipeline.params import load_section, stage_argparser

    parser = stage_argparser("Turn sweep results into comparison reports.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import matplotlib

    matplotlib.use("Agg")
    params = load_section(ReportParams, "report", args.params)
    repo = Path(args.params).resolve().parent
    for sweep in params.sweeps:
        metrics = build_report(sweep, params, repo)
        print(
            f"report {sweep}: {params.out_dir}/{sweep}/report.md ({json.dumps({k: metrics.get(k) for k in ('trials', 'finished', 'failed', 'best_nll')})})"
        )
    return 0
