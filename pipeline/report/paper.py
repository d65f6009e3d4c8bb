"""The published numbers this project is measured against, and our trials beside them.

- The paper (Kalchbrenner et al. 2016, Tables 1-2): its Moving MNIST rows, the lower bound, and
  the scale they were measured at; which row a trial's architecture reproduces.
- The blog post's overfitting experiment: the iterations each preset needed, and whether it sat
  on a plateau.
"""

from __future__ import annotations

import math

import pandas as pd

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
# The paper's best VPN's excess over the lower bound (87.6 - 86.3): the figure our excess compares with.
PAPER_BEST_EXCESS = min(nll for _, nll in PAPER_ROWS.values()) - PAPER_LOWER_BOUND
# The paper's frames are grey 64x64: its nats/frame are sums over 4,096 pixels.
PAPER_PIXELS = 64 * 64
# The scale the paper's numbers come from, stated beside ours.
PAPER_SCALE = (
    "64x64 frames, 20-frame sequences scored on frames 10..19, c = 128, 19.2M training sequences, "
    "all 10,000 test sequences"
)

# Why the reports set per-pixel figures beside the paper's, and what may be read from them (size_note).
SIZE_NOTE = (
    "A frame's NLL is a sum over its pixels, so nats/frame grow with the frame size and do not compare "
    "across sizes; nats/pixel (nats/frame over the frame's C x H x W values) do, in unit. Even per pixel "
    "these frames are not the paper's (smaller, pooled from 64x64, the models trained on far fewer "
    "sequences), so what carries over is the order of the rows and the sign of each gap, not their size."
)

# The blog post's overfitting result (iterations to converge), shown next to ours.
BLOG_OVERFIT_ITERATIONS = {"full": 600, "mini": 5000, "micro": 3000}
BLOG_PLATEAU = {"full": False, "mini": True, "micro": True}


def frame_pixels(summary: pd.DataFrame) -> int | None:
    """The values a frame's NLL sums over, C x H x W, where every trial with a frame size has the same one
    (a pixel of a grey frame, a sub-pixel of an RGB one); None where the sizes differ or are unknown.

    Nats per frame grow with this number, so they compare only between frames of one size; divided by
    it (nats per pixel) they compare in unit across sizes (SIZE_NOTE)."""
    if not {"frame_height", "frame_width"} <= set(summary.columns):
        return None
    channels = summary["image_channels"] if "image_channels" in summary else pd.Series(1, index=summary.index)
    sizes = {
        int(c if pd.notna(c) else 1) * int(h) * int(w)
        for c, h, w in zip(channels, summary["frame_height"], summary["frame_width"])
        if pd.notna(h) and pd.notna(w)
    }
    return sizes.pop() if len(sizes) == 1 else None


def per_pixel(nats_per_frame: float, pixels: int | None) -> float:
    """nats/frame over the frame's C x H x W values; NaN where the frame size is unknown."""
    return nats_per_frame / pixels if pixels else math.nan


def size_note(pixels: int | None) -> str:
    """SIZE_NOTE where our frames are not the paper's size; "" where they are (then nats/frame compare)."""
    return "" if pixels == PAPER_PIXELS else SIZE_NOTE


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
    NLL and its excess over the paper's lower bound of 86.3 (nats/frame); both excesses per pixel,
    the unit in which they compare across frame sizes (ours over this sweep's C x H x W, the paper's over 4,096)."""
    pixels = frame_pixels(summary)
    rows = []
    for _, r in summary.iterrows():
        paper = paper_row(r)
        excess, paper_excess = r.get("excess", math.nan), paper[1] - PAPER_LOWER_BOUND if paper else math.nan
        rows.append(
            {
                "row": r["row"] if isinstance(r.get("row"), str) else r["config"],
                "paper's row": paper[0] if paper else "-",
                "status": r["status"],
                "test NLL": r.get("test_nats_per_frame", math.nan),
                "floor": r.get("test_floor_nats_per_frame", math.nan),
                "excess": excess,
                "paper NLL": paper[1] if paper else math.nan,
                "paper excess": paper_excess,
                "excess/pixel": per_pixel(excess, pixels),
                "paper excess/pixel": per_pixel(paper_excess, PAPER_PIXELS),
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
        source = "streamed" if r.get("data") == "stream" else "drawn from the fixed set"
        parts.append(
            f"{frames} frames, {clip or 'all'}-frame clips scored on the frames after {int(r['context'])}, "
            f"c = {round(128 * float(r['filter_fraction']))}, "
            f"{int(r['enc_blocks'])} encoder and {int(r['dec_blocks'])} decoder blocks, "
            f"{seen:,} training sequences ({source})"
            + (f", {int(tested):,} test sequences" if pd.notna(tested) else "")
        )
    return "; ".join(parts)


def preset_name(row: pd.Series) -> str:
    """The preset a trial ran (full, mini, micro: the blog post's names), else its config label."""
    return row["preset"] if isinstance(row.get("preset"), str) else row["config"]


def overfit_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The blog post's result beside this run's: iterations to converge and plateaus, per preset."""
    rows = []
    for _, r in summary.iterrows():
        name = preset_name(r)
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
