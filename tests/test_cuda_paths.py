"""Defects of the CUDA paths found by reading them (issue 18, point 9), each checked on CPU: the CUDA
RNG states restored only for the GPUs visible (a faked device count), one system-metrics monitor per
trial, the spec refusing idle GPUs and seq_len 2 under DDP, and the test NLL scored in fp32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from pipeline.sweep import trainable
from pipeline.sweep.spec import SpecError, load_spec
from vpn import train as vpn_train
from vpn.config import TrainConfig, VPNConfig
from vpn.evaluate import full_precision, score
from vpn.train import Trainer

MODEL = VPNConfig(enc_blocks=1, dec_blocks=1, filter_fraction=0.03125, output="bernoulli")
TRAIN = TrainConfig(steps=2, batch_size=2, context=2, device="cpu", num_workers=0)


def test_resume_restores_cuda_rng_only_for_visible_gpus(monkeypatch):
    """A checkpoint written on a node of 2 visible GPUs, resumed where 1 is visible."""
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append(device))
    states = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    vpn_train.restore_cuda_rng(states)
    assert set_calls == [0]

    data = torch.randint(0, 256, (4, 4, 1, 8, 8), dtype=torch.uint8)
    trainer = Trainer(MODEL, TRAIN, data)
    state = trainer.state_dict()
    state["rng"]["cuda"] = states
    set_calls.clear()
    Trainer(MODEL, TRAIN, data).load_state_dict(state)  # the Trainer's resume path
    assert set_calls == [0]


@pytest.mark.parametrize("rank", [0, 1])
def test_one_system_metrics_monitor_per_trial(monkeypatch, rank):
    started = []
    monkeypatch.setattr(trainable, "_system_metrics", lambda cfg: started.append(cfg) or SimpleNamespace(finish=list))
    monkeypatch.setattr(trainable._TrialRun, "open", classmethod(lambda cls, cfg, tags: None))
    monkeypatch.setattr(trainable, "_train", lambda cfg, run, session: None)
    cfg = SimpleNamespace(mode="train", system_metrics=True, run_id="r")
    trainable.run_trial(cfg, session=None, tags={}, rank=rank)
    assert len(started) == (1 if rank == 0 else 0)


def _spec_error(tmp_path, run: dict, train: dict) -> str:
    spec = {
        "name": "c",
        "data": "data",
        "model": {"output": "bernoulli", "filter_fraction": 0.03125},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 4, "context": 1, "device": "cpu", **train},
        "run": run,
        "profiles": {"gpu": {}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as info:
        load_spec(path, root=tmp_path)
    return str(info.value)


def test_spec_refuses_gpus_a_one_worker_trial_leaves_idle(tmp_path):
    msg = _spec_error(tmp_path, {"gpus_per_trial": 2}, {})
    assert "run.gpus_per_trial" in msg and "workers_per_trial=1" in msg
    msg = _spec_error(tmp_path, {"gpus_per_worker": 4}, {})
    assert "run.gpus_per_worker" in msg


def test_spec_refuses_seq_len_2_with_data_parallel_workers(tmp_path):
    msg = _spec_error(tmp_path, {"workers_per_trial": 2}, {"seq_len": 2})
    assert "train.seq_len" in msg and "run.workers_per_trial=2" in msg


def test_trial_scores_in_fp32_as_vpn_eval_does(monkeypatch):
    """A Trainer training in bf16 scores its test NLL in fp32: the number `vpn eval` gives."""
    data = torch.randint(0, 256, (4, 4, 1, 8, 8), dtype=torch.uint8)
    trainer = Trainer(MODEL, TRAIN, data)
    trainer.cpu_bf16 = True  # as on CUDA: the training forward runs under bf16 autocast
    assert trainer.precision == "bf16"
    got = trainer.score(data).nats_per_frame
    with torch.no_grad():
        fp32 = score(trainer.model, data, TRAIN).nats_per_frame  # what python -m vpn eval calls
        bf16 = score(trainer.model, data, TRAIN, autocast=trainer._autocast).nats_per_frame
    assert got == fp32
    assert bf16 != fp32  # so the test above could fail: bf16 gives another number


def test_full_precision_turns_tf32_off_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_precision("cpu"):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
