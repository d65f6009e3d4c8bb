"""Moving MNIST generation: trajectory and rendering invariants, determinism, config errors.

Everything runs on a tiny synthetic MNIST (random 28x28 "digits" whose pixels are all non-zero, so
a digit's pixels can be recognised exactly wherever it is drawn).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import generate as gen
from pipeline.data.generate import GenerateConfig, bounce, generate, plan_split, render
from pipeline.params import ParamsError, section_from_mapping
from vpn.data import SPLITS, load_split, meta_path, read_stats
from vpn.metrics import bernoulli_lower_bound
from vpn.moving_mnist import TRAIN_DIGITS_FILE, SequenceSpec

TINY = GenerateConfig(
    seed=3, n_train=7, n_val=4, n_test=5, val_digits=20, seq_len=12, frame_size=40, digit_size=12, context=4
)  # digits shrunk to 12x12 so that two of them are often apart on the 40x40 canvas


def make_fake_mnist(path: Path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Path:
    """A stand-in for mnist.npz: uint8 digits with every pixel in 1..255, labels 0..9."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(1, 256, size=(n_train, 28, 28), dtype=np.uint8),
        y_train=(np.arange(n_train) % 10).astype(np.uint8),
        x_test=rng.integers(1, 256, size=(n_test, 28, 28), dtype=np.uint8),
        y_test=(np.arange(n_test) % 10).astype(np.uint8),
    )
    return path


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_mnist(tmp_path_factory.mktemp("mnist") / "mnist.npz")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, fake_mnist: Path) -> Path:
    out = tmp_path_factory.mktemp("moving_mnist")
    generate(TINY, fake_mnist, out)
    return out


