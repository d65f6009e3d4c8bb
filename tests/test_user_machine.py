"""Options and errors as a user meets them on their own machine: checkpoints that are not ours,
cpu_amp on a CPU without native bf16, what the benchmarks record about the CPU, and the framework
log lines a sweep's console does not show."""

from __future__ import annotations

import logging

import pytest
import torch

from vpn import VPNConfig
from vpn.checkpoint import load_checkpoint
from vpn.config import TrainConfig
from vpn.train import Trainer

TINY = VPNConfig(enc_blocks=1, dec_blocks=1, filter_fraction=8 / 128, output="bernoulli")


# -- checkpoints: refused with the path and one sentence ---------------------------------------------
def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.count(". ") == 0 and not message.endswith(".."), message
    assert "weights_only" not in message and "torch.load" not in message, message  # torch's advice stays out


def test_corrupt_checkpoint_is_one_sentence_naming_the_path(tmp_path):
    bad = tmp_path / "run" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    assert str(err.value) == f"checkpoint {bad} cannot be read: it is truncated, corrupt or not a PyTorch file"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained torch paragraph
    _one_sentence(str(err.value))


def test_foreign_checkpoint_names_what_it_holds_and_runs_nothing(tmp_path):
    foreign = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), foreign)  # a whole pickled module, as many projects save
    with pytest.raises(ValueError) as err:
        load_checkpoint(foreign)
    message = str(err.value)
    assert message.startswith(
        f"checkpoint {foreign} is not a VPN checkpoint: it stores Python objects (torch.nn.modules.linear.Linear)"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__
    _one_sentence(message)
    plain = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)  # plain tensors, but not our format
    with pytest.raises(ValueError, match=f"checkpoint {plain} is not a vpn-checkpoint/1 file") as err:
        load_checkpoint(plain)
    _one_sentence(str(err.value))


def test_cli_prints_the_sentence_without_a_traceback(tmp_path, capsys):
    from vpn.cli import main

    bad = tmp_path / "c.pt"
    bad.write_bytes(b"\x80\x02garbage")
    assert main(["eval", "--checkpoint", str(bad), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: checkpoint {bad} cannot be read: it is truncated, corrupt or not a PyTorch file"


# -- cpu_amp: warn and train in fp32 where bf16 would be emulated --------------------------------------
def _first_losses(cpu_amp: bool, steps: int = 3) -> tuple[list[float], Trainer]:
    data = torch.zeros(4, 3, 1, 8, 8, dtype=torch.uint8)
    data[:, :, :, 2:5, 2:5] = 255
    trainer = Trainer(TINY, TrainConfig(batch_size=2, context=1, device="cpu", cpu_amp=cpu_amp), data)
    return [float(trainer.train_step(data[:2])) for _ in range(steps)], trainer


def test_cpu_amp_without_native_bf16_warns_and_trains_in_fp32(monkeypatch, caplog):
    monkeypatch.setattr("vpn.train.cpu_has_native_bf16", lambda: False)  # e.g. an AVX2 CPU
    with caplog.at_level(logging.WARNING, logger="vpn.train"):
        amp_losses, trainer = _first_losses(cpu_amp=True)
    assert trainer.precision == "fp32"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "cpu_amp ignored, training in fp32" in warning[0] and "30x" in warning[0]
    fp32_losses, _ = _first_losses(cpu_amp=False)
    assert amp_losses == fp32_losses  # bit for bit: no autocast ran


def test_cpu_amp_with_native_bf16_runs_bf16(monkeypatch, caplog):
    monkeypatch.setattr("vpn.train.cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="vpn.train"):
        amp_losses, trainer = _first_losses(cpu_amp=True, steps=1)
    assert trainer.precision == "bf16" and not caplog.records
    fp32_losses, _ = _first_losses(cpu_amp=False, steps=1)
    assert amp_losses != fp32_losses and amp_losses == pytest.approx(fp32_losses, rel=1e-2)


def test_native_bf16_probe_matches_the_cpu_flags():
    from pathlib import Path

    from vpn.train import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no x86 /proc/cpuinfo here")
    flags = set(
        next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    )
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_benchmarks_record_the_cpu_capability():
    from benchmarks.common import environment

    env = environment(torch.device("cpu"))
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env["cpu_native_bf16"], bool) and isinstance(env["cpu_flags"], list)
    assert env["cpu_capability"] in env["device"] and "bf16" in env["device"]


# -- a sweep's console: progress, not framework chatter ------------------------------------------------
def test_trials_silence_rays_per_checkpoint_lines():
    """Ray 2.60 logs "Checkpoint successfully created at: ..." at INFO from this module, in the
    trial's worker, for every checkpoint (29 of the 970 lines of a default `dvc repro`)."""
    import inspect

    from ray.train._internal import storage

    from pipeline.sweep.trials.trainable import quiet_framework_logs

    assert "Checkpoint successfully created" in inspect.getsource(storage)  # the line this silences
    quiet_framework_logs()
    for name in (storage.logger.name, "mlflow.system_metrics.system_metrics_monitor"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING), name
