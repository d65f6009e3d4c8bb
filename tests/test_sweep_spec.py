"""Sweep specs are validated completely before Ray starts, and errors name the file and the field.

Fast: no Ray, no MLflow. The shipped specs are checked here too (every profile resolves, the CPU
profiles stay small, the GPU profiles are at the paper's scale).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.sweep.spec.data_check import SweepDataError, check_data
from pipeline.sweep.spec.sweep import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "data": "data",
    "model": {"output": "bernoulli"},
    "train": {"steps": 10, "batch_size": 2, "context": 2, "device": "cpu"},
    "search": {"model": {"enc_blocks": [1, 2], "filter_fraction": [0.03125]}},
    "profiles": {"cpu": {}},
}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def with_(base: dict, **changes) -> dict:
    """A deep-ish copy of base with top-level sections replaced."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    out.update(changes)
    return out


def error_of(tmp_path: Path, spec: dict) -> str:
    path = write_spec(tmp_path, spec)
    with pytest.raises(SpecError) as info:
        load_spec(path, root=tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # the spec file is always named first
    return message


# -- the shipped specs -----------------------------------------------------------------------------
def test_depth_width_spec_resolves_every_profile():
    spec = load_spec(REPO / "sweeps/depth_width.yaml")
    assert set(spec.profiles) == {"cpu", "gpu", "tiny"}  # tiny: the end-to-end test's profile
    cpu, gpu = spec.resolve("cpu"), spec.resolve("gpu")
    assert cpu.mode == gpu.mode == "train"
    assert cpu.data == gpu.data == (REPO / "data/moving_mnist").resolve()
    # The CPU profile: at least 6 configurations, small widths, shrunk frames, one CPU and no GPU each.
    assert len(cpu.points) >= 6
    assert {p.train.downsample for p in cpu.points} == {4}
    assert max(p.model.filter_fraction for p in cpu.points) <= 0.125
    assert (cpu.run.cpus_per_trial, cpu.run.gpus_per_trial) == (1.0, 0.0)
    # The GPU profile: 64x64 frames (no pooling), full widths, the paper's 10 + 10 frames, around and
    # beyond the presets in both depths.
    assert {p.train.downsample for p in gpu.points} == {1}
    assert max(p.model.filter_fraction for p in gpu.points) == 1.0
    assert {(p.train.seq_len, p.train.context) for p in gpu.points} == {(20, 10)}
    enc = {p.model.enc_blocks for p in gpu.points}
    dec = {p.model.dec_blocks for p in gpu.points}
    assert min(enc) <= 2 and max(enc) > 8 and min(dec) <= 3 and max(dec) > 12  # micro's depths to past full's
    assert {"full", "mini", "micro"} <= {p.preset for p in gpu.points}
    assert gpu.run.gpus_per_trial > 0


def test_presets_overfit_spec_is_the_blog_experiment():
    spec = load_spec(REPO / "sweeps/presets_overfit.yaml")
    for profile in ("cpu", "gpu"):
        sweep = spec.resolve(profile)
        assert sweep.mode == "overfit"
        assert [p.preset for p in sweep.points] == ["full", "mini", "micro"]
        depths = {p.preset: (p.model.enc_blocks, p.model.dec_blocks) for p in sweep.points}
        assert depths == {"full": (8, 12), "mini": (4, 6), "micro": (2, 3)}
    gpu = spec.resolve("gpu")
    assert [p.model.filter_fraction for p in gpu.points] == [1.0, 0.25, 0.25]  # the presets exactly
    assert {p.train.downsample for p in gpu.points} == {1}
    assert 0 < gpu.run.gpus_per_trial < 1  # fractional: the three share a GPU
    cpu = spec.resolve("cpu")
    assert [p.model.filter_fraction for p in cpu.points] == [0.125, 0.03125, 0.03125]


def test_decoders_spec_pairs_the_decoders_at_matched_parameters():
    """sweeps/decoders.yaml: every profile crosses pixelcnn with stacks, each point has a twin of the
    other decoder at the same depth and width within 5% in parameters, and no trial is stopped early
    (a pair is compared at one budget)."""
    import torch

    from vpn import VideoPixelNetwork

    spec = load_spec(REPO / "sweeps/decoders.yaml")
    assert set(spec.profiles) == {"cpu", "gpu", "tiny"}
    for profile in spec.profiles:
        sweep = spec.resolve(profile)
        assert not sweep.run.asha.enabled
        sizes = {}
        for p in sweep.points:
            with torch.device("meta"):
                sizes[(p.model.decoder, p.model.replace(decoder="pixelcnn"))] = VideoPixelNetwork(
                    p.model
                ).num_parameters()
        plain = {cfg: n for (d, cfg), n in sizes.items() if d == "pixelcnn"}
        stacks = {cfg: n for (d, cfg), n in sizes.items() if d == "stacks"}
        assert set(plain) == set(stacks) and len(plain) == len(sweep.points) // 2
        assert all(1.0 < stacks[cfg] / plain[cfg] < 1.05 for cfg in plain)
    cpu, gpu = spec.resolve("cpu"), spec.resolve("gpu")
    assert {p.train.downsample for p in cpu.points} == {4} and len(cpu.points) <= 12
    assert max(p.model.filter_fraction for p in cpu.points) <= 0.125
    assert (cpu.run.cpus_per_trial, cpu.run.gpus_per_trial) == (1.0, 0.0)
    # gpu: the paper's setting: 64x64, 10 + 10 frames, its encoder, l = 12 at the full width c = 128
    assert {p.train.downsample for p in gpu.points} == {1}
    assert {(p.train.seq_len, p.train.context) for p in gpu.points} == {(20, 10)}
    assert {p.model.enc_blocks for p in gpu.points} == {8}
    assert any(p.model.dec_blocks == 12 and p.model.filter_fraction == 1.0 for p in gpu.points)
    assert gpu.run.gpus_per_trial > 0


# -- valid specs -----------------------------------------------------------------------------------
def test_grid_points_labels_presets_and_samples(tmp_path):
    spec = with_(
        BASE,
        search={
            "model": {"enc_blocks": [2, 4], "dec_blocks": [3, 6], "filter_fraction": [0.25]},
            "train": {"lr": [1e-3]},
        },
        run={"seeds": 2},
        train={**BASE["train"], "seed": 7},
    )
    sweep = load_spec(write_spec(tmp_path, spec), root=tmp_path).resolve("cpu")
    assert [p.label for p in sweep.points][:4] == [
        "e2-d3-f0.25-lr=0.001-s0",
        "e2-d3-f0.25-lr=0.001-s1",
        "e2-d6-f0.25-lr=0.001-s0",
        "e2-d6-f0.25-lr=0.001-s1",
    ]
    assert [p.index for p in sweep.points] == list(range(8))
    assert [p.train.seed for p in sweep.points[:2]] == [7, 8]
    by_depth = {(p.model.enc_blocks, p.model.dec_blocks): p.preset for p in sweep.points}
    assert by_depth == {(2, 3): "micro", (2, 6): None, (4, 3): None, (4, 6): "mini"}  # exact matches only
    assert sweep.data == (tmp_path / "data").resolve()


def test_profile_overrides_merge_and_remove_axes(tmp_path):
    spec = with_(
        BASE,
        search={"model": {"enc_blocks": [1, 2], "dec_blocks": [1, 2]}},
        run={"asha": {"enabled": True, "grace_steps": 5}},
        profiles={
            "cpu": {
                "train": {"steps": 4},
                "search": {"model": {"dec_blocks": None}},
                "run": {"asha": {"grace_steps": 2}},
            },
            "gpu": {"model": {"filter_fraction": 0.5}, "data": "/elsewhere"},
        },
    )
    loaded = load_spec(write_spec(tmp_path, spec), root=tmp_path)
    cpu, gpu = loaded.resolve("cpu"), loaded.resolve("gpu")
    assert [p.label for p in cpu.points] == ["e1", "e2"]
    assert {p.train.steps for p in cpu.points} == {4}
    assert (cpu.run.asha.enabled, cpu.run.asha.grace_steps) == (True, 2)
    assert len(gpu.points) == 4 and {p.model.filter_fraction for p in gpu.points} == {0.5}
    assert gpu.data == Path("/elsewhere")
    assert loaded.resolve("cpu", data="other").data == (tmp_path / "other").resolve()


def test_presets_with_width_scale(tmp_path):
    spec = with_(BASE, search={"preset": ["full", "micro"], "preset_width_scale": 0.125})
    sweep = load_spec(write_spec(tmp_path, spec), root=tmp_path).resolve("cpu")
    assert [(p.label, p.preset, p.model.enc_blocks, p.model.filter_fraction) for p in sweep.points] == [
        ("full", "full", 8, 0.125),
        ("micro", "micro", 2, 0.03125),
    ]


def test_fingerprint_follows_what_is_computed(tmp_path):
    a = load_spec(write_spec(tmp_path, BASE, "a.yaml"), root=tmp_path).resolve("cpu")
    b = load_spec(
        write_spec(tmp_path, with_(BASE, description="words", run={"max_failures": 5}), "b.yaml"), root=tmp_path
    )
    c = load_spec(write_spec(tmp_path, with_(BASE, train={**BASE["train"], "steps": 11}), "c.yaml"), root=tmp_path)
    assert a.fingerprint("d") == b.resolve("cpu").fingerprint("d")  # words and retries change nothing
    assert a.fingerprint("d") != c.resolve("cpu").fingerprint("d")
    assert a.fingerprint("d") != a.fingerprint("other data")


# -- bad specs: the field is named -----------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, where, what",
    [
        ({"sweeep": 1}, "sweeep", "unknown key"),
        ({"name": "a b"}, "name", "letters"),
        ({"mode": "fit"}, "mode", "train, overfit"),
        ({"model": {"enc_blocks": 2, "n_blocks": 3}}, "model.n_blocks", "unknown VPNConfig key"),
        ({"train": {"stepz": 3}}, "train.stepz", "unknown TrainConfig key"),
        ({"model": {"enc_blocks": 0}}, "model.enc_blocks", "integer >= 1"),
        ({"train": {"lr": -1}}, "train.lr", "positive"),
        ({"search": {"model": {"enc_blocks": []}}}, "search.model.enc_blocks", "empty grid"),
        ({"search": {"model": {"enc_blocks": 3}}}, "search.model.enc_blocks", "must be a list"),
        ({"search": {"model": {"enc_blocks": [1, 1]}}}, "search.model.enc_blocks", "repeated value"),
        ({"search": {"model": {"width": [1]}}}, "search.model.width", "unknown VPNConfig key"),
        ({"search": {"train": {"stepz": [1]}}}, "search.train.stepz", "unknown TrainConfig key"),
        ({"search": {"grid": {}}}, "search.grid", "unknown key"),
        ({"search": {"model": {"filter_fraction": [0.5, 2.0]}}}, "search.model.filter_fraction", "(0, 1]"),
        # c = round(128 * 0.001) = 0 channels: an impossible model
        ({"search": {"model": {"filter_fraction": [0.001]}}}, "search.model.filter_fraction", "MU width c=0"),
        ({"search": {"model": {"output": ["softmax"]}}}, "search.model.output", "output must be one of"),
        ({"search": {"preset": ["huge"]}}, "search.preset", "unknown preset"),
        ({"search": {"preset": ["mini"], "model": {"dec_blocks": [3]}}}, "search.model.dec_blocks", "conflicts"),
        ({"search": {"preset_width_scale": 0.5}}, "search.preset_width_scale", "only applies"),
        ({"run": {"gpus_per_trial": 1.5}}, "run.gpus_per_trial", "whole number"),
        ({"run": {"cpus": 1}}, "run.cpus", "unknown key"),
        ({"run": {"cpus-per-trial": 1}}, "run.cpus-per-trial", "unknown key"),  # not a Python name: still named
        ({"run": {"asha": {"enabled": True, "grace": 1}}}, "run.asha.grace", "unknown key"),
        ({"run": {"max_failures": "twice"}}, "run.max_failures", "must be an integer"),
        ({"overfit": {"index": 0}}, "overfit", "only applies to mode: overfit"),
        ({"mode": "overfit", "overfit": {"split": "dev"}}, "overfit.split", "train, val or test"),
        ({"profiles": {}}, "profiles", "at least one profile"),
        ({"profiles": {"cpu": {"trian": {}}}}, "profiles.cpu.trian", "unknown key"),
        ({"profiles": {"cpu": {"train": {"steps": 0}}}}, "profiles.cpu.train.steps", "integer >= 1"),
        (
            {"profiles": {"cpu": {"search": {"model": {"filter_fraction": [3.0]}}}}},
            "profiles.cpu.search.model.filter_fraction",
            "(0, 1]",
        ),
    ],
)
def test_bad_spec_names_the_field(tmp_path, changes, where, what):
    message = error_of(tmp_path, with_(BASE, **changes))
    assert f": {where}" in message, message
    assert what in message, message


