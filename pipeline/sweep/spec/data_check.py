"""The check of a sweep's data before Ray starts: every split the trials read is there and fits every point.

Only the arrays' headers are read (memory-mapped), so the check costs milliseconds even for the
full data. Its result also gives the data's identity, part of the sweep's id (pipeline.sweep.spec.identity).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.sweep.spec.sweep import Sweep


class SweepDataError(ValueError):
    """The data or the cluster a sweep needs is missing or does not fit its configs.

    Not pipeline.data.generate.DataError (the data stage's own error): this one is raised by the
    sweep's checks before anything is created, and `python -m pipeline.sweep` exits 2 on it.
    """


def check_data(sweep: Sweep) -> dict[str, Any]:
    """Open the splits the sweep reads (memory-mapped headers only) and check every point fits them.

    Returns {"shape": (N, T, C, H, W) of train or the overfit split, "identity": str (stats.json,
    else the shapes), "identity_of": what the identity was taken from, "shapes": split -> shape}.
    """
    from vpn.data import read_stats

    shapes, splits = _shapes(sweep)
    n, t, c, h, w = shapes[splits[0]]
    _check_points(sweep, (n, t, c, h, w))
    try:
        identity, identity_of = json_dumps(read_stats(sweep.data)), "stats.json"
    except FileNotFoundError:  # hand-made data (tests): its shapes stand in for the stats
        identity, identity_of = json_dumps(shapes), "array shapes"
    except ValueError as e:  # there, but not a JSON object (corrupt, truncated)
        raise SweepDataError(f"{sweep.source}: data: {e}") from None
    return {"shape": (n, t, c, h, w), "identity": identity, "identity_of": identity_of, "shapes": shapes}


def streams(sweep: Sweep) -> bool:
    """Whether a point of this train-mode sweep draws fresh sequences (train.data=stream)."""
    return sweep.mode == "train" and any(p.train.data == "stream" for p in sweep.points)


def _shapes(sweep: Sweep) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """(split or "stream" -> (N, T, C, H, W), the splits read in order); all must share (T, C, H, W)."""
    from vpn.data import load_split

    # train mode reads val while training and scores test at the end; train.npy only if a point trains
    # on the fixed set (a stream draws from train_digits.npy instead).
    if sweep.mode == "train":
        fixed = any(p.train.data == "fixed" for p in sweep.points)
        splits = (("train",) if fixed else ()) + ("val", "test")
    else:
        splits = (sweep.overfit.split,)
    shapes = {}
    for split in splits:
        try:
            shapes[split] = tuple(load_split(sweep.data, split).shape)
        except (FileNotFoundError, ValueError) as e:
            raise SweepDataError(f"{sweep.source}: data: {e}") from e
    if streams(sweep):
        from vpn.moving_mnist import MovingMNISTStream

        try:
            stream = MovingMNISTStream.from_folder(sweep.data)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise SweepDataError(f"{sweep.source}: train.data=stream: {e}") from e
        spec = stream.spec
        shapes["stream"] = (0, spec.seq_len, spec.channels, spec.frame_size, spec.frame_size)
    for split, shape in shapes.items():  # every source the trials read must have the same frames
        if shape[1:] != shapes[splits[0]][1:]:
            raise SweepDataError(
                f"{sweep.source}: data: {split} has sequences of shape {shape[1:]} but {splits[0]} has "
                f"{shapes[splits[0]][1:]} (T, C, H, W)"
            )
    return shapes, splits


def _check_points(sweep: Sweep, shape: tuple[int, int, int, int, int]) -> None:
    """Every point's configs fit data of this (N, T, C, H, W), and so does the overfit index."""
    n, t, c, h, w = shape
    for p in sweep.points:
        where = f"{sweep.source}: point {p.label}"
        if p.model.image_channels != c:
            raise SweepDataError(f"{where}: model.image_channels={p.model.image_channels} but {sweep.data} has C={c}")
        frames = p.train.seq_len or t
        if frames > t:
            raise SweepDataError(f"{where}: train.seq_len={frames} but the data has {t} frames per sequence")
        if sweep.mode == "train" and p.train.context >= frames:
            raise SweepDataError(f"{where}: train.context={p.train.context} leaves no frame to score of {frames}")
        if h // p.train.downsample < 2 or w // p.train.downsample < 2:
            raise SweepDataError(f"{where}: train.downsample={p.train.downsample} shrinks {h}x{w} frames below 2x2")
    if sweep.mode == "overfit" and sweep.overfit.index >= n:
        raise SweepDataError(
            f"{sweep.source}: overfit.index={sweep.overfit.index} but split {sweep.overfit.split} has {n} sequences"
        )


def json_dumps(obj: Any) -> str:
    """The data's identity as text: sorted keys, so the same stats give the same id on every machine."""
    return json.dumps(obj, sort_keys=True, default=str)
