"""The frame metrics against OpenSTL's definitions restated in numpy, and free-running prediction:
the future is never read, a cold temperature is deterministic, and the summaries obey their order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from skimage.metrics import structural_similarity
from skimage.util.dtype import dtype_range

from vpn import VideoPixelNetwork, VPNConfig
from vpn.config import TrainConfig
from vpn.forecast import forecast, free_run
from vpn.video_metrics import frame_metrics, summarise


def fixed_arrays() -> tuple[np.ndarray, np.ndarray]:
    """pred (a binary draw) and true (grey), (N=2, T=3, C=1, 16, 16) in [0, 1], from a fixed seed."""
    rng = np.random.default_rng(1234)
    true = rng.random((2, 3, 1, 16, 16)) ** 3  # mostly dark, as Moving MNIST
    pred = (rng.random(true.shape) < true).astype(np.float64)
    return pred, true


# OpenSTL's openstl/core/metrics.py (commit c74deb5), restated.
def openstl_mse(pred, true):
    return np.mean((pred - true) ** 2, axis=(0, 1)).sum()


def openstl_mae(pred, true):
    return np.mean(np.abs(pred - true), axis=(0, 1)).sum()


def openstl_psnr(pred, true):
    pred = np.clip(pred, 0, 1)
    values = [
        20.0 * np.log10(1.0 / np.sqrt(np.mean((p - t) ** 2)))
        for p, t in zip(pred.reshape(-1, *pred.shape[2:]), true.reshape(-1, *true.shape[2:]))
    ]
    return np.mean(values)


def openstl_ssim(pred, true):
    # cal_ssim(pred[b, f].swapaxes(0, 2), true[b, f].swapaxes(0, 2), multichannel=True) under its
    # scikit-image <= 0.19.3, whose data_range for a float image is its dtype's span, (-1, 1).
    lo, hi = dtype_range[np.float64]
    pred = np.clip(pred, 0, 1)
    values = [
        structural_similarity(pred[b, f].swapaxes(0, 2), true[b, f].swapaxes(0, 2), channel_axis=-1, data_range=hi - lo)
        for b in range(pred.shape[0])
        for f in range(pred.shape[1])
    ]
    return np.mean(values)


def naive_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 with scikit-image's defaults: 7x7 uniform windows (the valid ones), sample
    (co)variances; a, b (H, W). An independent check of the library call."""
    wa, wb = sliding_window_view(a, (7, 7)), sliding_window_view(b, (7, 7))  # (H-6, W-6, 7, 7)
    n = 49
    ma, mb = wa.mean(axis=(-1, -2)), wb.mean(axis=(-1, -2))
    va = wa.var(axis=(-1, -2)) * n / (n - 1)
    vb = wb.var(axis=(-1, -2)) * n / (n - 1)
    cov = ((wa - ma[..., None, None]) * (wb - mb[..., None, None])).mean(axis=(-1, -2)) * n / (n - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s.mean())


def test_metrics_equal_openstl_definitions():
    pred, true = fixed_arrays()
    ours = summarise(frame_metrics(pred, true))
    assert ours["mse"] == pytest.approx(openstl_mse(pred, true), rel=1e-12)
    assert ours["mae"] == pytest.approx(openstl_mae(pred, true), rel=1e-12)
    assert ours["psnr"] == pytest.approx(openstl_psnr(pred, true), rel=1e-12)
    assert ours["ssim"] == pytest.approx(openstl_ssim(pred, true), rel=1e-12)
    # MSE and MAE are sums over a frame's 256 pixels: well above 1 for these arrays.
    assert ours["mse"] > 1 and ours["mae"] > ours["mse"]


def test_ssim_matches_a_naive_window_computation_at_openstls_range():
    pred, true = fixed_arrays()
    per = frame_metrics(pred, true)["ssim"]  # (N, T)
    for b in range(2):
        for f in range(3):
            assert per[b, f] == pytest.approx(naive_ssim(pred[b, f, 0], true[b, f, 0], 2.0), rel=1e-9)
    # data_range matters: at 1.0 (not OpenSTL's effective 2.0) the value differs.
    assert per[0, 0] != pytest.approx(naive_ssim(pred[0, 0, 0], true[0, 0, 0], 1.0), rel=1e-3)


def test_perfect_prediction_and_bad_input():
    _, true = fixed_arrays()
    per = frame_metrics(true, true)
    assert np.all(per["mse"] == 0) and np.all(per["ssim"] == pytest.approx(1.0)) and np.all(np.isinf(per["psnr"]))
    with pytest.raises(ValueError, match="same shape"):
        frame_metrics(true, true[:1])
    with pytest.raises(ValueError, match="7x7"):
        frame_metrics(true[..., :6, :6], true[..., :6, :6])


def tiny_model(seed: int = 0) -> VideoPixelNetwork:
    torch.manual_seed(seed)
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli", enc_blocks=1, dec_blocks=1)
    return VideoPixelNetwork(cfg).eval()


def clips(n: int = 3, t: int = 5, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (n, t, 1, size, size), generator=g, dtype=torch.uint8)


def test_free_running_never_reads_the_future():
    model, frames = tiny_model(), clips()
    changed = frames.clone()
    changed[:, 2:] = 255 - changed[:, 2:]  # every frame after the 2 of context
    # A low temperature, so that the untrained model's small logit differences decide the coins.
    a = free_run(model, frames, 2, 3, torch.Generator().manual_seed(0), temperature=0.05)
    b = free_run(model, changed, 2, 3, torch.Generator().manual_seed(0), temperature=0.05)
    assert a.shape == (3, 3, 3, 1, 8, 8) and torch.equal(a, b)
    # ...while the context is read: changing it changes the draws.
    changed[:, :2] = 255 - frames[:, :2]
    assert not torch.equal(a, free_run(model, changed, 2, 3, torch.Generator().manual_seed(0), temperature=0.05))


def test_cold_temperature_gives_the_same_frames_every_time():
    model, frames = tiny_model(), clips(t=4)
    cold = [free_run(model, frames, 2, 2, torch.Generator().manual_seed(s), temperature=1e-6) for s in (0, 1)]
    assert torch.equal(cold[0], cold[1])
    # ...and at temperature 1 the seeds matter (so the check above could fail).
    warm = [free_run(model, frames, 2, 2, torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(warm[0], warm[1])


def test_forecast_summaries():
    model, frames = tiny_model(), clips(n=4, t=4)
    cfg = TrainConfig(seq_len=4, context=2, batch_size=3)
    score = forecast(model, frames, cfg, sequences=4, samples=3, seed=0)
    assert (score.sequences, score.samples, score.frames) == (4, 3, 2)
    assert all(len(v) == 2 for v in score.per_frame.values())
    for m in ("mse", "mae"):  # the best of k errs least; the mean frame's MSE is <= the mean (convexity)
        assert score.best[m] <= score.mean[m]
        assert np.mean(score.per_frame[m]) == pytest.approx(score.mean[m])
    assert score.mean_frame["mse"] <= score.mean["mse"]
    assert score.best["ssim"] >= score.mean["ssim"] and score.best["psnr"] >= score.mean["psnr"]
    again = forecast(model, frames, cfg, sequences=4, samples=3, seed=0)
    assert again == score  # the seed fixes every draw
    assert forecast(model, frames, cfg, sequences=4, samples=3, seed=1) != score