def test_combination_error_names_the_grid_point(tmp_path):
    # Each value is fine on its own on top of the base; seq_len 3 with context 3 is not.
    spec = with_(BASE, search={"train": {"seq_len": [3, 4], "context": [2, 3]}})
    message = error_of(tmp_path, spec)
    assert ": search (profile cpu): context=3 must be < seq_len=3" in message
    assert "grid point train.seq_len=3, train.context=3" in message
    # A value impossible with the base alone is named by its axis.
    message = error_of(tmp_path, with_(BASE, search={"train": {"seq_len": [2, 4]}}))
    assert ": search.train.seq_len (profile cpu): context=2 must be < seq_len=2" in message


def test_second_profile_errors_before_anything_runs(tmp_path):
    spec = with_(BASE, profiles={"cpu": {}, "gpu": {"run": {"gpus_per_trial": -1}}})
    assert "profiles.gpu.run.gpus_per_trial" in error_of(tmp_path, spec)


def test_not_a_file_or_not_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


# -- the data is checked against the grid before Ray --------------------------------------------------
def test_data_checks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = load_spec(write_spec(tmp_path, with_(BASE, train={**BASE["train"], "seq_len": 5})), root=tmp_path)
    with pytest.raises(SweepDataError, match=r"data: .*train\.npy.*not found"):
        check_data(spec.resolve("cpu"))
    for split in ("train", "val"):
        np.save(data / f"{split}.npy", np.zeros((3, 4, 1, 8, 8), np.uint8))
    # train mode scores the test split at the end of every trial: it must be there, with the same frames
    with pytest.raises(SweepDataError, match=r"data: .*test\.npy.*not found"):
        check_data(spec.resolve("cpu"))
    np.save(data / "test.npy", np.zeros((2, 4, 1, 8, 6), np.uint8))
    with pytest.raises(SweepDataError, match=r"test has sequences of shape \(4, 1, 8, 6\)"):
        check_data(spec.resolve("cpu"))
    np.save(data / "test.npy", np.zeros((2, 4, 1, 8, 8), np.uint8))
    with pytest.raises(SweepDataError, match="seq_len=5 but the data has 4 frames"):
        check_data(spec.resolve("cpu"))
    ok = load_spec(write_spec(tmp_path, BASE, "ok.yaml"), root=tmp_path).resolve("cpu")
    assert check_data(ok)["shape"] == (3, 4, 1, 8, 8)
    rgb = load_spec(write_spec(tmp_path, with_(BASE, model={"image_channels": 3}), "rgb.yaml"), root=tmp_path)
    with pytest.raises(SweepDataError, match="image_channels=3 but .* has C=1"):
        check_data(rgb.resolve("cpu"))


