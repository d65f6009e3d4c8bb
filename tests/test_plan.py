"""The memory plan (pipeline.sweep.cluster.plan): `--plan --json` on a tiny spec, the settings auto would choose
(stopping at the first fit, measuring no setting twice), the GPU's source (the spec, cluster.yaml, or on a
live cluster the probe of its GPUs), a trial that cannot fit refused before Ray starts; and (slow) the
probe on a real local Ray without CUDA, every gpu profile in sweeps/ fits the GPUs sweeps/cluster.yaml
offers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline.paths import repo_root
from pipeline.sweep import driver
from pipeline.sweep.cluster import plan
from pipeline.sweep.cluster.placement import GPUProbe
from pipeline.sweep.spec.sweep import SpecError, load_spec
from vpn import memory
from vpn.memory import CONTEXT_GIB, GIB, HEADROOM

MODEL = {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.03125}
TRAIN = {"steps": 10, "batch_size": 4, "seq_len": 4, "context": 2, "downsample": 4, "device": "auto"}


def spec_of(tmp_path: Path, run: dict, train: dict | None = None) -> Path:
    spec = {
        "name": "p",
        "data": "data",
        "model": MODEL,
        "train": {**TRAIN, **(train or {})},
        "search": {"model": {"dec_blocks": [1, 2]}},
        "run": {"gpus_per_trial": 1, **run},
        "profiles": {"gpu": {}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def gb_for(step_gib: float) -> float:
    """The GPU memory in GB whose budget (vpn.memory.budget_bytes) is just above a step of step_gib."""
    return (step_gib * 1.02 + CONTEXT_GIB) / HEADROOM * GIB / plan.GB


def estimates(tmp_path: Path) -> dict[str, plan.TrialPlan]:
    """The plan with a huge GPU: every trial's plain step."""
    sweep = load_spec(spec_of(tmp_path, {"gpu_memory_gb": 1000}), root=tmp_path).resolve("gpu")
    return {p.label: p for p in plan.plan_sweep(sweep, plan.planned_gpu(sweep, tmp_path))}


