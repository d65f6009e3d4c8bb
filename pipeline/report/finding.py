"""The paper's finding in an ablation sweep: how far the baseline (no dependency within a frame) ends
behind the best VPN row, and how RMB blocks compare with ReLU blocks, each beside the paper's gap.

    finding = paper_finding(summary)   # None unless the sweep ran the baseline and a VPN row
    lines = finding_lines(finding)     # the report's paragraph
    finding.to_json()                  # metrics.json["finding"]

Gaps are differences of test excess over the floor. In nats/frame they are sums over a frame's pixels,
so they do not compare across frame sizes: the paper's 22.5 is over 4,096 pixels (64x64), a 32x32 run's
over 1,024. Each gap is therefore also given in nats/pixel (pipeline.report.paper.frame_pixels), the unit
it is set beside the paper's in, and the text says what holds there: the sign (which row is ahead), not
a match in size (pipeline.report.paper.SIZE_NOTE, printed above the paragraph by the report). A row's
excess is its mean over the seeds it finished. The "best" VPN row is the VPN row of least mean excess,
and best RMB and best ReLU likewise (the paper's Table 2 names its best rows the same way). With >= 2
seeds that both rows finished, a gap has the t interval of its per-seed differences
(pipeline.report.stats.paired_difference); the choice of the best row is made on the same trials, which
the interval does not account for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from pipeline.report.paper import PAPER_PIXELS, PAPER_ROWS, frame_pixels, per_pixel
from pipeline.report.stats import Interval, excess_by_seed, paired_difference, paper_row_trials, scored

_PAPER = {name: nll for name, nll in PAPER_ROWS.values()}
_BASELINE = PAPER_ROWS[("baseline", None, None)][0]
_VPN = [name for name in _PAPER if name != _BASELINE]
_RMB = [name for name in _VPN if "RMB" in name]
_RELU = [name for name in _VPN if "ReLU" in name]
# The paper's gaps (Table 2): baseline over its best VPN (110.1 - 87.6), best RMB over best ReLU (87.6 - 87.7).
PAPER_BASELINE_GAP = _PAPER[_BASELINE] - min(_PAPER[n] for n in _VPN)
PAPER_RMB_OVER_RELU = min(_PAPER[n] for n in _RMB) - min(_PAPER[n] for n in _RELU)


@dataclass(frozen=True)
class Gap:
    """a's mean excess minus b's (nats/frame), over frames of `pixels` values (C x H x W; None: unknown);
    its paired interval where >= 2 seeds allow one; the paper's gap (nats/frame, over 4,096 pixels)."""

    a: str
    b: str
    value: float
    paper: float
    interval: Interval | None
    pixels: int | None = None

    @property
    def per_pixel(self) -> float:
        return per_pixel(self.value, self.pixels)

    @property
    def paper_per_pixel(self) -> float:
        return per_pixel(self.paper, PAPER_PIXELS)

    @property
    def same_sign(self) -> bool:
        """Whether ours points the paper's way (the same row ahead)."""
        return (self.value > 0) == (self.paper > 0) and self.value != 0

    def to_json(self) -> dict:
        ci = None if self.interval is None else [self.interval.low, self.interval.high]
        ci_pixel = None if ci is None or not self.pixels else [c / self.pixels for c in ci]
        return {"a": self.a, "b": self.b, "nats_per_frame": self.value, "paper": self.paper, "ci95": ci,
                "seeds": None if self.interval is None else self.interval.n,
                "pixels": self.pixels, "nats_per_pixel": _json(self.per_pixel), "ci95_per_pixel": ci_pixel,
                "paper_pixels": PAPER_PIXELS, "paper_nats_per_pixel": self.paper_per_pixel,
                "same_sign_as_paper": self.same_sign}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """The baseline's gap behind the best VPN row, and RMB over ReLU (None where a block is missing)."""

    baseline_gap: Gap
    rmb_over_relu: Gap | None
    frames: str  # "32x32": the size the gaps were measured at

    def to_json(self) -> dict:
        rmb = None if self.rmb_over_relu is None else self.rmb_over_relu.to_json()
        return {"frames": self.frames, "baseline_gap": self.baseline_gap.to_json(), "rmb_over_relu": rmb}


