"""Streamed training sequences (vpn.moving_mnist.MovingMNISTStream), the test file, and scoring.

The stream must be the data stage's protocol (one implementation: the same plan and render), a pure
function of (seed, sequence), drawn only from the training digits, and resumable exactly; a trial's
test score must be model.nll on the test split and its floor the data stage's lower bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline.data.generate import DataError, GenerateConfig, generate
from tests.test_data_generate import TINY, make_fake_mnist, naive_render
from vpn import VideoPixelNetwork, VPNConfig
from vpn.batches import stream_indices
from vpn.config import TrainConfig
from vpn.data import MovingMNIST, read_stats, training_source
from vpn.evaluate import prepare, score
from vpn.metrics import bernoulli_lower_bound
from vpn.moving_mnist import STREAM_KEY, TRAIN_DIGITS_FILE, MovingMNISTStream, digit_images, plan_split
from vpn.train import Trainer


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist") / "mnist.npz")


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("moving_mnist")
    generate(TINY, mnist, out)
    return out


def test_stream_is_the_generators_protocol(data):
    """Sequence i is plan_split + render of the data stage, from the generator seeded by (seed, i)."""
    stream = MovingMNISTStream.from_folder(data, seed=7)
    assert stream.spec == TINY.sequence
    pool = np.load(data / TRAIN_DIGITS_FILE)
    for i in (0, 5, 12345):
        rng = np.random.default_rng(np.random.SeedSequence([STREAM_KEY, 7, i]))
        plan = plan_split(rng, 1, len(pool), None, TINY.sequence)
        expected = naive_render(digit_images(pool, plan, slice(None), TINY.sequence), plan.offset, TINY.frame_size)
        np.testing.assert_array_equal(stream[i].numpy(), expected[0])
        # the generator's invariants: offset = trunc(free * position), inside the canvas, and digits
        # move at most step * free (+1 for truncation) pixels a frame: no teleporting
        np.testing.assert_array_equal(stream.plan([i]).offset, (TINY.free * plan.position).astype(np.int64))
        offset = stream.plan([i]).offset
        assert offset.min() >= 0 and offset.max() <= TINY.free
        assert np.abs(np.diff(offset, axis=2)).max() <= int(np.ceil(TINY.step * TINY.free)) + 1


def test_same_seed_and_index_give_the_same_bytes_in_any_batch(data):
    a = MovingMNISTStream.from_folder(data, seed=3)
    b = MovingMNISTStream.from_folder(data, seed=3)
    batch = torch.stack(a.__getitems__([4, 9, 2]))
    singles = torch.stack([b[4], b[9], b[2]])
    assert batch.dtype == torch.uint8 and batch.shape == (3, TINY.seq_len, 1, TINY.frame_size, TINY.frame_size)
    assert torch.equal(batch, singles)
    assert not torch.equal(a[4], a[5])  # another sequence
    assert not torch.equal(a[4], MovingMNISTStream.from_folder(data, seed=4)[4])  # another seed


def test_stream_draws_only_the_training_digits(data, mnist):
    """train_digits.npy is exactly the train split's pool: no val or test digit can appear."""
    x = np.load(mnist)
    pool = np.load(data / TRAIN_DIGITS_FILE)
    held_out = len(x["x_train"]) - TINY.val_digits
    np.testing.assert_array_equal(pool, x["x_train"][:held_out])
    stream = MovingMNISTStream.from_folder(data, seed=0)
    drawn = stream.plan(list(range(500))).digit_index
    assert drawn.min() >= 0 and drawn.max() < held_out and len(np.unique(drawn)) > held_out // 2
    # every drawn digit image is a training image and none is a val or test image (fake digits are unique)
    others = {bytes(d) for d in np.concatenate([x["x_train"][held_out:], x["x_test"]]).reshape(-1, 28 * 28)}
    assert not {bytes(d) for d in pool[np.unique(drawn)].reshape(-1, 28 * 28)} & others


