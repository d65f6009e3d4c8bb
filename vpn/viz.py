"""Pictures of videos: a PNG strip of rows of frames, and an animated GIF (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from vpn.files import atomic_path


def strip(rows: list[Tensor | np.ndarray], gap: int = 2, separator_at: int | None = None) -> Image.Image:
    """Rows of videos, each uint8 (T, C, H, W), into one image: row r, column t is rows[r][t].

    separator_at: draw a mid-grey column before frame `separator_at` (the first generated frame).
    Rows may have different lengths; missing frames stay black.
    """
    arrays = [np.asarray(r.cpu() if isinstance(r, Tensor) else r) for r in rows]
    t_max = max(len(a) for a in arrays)
    c, h, w = arrays[0].shape[1:]
    sep = 2 if separator_at is not None else 0  # width of the grey separator column
    canvas = np.zeros((len(arrays) * (h + gap) - gap, t_max * (w + gap) - gap + sep + gap, c), np.uint8)
    if separator_at is not None:
        x = separator_at * (w + gap)
        canvas[:, x : x + sep] = 128
    for r, video in enumerate(arrays):
        for t, frame in enumerate(video):
            x = t * (w + gap) + (sep + gap if separator_at is not None and t >= separator_at else 0)
            canvas[r * (h + gap) : r * (h + gap) + h, x : x + w] = np.transpose(frame, (1, 2, 0))
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


MIN_FRAME_PX = 128  # frames drawn at least this tall: a 16x16 frame is readable at 128 px


def enlarge(image: Image.Image, frame_px: int, min_px: int = MIN_FRAME_PX) -> Image.Image:
    """Scale a strip of frame_px-high frames by a whole factor up to >= min_px a frame (nearest neighbour)."""
    k = max(1, -(-min_px // frame_px))
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:  # the format is named: the temporary name ends in .tmp
        image.save(tmp, format="PNG")
    return path


def save_gif(rows: list[Tensor | np.ndarray], path: str | Path, scale: int = 4, ms_per_frame: int = 200) -> Path:
    """Rows of videos (each uint8 (T, C, H, W), same T) side by side, as an animated GIF."""
    arrays = [np.asarray(r.cpu() if isinstance(r, Tensor) else r) for r in rows]
    frames = []
    for t in range(min(len(a) for a in arrays)):
        image = strip([a[t : t + 1] for a in arrays])  # one column: the rows stacked vertically
        frames.append(image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST))
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path