def _gap(rows: dict[str, pd.DataFrame], a: str, b: str, paper: float, pixels: int | None) -> Gap:
    value = float(rows[a]["excess"].mean() - rows[b]["excess"].mean())
    interval = paired_difference(excess_by_seed(rows[a]), excess_by_seed(rows[b]))
    return Gap(a, b, value, paper, interval, pixels)


def _best(rows: dict[str, pd.DataFrame], names: list[str]) -> str | None:
    ran = [n for n in names if n in rows]
    return min(ran, key=lambda n: rows[n]["excess"].mean()) if ran else None


def paper_finding(summary: pd.DataFrame) -> Finding | None:
    """The finding of a sweep that ran the baseline and at least one VPN row of the paper; else None."""
    rows = paper_row_trials(summary)
    best_vpn = _best(rows, _VPN)
    if _BASELINE not in rows or best_vpn is None:
        return None
    rmb, relu = _best(rows, _RMB), _best(rows, _RELU)
    ok = scored(summary)
    frames = f"{int(ok['frame_height'].iloc[0])}x{int(ok['frame_width'].iloc[0])}" if "frame_height" in ok else "?"
    pixels = frame_pixels(ok)
    return Finding(
        baseline_gap=_gap(rows, _BASELINE, best_vpn, PAPER_BASELINE_GAP, pixels),
        rmb_over_relu=_gap(rows, rmb, relu, PAPER_RMB_OVER_RELU, pixels) if rmb and relu else None,
        frames=frames,
    )


def _gap_text(gap: Gap, frames: str) -> str:
    """Ours (nats/frame with its interval, and nats/pixel) beside the paper's, and what holds per pixel."""
    ci = (
        f", {gap.interval.level:.0%} CI [{gap.interval.low:+.2f}, {gap.interval.high:+.2f}] over "
        f"{gap.interval.n} seeds (paired)"
        if gap.interval is not None
        else " (one seed: no interval; `run.seeds: 3` in the profile gives one)"
    )
    ours = f"**{gap.value:+.2f} nats/frame**{ci}"
    if not gap.pixels:
        return f"{ours}; the paper at 64x64: {gap.paper:+.1f} nats/frame (no per-pixel figure: frame size unknown)"
    pixel = f"**{gap.per_pixel:+.3g} nats/pixel** (over {gap.pixels:,} pixels at {frames})"
    paper = f"the paper at 64x64: {gap.paper:+.1f} nats/frame, {gap.paper_per_pixel:+.3g} nats/pixel (over 4,096)"
    if gap.pixels == PAPER_PIXELS:
        return f"{ours}, {pixel}; {paper}"
    sign = "the paper's sign" if gap.same_sign else "the opposite sign to the paper's"
    crosses = gap.interval is not None and gap.interval.low < 0 < gap.interval.high
    size = abs(gap.per_pixel / gap.paper_per_pixel)
    return (
        f"{ours}, {pixel}; {paper}. Per pixel it has {sign}"
        + (" (though its interval includes 0)" if crosses else "")
        + f", at {size:.3g} times the paper's size; only the sign carries over across these sizes"
    )


def finding_lines(finding: Finding | None) -> list[str]:
    """The report's paragraph on the paper's finding; [] without one."""
    if finding is None:
        return []
    base = finding.baseline_gap
    lines = [
        "### The paper's finding: the baseline's gap",
        "",
        (
            f"Test excess of {base.a} minus {base.b} (the best VPN row), at {finding.frames} frames: "
            f"{_gap_text(base, finding.frames)}. A positive gap is what the masked decoder buys: the baseline "
            "predicts every pixel of a frame at once, with no pixel of that frame to condition on."
        ),
    ]
    if finding.rmb_over_relu is not None:
        r = finding.rmb_over_relu
        lines += [
            "",
            f"Best RMB row ({r.a}) minus best ReLU row ({r.b}): {_gap_text(r, finding.frames)} (negative: RMB better).",
        ]
    lines += [
        "",
        (
            "At 16x16 frames the gap nearly vanishes (docs/paper.md gives the same rows at both sizes): a "
            "stroke is a pixel or two wide there, so the pixels above and to the left say little about the next."
        ),
        "",
    ]
    return lines


def _json(value: float) -> float | None:
    return None if math.isnan(value) else value
