"""The decoder comparison of a sweep whose trials differ in `decoder` (sweeps/decoders.yaml).

    lines, figures = decoder_comparison(summary, out_dir)

summary: pipeline.report.analysis.summarise's table (one row per trial: the configs, parameters,
flops_per_frame, steps_per_second, status, final_nll). Returns markdown lines for the report and
(title, PNG file name) of the figure written into out_dir.

Pairs at matched parameters. Each trial of another decoder is paired with the reference decoder's
("pixelcnn", the paper's) trial of nearest parameter count among those run under the same conditions
(every config field but the decoder and the three size axes: blocks, output, dilation, training
settings, seed, frame size). The same depth and width wins a tie. A pair is matched when the two
parameter counts are within `tolerance` (10%) of each other; only matched pairs enter the verdict.

Cost. Parameters; FLOPs per frame as vpn counts them (every conv's whole kernel: the masked decoder's
3x3 kernels count their 3 always-masked taps, which neither a forward pass nor the stacks execute,
so this figure flatters the stacks; see vpn.model.StacksDecoder); and measured training steps per
second, which shows the cost that runs.

Verdict. The mean and range of the NLL difference (other - reference) over the matched pairs, and
how many pairs it favours. Where a config ran with several seeds, the spread of its NLL over seeds
(the largest standard deviation of any config) is the noise floor: a mean difference within two of
it is "no clear difference"; the 95% t interval of the mean difference over the matched pairs (each
pair shares its seed) is given, with whether it excludes 0 (pipeline.report.stats). With one seed
per config there is no noise estimate, and the report says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report.figures import save_figure
from pipeline.report.stats import t_interval
from pipeline.report.tables import markdown_table
from pipeline.sweep.record.results import EXCESS, rank_column

REFERENCE = "pixelcnn"
# The axes that set a model's size: a pair may differ in them (that is how sizes are matched).
SIZE_COLUMNS = ("enc_blocks", "dec_blocks", "filter_fraction")
# The conditions a pair shares (pipeline.sweep.record.results' columns, as pipeline.report.analysis.load_results names
# them): the model's fields but the decoder and the sizes, the training fields that change the
# result (not logging, checkpointing or the device), the seed's sample, and the frame size.
CONDITIONS = (
    "block", "dilation", "output", "image_channels", "step_budget", "batch_size", "lr", "rmsprop_alpha",
    "rmsprop_eps", "grad_clip", "seed", "val_batches", "context", "seq_len", "downsample", "amp", "cpu_amp",
    "sample", "profile", "frame_height", "frame_width",
)  # fmt: skip


def with_score(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The summary with a `score` column, and its name: the results' ranking (rank_column), so the test
    NLL's excess over its floor where the trials were scored on the test split (within one sweep all
    pairs share the test frames, so the floor cancels and a difference of excesses is a difference of
    test NLLs), else the final NLL."""
    rank = rank_column(summary, "final_nll")
    return summary.assign(score=summary[rank]), "test NLL" if rank == EXCESS else "final NLL"


def size_label(row: pd.Series) -> str:
    return f"enc {int(row['enc_blocks'])} / dec {int(row['dec_blocks'])} / f {row['filter_fraction']:g}"


def _condition_key(row: pd.Series, columns: list[str]) -> tuple[str, ...]:
    return tuple("-" if pd.isna(row[c]) else str(row[c]) for c in columns)


