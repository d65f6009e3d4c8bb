"""Training: overfitting one sequence, exact resume, safe checkpoints, non-finite losses."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from vpn import VPNConfig
from vpn.checkpoint import load_checkpoint, load_model
from vpn.config import TrainConfig
from vpn.overfit import overfit
from vpn.train import NonFiniteLossError, Trainer

TINY = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")


def moving_digits(n: int = 6, t: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Tiny stand-in for Moving MNIST: bright 3x3 blobs moving with a random velocity. (n, t, 1, s, s)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, t, 1, size, size, dtype=torch.uint8)
    for k in range(n):
        y, x = (int(v) for v in torch.randint(0, size - 3, (2,), generator=g))
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        for step in range(t):
            yy, xx = (y + dy * step) % (size - 2), (x + dx * step) % (size - 2)
            out[k, step, 0, yy : yy + 3, xx : xx + 3] = 255
    return out


def test_overfitting_one_sequence_drives_nll_down():
    """The blog post's sanity check, at the default learning rate: a large factor in a few hundred steps."""
    seq = moving_digits(1)[0]
    result = overfit(TINY, TrainConfig(steps=300, context=1), seq, tol=0.0, progress=False)
    first, last = result.losses[0], min(result.losses[-10:])
    assert first / max(last - result.floor, 1e-9) > 10, (first, last)


def test_overfit_reports_convergence_step():
    seq = moving_digits(1)[0]
    result = overfit(TINY, TrainConfig(steps=400, lr=3e-3, context=1), seq, progress=False)
    assert result.converged_step is not None and result.converged_step == len(result.losses)
    assert result.losses[-1] <= result.floor + result.tol
    assert all(loss > result.floor + result.tol for loss in result.losses[:-1])
    assert result.tol == pytest.approx(0.01 * 64)  # 0.01 nats per sub-pixel by default


def test_resume_continues_exactly(tmp_path):
    """Stop at step 3, resume from the checkpoint file: steps 4..6 have the losses of one straight run."""
    data, val = moving_digits(8), moving_digits(4, seed=1)
    cfg = TrainConfig(steps=6, batch_size=2, log_every=1, val_every=3, context=2, seed=4)
    straight: dict[int, float] = {}
    Trainer(TINY, cfg, data, val).fit(
        on_log=lambda s, m: straight.update({s: m["train_nats_per_frame"]}), progress=False
    )

    first = Trainer(TINY, cfg, data, val)
    first.fit(until=3, progress=False)
    path = first.save(tmp_path / "checkpoint.pt")
    del first
    resumed_losses: dict[int, float] = {}
    resumed = Trainer.from_checkpoint(path, data, val)
    assert resumed.step == 3
    resumed.fit(on_log=lambda s, m: resumed_losses.update({s: m["train_nats_per_frame"]}), progress=False)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == straight[step], step


def test_checkpoint_is_self_describing(tmp_path):
    trainer = Trainer(TINY, TrainConfig(steps=2, batch_size=1, context=2), moving_digits(2))
    trainer.fit(progress=False)
    state = load_checkpoint(trainer.save(tmp_path / "c.pt"))
    assert state["step"] == 2 and VPNConfig.from_dict(state["model_config"]) == TINY
    assert set(state) >= {"model", "optimizer", "step", "model_config", "train_config", "rng"}
    model = load_model(tmp_path / "c.pt")
    assert model.cfg == TINY and not model.training


def test_corrupt_and_malicious_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(bad)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "vpn-checkpoint/1", "payload": Exploit()}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    assert not marker.exists()

    plain = tmp_path / "plain.pt"
    torch.save({"hello": 1}, plain)
    with pytest.raises(ValueError, match="not a vpn-checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_finite_loss_stops_training():
    trainer = Trainer(TINY, TrainConfig(steps=5, batch_size=1, log_every=1, context=2), moving_digits(2))
    with torch.no_grad():
        trainer.model.decoder.head_out.bias.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match="non-finite") as caught:
        trainer.fit(progress=False)
    assert trainer.step == 1
    # Ray and process pools copy errors by pickling: the copy keeps the step, value and message
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.step, str(copy)) == (caught.value.step, str(caught.value)) and math.isnan(copy.value)