def tiny_model() -> VPNConfig:
    return VPNConfig.preset("micro", filter_fraction=4 / 128, enc_blocks=1, dec_blocks=1, output="bernoulli")


def test_training_on_the_stream_resumes_exactly(data, tmp_path):
    cfg = TrainConfig(
        steps=6,
        batch_size=2,
        log_every=1,
        val_every=3,
        val_batches=1,
        seq_len=5,
        context=2,
        device="cpu",
        data="stream",
        ckpt_every=3,
    )
    val = MovingMNIST(data, "val")
    whole = Trainer(tiny_model(), cfg, training_source(data, "stream", cfg.seed), val)
    losses: dict[int, float] = {}
    whole.fit(on_log=lambda s, m: losses.__setitem__(s, m["train_nats_per_frame"]), progress=False)

    first = Trainer(tiny_model(), cfg, training_source(data, "stream", cfg.seed), val)
    first.fit(3, on_checkpoint=lambda s: first.save(tmp_path / "c.pt"), progress=False)
    resumed = Trainer.from_checkpoint(tmp_path / "c.pt", training_source(data, "stream", cfg.seed), val)
    again: dict[int, float] = {}
    resumed.fit(on_log=lambda s, m: again.__setitem__(s, m["train_nats_per_frame"]), progress=False)
    assert again == {s: losses[s] for s in (4, 5, 6)}  # bit for bit
    # step s trained on stream sequences (s-1)*B .. s*B-1
    assert stream_indices(2, 4) == [6, 7]


def test_trainer_refuses_a_source_that_is_not_the_configured_one(data):
    cfg = TrainConfig(steps=1, batch_size=2, device="cpu", seq_len=5, context=2)
    with pytest.raises(ValueError, match="train.data is 'fixed' but the training data given is a stream"):
        Trainer(tiny_model(), cfg, training_source(data, "stream"))
    with pytest.raises(ValueError, match="train.data is 'stream'"):
        Trainer(tiny_model(), cfg.replace(data="stream"), MovingMNIST(data, "train"))
    with pytest.raises(ValueError, match="data must be one of"):
        cfg.replace(data="streamed")
    with pytest.raises(ValueError, match="test_sequences"):
        cfg.replace(test_sequences=0)


def test_missing_pool_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=TRAIN_DIGITS_FILE):
        MovingMNISTStream.from_folder(tmp_path)


# -- scoring ----------------------------------------------------------------------------------------
def test_score_is_model_nll_and_its_floor_the_lower_bound(data):
    cfg = TrainConfig(batch_size=3, seq_len=6, context=2, downsample=2, device="cpu")
    torch.manual_seed(0)
    model = VideoPixelNetwork(tiny_model())
    test = MovingMNIST(data, "test")
    result = score(model, test, cfg, sequences=4)
    frames = prepare(torch.stack([test[k] for k in range(4)]), cfg)  # (4, 6, 1, 20, 20)
    with torch.no_grad():
        by_hand = model.nll(frames, context=2).double().mean()
    assert result.sequences == 4
    assert result.nats_per_frame == pytest.approx(float(by_hand), rel=1e-6)
    assert result.floor_nats_per_frame == pytest.approx(
        float(bernoulli_lower_bound(frames, 2).double().mean()), rel=1e-6
    )
    assert result.excess_nats_per_frame == pytest.approx(result.nats_per_frame - result.floor_nats_per_frame)
    assert result.nats_per_frame > result.floor_nats_per_frame  # a cross-entropy is never below its floor


def test_score_builds_no_autograd_graph(data):
    """`vpn eval` calls score directly, outside any no_grad: a graph kept by the running sum would hold
    every batch's activations until the last one (the whole test set's, on a GPU)."""
    cfg = TrainConfig(batch_size=2, seq_len=6, context=2, downsample=2, device="cpu")
    model = VideoPixelNetwork(tiny_model())
    grad_enabled = []
    model.register_forward_hook(lambda module, args, out: grad_enabled.append(torch.is_grad_enabled()))
    test = MovingMNIST(data, "test")
    score(model, test, cfg, sequences=4)
    score(model, test, cfg, sequences=4, autocast=lambda: torch.autocast("cpu", torch.bfloat16))
    assert grad_enabled == [False] * 4  # two batches of two, twice
    assert torch.is_grad_enabled()  # and as it was afterwards