def match_pairs(summary: pd.DataFrame, reference: str = REFERENCE, tolerance: float = 0.1) -> pd.DataFrame:
    """One row per finished trial of a decoder other than `reference`, with its partner (module
    docstring): sizes, decoders, parameters, FLOPs, steps/s and final NLL of both, the ratios, the
    NLL difference (other - reference) and `matched` (parameters within tolerance). Empty if there is
    no reference trial or no other decoder."""
    summary, _ = with_score(summary)
    ok = summary[(summary["status"] == "FINISHED") & summary["score"].notna()]
    columns = [c for c in CONDITIONS if c in ok.columns]
    refs = ok[ok["decoder"] == reference]
    rows = []
    for _, trial in ok[ok["decoder"] != reference].iterrows():
        key = _condition_key(trial, columns)
        same = refs[[_condition_key(r, columns) == key for _, r in refs.iterrows()]]
        if same.empty:
            continue
        distance = np.abs(np.log(same["parameters"].to_numpy(float) / float(trial["parameters"])))
        same_size = np.array([all(r[c] == trial[c] for c in SIZE_COLUMNS) for _, r in same.iterrows()])
        partner = same.iloc[int(np.lexsort((~same_size, distance))[0])]  # nearest; the same size on a tie
        ratio = float(trial["parameters"]) / float(partner["parameters"])
        speed = trial.get("steps_per_second"), partner.get("steps_per_second")
        rows.append(
            {
                "size": size_label(trial),
                "reference_size": size_label(partner),
                "decoder": trial["decoder"],
                "reference": reference,
                "parameters": int(trial["parameters"]),
                "reference_parameters": int(partner["parameters"]),
                "parameter_ratio": ratio,
                "flops_ratio": float(trial["flops_per_frame"]) / float(partner["flops_per_frame"]),
                "steps_per_second": speed[0],
                "reference_steps_per_second": speed[1],
                "speed_ratio": (float(speed[0]) / float(speed[1]))
                if all(pd.notna(s) and s for s in speed)
                else math.nan,
                "nll": float(trial["score"]),
                "reference_nll": float(partner["score"]),
                "nll_difference": float(trial["score"]) - float(partner["score"]),
                "matched": abs(ratio - 1) <= tolerance,
                "run_id": trial["run_id"],
                "reference_run_id": partner["run_id"],
            }
        )
    return pd.DataFrame(rows)


def seed_noise(summary: pd.DataFrame) -> float | None:
    """Largest standard deviation of the score over seeds of one config; None with one seed each."""
    summary, _ = with_score(summary)
    ok = summary[(summary["status"] == "FINISHED") & summary["score"].notna()]
    if "seed" not in ok.columns:
        return None
    config = [c for c in ("decoder", *SIZE_COLUMNS, *CONDITIONS) if c in ok.columns and c not in ("seed", "sample")]
    spread = ok.groupby([ok[c].astype(str) for c in config])["score"].std().dropna()
    return float(spread.max()) if len(spread) else None


def verdict(pairs: pd.DataFrame, noise: float | None, score: str = "final NLL") -> str:
    """One sentence: does the other decoder gain over the reference at matched parameters?

    pairs: match_pairs' rows of one decoder.
    """
    if pairs["decoder"].nunique() > 1:
        raise ValueError(f"verdict takes one decoder's pairs, got {sorted(pairs['decoder'].unique())}")
    matched = pairs[pairs["matched"]]
    if matched.empty:
        return "No pair of trials at matched parameters: no verdict."
    diff = matched["nll_difference"]
    name, reference = matched["decoder"].iloc[0], matched["reference"].iloc[0]
    better = int((diff < 0).sum())
    text = (
        f"At matched parameters {name} has the lower {score} in {better} of {len(matched)} pairs; "
        f"NLL difference ({name} - {reference}) mean {diff.mean():+.2f} nats/frame "
        f"(range {diff.min():+.2f} to {diff.max():+.2f}; "
        f"{100 * diff.mean() / matched['reference_nll'].mean():+.1f}% of "
        f"{reference}'s mean)."
    )
    if noise is None:
        return (
            text
            + " One seed per config: no noise estimate, so this is a single measurement, not a significant difference."
        )
    interval = t_interval(diff)
    if interval is not None:  # each pair shares its seed: the interval of the mean paired difference
        text += f" Mean difference over the {interval.n} matched pairs: {interval.text()}, " + (
            "**excludes 0**." if interval.excludes_zero else "includes 0: not a significant difference."
        )
    if abs(diff.mean()) <= 2 * noise:
        return text + f" Seed-to-seed spread up to {noise:.2f} nats/frame: **no clear difference**."
    gain = f"**{name} {'gains' if diff.mean() < 0 else 'loses'}**"
    return text + f" Seed-to-seed spread up to {noise:.2f} nats/frame: {gain} beyond twice the noise."