def test_plan_json_lists_every_trial_with_its_settings(tmp_path, capsys):
    path = spec_of(tmp_path, {"gpu_memory_gb": 1000})
    assert driver.main([str(path), "--profile", "gpu", "--plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["d1", "d2"]
    for r in rows:
        for key in ("label", "gpu_memory_gib", "activation_checkpointing", "micro_batch_size", "fits", "gpu_hours"):
            assert key in r
        assert r["fits"] is True and r["activation_checkpointing"] is False and r["micro_batch_size"] is None
        assert r["gpu_memory_gib"] == r["plain_memory_gib"] > 0
        assert r["precision"] == "bf16" and r["frames"] == [4, 16, 16] and r["sequences_per_gpu"] == 4
        assert r["gpu_hours"] > 0 and r["parameters"] > 0 and r["flops_per_frame"] > 0
    assert rows[1]["plain_memory_gib"] > rows[0]["plain_memory_gib"]  # a deeper decoder keeps more


def test_plan_chooses_checkpointing_then_micro_batches_as_auto_would(tmp_path):
    plain = estimates(tmp_path)["d2"]
    # A GPU just too small for the plain step of the deeper trial: auto must pick something cheaper.
    gb = gb_for(plain.plain_memory_gib * 0.8)
    sweep = load_spec(spec_of(tmp_path, {"gpu_memory_gb": gb}), root=tmp_path).resolve("gpu")
    got = plan.plan_trial(sweep, sweep.points[1], plan.planned_gpu(sweep, tmp_path))
    assert got.fits is True
    assert got.activation_checkpointing or got.micro_batch_size is not None
    assert got.gpu_memory_gib <= got.budget_gib < got.plain_memory_gib
    text = plan.show_plan(sweep, as_json=False, root=tmp_path)
    assert f"run.gpu_memory_gb of {sweep.source}" in text and "an estimate" in text and "total: 2 trial(s)" in text


def test_auto_stops_at_the_first_fit_and_measures_no_setting_twice(tmp_path, monkeypatch):
    plain = estimates(tmp_path)["d2"]
    sweep = load_spec(spec_of(tmp_path, {"gpu_memory_gb": gb_for(plain.plain_memory_gib * 0.8)}), root=tmp_path)
    sweep = sweep.resolve("gpu")
    measured = []
    real = memory._measure
    monkeypatch.setattr(memory, "_measure", lambda *a, **k: measured.append(a[1]) or real(*a, **k))
    memory._measured.cache_clear()
    point = sweep.points[1]
    got = plan.plan_trial(sweep, point, plan.planned_gpu(sweep, tmp_path))
    settings = [(c.activation_checkpointing, c.micro_batch_size) for c in measured]
    assert got.fits and settings[0] == (False, None) and len(settings) == len(set(settings))
    assert settings[-1] == (got.activation_checkpointing, got.micro_batch_size)  # nothing after the first fit
    again = dataclasses.replace(point, train=point.train.replace(seed=7, lr=0.1, steps=3))
    assert plan.plan_trial(sweep, again, plan.planned_gpu(sweep, tmp_path)).gpu_memory_gib == got.gpu_memory_gib
    assert len(measured) == len(settings)  # the same trial but for fields no estimate reads: measured once


def test_the_gpu_planned_for_comes_from_the_probe_where_it_saw_one(tmp_path):
    """plan.gpu_from_probe, the rule the driver applies to pipeline.sweep.cluster.placement.probe_gpus's answer."""
    cluster = plan.cluster_gpu(repo_root() / "sweeps/cluster.yaml")
    both = GPUProbe((("n1", "NVIDIA H100 80GB HBM3", 85_000_000_000), ("n2", "NVIDIA L40S", 47_700_000_000)))
    gpu, where = plan.gpu_from_probe(cluster, both)
    assert gpu.memory_gb == pytest.approx(47.7) and "NVIDIA L40S" in gpu.source and "smallest of 2 node(s)" in where
    spec_gb = plan.GPU(24.0, "run.gpu_memory_gb of spec.yaml")
    assert plan.gpu_from_probe(spec_gb, both)[0] is spec_gb  # a cap the spec chose below the real GPU
    assert plan.gpu_from_probe(plan.GPU(100.0, "run.gpu_memory_gb of spec.yaml"), both)[0] == gpu
    none = GPUProbe(why_none="no node of the Ray cluster offers a GPU")
    assert plan.gpu_from_probe(cluster, none) == (cluster, f"no GPU visible ({none.why_none}), using {cluster.source}")
    assert plan.gpu_from_probe(None, none)[0] is None
    # The probed GPU is what the check then plans for: one too small refuses a trial the spec's GPU fits.
    sweep = load_spec(spec_of(tmp_path, {"gpu_memory_gb": 1000}), root=tmp_path).resolve("gpu")
    small, _ = plan.gpu_from_probe(plan.planned_gpu(sweep, tmp_path), GPUProbe((("n", "a GPU", 2**30),)))
    with pytest.raises(SpecError, match="the cluster's GPU as torch reads it: a GPU, 1.0 GiB"):
        plan.check_plan(sweep, tmp_path, small)


def test_the_probe_of_a_cluster_without_gpus_runs_nothing():
    class NoGPURay:
        @staticmethod
        def nodes():
            return [{"NodeID": "n", "Alive": True, "Resources": {"CPU": 2.0}}]

        @staticmethod
        def remote(*args, **kwargs):
            pytest.fail("a task was started")

    from pipeline.sweep.cluster.placement import probe_gpus

    assert probe_gpus(NoGPURay()) == GPUProbe(why_none="no node of the Ray cluster offers a GPU")


def test_cluster_yaml_names_its_smallest_gpu():
    gpu = plan.cluster_gpu(repo_root() / "sweeps/cluster.yaml")
    assert gpu.memory_gb == 48 and "NVIDIA L40S" in gpu.source and "g6e.4xlarge" in gpu.source


def test_unknown_gpu_instance_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"available_node_types": {"w": {"node_config": {"InstanceType": "g9.huge"}}}}))
    with pytest.raises(ValueError, match="available_node_types.w: the GPU of g9.huge"):
        plan.cluster_gpu(path)


