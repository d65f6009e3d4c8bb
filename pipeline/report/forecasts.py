"""The report's free-running section: our trials' MSE, MAE, SSIM, PSNR beside OpenSTL's Moving MNIST rows.

Ours: each train-mode trial's free-running scores (pipeline.sweep.record.forecasting, vpn.forecast), read
from trials.parquet. The table leads with the metrics of the per-pixel mean of the k samples: the
Bernoulli head draws binary frames, and against grey targets a binary draw pays for every grey
pixel however good the model is, while OpenSTL's deterministic models, trained with MSE, predict the
conditional mean, which the mean frame estimates. The mean over samples and the best of k follow.

OpenSTL's rows: copied from docs/en/model_zoos/video_benchmarks.md of github.com/chengtan9907/OpenSTL
(commit c74deb5d4c3da585291f9f18281f3fefdbba3a54; the file last changed in 8cac741), table "STL
Benchmarks on MMNIST": 64x64 frames, 10 frames predicted from 10, on the standard test set.

MSE and MAE are sums over a frame's pixels (OpenSTL's definition), so each table also gives them per
pixel, the unit the two are compared in (compare_line); each table's caption states its frame size,
its test set and how many sequences were scored. Where MSE and the test NLL order the trials
differently, metric_order_line says so with the run's own numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from pipeline.report.figures import save_figure
from pipeline.report.paper import PAPER_PIXELS, frame_pixels, scale_statement
from pipeline.report.stats import config_keys
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
OPENSTL_TEST_SET = "the 10,000 sequences of the standard test file (mnist_test_seq.npy)"


def has_forecasts(summary: pd.DataFrame) -> bool:
    return "test_mse" in summary and summary["test_mse"].notna().any()


def ours_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per trial with free-running scores, ordered by the mean frame's MSE."""
    scored = summary[summary["test_mse"].notna()].sort_values("test_mse_mean_frame")
    pixels = frame_pixels(scored)
    rows = []
    for _, r in scored.iterrows():
        rows.append(
            {
                "trial": r["config"],
                "MSE (mean frame)": r["test_mse_mean_frame"],
                "MAE (mean frame)": r["test_mae_mean_frame"],
                "SSIM (mean frame)": r["test_ssim_mean_frame"],
                "PSNR (mean frame)": r["test_psnr_mean_frame"],
                "MSE/pixel (mean frame)": r["test_mse_mean_frame"] / pixels if pixels else math.nan,
                "MAE/pixel (mean frame)": r["test_mae_mean_frame"] / pixels if pixels else math.nan,
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
    """OpenSTL's published rows, with MSE and MAE also per pixel (over a 64x64 frame's 4,096)."""
    table = pd.DataFrame(OPENSTL_ROWS, columns=["method", "setting", "MSE", "MAE", "SSIM"])
    return table.assign(**{"MSE/pixel": table["MSE"] / PAPER_PIXELS, "MAE/pixel": table["MAE"] / PAPER_PIXELS})


def test_set(summary: pd.DataFrame) -> str:
    """The test split the trials were scored on, as the data stage recorded it in the data's stats.json
    (the standard file's name where `generate.test_file` was set); "the data's test split" where unreadable."""
    for folder in summary["data_path"].dropna().unique() if "data_path" in summary else ():
        try:
            test = json.loads((Path(str(folder)) / "stats.json").read_text())["splits"]["test"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if test.get("source_file"):
            return f"the standard test file ({Path(test['source_file']).name})"
        return "the test split the data stage generated (not the standard file)"
    return "the data's test split"


def _ints(values: pd.Series) -> str:
    return ", ".join(f"{int(v):,}" for v in sorted(set(values.dropna())))


def ours_caption(scored: pd.DataFrame) -> str:
    """What our table's figures are: how many test sequences of which test set, at which size, predicting
    how many frames from how many, with how many samples."""
    sizes = sorted({f"{int(h)}x{int(w)}" for h, w in zip(scored["frame_height"], scored["frame_width"])})
    contexts = scored["context"].dropna().astype(int)
    horizons = (scored["seq_len"] - scored["context"]).dropna() if "seq_len" in scored else pd.Series(dtype=float)
    predicted = f"{_ints(horizons)} frames predicted from {_ints(contexts)}"
    if not len(horizons):
        predicted = f"the frames after the first {_ints(contexts)}"
    pixels = frame_pixels(scored)
    per = f"summed over a frame's {pixels:,} pixels" if pixels else "summed over a frame's pixels"
    return (
        f"Ours: the first {_ints(scored['test_forecast_sequences'])} sequences of {test_set(scored)}, "
        f"{', '.join(sizes)} frames, {predicted}, k = {_ints(scored['test_forecast_samples'])} samples each; "
        f"MSE and MAE {per}, and per pixel:"
    )


def compare_line(ours: pd.DataFrame, scored: pd.DataFrame) -> str:
    """Our best mean frame beside OpenSTL's rows in the unit both share, MSE per pixel, and where it falls."""
    theirs = openstl_table()["MSE/pixel"]
    best = ours.iloc[0]
    value = best["MSE/pixel (mean frame)"]
    if not math.isfinite(value):
        return ""
    below = int((theirs > value).sum())
    where = (
        "below every one of their rows" if below == len(theirs)
        else "above every one of their rows" if below == 0
        else f"between their rows (below {below} of {len(theirs)})"
    )  # fmt: skip
    pixels = frame_pixels(scored)
    same = pixels == PAPER_PIXELS
    return (
        f"Per pixel, the unit both tables share, our best mean frame ({best['trial']}) has an MSE of {value:.4g}, "
        f"against OpenSTL's {theirs.min():.4g} to {theirs.max():.4g}: {where}. "
        + (
            "Our frames are the size of theirs."
            if same
            else "Only the unit is shared: our frames are smaller and pooled from 64x64, and the horizon and the "
            "number of sequences are not theirs (the captions), so this places our numbers beside theirs in one "
            "unit; it does not rank the models."
        )
    )


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
            f": ours over {pixels:,}, theirs over 4,096, so at another frame size they do not compare; per "
            "pixel (the /pixel columns) they compare in unit."
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
    scored = summary[summary["test_mse"].notna()]
    order_line, order = metric_order(summary)
    lines = [
        "## Predicted frames: MSE, MAE, SSIM, PSNR beside OpenSTL",
        "",
        scale_line(summary),
        "",
        ours_caption(scored),
        "",
        markdown_table(ours, list(ours.columns)),
        "",
        *([order_line, ""] if order_line else []),
        (
            f"OpenSTL's Moving MNIST rows, as published: 64x64 frames, 10 predicted from 10, on {OPENSTL_TEST_SET}; "
            "MSE and MAE summed over a frame's 4,096 pixels, and per pixel:"
        ),
        "",
        markdown_table(openstl_table(), ["method", "setting", "MSE", "MAE", "SSIM", "MSE/pixel", "MAE/pixel"]),
        "",
        *([line, ""] if (line := compare_line(ours, scored)) else []),
    ]
    best = ours.iloc[0]
    metrics = {
        "best_forecast_trial": best["trial"],
        **{f"best_forecast_{k.split(' ')[0].lower()}_mean_frame": _number(best[k]) for k in ours.columns[1:5]},
        "best_forecast_mse_per_pixel_mean_frame": _number(best["MSE/pixel (mean frame)"]),
        **({"forecast_order": order} if order else {}),
    }
    figure = ("Free-running metrics per predicted frame", plot_by_frame(summary, out / "forecast.png").name)
    return lines, [figure], metrics


# Why MSE and the likelihood may rank trials differently (metric_order).
MSE_REASON = (
    "MSE scores one prediction against the truth, and the prediction that minimises it is the per-pixel "
    "mean, a blur: it rewards hedging over where a digit goes and cannot see whether a frame's pixels hang "
    "together, which the likelihood charges for pixel by pixel. The report ranks by the likelihood (the "
    "test excess), the paper's measure."
)


def metric_order(summary: pd.DataFrame) -> tuple[str, dict | None]:
    """Where the mean frame's MSE and the test NLL order the configs differently: a sentence with the
    run's numbers and the reason, and the same for metrics.json; ("", None) where they agree (or < 2 configs).
    A config's figures are means over its seeds."""
    if "test_nats_per_frame" not in summary:
        return "", None
    ok = summary[summary["test_mse_mean_frame"].notna() & summary["test_nats_per_frame"].notna()]
    if ok.empty:
        return "", None
    names = ok["row"].where(ok["row"].map(lambda v: isinstance(v, str)), ok["config"]) if "row" in ok else ok["config"]
    grouped = ok.assign(name=names).groupby(config_keys(ok), sort=False)
    configs = grouped.agg(
        name=("name", "first"),
        mse=("test_mse_mean_frame", "mean"),
        nll=("test_nats_per_frame", "mean"),
        sequences=("test_forecast_sequences", "max"),
    )
    if len(configs) < 2:
        return "", None
    by_mse, by_nll = list(configs.sort_values("mse")["name"]), list(configs.sort_values("nll")["name"])
    if by_mse == by_nll:
        return "", None
    from scipy.stats import kendalltau

    tau = float(kendalltau(configs["mse"], configs["nll"]).statistic)
    first = configs.sort_values("mse").iloc[0]
    others = configs[configs["name"] != first["name"]]
    rank = by_nll.index(first["name"]) + 1
    best_nll = configs.sort_values("nll").iloc[0]
    tested = ok["test_sequences_scored"].max() if "test_sequences_scored" in ok else math.nan
    counts = f"MSE over {int(first['sequences']):,} test sequences" + (
        f", the NLL over {int(tested):,}" if pd.notna(tested) else ""
    )
    if rank > 1:
        detail = (
            f"by the mean frame's MSE {first['name']} comes first ({first['mse']:.2f}, against "
            f"{others['mse'].min():.2f} to {others['mse'].max():.2f} for the others), by the test NLL it is "
            f"{rank} of {len(configs)} ({first['nll']:.2f} nats/frame, {first['nll'] - best_nll['nll']:.2f} "
            f"behind {best_nll['name']})"
        )
    else:
        detail = (
            f"both put {first['name']} first, but order the rest differently (by MSE: {', '.join(by_mse[1:])}; "
            f"by the NLL: {', '.join(by_nll[1:])})"
        )
    line = (
        f"**MSE and the likelihood disagree here** (Kendall's tau {tau:+.2f} over {len(configs)} configs; {counts}): "
        f"{detail}. {MSE_REASON}"
    )
    order = {"by_mse": by_mse, "by_nll": by_nll, "kendall_tau": tau, "mse_first": first["name"], "its_nll_rank": rank}
    return line, order


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)
