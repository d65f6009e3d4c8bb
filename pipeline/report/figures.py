"""Every figure of the report (seaborn), each written as a PNG by save_figure.

One palette and one hue/style order (`_orders`) serve every figure of a sweep, so that a depth (or
the paper's row) has one colour throughout the report. pipeline/report/decoders.py draws its own
figure and saves it here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.report.analysis import pareto_front
from pipeline.report.paper import overfit_table, preset_name
from vpn.files import atomic_path


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


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_curves(summary: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Path:
    """curves.png: train and val nats/frame against step, a panel per split, one line per trial
    (colour: the series, style: width), log scale."""
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
    return save_figure(fig, out)


def plot_converge_heatmaps(summary: pd.DataFrame, out: Path) -> Path:
    """converge_heatmaps.png: mean iterations to converge over each pair of encoder blocks, decoder
    blocks and filter fraction (finished trials)."""
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
    return save_figure(fig, out)


def plot_pareto(summary: pd.DataFrame, out: Path) -> Path:
    """pareto.png: final NLL against parameters and against FLOPs per frame, the Pareto front marked."""
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
    return save_figure(fig, out)


def plot_speed(summary: pd.DataFrame, out: Path) -> Path:
    """speed.png: each config's mean training steps per second, slowest first."""
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
    return save_figure(fig, out)


def plot_ablation(table: pd.DataFrame, out: Path) -> Path:
    """Excess over the floor per row: this sweep's beside the paper's, per pixel (log scale): nats/frame
    sum over a frame's pixels, and the paper's frames are 64x64 (pipeline.report.paper.SIZE_NOTE)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import seaborn as sns

    sources = {"excess/pixel": "this sweep", "paper excess/pixel": "paper (64x64, full scale)"}
    long = table.melt(id_vars="row", value_vars=list(sources), var_name="source", value_name="nats")
    long["source"] = long["source"].map(sources)
    long = long.dropna(subset=["nats"])
    long = long[long["nats"] > 0]  # a log axis; an excess is >= 0
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(table) + 1.5))
    if len(long):
        sns.barplot(data=long, y="row", x="nats", hue="source", order=list(table["row"]), ax=ax)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2g", fontsize=8, padding=2)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
    ax.set_xlabel("test NLL minus its floor (nats/pixel; lower is better)")
    ax.set_ylabel("")
    ax.set_title("the paper's rows: excess over the data's floor")
    return save_figure(fig, out)


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
        curve_ax.plot(curve["step"], curve["train_nats_per_frame"], label=preset_name(r))
        for a, b in r["plateaus"]:
            curve_ax.axvspan(a, b, alpha=0.15, color=curve_ax.lines[-1].get_color())
    curve_ax.set_yscale("log")
    curve_ax.set_xlabel("step")
    curve_ax.set_ylabel("train NLL (nats/frame)")
    curve_ax.set_title("overfitting curves (shaded: plateaus)")
    curve_ax.legend()
    return save_figure(fig, out)


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
    return save_figure(fig, out)
