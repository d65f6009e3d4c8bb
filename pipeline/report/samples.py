"""The best run's sampled frames: its checkpoint, from MLflow, continues a sequence after a context
(samples.png in the report, beside the ground truth)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from pipeline.report.analysis import ResultsError
from pipeline.report.figures import plot_samples
from pipeline.report.params import ReportParams


def write_samples_figure(best: pd.Series, params: ReportParams, repo: Path, out: Path) -> Path | None:
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

    from pipeline.sweep.record.tracking import tracking_uri

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