def test_a_trial_that_cannot_fit_is_refused_before_ray(tmp_path, monkeypatch):
    none = load_spec(spec_of(tmp_path, {"gpu_memory_gb": gb_for(0)}), root=tmp_path).resolve("gpu")
    frugal = min(p.gpu_memory_gib for p in plan.plan_sweep(none, plan.planned_gpu(none, tmp_path)))
    # Half the most frugal step (checkpointing, micro-batches of 1) of the smallest trial: neither fits.
    path = spec_of(tmp_path, {"gpu_memory_gb": gb_for(frugal / 2)})
    monkeypatch.setattr(driver, "connect_ray", lambda: pytest.fail("Ray was started"))
    with pytest.raises(SpecError) as info:
        driver.run_sweep(load_spec(path, root=tmp_path), "gpu", results_dir=tmp_path / "r", storage=str(tmp_path))
    msg = str(info.value)
    assert "trial d1 (and 1 more trial(s)) does not fit one GPU" in msg
    for field in ("train.activation_checkpointing", "train.micro_batch_size", "run.gpu_memory_gb", "GiB"):
        assert field in msg
    assert msg.startswith(f"{path}: profiles.gpu:")


def test_a_cpu_sweep_is_not_planned(tmp_path):
    sweep = load_spec(spec_of(tmp_path, {"gpus_per_trial": 0, "gpu_memory_gb": 0.001}), root=tmp_path).resolve("gpu")
    assert plan.check_plan(sweep, tmp_path) == []


def test_gpu_memory_gb_is_checked(tmp_path):
    with pytest.raises(SpecError, match=r"run.gpu_memory_gb.*gpu_memory_gb must be a number > 0"):
        load_spec(spec_of(tmp_path, {"gpu_memory_gb": 0}), root=tmp_path)


GPU_PROFILES = [
    (spec, profile)
    for spec in sorted((repo_root() / "sweeps").glob("*.yaml"))
    if "profiles" in (raw := yaml.safe_load(spec.read_text()))
    for profile in raw["profiles"]
    if profile.startswith("gpu")
]


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "profile"), GPU_PROFILES, ids=[f"{s.stem}-{p}" for s, p in GPU_PROFILES])
def test_every_gpu_profile_fits_the_clusters_gpus(spec, profile, capsys):
    """`--plan --json` of each gpu profile: every trial fits the smallest GPU of sweeps/cluster.yaml."""
    assert driver.main([str(spec), "--profile", profile, "--plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["budget_gib"] is not None for r in rows)
    assert [r["label"] for r in rows if not r["fits"]] == []


def test_gpus_torch_cannot_use_are_refused_and_usable_ones_are_not(tmp_path):
    """placement.refuse_unusable_gpus on the probe's answers (the real probe: tests/test_sweep_ray.py)."""
    from pipeline.sweep.cluster.placement import refuse_unusable_gpus
    from pipeline.sweep.spec.data_check import SweepDataError

    sweep = load_spec(spec_of(tmp_path, {}), root=tmp_path).resolve("gpu")
    node = {"node": "10.0.0.7", "host": "w7", "torch": "2.13.0+cu128", "cuda_build": "12.8", "available": False}
    h100 = GPUProbe((("n1", "NVIDIA H100 80GB HBM3", 85_000_000_000),))
    refuse_unusable_gpus(sweep, h100)  # every GPU node's torch sees its GPU: no refusal
    refuse_unusable_gpus(
        sweep, GPUProbe(why_none="no node with a GPU ran the probe within 120 s")
    )  # busy: trials check
    cases = [
        (GPUProbe(why_none="no node of the Ray cluster offers a GPU"), "asks for GPUs but the Ray cluster offers none"),
        (GPUProbe(h100.gpus, unusable=({**node, "cuda_visible_devices": ""},)), "CUDA_VISIBLE_DEVICES is empty"),
        (GPUProbe(why_none="x", unusable=(node,)), "an NVIDIA driver older than that CUDA build"),
        (GPUProbe(why_none="x", unusable=({**node, "cuda_build": None}, node)), "a CPU-only build, no CUDA"),
    ]
    for probe, words in cases:
        with pytest.raises(SweepDataError) as info:
            refuse_unusable_gpus(sweep, probe)
        msg = str(info.value)
        assert msg.startswith(f"{sweep.source}: profiles.gpu: run.gpus_per_trial=1") and words in msg, msg
        if probe.unusable:
            assert "node 10.0.0.7 (w7)" in msg and "torch 2.13.0+cu128" in msg and "--profile cpu" in msg, msg
    assert "(and 1 more node(s))" in msg
    cpu = load_spec(spec_of(tmp_path, {"gpus_per_trial": 0}), root=tmp_path).resolve("gpu")
    refuse_unusable_gpus(cpu, GPUProbe(why_none="no node of the Ray cluster offers a GPU"))  # asks for none
