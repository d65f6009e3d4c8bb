"""Video Pixel Networks (Kalchbrenner et al. 2016) in PyTorch.

    from vpn import VPNConfig, VideoPixelNetwork
    cfg = VPNConfig.preset("micro", image_channels=1, output="bernoulli")
    model = VideoPixelNetwork(cfg)
    logits = model(frames)                     # frames: uint8 (B, T, C, H, W)
    nll = model.nll(frames, context=10)        # (B,) nats per frame
    video = model.sample(context_frames, n_frames)

This package knows nothing of Ray, MLflow or DVC; pipeline/ holds that glue.
"""

from vpn.config import PRESETS, VPNConfig
from vpn.model import VideoPixelNetwork

__all__ = ["PRESETS", "VPNConfig", "VideoPixelNetwork"]
