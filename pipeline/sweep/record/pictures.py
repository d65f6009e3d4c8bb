"""Pictures a sweep trial logs to MLflow: what the model generates, beside the ground truth.

- samples (train mode, at every validation): one validation sequence, prepared as the trial trains
  (clip length, pooling). Its first `context` frames are given, and the next `frames` are drawn pixel
  by pixel by the cached sampler (vpn.sample) with a fixed seed, so successive pictures of a run
  differ only by the weights. Rows: the ground truth; the context, then the drawn frames.
- reconstruction (overfit mode): the sequence the trial memorises, and the model's view of each frame
  given the true frames before it (teacher forcing, what the loss scores): the expected intensity of
  every pixel, sigmoid(logit) * 255 for the Bernoulli head and the softmax's mean for the categorical
  one. Frame 0 is never predicted, so it is shown as given.

A grey bar marks the first frame the model produced. Frames are enlarged (nearest neighbour) to at
least MIN_FRAME_PX so that 16x16 frames are visible in the MLflow UI. Cost: see docs/sweeps.md.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from vpn.model import VideoPixelNetwork
from vpn.viz import MIN_FRAME_PX, strip
from vpn.viz import enlarge as _enlarge

SAMPLES_KEY = "samples"  # MLflow image keys: the UI's image view groups pictures by key, with a step slider
RECONSTRUCTION_KEY = "reconstruction"


def enlarge(image: Image.Image, frame_px: int) -> Image.Image:
    """Scale a strip of frame_px-high frames by a whole factor up to >= MIN_FRAME_PX (nearest): vpn.viz.enlarge."""
    return _enlarge(image, frame_px, MIN_FRAME_PX)


@torch.no_grad()
def sample_strip(model: VideoPixelNetwork, sequence: Tensor, context: int, frames: int, seed: int = 0) -> Image.Image:
    """sequence uint8 (T, C, H, W) with T >= context + frames -> the truth above, context + drawn frames below."""
    device = next(model.parameters()).device
    truth = sequence[: context + frames].cpu()  # (context + frames, C, H, W)
    generator = torch.Generator().manual_seed(seed)  # a CPU generator drives a model on any device
    drawn = model.sample(truth[None, :context].to(device), frames, generator=generator)[0].cpu()  # (frames, C, H, W)
    rows = [truth, torch.cat([truth[:context], drawn])]
    return enlarge(strip(rows, separator_at=context), truth.shape[-2])


@torch.no_grad()
def expected_frames(logits: Tensor, output: str) -> Tensor:
    """The mean intensity of each sub-pixel under the model: logits (T, C, H, W) bernoulli or
    (T, C, 256, H, W) categorical -> uint8 (T, C, H, W)."""
    if output == "bernoulli":
        mean = torch.sigmoid(logits.float()) * 255
    else:
        levels = torch.arange(256, dtype=torch.float32, device=logits.device)
        mean = torch.einsum("tckhw,k->tchw", torch.softmax(logits.float(), dim=2), levels)
    return mean.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def reconstruction_strip(model: VideoPixelNetwork, sequence: Tensor) -> Image.Image:
    """sequence uint8 (T, C, H, W) -> the truth above, frame 0 + each later frame's expected intensities below."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(sequence[None].to(device))[0]  # (T-1, C, H, W) or (T-1, C, 256, H, W)
    finally:
        model.train(was_training)
    truth = sequence.cpu()
    predicted = expected_frames(logits, model.cfg.output).cpu()  # (T-1, C, H, W)
    return enlarge(strip([truth, torch.cat([truth[:1], predicted])], separator_at=1), truth.shape[-2])