def plot_decoders(summary: pd.DataFrame, pairs: pd.DataFrame, out: Path) -> Path:
    """Final NLL against parameters, FLOPs per frame and training steps/s; hue: decoder; each
    matched pair joined by a grey line."""
    summary, score = with_score(summary)
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the report stage sets it too
    import matplotlib.pyplot as plt
    import seaborn as sns

    ok = summary[(summary["status"] == "FINISHED") & summary["score"].notna()]
    decoders = sorted(ok["decoder"].unique(), key=lambda d: (d != REFERENCE, d))
    by_run = ok.set_index("run_id")
    panels = [("parameters", "parameters", True), ("flops_per_frame", "FLOPs per frame (forward, counted)", True),
              ("steps_per_second", "training steps per second (measured)", False)]  # fmt: skip
    panels = [p for p in panels if p[0] in ok.columns and ok[p[0]].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (cost, label, log_x) in zip(axes[0], panels):
        for _, pair in pairs[pairs["matched"]].iterrows() if len(pairs) else []:
            a, b = by_run.loc[pair["reference_run_id"]], by_run.loc[pair["run_id"]]
            ax.plot([a[cost], b[cost]], [a["score"], b["score"]], color="0.6", lw=1, zorder=1)
        sns.scatterplot(
            data=ok,
            x=cost,
            y="score",
            hue="decoder",
            hue_order=decoders,
            style="decoder",
            style_order=decoders,
            s=70,
            ax=ax,
            zorder=2,
        )
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{score} (nats/frame)" + (" - floor" if score == "test NLL" else ""))
        ax.legend(fontsize=8)
    fig.suptitle("decoders at matched parameters (grey: pairs joined)", fontsize=10)
    return save_figure(fig, out)


def decoder_comparison(
    summary: pd.DataFrame, out_dir: Path, reference: str = REFERENCE, tolerance: float = 0.1
) -> tuple[list[str], list[tuple[str, str]]]:
    """Markdown lines and [(title, PNG name)] comparing the decoders at matched parameters."""
    lines = ["## Decoders at matched parameters", ""]
    if "decoder" not in summary.columns or summary["decoder"].nunique() < 2:
        return lines + ["The trials all use one decoder: nothing to compare.", ""], []
    pairs = match_pairs(summary, reference, tolerance)
    if pairs.empty:
        return lines + [
            f"No finished trial of another decoder has a finished `{reference}` partner run under the same conditions.",
            "",
        ], []
    noise = seed_noise(summary)
    _, score = with_score(summary)
    matched = pairs[pairs["matched"]]
    lines += [
        (
            f"Each trial of another decoder is paired with the `{reference}` trial (the paper's masked decoder) of "
            f"nearest parameter count run under the same conditions; pairs within {tolerance:.0%} in parameters "
            f"are matched ({len(matched)} of {len(pairs)}). Negative NLL differences favour the other decoder."
        ),
        "",
    ]
    for name, own in pairs.groupby("decoder", sort=True):
        lines += [f"- **{name}**: {verdict(own, noise, score)}"]
        own_matched = own[own["matched"]]
        if len(own_matched):
            lines[-1] += (
                f" Cost over {reference} (means over the matched pairs): parameters "
                f"x{own_matched['parameter_ratio'].mean():.3f}, counted FLOPs per frame "
                f"x{own_matched['flops_ratio'].mean():.3f}, "
                f"measured training steps/s x{own_matched['speed_ratio'].mean():.2f}."
            )
    lines += [
        "",
        (
            "Counted FLOPs include the masked decoder's always-masked taps, which no pass executes; steps/s is what "
            "runs (trials that share a machine slow each other)."
        ),
        "",
    ]
    table = pairs.assign(
        pair=[
            f"{r['size']}" + ("" if r["size"] == r["reference_size"] else f" vs {r['reference_size']}")
            for _, r in pairs.iterrows()
        ]
    )
    columns = {"pair": "size (vs reference's)", "decoder": "decoder"}
    if "seed" in summary.columns and summary["seed"].nunique() > 1:
        table = table.assign(seed=table["run_id"].map(summary.set_index("run_id")["seed"]))
        columns["seed"] = "seed"
    columns.update({
        "parameter_ratio": "params ratio", "flops_ratio": "FLOPs ratio (counted)", "speed_ratio": "steps/s ratio",
        "reference_nll": f"NLL {reference}", "nll": "NLL (decoder)", "nll_difference": "NLL difference",
        "matched": "matched",
    })  # fmt: skip
    lines += [markdown_table(table, columns), ""]
    name = "decoders.png"
    plot_decoders(summary, pairs, Path(out_dir) / name)
    return lines, [(f"Decoders: {score} against parameters, FLOPs and speed", name)]