def random_walks(n: int = 400, seq_len: int = 60, step: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    start = rng.random((n, 2))
    velocity = gen.directions(rng.random(n) * 2 * np.pi)
    return start, velocity, *bounce(start, velocity, seq_len, step)


# ------------------------------------------------------------------------------------------------
# Trajectories


def test_positions_stay_inside_the_unit_square_and_the_canvas():
    _, _, pos, _ = random_walks()
    assert pos.min() >= 0.0 and pos.max() <= 1.0
    plan = plan_split(np.random.default_rng(0), 300, 50, np.zeros(50, np.uint8), replace(TINY, seq_len=40))
    free = TINY.frame_size - TINY.digit_size
    assert plan.offset.min() >= 0 and plan.offset.max() <= free


def test_speed_is_constant_between_bounces():
    step = 0.1
    start, velocity, pos, vel = random_walks(step=step)
    # Every frame's velocity is a unit vector (sign flips do not change the speed).
    np.testing.assert_allclose(np.linalg.norm(vel, axis=-1), 1.0, atol=1e-8)
    prev_pos = np.concatenate([start[:, None], pos[:, :-1]], axis=1)  # (M, T, 2)
    prev_vel = np.concatenate([velocity[:, None], vel[:, :-1]], axis=1)
    free_move = (vel == prev_vel).all(axis=-1)  # no bounce in this frame
    assert free_move.mean() > 0.5  # the walk is long enough to have plenty of both kinds
    displacement = pos - prev_pos
    np.testing.assert_allclose(displacement[free_move], step * prev_vel[free_move], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(displacement[free_move], axis=-1), step, atol=1e-8)


def test_a_bounce_reverses_only_the_component_that_hit_the_edge():
    _start, velocity, pos, vel = random_walks()
    prev_vel = np.concatenate([velocity[:, None], vel[:, :-1]], axis=1)  # (M, T, 2)
    flipped = vel != prev_vel
    assert flipped.any()
    np.testing.assert_array_equal(vel[flipped], -prev_vel[flipped])
    # A flipped component sits on an edge; the other component of that frame moved freely.
    assert np.isin(pos[flipped], (0.0, 1.0)).all()
    one_flip = flipped.sum(-1) == 1
    kept = one_flip[..., None] & ~flipped
    np.testing.assert_array_equal(vel[kept], prev_vel[kept])


def test_bounce_by_hand():
    # x reaches 1.03 in the first step: clamped to 1 and its velocity negated; y untouched.
    pos, vel = bounce(np.array([[0.5, 0.95]]), np.array([[0.6, 0.8]]), seq_len=2, step=0.1)
    np.testing.assert_allclose(pos[0, 0], [0.56, 1.0])
    np.testing.assert_allclose(vel[0, 0], [0.6, -0.8])
    np.testing.assert_allclose(pos[0, 1], [0.62, 0.92])


def reference_trajectory(start: np.ndarray, theta: float, seq_len: int, step: float) -> list[tuple[float, float]]:
    """Srivastava et al.'s GetRandomTrajectory for one digit, in plain Python floats: move by
    step * (sin theta, cos theta), then clamp a coordinate that left [0, 1] and negate its velocity."""
    y, x = float(start[0]), float(start[1])
    vy, vx = math.sin(theta), math.cos(theta)
    out = []
    for _ in range(seq_len):
        y, x = y + vy * step, x + vx * step
        if y <= 0:
            y, vy = 0.0, -vy
        if y >= 1:
            y, vy = 1.0, -vy
        if x <= 0:
            x, vx = 0.0, -vx
        if x >= 1:
            x, vx = 1.0, -vx
        out.append((y, x))
    return out


def test_offsets_follow_each_digits_own_trajectory_frame_by_frame():
    """offset[t] = floor(free * position[t]), position recomputed independently from the plan's start
    and direction, frame by frame; so a digit moves at most step * free pixels (+1 for the floor) a
    frame and never jumps."""
    cfg = replace(TINY, seq_len=30)
    plan = plan_split(np.random.default_rng(2), 40, 50, np.zeros(50, np.uint8), cfg)
    n, d = plan.digit_index.shape
    reference = np.array(
        [
            reference_trajectory(plan.start[i, k], plan.theta[i, k], cfg.seq_len, cfg.step)
            for i in range(n)
            for k in range(d)
        ]
    ).reshape(n, d, cfg.seq_len, 2)
    assert np.isin(reference, (0.0, 1.0)).any()  # bounces happen, so they are checked too
    # the generator rounds sin and cos to multiples of 2^-30: each step may differ by step * 2^-30
    np.testing.assert_allclose(plan.position, reference, rtol=0, atol=cfg.seq_len * cfg.step * 2.0**-30)
    np.testing.assert_array_equal(plan.offset, np.floor(cfg.free * reference).astype(np.int64))
    # bounded motion: from the start to frame 0, and between consecutive frames
    path = np.concatenate([np.floor(cfg.free * plan.start)[:, :, None], plan.offset], axis=2)  # (N, D, T+1, 2)
    moves = np.abs(np.diff(path, axis=2))
    assert moves.max() <= math.floor(cfg.step * cfg.free) + 1
    assert (moves.sum(axis=-1) > 0).mean() > 0.5  # and they do move


# ------------------------------------------------------------------------------------------------
# Rendering


def naive_render(images: np.ndarray, offset: np.ndarray, frame_size: int) -> np.ndarray:
    """Reference: one slice assignment per (sequence, frame, digit)."""
    b, d, c, s, _ = images.shape
    t = offset.shape[2]
    frames = np.zeros((b, t, c, frame_size, frame_size), np.uint8)
    for i in range(b):
        for j in range(t):
            for k in range(d):
                y, x = offset[i, k, j]
                window = frames[i, j, :, y : y + s, x : x + s]
                np.maximum(window, images[i, k], out=window)
    return frames


@pytest.mark.parametrize("channels,digits", [(1, 2), (3, 3), (1, 1)])
def test_render_matches_the_naive_loop(channels, digits):
    rng = np.random.default_rng(1)
    s, size = 9, 20
    images = rng.integers(0, 256, size=(5, digits, channels, s, s), dtype=np.uint8)
    offset = rng.integers(0, size - s + 1, size=(5, digits, 7, 2))
    np.testing.assert_array_equal(render(images, offset, size), naive_render(images, offset, size))


def test_digit_pixels_are_preserved_where_digits_do_not_overlap(tiny_data, fake_mnist):
    mnist = np.load(fake_mnist)
    s = TINY.digit_size
    checked = 0
    for split in SPLITS:
        video = load_split(tiny_data, split)  # (N, T, 1, H, W)
        meta = pd.read_parquet(meta_path(tiny_data, split))
        for n, rows in meta.groupby("sequence"):
            digits = [gen.resize_digits(mnist[r.mnist_array][r.mnist_index], s) for r in rows.itertuples()]
            tops, lefts = np.stack(rows["top"].to_list()), np.stack(rows["left"].to_list())  # (D, T)
            for t in range(TINY.seq_len):
                frame = video[n, t, 0]
                (y0, y1), (x0, x1) = tops[:, t], lefts[:, t]
                coverage = np.zeros(frame.shape, bool)
                for y, x, digit in zip(tops[:, t], lefts[:, t], digits, strict=True):
                    coverage[y : y + s, x : x + s] = True
                    if abs(y0 - y1) >= s or abs(x0 - x1) >= s:  # the windows are disjoint
                        np.testing.assert_array_equal(frame[y : y + s, x : x + s], digit)
                        checked += 1
                assert not frame[~coverage].any()  # nothing drawn outside the digits
    assert checked > 20


def test_splits_draw_from_disjoint_digit_pools(tiny_data, fake_mnist):
    n_train = len(np.load(fake_mnist)["x_train"])
    held_out = n_train - TINY.val_digits
    train = pd.read_parquet(meta_path(tiny_data, "train"))
    val = pd.read_parquet(meta_path(tiny_data, "val"))
    test = pd.read_parquet(meta_path(tiny_data, "test"))
    assert (train.mnist_array == "x_train").all() and (train.mnist_index < held_out).all()
    assert (val.mnist_array == "x_train").all() and (val.mnist_index >= held_out).all()
    assert (test.mnist_array == "x_test").all()
    labels = np.load(fake_mnist)["y_train"]
    np.testing.assert_array_equal(train.label, labels[train.mnist_index])


def test_colour_variant_tints_the_same_digits_on_the_same_paths(fake_mnist):
    cfg = replace(TINY, colour=True)
    pool = np.load(fake_mnist)["x_test"]
    labels = np.zeros(len(pool), np.uint8)
    grey = plan_split(np.random.default_rng(5), 6, len(pool), labels, TINY)
    rgb = plan_split(np.random.default_rng(5), 6, len(pool), labels, cfg)
    np.testing.assert_array_equal(grey.offset, rgb.offset)
    np.testing.assert_array_equal(grey.digit_index, rgb.digit_index)
    assert rgb.colour.shape == (6, TINY.digits, 3) and (rgb.colour.max(-1) == 255).all()
    images = gen.digit_images(pool, rgb, slice(None), cfg)  # (N, D, 3, s, s)
    grey_digits = gen.resize_digits(pool[rgb.digit_index], cfg.digit_size)[:, :, None]  # (N, D, 1, s, s)
    expected = np.rint(grey_digits * (rgb.colour[..., None, None] / 255.0))
    np.testing.assert_array_equal(images, expected.astype(np.uint8))
    video = render(images, rgb.offset, cfg.frame_size)
    assert video.shape == (6, cfg.seq_len, 3, cfg.frame_size, cfg.frame_size)


def test_resized_digits_for_tiny_configs():
    digits = np.arange(28 * 28, dtype=np.int64).reshape(1, 28, 28)
    np.testing.assert_array_equal(gen.resize_digits(digits, 28), digits)
    small = gen.resize_digits(digits, 14)
    assert small.shape == (1, 14, 14)
    np.testing.assert_array_equal(small[0], digits[0, 1::2, 1::2])


# ------------------------------------------------------------------------------------------------
# Determinism and outputs


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_params_give_the_same_bytes_whatever_the_chunking(tmp_path, fake_mnist, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    generate(TINY, fake_mnist, first)
    monkeypatch.setattr(gen, "CHUNK", 2)  # rendering in other chunks must not change a byte
    generate(TINY, fake_mnist, second)
    a, b = file_bytes(first), file_bytes(second)
    outputs = ["stats.json", TRAIN_DIGITS_FILE] + [f"{s}.npy" for s in SPLITS] + [f"{s}_meta.parquet" for s in SPLITS]
    assert sorted(a) == sorted(outputs)
    assert a == b
    third = tmp_path / "c"
    generate(replace(TINY, seed=TINY.seed + 1), fake_mnist, third)
    assert file_bytes(third)["test.npy"] != a["test.npy"]


def test_split_streams_are_independent(tmp_path, fake_mnist):
    generate(TINY, fake_mnist, tmp_path / "a")
    generate(replace(TINY, n_train=3), fake_mnist, tmp_path / "b")
    for split in ("val", "test"):
        assert (tmp_path / "a" / f"{split}.npy").read_bytes() == (tmp_path / "b" / f"{split}.npy").read_bytes()


def test_stats_record_shapes_and_the_lower_bound(tiny_data):
    stats = read_stats(tiny_data)
    for split in SPLITS:
        n = {"train": TINY.n_train, "val": TINY.n_val, "test": TINY.n_test}[split]
        assert stats["splits"][split]["shape"] == [n, TINY.seq_len, 1, TINY.frame_size, TINY.frame_size]
    # The recorded bound is vpn.metrics' own, over the whole test split at once.
    test = torch.from_numpy(np.array(load_split(tiny_data, "test")))
    direct = bernoulli_lower_bound(test, context=TINY.context).double().mean().item()
    assert stats["lower_bound_nats_per_frame"] == pytest.approx(direct, abs=1e-4)
    assert stats["splits"]["test"]["lower_bound_nats_per_frame"] == stats["lower_bound_nats_per_frame"]


def test_lower_bound_against_closed_form():
    # Every pixel at grey level z = 128/255 costs the binary entropy H(z) nats; 0 and 255 cost 0.
    z = 128 / 255
    h = -(z * math.log(z) + (1 - z) * math.log(1 - z))
    frames = np.zeros((2, 5, 1, 8, 8), np.uint8)
    frames[0] = 128
    frames[1, :, :, :4] = 255
    total, square = gen.lower_bound_sum(frames, context=2)
    assert total == pytest.approx(64 * h, rel=1e-5)
    assert square == pytest.approx((64 * h) ** 2, rel=1e-5)


def test_failed_generation_leaves_no_files(tmp_path, fake_mnist, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    generate(TINY, fake_mnist, tmp_path)
    before = file_bytes(tmp_path)
    monkeypatch.setattr(gen, "meta_table", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(replace(TINY, seed=99), fake_mnist, tmp_path)
    assert file_bytes(tmp_path) == before  # old outputs intact, no temporary files left


# ------------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.parametrize(
    "override,field",
    [
        ({"digit_size": 65}, "digit_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"digits": 0}, "digits"),
        ({"n_train": -5}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"frame_size": -64}, "frame_size"),
        ({"step": 0}, "step"),
        ({"context": 20}, "context"),
        ({"seed": -1}, "seed"),
        ({"n_val": 2.5}, "n_val"),
        ({"colour": "yes"}, "colour"),
    ],
)
def test_impossible_sizes_are_rejected_naming_the_field(override, field):
    with pytest.raises(ParamsError, match=field):
        section_from_mapping(GenerateConfig, override, "generate")


def test_unknown_key_is_rejected_naming_key_and_section():
    with pytest.raises(ParamsError, match=r"'n_trian'.*section 'generate'"):
        section_from_mapping(GenerateConfig, {"n_trian": 5}, "generate")


def test_config_takes_the_protocol_fields_from_sequence_spec_in_params_order():
    # params.yaml, dvc.yaml's params list and stats.json's "params" all follow the field order.
    names = [f.name for f in fields(GenerateConfig)]
    assert names == [
        "seed", "n_train", "n_val", "n_test", "val_digits",
        "seq_len", "frame_size", "digit_size", "digits", "step", "colour",
        "context", "test_file",
    ]  # fmt: skip
    assert [f.name for f in fields(SequenceSpec)] == names[5:11]
    assert GenerateConfig() == GenerateConfig(**{f.name: f.default for f in fields(SequenceSpec)})
    spec = TINY.sequence
    assert type(spec) is SequenceSpec
    assert spec == SequenceSpec(seq_len=12, frame_size=40, digit_size=12, digits=2, step=0.1, colour=False)
    assert (TINY.channels, TINY.free) == (spec.channels, spec.free) == (1, 28)


def test_val_digits_must_leave_training_digits(tmp_path, fake_mnist):
    with pytest.raises(ParamsError, match="val_digits"):
        generate(replace(TINY, val_digits=100), fake_mnist, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_mnist_file_is_named(tmp_path):
    bad = tmp_path / "mnist.npz"
    np.savez(bad, x_train=np.zeros((10, 28, 28), np.float32), y_train=np.zeros(10, np.uint8),
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.uint8))  # fmt: skip
    with pytest.raises(gen.DataError, match=r"mnist\.npz.*x_train"):
        generate(TINY, bad, tmp_path / "out")
    with pytest.raises(gen.DataError, match="not found"):
        generate(TINY, tmp_path / "missing.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
