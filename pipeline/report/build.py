"""Report stage: a sweep's results tables -> reports/<sweep>/report.md, report.html and PNG figures.

Reads results/<sweep>/trials.parquet (one row per trial) and curves.parquet (one row per trial and
logged step), which pipeline.sweep.record.results reads back from MLflow, so every number here is MLflow's.

Figures (seaborn):
- curves.png: nats/frame against step, one line per config, colour = depth, style = width;
- converge_heatmaps.png: iterations to converge against encoder blocks, decoder blocks, filter fraction;
- pareto.png: final NLL against parameters and against FLOPs per frame, Pareto front marked;
- speed.png: training steps per second of each config;
- samples.png: frames sampled by the best run beside the ground truth;
- forecast.png (train sweeps with free-running scores): MSE, MAE, SSIM, PSNR per predicted frame,
  beside a table of the trials' scores and OpenSTL's published Moving MNIST rows (forecasts.py).
For an overfit sweep (the blog post's experiment) also overfit.png: iterations each preset needed,
against the post's numbers, and each curve with its plateaus shaded.

For a sweep of the paper's rows (sweeps/paper_ablation.yaml) also ablation.png and a table of each
row's test NLL, floor and excess beside the paper's Table 2 numbers.

Definitions (also printed in the report):
- final NLL: the last logged validation nats/frame (train nats/frame where no validation ran).
- test NLL, floor, excess: the test split scored at the end of each trial, the entropy of the same
  frames (the least any model can score), and test minus floor. Trials are ranked by the excess (a
  sweep's trials share a frame size). Beside the paper's figures (64x64) the report sets ours also in
  nats/pixel, nats/frame over the frame's C x H x W values: nats/frame grow with the frame size.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.report.analysis import is_overfit_sweep, load_results, summarise
from pipeline.report.decoders import decoder_comparison
from pipeline.report.figures import (
    plot_ablation,
    plot_converge_heatmaps,
    plot_curves,
    plot_overfit,
    plot_pareto,
    plot_speed,
    series_name,
)
from pipeline.report.finding import finding_lines, paper_finding
from pipeline.report.forecasts import forecast_section
from pipeline.report.paper import (
    PAPER_BEST_EXCESS,
    PAPER_LOWER_BOUND,
    PAPER_PIXELS,
    PAPER_SCALE,
    ablation_table,
    frame_pixels,
    is_ablation_sweep,
    overfit_table,
    per_pixel,
    scale_statement,
    size_note,
)
from pipeline.report.params import ReportParams
from pipeline.report.samples import write_samples_figure
from pipeline.report.search_figures import search_section
from pipeline.report.stats import paper_contrasts, seed_section
from pipeline.report.tables import TABLE_COLUMNS, markdown_table, md_text
from pipeline.sweep.record.results import EXCESS, best_trial, rank_column
from vpn.files import write_text

log = logging.getLogger(__name__)

# The report's own score where no trial was scored on the test split (overfit sweeps).
FALLBACK_RANK = "final_nll"


@dataclass
class Page:
    """A report as it is built: markdown lines, then the figures (title, PNG file name) shown after
    them, and the metrics written to metrics.json (in insertion order)."""

    lines: list[str]
    metrics: dict[str, Any]
    figures: list[tuple[str, str]] = field(default_factory=list)


def build_report(sweep: str, params: ReportParams, repo: Path) -> dict[str, Any]:
    """Write reports/<sweep>/ and return the report's metrics (also written as metrics.json)."""
    out = repo / params.out_dir / sweep
    out.mkdir(parents=True, exist_ok=True)
    trials, curves = load_results(repo / params.results_dir, sweep)
    page = Page(lines=[f"# Sweep report: {sweep}", ""], metrics={"sweep": sweep, "trials": len(trials)})
    if trials.empty:
        page.lines += ["**This sweep has no runs.** MLflow holds no trial for it: run the sweep stage first.", ""]
        page.metrics.update(finished=0, failed=0, best_nll=None)
        write_pages(out, page.lines, page.metrics)
        return page.metrics

    summary = summarise(trials, curves, params)
    finished = summary[summary["status"] == "FINISHED"]
    page.metrics.update(finished=len(finished), failed=len(summary) - len(finished))
    page.lines += _overview(sweep, summary)
    best = best_trial(finished, FALLBACK_RANK) if len(curves) else None
    if best is None:
        page.metrics["best_nll"] = None
        page.lines += ["No trial finished, so there are no curves to compare.", ""]
    else:
        _add_findings(page, summary, curves, best, is_overfit_sweep(trials), params, repo, out)
    for title, name in page.figures:
        page.lines += [f"## {title}", "", f"![{title}]({name})", ""]
    # Every trial in the ranking's order (trials that did not finish included), ties by the final NLL.
    order = ["excess", "final_nll"] if rank_column(summary, FALLBACK_RANK) == EXCESS else ["final_nll"]
    page.lines += ["## Every trial", "", markdown_table(summary.sort_values(order), TABLE_COLUMNS), ""]
    page.lines += _definitions(params)
    write_pages(out, page.lines, page.metrics)
    return page.metrics


