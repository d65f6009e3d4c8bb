"""A searched sweep's section of the report (search.algorithm random or optuna): which knob matters.

    lines, figures, metrics = search_section(summary, out_dir)

summary: pipeline.report.analysis.summarise's table. A sweep is searched when its trials carry
`est_gpu_hours` (pipeline.sweep.trials.searched_runs logs it on searched trials only). Its axes are the
config fields (pipeline.report.stats.config_columns, the label left out) whose value varies over the
finished trials.

- parallel.png: the parallel coordinates of the finished trials, one line per trial through each
  axis (scaled to its own min..max) and the test excess, coloured by the excess;
- importance.png: each axis's share of the excess's variance by fANOVA (Hutter et al. 2014), as
  optuna.importance.FanovaImportanceEvaluator computes it (a random forest of 64 trees, seed 0) on
  the trials as an Optuna study; normalised to sum to 1;
- compute.png: test excess against training compute, the Pareto front marked and a power-law trend
  fitted by least squares in log-log space: log10(excess) = log10(a) + b log10(C), over the trials
  with a positive excess (three at least).

Training compute C = 3 x F x (T - 1) x B x S FLOPs: F the counted forward FLOPs of one frame
(`flops_per_frame`, at the frame size trained on), T - 1 the frames a clip predicts, B the batch
size, S the steps the trial ran (early-stopped trials ran fewer); 3 x for forward and backward, as
pipeline.sweep.spec.budget counts a trial's cost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.report.analysis import pareto_front
from pipeline.report.figures import save_figure
from pipeline.report.stats import config_columns, scored
from pipeline.report.tables import markdown_table
from pipeline.sweep.spec.budget import SEQ_LEN

COST_COLUMN = "est_gpu_hours"
IMPORTANCE_METHOD = "fANOVA (optuna.importance.FanovaImportanceEvaluator, 64 trees, seed 0)"


def is_searched(summary: pd.DataFrame) -> bool:
    return COST_COLUMN in summary.columns and summary[COST_COLUMN].notna().any()


def searched_axes(summary: pd.DataFrame) -> list[str]:
    """The config fields whose value varies over the finished, scored trials, in the table's order."""
    ok = scored(summary)
    return [c for c in config_columns(ok) if c not in ("config", "row") and ok[c].astype(str).nunique() > 1]


def training_flops(summary: pd.DataFrame) -> pd.Series:
    """(N,) training compute of each trial in FLOPs (module docstring); NaN where a factor is missing."""
    frames = summary["seq_len"].astype(float).fillna(SEQ_LEN) - 1 if "seq_len" in summary else SEQ_LEN - 1
    steps = summary["steps"] if "steps" in summary else pd.Series(math.nan, index=summary.index)
    return (
        3.0
        * summary["flops_per_frame"].astype(float)
        * frames
        * summary["batch_size"].astype(float)
        * steps.astype(float)
    )


def _distribution(values: pd.Series):
    """The Optuna distribution a column's values were drawn from, as far as the table shows it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return CategoricalDistribution(sorted(values.astype(str).unique()))
    if pd.api.types.is_integer_dtype(values):
        return IntDistribution(int(values.min()), int(values.max()))
    return FloatDistribution(float(values.min()), float(values.max()))


def _value(value: Any, distribution: Any) -> Any:
    """A table cell as its distribution's type (iterrows turns ints into floats in a mixed row)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return str(value)
    return int(value) if isinstance(distribution, IntDistribution) else float(value)


def importances(table: pd.DataFrame, axes: list[str], target: str = "excess", seed: int = 0) -> dict[str, float]:
    """{axis: share of the target's variance} by fANOVA, largest first; table: one row per trial."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {a: _distribution(table[a]) for a in axes}
    study = optuna.create_study(direction="minimize")
    for _, row in table.iterrows():
        params = {a: _value(row[a], d) for a, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[target])))
    evaluator = FanovaImportanceEvaluator(seed=seed)
    return dict(get_param_importances(study, evaluator=evaluator, params=axes))


def power_fit(cost: np.ndarray, excess: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of excess = a C^b, least squares on log10 of both; None under 3 positive points."""
    keep = (cost > 0) & (excess > 0) & np.isfinite(cost) & np.isfinite(excess)
    if keep.sum() < 3 or np.unique(cost[keep]).size < 2:
        return None
    b, log_a = np.polyfit(np.log10(cost[keep]), np.log10(excess[keep]), 1)
    return float(10**log_a), float(b)