# -- the command line: a bad spec fails before Ray starts ------------------------------------------
def test_cli_bad_spec_fails_before_ray(tmp_path):
    spec = write_spec(tmp_path, with_(BASE, search={"model": {"filter_fraction": [0.5, 7.0]}}))
    storage = tmp_path / "ray_results"
    probe = textwrap.dedent(
        f"""
        import sys
        from pipeline.sweep.driver import main
        rc = main([{str(spec)!r}, "--profile", "cpu", "--storage", {str(storage)!r}])
        assert "ray" not in sys.modules, "Ray was imported for a bad spec"
        sys.exit(rc)
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{spec}: search.model.filter_fraction" in proc.stderr
    assert "(0, 1], got 7.0" in proc.stderr
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_unknown_profile(tmp_path):
    from pipeline.sweep.driver import main

    spec = write_spec(tmp_path, BASE)
    assert main([str(spec), "--profile", "tpu"]) == 2


# -- the cluster config ------------------------------------------------------------------------------
def test_cluster_config_is_a_valid_ray_cluster_launcher_config():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "sweeps/cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own schema, with its defaults filled in
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU nodes
    assert raw["file_mounts"]["~/vpn"] == "."  # the repository on every node
    assert set(raw["file_mounts"]) == {"~/vpn", "~/.ray/auth_token", "~/.vpn_mlflow_credentials", "~/.vpn_mlflow_admin"}
    assert "pip install -q -e ~/vpn" in raw["setup_commands"]
    assert any("tracking_server start" in c for c in raw["head_start_ray_commands"])
    env = " ".join(raw["setup_commands"] + raw["head_setup_commands"])
    for var in ("VPN_DATA", "VPN_SWEEP_STORAGE", "VPN_WAIT_FOR_NODES", "MLFLOW_TRACKING_URI"):
        assert var in env
    assert "RAY_AUTH_MODE=token" in env and "VPN_RESULTS_DIR" in env
    assert any("|| dvc pull ||" in c for c in raw["setup_commands"])  # the data from the DVC remote first


def test_the_onprem_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "sweeps/onprem.yaml").read_text())
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "local"
    assert raw["min_workers"] == raw["max_workers"] == len(raw["provider"]["worker_ips"])
    env = next(c for c in raw["setup_commands"] if "> ~/.vpn_env" in c)
    assert f"VPN_HEAD_IP={raw['provider']['head_ip']}" in env  # the two marked copies of the head's address agree
    for var in ("RAY_AUTH_MODE=token", "MLFLOW_TRACKING_URI", "VPN_SWEEP_STORAGE", "VPN_DATA", "VPN_RESULTS_DIR"):
        assert var in env
    assert any("tracking_server start" in c for c in raw["head_start_ray_commands"])
    assert any("|| dvc pull ||" in c for c in raw["setup_commands"])  # the data from the DVC remote first


@pytest.mark.parametrize("config", ["cluster.yaml", "onprem.yaml"])
def test_cluster_configs_listen_on_no_wildcard_and_keep_secrets_private(config):
    """Issue 28/30: nothing on 0.0.0.0 (MLflow on the private address, Ray's dashboard on 127.0.0.1);
    every synced secret made 0600 (its folder 0700) on every node; the trials' login on every node's
    shell, the admin's only in the head's setup."""
    raw = yaml.safe_load((REPO / "sweeps" / config).read_text())
    assert "0.0.0.0" not in repr(raw)  # its comments aside
    commands = raw["setup_commands"] + raw["head_setup_commands"] + raw["head_start_ray_commands"]
    assert "mlflow server" not in " ".join(commands)  # started by tracking_server, on --host <private address>
    assert not any("--dashboard-host" in c and "127.0.0.1" not in c for c in commands)
    secrets = [m for m in raw["file_mounts"] if m != "~/vpn"]
    chmod = raw["setup_commands"][0]
    assert chmod.startswith("chmod 700 ~/.ray && chmod 600") and all(m in chmod for m in secrets)
    env = next(c for c in raw["setup_commands"] if "~/.vpn_env" in c and "printf" in c)
    assert "source $HOME/.vpn_mlflow_credentials" in env and "vpn_mlflow_admin" not in env
    (start,) = [c for c in raw["head_start_ray_commands"] if "tracking_server start" in c]
    assert "--admin-login ~/.vpn_mlflow_admin --trials-login ~/.vpn_mlflow_credentials" in start


@pytest.mark.parametrize("config", ["cluster.yaml", "onprem.yaml"])
def test_a_failed_cd_runs_no_data_stage(config, tmp_path):
    """Issue 30: the data command stops when its `cd` fails, instead of running `dvc pull` and the data
    stages in $HOME. Run as written, with stand-ins for dvc and python that leave a mark."""
    raw = yaml.safe_load((REPO / "sweeps" / config).read_text())
    (line,) = [c for c in raw["setup_commands"] if "|| dvc pull ||" in c]
    line = line.replace(". ~/.vpn_env && ", "")  # on the node it sets VPN_REPO and PATH
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("dvc", "python"):
        (bin_ / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path / 'ran'}\nexit 1\n")
        (bin_ / tool).chmod(0o755)
    env = {"HOME": str(tmp_path / "home"), "VPN_REPO": str(tmp_path / "missing"), "PATH": f"{bin_}:/usr/bin:/bin"}
    (tmp_path / "home").mkdir()
    done = subprocess.run(
        ["bash", "-c", line], check=False, cwd=tmp_path / "home", env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "cd" in done.stderr
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()
    # The same line with the repository there does run them (the stand-ins are reached).
    (tmp_path / "home" / "vpn").mkdir()
    (tmp_path / "missing").mkdir()
    subprocess.run(["bash", "-c", line], check=False, cwd=tmp_path / "home", env=env, capture_output=True, text=True)
    assert (tmp_path / "ran").read_text().split() == ["dvc", "python"]


# -- resources: GPUs only where the cluster has them ----------------------------------------------------
def test_gpus_are_requested_only_where_the_cluster_has_them(tmp_path, caplog):
    from pipeline.sweep.cluster.placement import choose_profile, trial_resources

    spec = load_spec(
        write_spec(
            tmp_path,
            with_(
                BASE,
                train={**BASE["train"], "device": "auto"},
                run={"gpus_per_trial": 0.5},
                profiles={"cpu": {"run": {"gpus_per_trial": 0}}, "gpu": {}},
            ),
        ),
        root=tmp_path,
    )
    gpu = spec.resolve("gpu")
    assert trial_resources(gpu, {"CPU": 8.0, "GPU": 1.0}) == {"cpu": 1.0, "gpu": 0.5}  # fractional
    # A CPU-only cluster: refused (in Ray 2.60 the request would wait forever; CPU trials would skip the GPUs).
    with pytest.raises(SweepDataError, match="profiles.gpu: run.gpus_per_trial=0.5 asks for GPUs but the Ray"):
        trial_resources(gpu, {"CPU": 8.0})
    assert trial_resources(spec.resolve("cpu"), {"CPU": 2.0, "GPU": 4.0}) == {"cpu": 1.0, "gpu": 0.0}
    with pytest.raises(SweepDataError, match="cpus_per_trial=1 but the cluster has 0 CPU"):
        trial_resources(gpu, {"GPU": 1.0})
    # Two GPUs for a one-worker trial would leave one idle: the spec refuses it (tests/test_cuda_paths.py).
    with pytest.raises(SpecError, match="run.gpus_per_trial"):
        load_spec(write_spec(tmp_path, with_(BASE, run={"gpus_per_trial": 2}), "two.yaml"), root=tmp_path)
    # --profile auto: gpu where the cluster has GPUs, else cpu.
    assert choose_profile(spec, "auto", {"CPU": 8.0, "GPU": 1.0}) == "gpu"
    assert choose_profile(spec, "auto", {"CPU": 8.0}) == "cpu"
    assert choose_profile(spec, "gpu", {"CPU": 8.0}) == "gpu"