def test_floor_at_the_data_stages_framing_is_stats_json(data):
    """Frames context..T-1 of the whole test split at full size: the floor is the stage's lower bound."""
    cfg = TrainConfig(batch_size=2, context=TINY.context, device="cpu")
    result = score(VideoPixelNetwork(tiny_model()), MovingMNIST(data, "test"), cfg)
    assert result.sequences == TINY.n_test
    assert round(result.floor_nats_per_frame, 4) == pytest.approx(
        read_stats(data)["lower_bound_nats_per_frame"], abs=1e-4
    )


def test_categorical_scores_have_no_bernoulli_floor(data):
    cfg = TrainConfig(batch_size=2, seq_len=4, context=2, device="cpu")
    result = score(VideoPixelNetwork(tiny_model().replace(output="categorical")), MovingMNIST(data, "test"), cfg, 2)
    assert result.floor_nats_per_frame is None and result.excess_nats_per_frame is None


# -- the standard test file -------------------------------------------------------------------------
def test_standard_test_file_becomes_the_test_split(tmp_path, mnist):
    """A file of mnist_test_seq.npy's layout (frames first, (T, N, H, W) uint8) is the test split."""
    cfg = dataclasses.replace(TINY, n_test=3)
    frames_first = np.random.default_rng(0).integers(
        0, 256, size=(cfg.seq_len, 3, cfg.frame_size, cfg.frame_size), dtype=np.uint8
    )
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, frames_first)
    stats = generate(dataclasses.replace(cfg, test_file=path.name), mnist, tmp_path / "out", base_dir=tmp_path)
    test = np.load(tmp_path / "out" / "test.npy")
    np.testing.assert_array_equal(test, frames_first.transpose(1, 0, 2, 3)[:, :, None])
    split = stats["splits"]["test"]
    assert split["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    bound = float(bernoulli_lower_bound(torch.from_numpy(test), cfg.context).double().mean())
    assert stats["lower_bound_nats_per_frame"] == pytest.approx(bound, abs=1e-4)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["params"]["test_file"] == path.name
    # the generated splits are as without the file
    generate(cfg, mnist, tmp_path / "plain")
    for name in ("train.npy", "val.npy", TRAIN_DIGITS_FILE):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((12, 3, 40, 40), np.float32), "expected uint8"),
        (np.zeros((3, 12, 40, 40), np.uint8), "generate.seq_len=12"),
        (np.zeros((12, 5, 40, 40), np.uint8), "generate.n_test=3"),
        (np.zeros((12, 3, 32, 32), np.uint8), "generate.frame_size=40"),
        (np.zeros((12, 3, 1, 40, 40), np.uint8), "expected uint8 \\(frames, sequences"),
    ],
)
def test_a_wrong_test_file_is_named_and_nothing_is_written(tmp_path, mnist, array, message):
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message):
        generate(dataclasses.replace(TINY, n_test=3, test_file=str(path)), mnist, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="colour"):
        GenerateConfig(test_file="x.npy", colour=True)


def test_gradient_accumulation_composes_with_the_stream(data):
    """train.micro_batch_size on streamed sequences: the whole-batch update up to float rounding."""
    cfg = TrainConfig(steps=2, batch_size=2, log_every=1, seq_len=5, context=2, device="cpu", data="stream")
    trained = []
    for micro in (None, 1):
        trainer = Trainer(tiny_model(), cfg.replace(micro_batch_size=micro), training_source(data, "stream", cfg.seed))
        trainer.fit(progress=False)
        trained.append(trainer.model.state_dict())
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
