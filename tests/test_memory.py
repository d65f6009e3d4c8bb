"""Memory: the estimate (vpn.memory) against real CPU steps, activation checkpointing and gradient
accumulation (train.micro_batch_size) against the plain step, and "auto" on CPU.

Checkpointing and accumulation must not change the numbers: checkpointed gradients equal plain
ones in float64 on every parameter, and an accumulated update equals the whole-batch update up to
float rounding (1 and 2 data-parallel workers alike); a resumed accumulated run is bit-identical.
The estimate's speed-ups (the meta-op memo, three of n micro-batches, the cache by estimate_key)
change no byte of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from vpn import VPNConfig, memory
from vpn.config import TrainConfig
from vpn.memory import choose_settings, train_memory
from vpn.model import VideoPixelNetwork
from vpn.step import micro_batches
from vpn.train import Trainer

TINY = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")
PLAIN = {"activation_checkpointing": False, "micro_batch_size": None}


def frames(n: int, t: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, t, 1, size, size) uint8 random bright pixels."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, t, 1, size, size, generator=g) < 0.3) * 255).to(torch.uint8)


# -- activation checkpointing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        VPNConfig.preset("micro", filter_fraction=8 / 128),  # categorical, masked decoder
        VPNConfig.preset("micro", filter_fraction=8 / 128, decoder="stacks", output="bernoulli"),
        VPNConfig.preset("micro", filter_fraction=8 / 128, decoder="baseline", block="relu", dilation=True),
    ],
    ids=["pixelcnn", "stacks", "baseline-relu"],
)
def test_checkpointed_gradients_equal_plain_gradients_in_float64(cfg):
    x = frames(2, t=4)
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = VideoPixelNetwork(cfg).double()
        model.set_activation_checkpointing(on)
        model.frame_nll(model(x), x).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-14, msg=name)
        assert g.abs().sum() > 0 or "conv_h" in name, name  # a parameter the loss reaches


def test_checkpointing_is_off_outside_autograd_and_keeps_the_state_dict():
    model = VideoPixelNetwork(TINY)
    keys = list(model.state_dict())
    model.set_activation_checkpointing(True)
    assert list(model.state_dict()) == keys
    with torch.no_grad():  # scoring and sampling: plain calls, the same logits
        x = frames(1)
        on = model(x)
        model.set_activation_checkpointing(False)
        torch.testing.assert_close(model(x), on, rtol=0, atol=0)


# -- gradient accumulation ------------------------------------------------------------------------
def _train(cfg: TrainConfig, data: torch.Tensor, model: VPNConfig = TINY, steps: int = 3) -> Trainer:
    trainer = Trainer(model, cfg, data)
    trainer.fit(until=steps, progress=False)
    return trainer


@pytest.mark.parametrize(
    "model", [TINY, VPNConfig.preset("micro", filter_fraction=8 / 128)], ids=["bernoulli", "categorical"]
)
def test_accumulated_update_equals_the_whole_batch_update(model):
    data = frames(12)
    base = TrainConfig(steps=3, batch_size=4, log_every=1, seed=2, device="cpu", **PLAIN)
    whole = _train(base, data, model)
    for micro, ckpt in ((1, False), (2, True)):
        acc = _train(base.replace(micro_batch_size=micro, activation_checkpointing=ckpt), data, model)
        assert acc.micro_batch_size == micro and acc.activation_checkpointing is ckpt
        for (name, p), q in zip(whole.model.named_parameters(), acc.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"micro {micro}: {name}")
        # the same batches were drawn: changing only the split leaves batch order a function of (seed, step)
        assert acc.step == whole.step == 3


def test_resumed_accumulated_run_is_bit_identical(tmp_path):
    data, val = frames(8), frames(4, seed=1)
    cfg = TrainConfig(
        steps=6,
        batch_size=4,
        log_every=1,
        val_every=3,
        context=2,
        seed=4,
        device="cpu",
        micro_batch_size=2,
        activation_checkpointing=True,
    )
    straight: dict[int, float] = {}
    Trainer(TINY, cfg, data, val).fit(
        on_log=lambda s, m: straight.update({s: m["train_nats_per_frame"]}), progress=False
    )
    first = Trainer(TINY, cfg, data, val)
    first.fit(until=3, progress=False)
    path = first.save(tmp_path / "checkpoint.pt")
    resumed = Trainer.from_checkpoint(path, data, val)
    again: dict[int, float] = {}
    resumed.fit(on_log=lambda s, m: again.update({s: m["train_nats_per_frame"]}), progress=False)
    assert again == {s: straight[s] for s in (4, 5, 6)}  # bit for bit


def test_micro_batch_size_must_divide_the_workers_share():
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide"):
        Trainer(TINY, TrainConfig(batch_size=4, device="cpu", micro_batch_size=3), frames(4))
    with pytest.raises(ValueError, match="micro_batch_size=8 must be <= batch_size=4"):
        TrainConfig(batch_size=4, micro_batch_size=8)
    for bad in (0, -1, 1.5, "half", True):
        with pytest.raises(ValueError, match="micro_batch_size"):
            TrainConfig(micro_batch_size=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="activation_checkpointing"):
            TrainConfig(activation_checkpointing=bad)
    assert micro_batches(8, None) == 1 and micro_batches(8, 2) == 4


def test_auto_keeps_the_plain_step_on_cpu():
    trainer = Trainer(TINY, TrainConfig(device="cpu", batch_size=2), frames(2))
    assert TrainConfig().activation_checkpointing == TrainConfig().micro_batch_size == "auto"
    assert (trainer.activation_checkpointing, trainer.micro_batch_size) == (False, None)
    assert not trainer.model.encoder.checkpointed


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(steps=3, batch_size=4, log_every=1, seed=2, device="cpu", micro_batch_size=1)
        trainer = _train(cfg, frames(12))
        if rank == 0:
            torch.save(trainer.model.state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_accumulation_on_two_workers_equals_one_worker(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_rank_main, args=(2, free_port(), str(out)), nprocs=2)
    single = _train(TrainConfig(steps=3, batch_size=4, log_every=1, seed=2, device="cpu", **PLAIN), frames(12))
    final = torch.load(out, weights_only=True)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=name)


# -- the estimate ---------------------------------------------------------------------------------
def test_estimate_falls_with_checkpointing_and_micro_batches_and_names_its_parts():
    cfg = TrainConfig(batch_size=4, **PLAIN)
    model = VPNConfig.preset("micro")
    plain = train_memory(model, cfg, (6, 32, 32))
    ckpt = train_memory(model, cfg.replace(activation_checkpointing=True), (6, 32, 32))
    micro = train_memory(model, cfg.replace(micro_batch_size=1), (6, 32, 32))
    n = VideoPixelNetwork(model).num_parameters()
    assert plain.parameters == plain.optimizer_state == 4 * n  # fp32 weights; RMSProp's square average
    assert ckpt.total < 0.5 * plain.total and micro.total < 0.5 * plain.total
    assert plain.step_peak > plain.saved_activations > 0
    bf16 = train_memory(model, cfg, (6, 32, 32), "bf16")
    assert bf16.parameters == plain.parameters and bf16.total < 0.7 * plain.total
    with pytest.raises(ValueError, match="resolved"):
        train_memory(model, TrainConfig(), (6, 32, 32))
    with pytest.raises(ValueError, match="precision"):
        train_memory(model, cfg, (6, 32, 32), "fp16")


def test_choose_settings_takes_the_cheapest_that_fits():
    model, cfg = VPNConfig.preset("micro"), TrainConfig(batch_size=4)
    plain = train_memory(model, cfg.replace(**PLAIN), (6, 32, 32))
    ckpt = train_memory(model, cfg.replace(activation_checkpointing=True, micro_batch_size=None), (6, 32, 32))
    assert choose_settings(model, cfg, (6, 32, 32), "fp32", plain.total)[:2] == (False, None)
    assert choose_settings(model, cfg, (6, 32, 32), "fp32", plain.total - 1)[:2] == (True, None)
    assert choose_settings(model, cfg, (6, 32, 32), "fp32", ckpt.total - 1)[:2] == (True, 2)
    assert choose_settings(model, cfg, (6, 32, 32), "fp32", 1) is None
    fixed = cfg.replace(activation_checkpointing=False)  # a field the config sets stays set
    assert choose_settings(model, fixed, (6, 32, 32), "fp32", plain.total - 1)[:2] == (False, 2)


def test_bf16_simulation_saves_what_autocast_saves():
    """The meta run's bf16 (parameters read through casts) against a real CPU autocast forward:
    the bytes kept for the backward (unique storages) agree within 5%."""
    for decoder in ("pixelcnn", "stacks"):
        cfg = VPNConfig.preset("micro", decoder=decoder)
        model, x = VideoPixelNetwork(cfg), frames(2, t=6, size=16)
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            model.frame_nll(logits, x).mean()
        estimate = train_memory(cfg, TrainConfig(batch_size=2, **PLAIN), (6, 16, 16), "bf16")
        assert estimate.saved_activations == pytest.approx(sum(saved.values()), rel=0.05), decoder


# -- the estimate's speed-ups change no byte ---------------------------------------------------------
MEMO_CASES = [
    (VPNConfig.preset("micro", filter_fraction=8 / 128), TrainConfig(batch_size=2, **PLAIN), "fp32"),
    (
        VPNConfig.preset("micro", filter_fraction=8 / 128, decoder="stacks", output="bernoulli"),
        TrainConfig(batch_size=2, activation_checkpointing=True, micro_batch_size=None),
        "bf16",
    ),
    (
        VPNConfig.preset("micro", filter_fraction=8 / 128, decoder="baseline", block="relu", dilation=True),
        TrainConfig(batch_size=3, activation_checkpointing=False, micro_batch_size=1),
        "fp32",
    ),
]


@pytest.mark.parametrize(("model", "cfg", "precision"), MEMO_CASES, ids=["pixelcnn", "stacks-ckpt-bf16", "relu-micro"])
def test_the_meta_memo_changes_no_estimate(model, cfg, precision, monkeypatch):
    """vpn.memory._MetaMemo answers repeated meta ops from a record: every field of the estimate equals,
    to the byte, the one measured with every op run (the first memoised run fills the memo, the second
    answers from it)."""
    args = (model, cfg, (5, 8, 8), precision, cfg.batch_size)
    memory._MEMO.clear()
    monkeypatch.setattr(memory._MetaMemo, "memo", False)
    reference = memory._measure(*args)
    monkeypatch.setattr(memory._MetaMemo, "memo", True)
    assert memory._measure(*args) == reference
    assert memory._measure(*args) == reference
    assert memory._MEMO  # it was used


def test_micro_batches_past_the_second_repeat_its_bytes():
    """train_memory runs three of n > 3 micro-batches (vpn.memory._measure): equal to the byte to all n."""
    for micro, ckpt in ((1, False), (2, True), (1, True)):
        cfg = TrainConfig(batch_size=8, activation_checkpointing=ckpt, micro_batch_size=micro)
        every = memory._measure(TINY, cfg, (4, 8, 8), "fp32", 8, every_micro_batch=True)
        assert train_memory(TINY, cfg, (4, 8, 8)) == every, (micro, ckpt)
    whole = TrainConfig(batch_size=4, activation_checkpointing=False, micro_batch_size=4)  # one pass: the plain step
    assert memory.estimate_key(TINY, whole, (4, 8, 8)) == memory.estimate_key(
        TINY, whole.replace(micro_batch_size=None), (4, 8, 8)
    )
    assert train_memory(TINY, whole, (4, 8, 8)) == memory._measure(TINY, whole, (4, 8, 8), "fp32", 4)


class _Reads:
    """A TrainConfig that records which of its fields are read."""

    def __init__(self, cfg: TrainConfig) -> None:
        self._cfg, self.read = cfg, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._cfg, name)


# Each field the cache keys on, and a value that changes the estimate of TrainConfig(batch_size=2, **PLAIN).
CHANGES = {"batch_size": 4, "activation_checkpointing": True, "micro_batch_size": 1}
# Keyed on or off although no size tested shows a difference: update() clips only when grad_clip > 0,
# and the norms it makes never set the peak (RMSProp's temporary per parameter, after them, is larger).
KEYED_WITHOUT_EFFECT = {"grad_clip": 0.0}


def test_the_cache_key_leaves_out_only_what_no_estimate_reads():
    """vpn.memory.estimate_key: the measurement reads no ignored field but lr and rmsprop_alpha, whose
    values change nothing; changing any ignored field keeps the key; every other field is listed here
    with a value that changes the estimate (a new TrainConfig field fails until it is placed)."""
    base = TrainConfig(batch_size=2, **PLAIN)
    reads = _Reads(base)
    reference = memory._measure(TINY, reads, (4, 8, 8), "fp32", 2)
    assert reads.read & set(memory.IGNORED_TRAIN_FIELDS) <= {"lr", "rmsprop_alpha"}
    for name, value in (("lr", 0.5), ("rmsprop_alpha", 0.5)):
        assert memory._measure(TINY, base.replace(**{name: value}), (4, 8, 8), "fp32", 2) == reference, name
    other = {"steps": 7, "seed": 3, "seq_len": 12, "context": 5, "downsample": 2, "device": "cuda", "amp": False}
    other |= {"memory_format": "channels_last", "compile": True, "data": "stream", "forecast_samples": 0}
    key = memory.estimate_key(TINY, base, (4, 8, 8))
    for name, value in other.items():
        assert memory.estimate_key(TINY, base.replace(**{name: value}), (4, 8, 8)) == key, name
    keyed = {f.name for f in dataclasses.fields(TrainConfig)} - set(memory.IGNORED_TRAIN_FIELDS)
    assert keyed == CHANGES.keys() | KEYED_WITHOUT_EFFECT.keys(), (
        "place the new field in CHANGES or IGNORED_TRAIN_FIELDS"
    )
    for name, value in CHANGES.items():
        changed = base.replace(**{name: value})
        assert memory.estimate_key(TINY, changed, (4, 8, 8)) != key, name
        assert train_memory(TINY, changed, (4, 8, 8)) != train_memory(TINY, base, (4, 8, 8)), name
    assert memory.estimate_key(TINY, base.replace(grad_clip=0.0), (4, 8, 8)) != key
    assert memory.estimate_key(TINY, base.replace(grad_clip=5.0), (4, 8, 8)) == key  # only on or off


def test_an_estimate_is_measured_once_per_key():
    memory._measured.cache_clear()
    cfg = TrainConfig(batch_size=2, **PLAIN)
    first = train_memory(TINY, cfg, (4, 8, 8))
    assert train_memory(TINY, cfg.replace(seed=5, lr=1e-2, steps=3), (4, 8, 8)) is first
    assert memory._measured.cache_info().misses == 1


PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from vpn.config import VPNConfig, TrainConfig
from vpn.train import Trainer
b, t, hw, ckpt = (int(a) for a in sys.argv[1:])
data = torch.randint(0, 256, (b, t, 1, hw, hw), dtype=torch.uint8)
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
# Reset the peak RSS (VmHWM) to the current RSS, so that the imports' own peak is not counted.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
cfg = TrainConfig(batch_size=b, device="cpu", activation_checkpointing=bool(ckpt), micro_batch_size=None)
trainer = Trainer(VPNConfig.preset("mini"), cfg, data)
trainer.train_step(data)
trainer.train_step(data)  # the steady state: gradients and RMSProp's state exist
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024 - base)
"""


