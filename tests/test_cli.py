"""python -m vpn info | train | eval | sample, end to end on a tiny data folder."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vpn.checkpoint import load_checkpoint, load_model
from vpn.cli import main
from vpn.config import TrainConfig, VPNConfig
from vpn.forecast import forecast
from vpn.metrics import bernoulli_lower_bound
from vpn.model import VideoPixelNetwork


@pytest.fixture
def data_dir(tmp_path):
    """train/val/test.npy shaped like the generate stage's output: uint8 (N, T, C, H, W)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mm"
    root.mkdir()
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        frames = np.zeros((n, 5, 1, 8, 8), np.uint8)
        for k in range(n):
            y, x = rng.integers(0, 5, 2)
            for t in range(5):
                frames[k, t, 0, y : y + 3, (x + t) % 6 : (x + t) % 6 + 3] = 255
        np.save(root / f"{split}.npy", frames)
    return root


def test_info_prints_every_preset():
    out = subprocess.run(
        [sys.executable, "-m", "vpn", "info", "--all", "--json"], capture_output=True, text=True, check=True
    ).stdout
    rows = {row["preset"]: row for row in json.loads(out)}
    assert set(rows) == {"full", "mini", "micro"}
    for name, row in rows.items():
        model = VideoPixelNetwork(VPNConfig.preset(name))
        assert row["parameters"] == model.num_parameters()
        assert row["gflops_per_frame_64x64"] == pytest.approx(model.flops_per_frame() / 1e9, abs=1e-3)
    assert (rows["full"]["enc_blocks"], rows["full"]["dec_blocks"], rows["full"]["mu_channels"]) == (8, 12, 128)


def test_train_eval_sample(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--preset",
            "micro",
            "--filter-fraction",
            "0.0625",
            "--output",
            "bernoulli",
            "--data",
            str(data_dir),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "context=2",
            "--set",
            "val_every=2",
            "--set",
            "log_every=2",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4] and "val_nats_per_frame" in lines[-1]
    capsys.readouterr()

    # resume for two more steps from the checkpoint
    assert (
        main(
            [
                "train",
                "--data",
                str(data_dir),
                "--resume",
                str(out / "checkpoint.pt"),
                "--steps",
                "6",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6

    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data_dir), "--context", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 3 and result["nats_per_frame"] > result["lower_bound_nats_per_frame"] >= 0
    # the printed numbers are the checkpoint's model's NLL and the bound at the --context asked for
    # (3, not the 2 it trained with), over every test sequence, in batches of 2 (the last one short)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--data",
                str(data_dir),
                "--context",
                "3",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    test = torch.from_numpy(np.load(data_dir / "test.npy"))
    model = load_model(out / "checkpoint.pt")
    with torch.no_grad():
        expected = {c: model.nll(test, context=c).mean().item() for c in (2, 3)}
    assert result["context"] == 3 and result["sequences"] == 3
    assert result["nats_per_frame"] == pytest.approx(expected[3], rel=1e-5)
    assert expected[2] != pytest.approx(expected[3], rel=1e-5)  # so a --context ignored would show
    assert result["lower_bound_nats_per_frame"] == pytest.approx(
        bernoulli_lower_bound(test, context=3).mean().item(), rel=1e-5
    )

    # free-running frame metrics: the same numbers as vpn.forecast with the same seed and context
    argv = ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data_dir), "--context", "3"]
    assert main([*argv, "--metrics", "mse,ssim", "--samples", "2", "--limit", "2", "--seed", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = dataclasses.replace(TrainConfig.from_dict(load_checkpoint(out / "checkpoint.pt")["train_config"]), context=3)
    expected = forecast(model, test, cfg, 2, samples=2, seed=4, batch_size=16)
    assert result["samples"] == 2 and result["forecast_sequences"] == 2 and "nats_per_frame" not in result
    assert result["mse"] == pytest.approx(expected.mean["mse"]) and result["ssim_best"] == pytest.approx(
        expected.best["ssim"]
    )
    assert len(result["mse_by_frame"]) == 2 and "psnr" not in result
    assert main([*argv, "--metrics", "nll,fid"]) == 2  # an unknown metric is refused, by name

    samples = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--data",
                str(data_dir),
                "--context",
                "2",
                "--frames",
                "3",
                "--batch",
                "2",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    png = Image.open(samples / "sample.png")
    png.verify()
    # 8x8 frames enlarged 16x (>= 128 px a frame): 2 rows (truth, one sample) per sequence, 5 frames
    assert png.size == ((5 * 10 - 2 + 4) * 16, (4 * 10 - 2) * 16)
    gif = Image.open(samples / "sample.gif")
    assert gif.n_frames == 5  # 2 context + 3 generated
    video = torch.load(samples / "sample.pt", weights_only=True)
    assert video.shape == (2, 3, 1, 8, 8) and video.dtype == torch.uint8
    # k samples: one row each under the ground truth, drawn after the same context
    argv = ["sample", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data_dir), "--context", "2"]
    assert main([*argv, "--frames", "3", "--samples", "3", "--out", str(samples / "k3")]) == 0
    with Image.open(samples / "k3" / "sample.png") as png:
        assert png.size[1] == (4 * 10 - 2) * 16  # 1 truth + 3 sample rows
    assert torch.load(samples / "k3" / "sample.pt", weights_only=True).shape == (1, 3, 3, 1, 8, 8)


def test_overfit_cli(tmp_path, data_dir, capsys):
    rc = main(
        [
            "train",
            "--preset",
            "micro",
            "--filter-fraction",
            "0.0625",
            "--output",
            "bernoulli",
            "--data",
            str(data_dir),
            "--overfit",
            "--steps",
            "400",
            "--lr",
            "3e-3",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "overfit.json").read_text())
    assert summary["converged_step"] == summary["steps_run"] <= 400
    assert "converged at iteration" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, data_dir, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--steps", "1"]) == 2
    assert "train.npy" in capsys.readouterr().err
    assert main(["train", "--data", str(data_dir), "--set", "learing_rate=1", "--out", str(tmp_path / "x")]) == 2
    assert "learing_rate" in capsys.readouterr().err
    assert main(["info", "--preset", "micro", "--dec-blocks", "0"]) == 2
    assert "dec_blocks" in capsys.readouterr().err
