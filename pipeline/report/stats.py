"""Seeds in the report: each config's mean test excess with a 95% t interval, and the interval of a
paired difference (pure functions on the report's summary table).

    interval = t_interval([1.2, 1.4, 1.1])            # Interval(mean, low, high, n), None under 2 values
    diff = paired_difference({0: 1.2, 1: 1.4}, {0: 1.0, 1: 1.1})   # a - b over the seeds both ran
    table = seed_intervals(summary)                   # one row per config with >= 2 seeds

The interval is Student's t: mean +- t_{(1+level)/2, n-1} s / sqrt(n), s the sample standard deviation
(ddof 1), as scipy.stats.t.interval gives it. A paired difference is the t interval of the per-seed
differences a_s - b_s: two trials that share a seed share the data order and the initialisation's
draw, so pairing removes that part of the noise. A difference "excludes 0" when both ends of its
interval have one sign: the two differ at the 5% level (two-sided).

A config is a trial's configuration without its seed: the label (pipeline.report.analysis.config_label),
the paper's row, and every VPNConfig and TrainConfig field but `seed` (and `sample`, the seed's index).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.report.paper import paper_row
from pipeline.report.tables import markdown_table
from pipeline.sweep.record.results import MODEL_COLUMNS, TRAIN_COLUMNS

LEVEL = 0.95
# Not part of a config: the seed (and its index), and fields that change how a trial runs or logs,
# never what it computes.
NOT_CONFIG = ("seed", "sample", "device", "num_workers", "log_every", "ckpt_every")


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided t interval at `level`, over n values."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, unit: str = "nats/frame") -> str:
        """'+0.12 nats/frame, 95% CI [-0.03, +0.27] (n = 3)'."""
        return f"{self.mean:+.3g} {unit}, {self.level:.0%} CI [{self.low:+.3g}, {self.high:+.3g}] (n = {self.n})"


def t_interval(values: Iterable[float], level: float = LEVEL) -> Interval | None:
    """The mean of `values` (NaNs dropped) with its t interval; None with fewer than 2 values."""
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return None
    mean, sem = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(len(x))
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * sem
    return Interval(mean, mean - half, mean + half, len(x), level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval | None:
    """The t interval of a_s - b_s over the seeds s both hold; None with fewer than 2 shared seeds."""
    shared = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in shared], level)


def config_columns(summary: pd.DataFrame) -> list[str]:
    """The columns that name a config (module docstring), those the summary has."""
    fields = [c for c in (*MODEL_COLUMNS, *TRAIN_COLUMNS) if c not in NOT_CONFIG]
    return [c for c in ("config", "row", *fields) if c in summary.columns]


def config_keys(summary: pd.DataFrame) -> pd.Series:
    """One string per trial naming its config: trials that differ only in the seed share it."""
    columns = config_columns(summary)
    # map(str), not astype(str): pandas 3's string dtype keeps a missing value missing (a float NaN),
    # which join refuses; str(value) names it ("nan", "<NA>", "None") like any other value.
    return summary[columns].map(str).agg("|".join, axis=1) if len(summary) else pd.Series(dtype=str)


def scored(summary: pd.DataFrame) -> pd.DataFrame:
    """The finished trials that have a test excess."""
    if "excess" not in summary.columns:
        return summary.iloc[0:0]
    return summary[(summary["status"] == "FINISHED") & summary["excess"].notna()]


def max_seeds(summary: pd.DataFrame) -> int:
    """The most finished, scored trials any one config has (1: no interval anywhere)."""
    ok = scored(summary)
    return int(ok.groupby(config_keys(ok)).size().max()) if len(ok) else 0


def seed_intervals(summary: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """One row per config with >= 2 finished seeds: config, seeds, mean excess, CI low and high,
    sorted by the mean. Empty when no config has two."""
    ok = scored(summary)
    rows = []
    for _, group in ok.groupby(config_keys(ok), sort=False):
        interval = t_interval(group["excess"], level)
        if interval is None:
            continue
        name = group["row"].iloc[0] if "row" in group and isinstance(group["row"].iloc[0], str) else None
        rows.append(
            {
                "config": name or group["config"].iloc[0],
                "seeds": interval.n,
                "mean excess": interval.mean,
                "CI low": interval.low,
                "CI high": interval.high,
            }
        )
    return pd.DataFrame(rows).sort_values("mean excess") if rows else pd.DataFrame(rows)


def excess_by_seed(trials: pd.DataFrame) -> dict[int, float]:
    """{seed: test excess} of one config's finished trials (the last one where a seed repeats)."""
    ok = scored(trials)
    return {int(s): float(e) for s, e in zip(ok["seed"], ok["excess"])} if "seed" in ok else {}


def seed_section(summary: pd.DataFrame, level: float = LEVEL) -> list[str]:
    """The report's lines on seeds: each config's mean excess with its interval; none with one seed
    per config (the report then says what it said before seeds were counted)."""
    table = seed_intervals(summary, level)
    if table.empty:
        return []
    columns = {"config": "config", "seeds": "seeds", "mean excess": "mean test excess",
               "CI low": f"{level:.0%} CI low", "CI high": f"{level:.0%} CI high"}  # fmt: skip
    return [
        f"## Seeds: mean test excess with a {level:.0%} confidence interval",
        "",
        (
            "Each config's test excess (nats/frame over the floor) over its finished seeds, with Student's t "
            "interval, mean +- t(n-1) s / sqrt(n). Configs with one finished seed are left out."
        ),
        "",
        markdown_table(table, columns),
        "",
    ]


def paper_row_trials(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The scored trials of each paper row that ran as one config: {paper row name: its trials}
    (a row run as several configs has no pairing by seed, so it is left out)."""
    ok = scored(summary)
    names = pd.Series([(p or ("",))[0] for p in (paper_row(r) for _, r in ok.iterrows())], index=ok.index)
    keys = config_keys(ok)
    return {n: ok[names == n] for n in names.unique() if n and keys[names == n].nunique() == 1}


# The paper's comparisons between its rows (Table 2): (a, b, what a - b measures).
PAPER_CONTRASTS = (
    ("VPN, RMB, dilation", "VPN, RMB, no dilation", "dilation, RMB blocks"),
    ("VPN, ReLU, dilation", "VPN, ReLU, no dilation", "dilation, ReLU blocks"),
    ("VPN, RMB, no dilation", "VPN, ReLU, no dilation", "RMB over ReLU, no dilation"),
    ("VPN, RMB, dilation", "VPN, ReLU, dilation", "RMB over ReLU, dilation"),
    ("VPN, RMB, dilation", "Baseline", "the best VPN over the baseline"),
)


def paper_contrasts(summary: pd.DataFrame, level: float = LEVEL) -> list[str]:
    """The paper's row-to-row comparisons, each the paired-by-seed interval of the excess difference
    (a - b); only rows run as one config, with >= 2 seeds both ran. Empty when none has."""
    by_row = {name: excess_by_seed(trials) for name, trials in paper_row_trials(summary).items()}
    lines = []
    for a, b, what in PAPER_CONTRASTS:
        diff = paired_difference(by_row.get(a, {}), by_row.get(b, {}), level) if a in by_row and b in by_row else None
        if diff is None:
            continue
        verdict = "**excludes 0**: a difference" if diff.excludes_zero else "includes 0: no significant difference"
        lines.append(f"- {what} ({a} - {b}): {diff.text()}; {verdict}.")
    if not lines:
        return []
    return [
        f"Paired by seed (the test excess of row a minus row b over the seeds both ran, t interval at {level:.0%}):",
        "",
        *lines,
        "",
    ]
