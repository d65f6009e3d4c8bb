"""The video-prediction field's frame metrics (MSE, MAE, SSIM, PSNR), defined exactly as OpenSTL's.

OpenSTL (Tan et al. 2023, github.com/chengtan9907/OpenSTL, openstl/core/metrics.py) scores
predicted frames in [0, 1], arrays (N, T, C, H, W):

- MSE, MAE: `np.mean(err, axis=(0, 1)).sum()`, i.e. the error summed over a frame's C*H*W pixels,
  averaged over sequences and frames (so a 64x64 frame's MSE is up to 4096, not up to 1);
- SSIM: scikit-image's `structural_similarity` per frame (after clipping the prediction to [0, 1]),
  averaged. OpenSTL calls it without `data_range` under its pinned scikit-image <= 0.19.3
  (environment.yml), which then takes the float dtype's range (-1, 1): data_range = 2. Newer
  scikit-image refuses floats without data_range, so SSIM_DATA_RANGE = 2.0 is given explicitly;
  with 1.0 the values would differ (its constants C1, C2 scale with data_range squared);
- PSNR: `20 log10(1 / sqrt(mean squared error))` per frame (the mean over the frame's pixels,
  after clipping), averaged; a perfect frame gives inf, as there.

`frame_metrics` returns every metric of every frame, (N, T) each, so that callers can average them
(OpenSTL's numbers), pick the best of several samples per sequence, or plot them over the horizon.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

METRICS = ("mse", "mae", "ssim", "psnr")
# Which way is better, for the best of k samples: the least error, the most similarity.
HIGHER_IS_BETTER = {"mse": False, "mae": False, "ssim": True, "psnr": True}
# OpenSTL's effective SSIM data range (see the module docstring).
SSIM_DATA_RANGE = 2.0


def _check(pred: np.ndarray, true: np.ndarray) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    if pred.ndim != 5:
        raise ValueError(f"frames must be (N, T, C, H, W), got shape {pred.shape}")
    if min(pred.shape[-2:]) < 7:
        raise ValueError(f"SSIM's 7x7 window needs frames of at least 7x7 pixels, got {pred.shape[-2:]}")


def frame_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """pred, true float (N, T, C, H, W) in [0, 1] -> {metric: float64 (N, T)}, one value per frame.

    The mean of each (N, T) array over both axes is OpenSTL's number for that metric.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    _check(pred, true)
    err = pred - true  # (N, T, C, H, W)
    out = {"mse": (err**2).sum(axis=(2, 3, 4)), "mae": np.abs(err).sum(axis=(2, 3, 4))}
    # OpenSTL clips the prediction after MSE and MAE, before SSIM and PSNR.
    clipped = np.clip(pred, 0.0, 1.0)
    per_pixel = ((clipped - true) ** 2).mean(axis=(2, 3, 4))  # (N, T)
    with np.errstate(divide="ignore"):
        out["psnr"] = np.where(per_pixel == 0, np.inf, 20.0 * np.log10(1.0 / np.sqrt(per_pixel)))
    n, t = pred.shape[:2]
    ssim = np.empty((n, t))
    for i in range(n):
        for j in range(t):
            # (C, H, W) -> (H, W, C): colour last, as OpenSTL passes it (its swapaxes(0, 2) gives
            # (W, H, C); SSIM's square window makes the transpose immaterial).
            a, b = np.moveaxis(clipped[i, j], 0, -1), np.moveaxis(true[i, j], 0, -1)
            ssim[i, j] = structural_similarity(a, b, channel_axis=-1, data_range=SSIM_DATA_RANGE)
    out["ssim"] = ssim
    return out


def summarise(per_frame: dict[str, np.ndarray]) -> dict[str, float]:
    """{metric: (N, T)} -> {metric: mean over sequences and frames}, OpenSTL's aggregate."""
    return {k: float(np.mean(v)) for k, v in per_frame.items()}