def plot_parallel(table: pd.DataFrame, axes: list[str], out: Path) -> Path:
    """parallel.png: one line per trial through its scaled axes and test excess, colour: the excess."""
    import matplotlib.pyplot as plt

    columns = [*axes, "excess"]
    fig, ax = plt.subplots(figsize=(1.8 * len(columns) + 2, 4.2))
    scaled, ticks = [], []
    for c in columns:
        values = pd.to_numeric(table[c], errors="coerce")
        if values.isna().any():  # a categorical axis: its values' rank
            codes = {v: k for k, v in enumerate(sorted(table[c].astype(str).unique()))}
            values = table[c].astype(str).map(codes).astype(float)
        low, high = float(values.min()), float(values.max())
        scaled.append((values - low) / (high - low) if high > low else values * 0 + 0.5)
        ticks.append(f"{c}\n{low:.3g} .. {high:.3g}")
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(float(table["excess"].min()), float(table["excess"].max()))
    ys = np.stack([s.to_numpy(float) for s in scaled], axis=1)  # (trials, columns)
    for y, e in zip(ys, table["excess"].to_numpy(float)):
        ax.plot(range(len(columns)), y, color=cmap(norm(e)), lw=1.5, alpha=0.85)
    ax.set_xticks(range(len(columns)), ticks, fontsize=8)
    ax.set_yticks([0, 1], ["min", "max"])
    for k in range(len(columns)):
        ax.axvline(k, color="0.7", lw=0.8, zorder=0)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="test excess (nats/frame)")
    ax.set_title(f"{len(table)} finished trials, each axis scaled to its own range", fontsize=10)
    return save_figure(fig, out)


def plot_importance(scores: dict[str, float], out: Path) -> Path:
    """importance.png: a bar per axis, its fANOVA share."""
    import matplotlib.pyplot as plt

    names = list(scores)[::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [scores[n] for n in names], color="tab:blue")
    ax.set_xlabel("share of the test excess's variance")
    ax.set_title(IMPORTANCE_METHOD, fontsize=9)
    return save_figure(fig, out)


def plot_compute(table: pd.DataFrame, fit: tuple[float, float] | None, out: Path) -> Path:
    """compute.png: test excess against training FLOPs (log-log), Pareto front and the fitted trend."""
    import matplotlib.pyplot as plt

    cost, excess = table["compute"].to_numpy(float), table["excess"].to_numpy(float)
    front = pareto_front(cost, excess)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(cost, excess, s=40, color="tab:blue", label="trial")
    order = np.argsort(cost[front])
    ax.plot(cost[front][order], excess[front][order], "o-", color="tab:red", mfc="none", ms=10, label="Pareto front")
    if fit is not None:
        grid = np.geomspace(cost.min(), cost.max(), 50)
        ax.plot(grid, fit[0] * grid ** fit[1], "--", color="0.3", label=f"fit: {fit[0]:.3g} C^{fit[1]:.3f}")
    ax.set_xscale("log")
    if (excess > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs: 3 x counted forward FLOPs x frames x batch x steps)")
    ax.set_ylabel("test excess (nats/frame)")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def search_section(summary: pd.DataFrame, out_dir: Path) -> tuple[list[str], list[tuple[str, str]], dict[str, Any]]:
    """Markdown lines, [(title, PNG name)] and metrics of a searched sweep (module docstring); empty
    for a grid."""
    if not is_searched(summary):
        return [], [], {}
    ok = scored(summary)
    axes = searched_axes(summary)
    lines = ["## The search: which knob matters", ""]
    if len(ok) < 2 or not axes:
        return (
            lines + [f"{len(ok)} finished trials with a test score over {len(axes)} varied axes: nothing to rank.", ""],
            [],
            {},
        )
    out_dir = Path(out_dir)
    table = ok.assign(compute=training_flops(ok).to_numpy())
    figures = [("The searched trials, parallel coordinates", plot_parallel(table, axes, out_dir / "parallel.png").name)]
    scores = importances(table, axes)
    figures.append(
        (f"Parameter importance: {IMPORTANCE_METHOD}", plot_importance(scores, out_dir / "importance.png").name)
    )
    fit = power_fit(table["compute"].to_numpy(float), table["excess"].to_numpy(float))
    title = "Test excess against training compute, Pareto front and fitted trend"
    figures.append((title, plot_compute(table, fit, out_dir / "compute.png").name))
    ranked = pd.DataFrame({"axis": list(scores), "importance": list(scores.values())})
    trend = (
        f"Trend: excess = a C^b fitted by least squares on log10(excess) against log10(C) over the "
        f"{int(((table['compute'] > 0) & (table['excess'] > 0)).sum())} trials with a positive excess: "
        f"a = {fit[0]:.4g}, b = {fit[1]:+.3f}."
        if fit
        else "Trend: fewer than three trials with a positive excess and distinct compute: no fit."
    )
    lines += [
        (
            f"{len(ok)} finished trials over the axes {', '.join(f'`{a}`' for a in axes)}. Importance: "
            f"{IMPORTANCE_METHOD}, each axis's share of the test excess's variance. Training compute C: 3 x "
            "counted forward FLOPs per frame x predicted frames x batch size x steps run."
        ),
        "",
        markdown_table(ranked, {"axis": "axis", "importance": "importance (fANOVA)"}),
        "",
        trend,
        "",
    ]
    metrics = {"importance": scores, "compute_fit": {"a": fit[0], "b": fit[1]} if fit else None}
    return lines, figures, metrics
