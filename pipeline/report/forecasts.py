"""The report's free-running section: our trials' MSE, MAE, SSIM, PSNR beside OpenSTL's Moving MNIST rows.

Ours: each train-mode trial's free-running scores (pipeline.sweep.record.forecasting, vpn.forecast), read
from trials.parquet. The table leads with the metrics of the per-pixel mean of the k samples: the
Bernoulli head draws binary frames, and against grey targets a binary draw pays for every grey
pixel however good the model is, while OpenSTL's deterministic models, trained with MSE, predict the
conditional mean, which the mean frame estimates. The mean over samples and the best of k follow.

OpenSTL's rows: copied from docs/en/model_zoos/video_benchmarks.md of github.com/chengtan9907/OpenSTL
(commit c74deb5d4c3da585291f9f18281f3fefdbba3a54; the file last changed in 8cac741), table "STL
Benchmarks on MMNIST": 64x64 frames, 10 frames predicted from 10, on the standard test set.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline.report.figures import save_figure
from pipeline.report.paper import scale_statement
from pipeline.report.tables import markdown_table
from vpn.video_metrics import METRICS

OPENSTL_SOURCE = (
    "OpenSTL, docs/en/model_zoos/video_benchmarks.md (github.com/chengtan9907/OpenSTL, commit c74deb5), "
    'table "STL Benchmarks on MMNIST"'
)
# (method, training setting, MSE, MAE, SSIM) as published there.
OPENSTL_ROWS = (
    ("ConvLSTM-L", "200 epoch", 27.78, 86.14, 0.9343),
    ("PredRNN", "200 epoch", 23.97, 72.82, 0.9462),
    ("PredRNN", "2000 epoch", 26.43, 77.52, 0.9411),
    ("PredRNN++", "200 epoch", 22.06, 69.58, 0.9509),
    ("PredRNN++", "2000 epoch", 14.07, 48.91, 0.9698),
    ("SimVP+IncepU", "200 epoch", 32.15, 89.05, 0.9268),
    ("SimVP+IncepU", "2000 epoch", 21.15, 64.15, 0.9536),
    ("SimVP+gSTA-S", "200 epoch", 26.69, 77.19, 0.9402),
    ("SimVP+gSTA-S", "2000 epoch", 15.05, 49.80, 0.9675),
)
BY_FRAME = {m: f"test_{m}_by_frame" for m in METRICS}


def has_forecasts(summary: pd.DataFrame) -> bool:
    return "test_mse" in summary and summary["test_mse"].notna().any()


def ours_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per trial with free-running scores, ordered by the mean frame's MSE."""
    scored = summary[summary["test_mse"].notna()].sort_values("test_mse_mean_frame")
    rows = []
    for _, r in scored.iterrows():
        rows.append(
            {
                "trial": r["config"],
                "MSE (mean frame)": r["test_mse_mean_frame"],
                "MAE (mean frame)": r["test_mae_mean_frame"],
                "SSIM (mean frame)": r["test_ssim_mean_frame"],
                "PSNR (mean frame)": r["test_psnr_mean_frame"],
                "MSE (per sample)": r["test_mse"],
                "SSIM (per sample)": r["test_ssim"],
                "PSNR (per sample)": r["test_psnr"],
                "MSE (best of k)": r["test_mse_best"],
                "SSIM (best of k)": r["test_ssim_best"],
                "k": int(r["test_forecast_samples"]),
                "sequences": int(r["test_forecast_sequences"]),
            }
        )
    return pd.DataFrame(rows)


def openstl_table() -> pd.DataFrame:
    return pd.DataFrame(OPENSTL_ROWS, columns=["method", "setting", "MSE", "MAE", "SSIM"])


def scale_line(summary: pd.DataFrame) -> str:
    """Where ours ran, against OpenSTL's setting, and why the numbers do not transfer one to one."""
    scored = summary[summary["test_mse"].notna()]
    size = scored["frame_height"].dropna()
    pixels = int(size.iloc[0]) ** 2 if len(size) else None
    temps = sorted({float(t) for t in scored.get("forecast_temperature", pd.Series(dtype=float)).dropna()})
    return (
        f"Ours ran at: {scale_statement(scored)}; k samples drawn at temperature "
        f"{', '.join(f'{t:g}' for t in temps) or '?'}, each frame fed back (free-running). "
        f"OpenSTL's ran at 64x64, 10 frames predicted from 10, on the 10,000 standard test sequences "
        f"({OPENSTL_SOURCE}). OpenSTL's models are deterministic: one prediction per sequence. Ours is "
        "sampled: a draw is binary (the Bernoulli head), so we lead with the per-pixel mean of the k "
        "samples, the counterpart of a deterministic model's prediction of the mean. MSE and MAE are "
        "sums over a frame's pixels"
        + (
            f": ours over {pixels:,}, theirs over 4,096, so at another frame size they do not compare."
            if pixels and pixels != 4096
            else "."
        )
    )


def plot_by_frame(summary: pd.DataFrame, out: Path) -> Path:
    """Each metric (mean over samples) against the predicted frame, one line per trial."""
    import matplotlib.pyplot as plt

    scored = summary[summary[BY_FRAME["mse"]].notna()] if BY_FRAME["mse"] in summary else summary.iloc[:0]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.4), layout="constrained")
    for ax, m in zip(axes, METRICS):
        for _, r in scored.iterrows():
            values = list(r[BY_FRAME[m]])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=r["config"])
        ax.set_xlabel("predicted frame (after the context)")
        ax.set_title(f"{m.upper()} (mean over samples)")
    if len(scored) <= 12:
        axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle("Free-running prediction: how each metric degrades over the horizon", fontsize=10)
    return save_figure(fig, out)


def forecast_section(summary: pd.DataFrame, out: Path) -> tuple[list[str], list[tuple[str, str]], dict]:
    """(markdown lines, figures, metrics) of the section; nothing when no trial has forecasts."""
    if not has_forecasts(summary):
        return [], [], {}
    ours = ours_table(summary)
    lines = [
        "## Predicted frames: MSE, MAE, SSIM, PSNR beside OpenSTL",
        "",
        scale_line(summary),
        "",
        markdown_table(ours, list(ours.columns)),
        "",
        "OpenSTL's Moving MNIST rows, as published (MSE and MAE per 64x64 frame):",
        "",
        markdown_table(openstl_table(), ["method", "setting", "MSE", "MAE", "SSIM"]),
        "",
    ]
    best = ours.iloc[0]
    metrics = {
        "best_forecast_trial": best["trial"],
        **{f"best_forecast_{k.split(' ')[0].lower()}_mean_frame": _number(best[k]) for k in ours.columns[1:5]},
    }
    figure = ("Free-running metrics per predicted frame", plot_by_frame(summary, out / "forecast.png").name)
    return lines, [figure], metrics


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)