def _peak_rss_increase(b: int, t: int, hw: int, ckpt: bool) -> int:
    # A fixed mmap threshold: glibc then returns every large block to the OS when it is freed, so
    # the peak RSS follows the live tensors instead of glibc's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(b), str(t), str(hw), str(int(ckpt))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.slow  # five subprocesses of real training steps
def test_estimate_matches_a_real_cpu_steps_peak_at_two_sizes():
    """Peak RSS increase of a real step (mini preset, 2 sequences of 8 frames) at 32x32 and 64x64,
    plain and checkpointed, against the estimate: within 8%, once the fixed cost of a first step
    (code pages, thread stacks, oneDNN's kernels: measured at 4x4 and subtracted) is taken out."""
    model = VPNConfig.preset("mini")
    fixed = (
        _peak_rss_increase(1, 2, 4, False) - train_memory(model, TrainConfig(batch_size=1, **PLAIN), (2, 4, 4)).total
    )
    assert 0 < fixed < 300 * 2**20
    for hw, ckpt in ((32, False), (64, False), (64, True)):
        cfg = TrainConfig(batch_size=2, activation_checkpointing=ckpt, micro_batch_size=None)
        estimate = train_memory(model, cfg, (8, hw, hw)).total
        measured = _peak_rss_increase(2, 8, hw, ckpt) - fixed
        assert estimate == pytest.approx(measured, rel=0.08), (hw, ckpt, estimate, measured)