def _overview(sweep: str, summary: pd.DataFrame) -> list[str]:
    """How many trials finished, the profile, where MLflow holds the runs, the frame size, and the
    trials that did not finish with their errors."""
    finished = summary[summary["status"] == "FINISHED"]
    failed = summary[summary["status"] != "FINISHED"]
    lines = [
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
        per_size = "NLLs are nats per frame of that size, FLOPs per frame at that size."
        lines += [f"Frames trained on: {', '.join(sizes)}; {per_size}", ""]
    if len(failed):
        lines += ["## Trials that did not finish", ""]
        for _, r in failed.iterrows():
            error = f" ({md_text(r['error'])})" if isinstance(r.get("error"), str) and r["error"] else ""
            lines.append(f"- **{md_text(r['config'])}**: {r['status']}{error}")
        lines.append("")
    return lines


def _add_findings(
    page: Page,
    summary: pd.DataFrame,
    curves: pd.DataFrame,
    best: pd.Series,
    overfit: bool,
    params: ReportParams,
    repo: Path,
    out: Path,
) -> None:
    """Everything a sweep with a finished trial shows, in the report's order: the best trial, the
    paper's rows, the figures (each drawn here), the blog post's table, the decoder comparison and
    the best run's samples."""
    finished = summary[summary["status"] == "FINISHED"]
    _add_best(page, best, ranked=rank_column(finished, FALLBACK_RANK) == EXCESS)
    page.lines += seed_section(summary)  # nothing with one seed per config
    page.metrics["iterations_to_converge"] = {
        r["config"]: (None if pd.isna(r["iterations_to_converge"]) else int(r["iterations_to_converge"]))
        for _, r in summary.iterrows()
    }
    if is_ablation_sweep(summary):
        _add_paper_rows(page, summary, out)
    forecast_lines, forecast_figures, forecast_metrics = forecast_section(finished, out)
    page.lines += forecast_lines
    page.figures += forecast_figures
    page.metrics.update(forecast_metrics)
    search_lines, search_figures, search_metrics = search_section(summary, out)  # searched sweeps only
    page.lines += search_lines
    page.figures += search_figures
    page.metrics.update(search_metrics)
    finished_curves = curves[curves["run_id"].isin(finished["run_id"])]
    title = f"Convergence curves (colour: {series_name(summary)}, style: width)"
    page.figures.append((title, plot_curves(summary, finished_curves, out / "curves.png").name))
    best_curve = curves[curves["run_id"] == best["run_id"]].sort_values("step")
    cols = [c for c in ("step", "train_nats_per_frame", "val_nats_per_frame") if c in best_curve]
    write_text(out / "best_curve.csv", best_curve[cols].to_csv(index=False))
    if overfit:
        _add_overfit(page, summary, curves, out)
    heatmaps = plot_converge_heatmaps(summary, out / "converge_heatmaps.png")
    page.figures.append(("Iterations to converge", heatmaps.name))
    page.figures.append(("Final NLL against cost, Pareto front marked", plot_pareto(summary, out / "pareto.png").name))
    if "decoder" in summary and summary["decoder"].nunique() > 1:  # e.g. sweeps/decoders.yaml
        decoder_lines, decoder_figures = decoder_comparison(summary, out)
        page.lines += decoder_lines
        page.figures += decoder_figures
    page.figures.append(("Training speed", plot_speed(summary, out / "speed.png").name))
    _add_samples(page, best, params, repo, out)


def _add_best(page: Page, best: pd.Series, ranked: bool) -> None:
    """The best trial (ranked: by its test NLL's excess over the floor; else by its final NLL)."""
    page.metrics["best_nll"] = float(best["final_nll"])
    page.metrics["best_config"] = best["config"]
    if not ranked:
        page.lines += [f"Best final NLL: **{best['final_nll']:.2f} nats/frame**, by {best['config']}.", ""]
        return
    pixels = frame_pixels(best.to_frame().T)
    page.metrics.update(
        best_test_nats_per_frame=float(best["test_nats_per_frame"]),
        best_test_floor_nats_per_frame=float(best["test_floor_nats_per_frame"]),
        best_excess_nats_per_frame=float(best["excess"]),
        best_excess_nats_per_pixel=_json_number(per_pixel(float(best["excess"]), pixels)),
    )
    paper = f"{PAPER_BEST_EXCESS:.1f} nats/frame at {PAPER_SCALE.split(',')[0]}"
    if pixels and pixels != PAPER_PIXELS:  # the unit both compare in
        ours = f"{per_pixel(float(best['excess']), pixels):.4f} nats/pixel over its {pixels:,} pixels"
        paper += f", {per_pixel(PAPER_BEST_EXCESS, PAPER_PIXELS):.5f} nats/pixel"
        beside = f"; {ours} (the paper's best VPN: {paper})"
    else:
        beside = f" (the paper's best VPN: {paper})"
    page.lines += [
        (
            f"Best: **{best['config']}**, test NLL **{best['test_nats_per_frame']:.2f} nats/frame** against a "
            f"floor of {best['test_floor_nats_per_frame']:.2f}: "
            f"**{best['excess']:.2f} nats/frame above the floor**{beside}. "
            f"Final validation NLL {best['final_nll']:.2f}."
        ),
        "",
    ]


def _add_paper_rows(page: Page, summary: pd.DataFrame, out: Path) -> None:
    """An ablation sweep's trials beside the paper's rows: a table, a figure and metrics["rows"]."""
    table = ablation_table(summary)
    page.lines += [
        "## The paper's rows",
        "",
        (
            f"This sweep ran at: {scale_statement(summary)}. The paper's numbers are at: {PAPER_SCALE}. "
            "Each NLL is set against its own floor (the paper's lower bound is "
            f"{PAPER_LOWER_BOUND}); the excesses are also given per pixel. {size_note(frame_pixels(summary))}"
        ).strip(),
        "",
        markdown_table(table, list(table.columns)),
        "",
        *finding_lines(finding := paper_finding(summary)),
        *paper_contrasts(summary),  # with >= 2 seeds a row
    ]
    if finding is not None:
        page.metrics["finding"] = finding.to_json()
    title = "The paper's rows: excess over the floor, ours beside the paper's"
    page.figures.append((title, plot_ablation(table, out / "ablation.png").name))
    page.metrics["rows"] = {
        r["row"]: {
            "test_nats_per_frame": _json_number(r["test NLL"]),
            "floor": _json_number(r["floor"]),
            "excess": _json_number(r["excess"]),
            "paper_nats_per_frame": _json_number(r["paper NLL"]),
            "excess_nats_per_pixel": _json_number(r["excess/pixel"]),
            "paper_excess_nats_per_pixel": _json_number(r["paper excess/pixel"]),
        }
        for _, r in table.iterrows()
    }


def _add_overfit(page: Page, summary: pd.DataFrame, curves: pd.DataFrame, out: Path) -> None:
    """An overfit sweep beside the blog post: its figure, a table and metrics["plateau"]."""
    title = "Overfitting one sequence: the blog post's figure"
    page.figures.append((title, plot_overfit(summary, curves, out / "overfit.png").name))
    page.metrics["plateau"] = {r["config"]: bool(len(r["plateaus"])) for _, r in summary.iterrows()}
    table = overfit_table(summary)
    page.lines += ["Overfitting one sequence, against the blog post (64x64, the presets' full widths):", ""]
    page.lines += [markdown_table(table, list(table.columns)), ""]


def _add_samples(page: Page, best: pd.Series, params: ReportParams, repo: Path, out: Path) -> None:
    """The best run's samples figure, or a line saying why there is none."""
    try:
        path = write_samples_figure(best, params, repo, out / "samples.png")
    except Exception as err:  # a report without samples beats no report; say why
        log.warning("no sample strip: %s", err)
        page.lines += [f"_No sample strip: {html.escape(str(err))}_", ""]
        return
    if path is None:
        page.lines += [f"_No sample strip: the best run ({best['config']}) logged no checkpoint._", ""]
        return
    title = f"Samples of the best run ({best['config']}): ground truth above, context + sampled frames below"
    page.figures.append((title, path.name))


def _definitions(params: ReportParams) -> list[str]:
    """The report's closing section: what each number means, with this report's parameters."""
    return [
        "## Definitions",
        "",
        (
            "- NLL: nats per frame (sum over pixels), as in Kalchbrenner et al. 2016; final NLL is the last "
            "validation value (train where no validation ran)."
        ),
        (
            "- test NLL (test_nats_per_frame): the test split scored at the end of the trial with the trial's own "
            "frame preparation, frames context..T-1 given the ones before; floor (test_floor_nats_per_frame): the "
            "entropy of exactly those frames' grey levels, the least any model can score; excess: test NLL minus "
            "floor. Trials are ranked by the excess."
        ),
        (
            "- nats/pixel: nats/frame over the frame's C x H x W values. A frame's NLL sums over its pixels, so "
            "nats/frame compare only between frames of one size; figures set beside the paper's (64x64, 4,096 "
            "pixels) or OpenSTL's are compared per pixel."
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


def _json_number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


# The HTML page's style sheet: readable width, images fit, compact bordered tables.
_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
    "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}"
)


def to_html(text: str) -> str:
    """The markdown `text` as HTML, with raw HTML off: a `<script>` in a trial's error text is shown as
    text, never run (Python-Markdown passes raw HTML through by default)."""
    import markdown

    md = markdown.Markdown(extensions=["tables"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md.convert(text)


def write_pages(out: Path, lines: list[str], metrics: dict[str, Any]) -> None:
    """report.md (the lines), report.html (the same, rendered) and metrics.json into `out`."""
    text = "\n".join(lines)
    write_text(out / "report.md", text)
    body = to_html(text)
    title = html.escape(lines[0].lstrip("# "))
    head = f"<meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
    write_text(out / "report.html", f"<!doctype html><html><head>{head}</head><body>{body}</body></html>")
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    from pipeline.params import ParamsError, load_section, stage_argparser

    parser = stage_argparser("Turn sweep results into comparison reports.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import matplotlib

    matplotlib.use("Agg")
    try:
        params = load_section(ReportParams, "report", args.params)
    except ParamsError as e:  # one sentence naming the file and the key, as the data stages say it
        log.error("%s", e)
        return 1
    repo = Path(args.params).resolve().parent
    from pipeline.report.to_mlflow import log_report

    for sweep in params.sweeps:
        metrics = build_report(sweep, params, repo)
        counts = json.dumps({k: metrics.get(k) for k in ("trials", "finished", "failed", "best_nll")})
        print(f"report {sweep}: {params.out_dir}/{sweep}/report.md ({counts})")
        if metrics["trials"]:  # a searched sweep's report into its parent MLflow run; grids: nothing yet
            parent = log_report(sweep, repo / params.out_dir / sweep, repo / params.results_dir / sweep)
            if parent:
                print(f"report {sweep}: logged to MLflow run {parent} (the sweep's parent)")
    return 0