def test_validation_is_logged_and_finite():
    logged = []
    cfg = TrainConfig(steps=4, batch_size=2, log_every=2, val_every=4, val_batches=1, context=2)
    Trainer(TINY, cfg, moving_digits(4), moving_digits(2, seed=3)).fit(
        on_log=lambda s, m: logged.append((s, m)), progress=False
    )
    assert [s for s, _ in logged] == [2, 4]
    assert "val_nats_per_frame" in logged[-1][1] and math.isfinite(logged[-1][1]["val_nats_per_frame"])
    assert "val_nats_per_frame" not in logged[0][1]


def test_validation_value_is_the_models_nll_of_the_first_sequences():
    """evaluate() = mean of model.nll(prepare(x), context) over the first val_batches * batch_size
    val sequences, frames context..T-1 each. Also with a last batch that is not full."""
    from vpn.evaluate import prepare

    val = moving_digits(7, t=6, seed=5)
    cfg = TrainConfig(steps=1, batch_size=3, val_batches=2, context=2, seq_len=5, device="cpu")
    trainer = Trainer(TINY, cfg, moving_digits(4), val)
    trainer.fit(progress=False)  # any weights will do; trained ones are the ones validation sees
    model = trainer.model.eval()
    with torch.no_grad():
        per_sequence = model.nll(prepare(val, cfg), context=cfg.context)  # (7,)
        all_frames = model.nll(prepare(val, cfg), context=1)  # (7,), frames 1..T-1
    assert trainer.evaluate() == pytest.approx(per_sequence[:6].mean().item(), rel=1e-5)
    assert trainer.evaluate(batches=3) == pytest.approx(per_sequence.mean().item(), rel=1e-5)  # 3 + 3 + 1
    # the check can tell: the first six are not the last six, nor the mean over all frames 1..T-1
    assert per_sequence[:6].mean().item() != pytest.approx(per_sequence[1:].mean().item(), rel=1e-5)
    assert all_frames[:6].mean().item() != pytest.approx(trainer.evaluate(), rel=1e-5)


def test_seq_len_keeps_the_first_frames():
    from vpn.evaluate import prepare

    frames = torch.randint(0, 256, (2, 6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prepare(frames, TrainConfig(seq_len=4, context=2)), frames[:, :4])
    assert torch.equal(prepare(frames, TrainConfig(seq_len=6, context=2)), frames)
    assert torch.equal(prepare(frames, TrainConfig(context=2)), frames)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"seq_len": 1}, "seq_len"),
        ({"context": 5, "seq_len": 4}, "context"),
        ({"device": "tpu"}, "device"),
        ({"rmsprop_alpha": 1.0}, "rmsprop_alpha"),
    ],
)
def test_train_config_rejects_impossible_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**overrides)


def test_train_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_downsample_and_seq_len():
    from vpn.evaluate import prepare

    frames = moving_digits(2, t=6, size=8)
    out = prepare(frames, TrainConfig(seq_len=4, downsample=2, context=2))
    assert out.shape == (2, 4, 1, 4, 4) and out.dtype == torch.uint8
    assert int(out[0, 0].float().mean().round()) == int(frames[0, 0].float().mean().round())


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host: `.item()`, `float(t)`, `bool(t)`,
    `torch.equal`. On a GPU each one waits for the queued work, so a step must make none."""

    SYNCS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
    )

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCS
        return func(*args, **(kwargs or {}))


def test_training_makes_host_syncs_only_when_it_logs():
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, enc_blocks=1, dec_blocks=1)
    data = torch.randint(0, 256, (8, 3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, TrainConfig(batch_size=2, context=1, device="cpu", log_every=5, steps=10), data)
    trainer.train_step(data[:2])  # first call: lazy optimizer state, outside the count
    with _HostSyncs() as syncs:
        for k in range(3):
            trainer.train_step(data[2 * k : 2 * k + 2])
    assert syncs.count == 0
    # the loop: one sync per log (steps 5 and 10), none per step. The DataLoader itself draws its
    # base seed with .item() on a CPU generator, once per loader: a host op that never waits on a GPU.
    trainer = Trainer(cfg, TrainConfig(batch_size=2, context=1, device="cpu", log_every=5, steps=10), data)
    with _HostSyncs() as loader_only:
        for _ in trainer.loader(10):
            pass
    with _HostSyncs() as syncs:
        trainer.fit(progress=False)
    assert trainer.step == 10 and syncs.count == loader_only.count + 2
    # and the probe does see a sync where there is one
    with _HostSyncs() as syncs:
        float(trainer.train_step(data[:2]))
    assert syncs.count == 1