def test_vpn_info_prints_the_estimate_under_the_settings_asked(capsys):
    from vpn.cli import main

    args = ["info", "--preset", "micro", "--batch-size", "4", "--seq-len", "6", "--height", "16", "--width", "16"]
    assert main([*args, "--precision", "bf16", "--activation-checkpointing", "--micro-batch-size", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    cfg = TrainConfig(batch_size=4, activation_checkpointing=True, micro_batch_size=2)
    expected = train_memory(VPNConfig.preset("micro"), cfg, (6, 16, 16), "bf16")
    assert row["train_memory_gib"] == pytest.approx(expected.total_gib, abs=1e-3)
    assert (row["precision"], row["activation_checkpointing"], row["micro_batch_size"]) == ("bf16", True, 2)
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_memory_gib"] > row["train_memory_gib"]


def test_the_choice_is_logged_once_as_params(tmp_path):
    """pipeline.sweep.record.tracking.log_params_once: a restarted trial keeps the first choice and is told of
    a change."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.record import tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("memory")).info.run_id
    chosen = {"memory.activation_checkpointing": True, "memory.micro_batch_size": None}
    assert tracking.log_params_once(client, run_id, chosen) == {}
    assert tracking.log_params_once(client, run_id, chosen) == {}  # the same again: nothing to log
    other = {**chosen, "memory.micro_batch_size": 2}
    assert tracking.log_params_once(client, run_id, other) == {"memory.micro_batch_size": "None"}
    assert client.get_run(run_id).data.params == {
        "memory.activation_checkpointing": "True",
        "memory.micro_batch_size": "None",
    }
