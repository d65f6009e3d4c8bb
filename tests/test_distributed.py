"""Data-parallel trials without Ray: vpn.train on two gloo ranks against one process, the spec's
run.workers_per_trial, and the placement check that runs before any trial starts.

The trainer shards each step's batch by rank, DDP averages the gradients and the logged loss and the
scores are all-reduced, so two ranks must compute the single process's curve up to float rounding,
and a two-rank run resumed from a checkpoint must continue it. (Real Ray clusters: test_cluster.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import free_port

from vpn import VPNConfig
from vpn.batches import batch_indices, shard, stream_indices
from vpn.config import TrainConfig
from vpn.train import Trainer

TINY = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")
CFG = TrainConfig(
    steps=6, batch_size=4, log_every=1, val_every=3, val_batches=1, ckpt_every=3, context=2, seed=3, device="cpu"
)


def moving_digits(n: int, t: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, t, 1, size, size) uint8 frames of random bright pixels: enough to give every step its own loss."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, t, 1, size, size, generator=g) < 0.25) * 255).to(torch.uint8)


def _rank_main(rank: int, world: int, port: int, out: str, resume_from: str | None) -> None:
    """One rank: train CFG (from a checkpoint if given), write its logged metrics and test score."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data, val, test = moving_digits(16), moving_digits(4, seed=1), moving_digits(5, seed=2)
        try:  # a global batch that does not split over the ranks is refused
            Trainer(TINY, CFG.replace(batch_size=3), data)
            raise AssertionError("batch_size=3 was accepted by 2 ranks")
        except ValueError as e:
            assert "batch_size=3 is the global batch: it must be a multiple of the 2" in str(e), e
        if resume_from:
            trainer = Trainer.from_checkpoint(resume_from, data, val)
        else:
            trainer = Trainer(TINY, CFG, data, val)
        logged: dict[int, dict[str, float]] = {}

        def on_checkpoint(step: int) -> None:
            if step == 3 and rank == 0 and not resume_from:
                trainer.save(Path(out).with_name("step3.pt"))

        trainer.fit(on_log=lambda s, m: logged.__setitem__(s, m), on_checkpoint=on_checkpoint, progress=False)
        result = trainer.score(test)  # 5 sequences: rank 0 scores 2, rank 1 scores 3
        outcome = {"logged": logged, "test": result.nats_per_frame, "floor": result.floor_nats_per_frame}
        Path(f"{out}.{rank}").write_text(json.dumps({**outcome, "n": result.sequences}))
        if rank == 0:
            trainer.save(Path(out).with_name("final.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, name: str, resume_from: Path | None = None) -> list[dict]:
    out = tmp_path / name
    mp.spawn(_rank_main, args=(2, free_port(), str(out), str(resume_from) if resume_from else None), nprocs=2)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def single_process() -> tuple[dict[int, dict[str, float]], Trainer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logged: dict[int, dict[str, float]] = {}
        trainer = Trainer(TINY, CFG, moving_digits(16), moving_digits(4, seed=1))
        trainer.fit(on_log=lambda s, m: logged.__setitem__(s, m), progress=False)
        return logged, trainer
    finally:
        torch.set_num_threads(threads)


def test_shards_partition_each_steps_batch():
    for step in (1, 2, 7):
        fixed = batch_indices(100, 6, seed=5, step=step)
        assert shard(fixed, 0, 3) + shard(fixed, 1, 3) + shard(fixed, 2, 3) == fixed
        streamed = stream_indices(6, step)
        assert shard(streamed, 0, 2) + shard(streamed, 1, 2) == streamed
    assert shard([4, 5, 6, 7], 0, 1) == [4, 5, 6, 7]


@pytest.mark.slow  # spawns processes (seconds of imports each)
def test_two_ranks_compute_the_single_process_curve_and_resume_it(tmp_path):
    reference, trainer = single_process()
    ranks = run_ranks(tmp_path, "ddp")
    nats = [{s: {k: v for k, v in m.items() if "nats" in k} for s, m in r["logged"].items()} for r in ranks]
    assert nats[0] == nats[1]  # every rank logs the same (all-reduced) losses
    logged = {int(s): m for s, m in ranks[0]["logged"].items()}
    assert sorted(logged) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step, metrics in reference.items():
        for key in ("train_nats_per_frame", "val_nats_per_frame"):
            if key in metrics:
                assert logged[step][key] == pytest.approx(metrics[key], rel=1e-5), (step, key)
    # the same weights at the end (the updates were the single process's), the same sharded test score
    final = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6, msg=name)
    expected = trainer.score(moving_digits(5, seed=2))
    for rank in ranks:
        assert rank["n"] == 5
        assert rank["test"] == pytest.approx(expected.nats_per_frame, rel=1e-6)
        assert rank["floor"] == pytest.approx(expected.floor_nats_per_frame, rel=1e-9)

    # two ranks resumed from the step-3 checkpoint continue the same curve
    resumed = run_ranks(tmp_path, "resumed", resume_from=tmp_path / "step3.pt")
    logged = {int(s): m for s, m in resumed[0]["logged"].items()}
    assert sorted(logged) == [4, 5, 6]
    for step in (4, 5, 6):
        assert logged[step]["train_nats_per_frame"] == pytest.approx(reference[step]["train_nats_per_frame"], rel=1e-5)


def test_one_process_is_unchanged():
    assert not dist.is_initialized()
    trainer = Trainer(TINY, CFG, moving_digits(16))
    assert (trainer.rank, trainer.world_size) == (0, 1) and trainer._forward is trainer.model
    assert os.environ.get("WORLD_SIZE") in (None, "1")


# -- the spec and the placement ----------------------------------------------------------------------
def resolve(tmp_path, run: dict, train: dict | None = None, **top):
    """A one-point spec with these run (and train) settings, resolved: a pipeline.sweep.spec.sweep.Sweep."""
    from pipeline.sweep.spec.sweep import load_spec

    spec = {"name": "dp", "model": {"output": "bernoulli"}, "train": {"batch_size": 4, **(train or {})},
            "search": {"model": {"enc_blocks": [1]}}, "run": run, "profiles": {"cpu": {}}, **top}  # fmt: skip
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path, root=tmp_path).resolve("cpu")


@pytest.mark.parametrize(
    "run, train, top, field, message",
    [
        (
            {"workers_per_trial": 3},
            None,
            {},
            "train.batch_size",
            "train.batch_size=4 (point e1) is the global batch: it must be a multiple of run.workers_per_trial=3",
        ),
        ({"workers_per_trial": 0}, None, {}, "run.workers_per_trial", "workers_per_trial must be an integer >= 1"),
        (
            {"workers_per_trial": 2, "gpus_per_worker": 0.5},
            None,
            {},
            "run.gpus_per_worker",
            "must be 0 (CPU workers, gloo) or 1",
        ),
        (
            {"workers_per_trial": 2, "gpus_per_trial": 2},
            None,
            {},
            "run.gpus_per_trial",
            "must be 0 (CPU workers, gloo) or 1",
        ),
        ({"workers_per_trial": 2, "cpus_per_worker": 0}, None, {}, "run.cpus_per_worker", "must be > 0"),
        ({"workers_per_trial": 2}, None, {"mode": "overfit"}, "run.workers_per_trial", "runs one worker"),
    ],
)
def test_spec_names_the_field_of_an_impossible_data_parallel_setting(tmp_path, run, train, top, field, message):
    from pipeline.sweep.spec.sweep import SpecError

    with pytest.raises(SpecError) as err:
        resolve(tmp_path, run, train, **top)
    assert f": {field}" in str(err.value) and message in str(err.value)


def test_per_worker_resources_default_to_the_trials_and_n_is_part_of_the_identity(tmp_path):
    one = resolve(tmp_path, {"cpus_per_trial": 2, "gpus_per_trial": 1})
    two = resolve(tmp_path, {"cpus_per_trial": 2, "gpus_per_trial": 1, "workers_per_trial": 2})
    assert (two.run.worker_cpus, two.run.worker_gpus) == (2.0, 1.0)  # two copies of the one-worker trial
    assert resolve(tmp_path, {"workers_per_trial": 2, "cpus_per_worker": 3}).run.worker_cpus == 3.0
    assert "workers_per_trial" not in one.identity()  # one-worker sweeps keep the identity they had
    assert one.fingerprint("d", "c") != two.fingerprint("d", "c")


def test_placement_counts_workers_per_node_and_names_the_fields(tmp_path, caplog):
    from pipeline.sweep.cluster.placement import DRIVER_MEMORY, DRIVER_RESOURCE, plan

    gpu_nodes = [{"CPU": 0.0, DRIVER_RESOURCE: 1.0}, {"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}]
    run = resolve(tmp_path, {"workers_per_trial": 4, "cpus_per_worker": 4, "gpus_per_worker": 1}).run
    p = plan(run, gpu_nodes)
    assert p.worker == {"CPU": 4.0, "GPU": 1.0} and p.driver == {DRIVER_RESOURCE: 0.01}
    assert p.max_concurrent == 2  # 4 workers per node (CPUs bind first): 8 workers, 2 trials
    # 8 GPUs per node but 16 CPUs: only 4 workers of 4 CPUs fit a node; 9 workers fit nowhere
    run = resolve(tmp_path, {"workers_per_trial": 9, "cpus_per_worker": 4, "gpus_per_worker": 1}, {"batch_size": 9}).run
    with pytest.raises(
        ValueError,
        match=r"run.workers_per_trial=9 workers of \{'CPU': 4.0, 'GPU': 1.0\} each "
        r"\(run.cpus_per_worker=4, run.gpus_per_worker=1\) cannot be placed.* hold 8 such",
    ):
        plan(run, gpu_nodes)
    # more GPUs than the cluster has
    run = resolve(tmp_path, {"workers_per_trial": 4, "gpus_per_trial": 1}).run
    with pytest.raises(ValueError, match=r"run.gpus_per_trial=1\) cannot be placed"):
        plan(run, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    # no GPU at all: refused, never CPU workers in the GPUs' place (tests/test_bad_inputs.py); CPU workers
    # (no GPU asked for) have their drivers on logical memory
    with pytest.raises(ValueError, match=r"run.gpus_per_trial=1 asks for GPUs but the Ray cluster offers none"):
        plan(run, [{"CPU": 2.0}, {"CPU": 2.0}])
    cpu_run = resolve(tmp_path, {"workers_per_trial": 4}).run
    p = plan(cpu_run, [{"CPU": 2.0}, {"CPU": 2.0}])
    assert p.worker == {"CPU": 1.0} and p.driver == {"memory": float(DRIVER_MEMORY)} and p.max_concurrent == 1


def test_the_sweep_refuses_a_trial_no_placement_holds(tmp_path):
    pytest.importorskip("ray")
    from pipeline.sweep.cluster.placement import trainable_of
    from pipeline.sweep.spec.data_check import SweepDataError

    sweep = resolve(tmp_path, {"workers_per_trial": 2, "gpus_per_worker": 1})
    nodes = [{"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(
        SweepDataError, match=r"dp.yaml: run.workers_per_trial=2 workers .* run.gpus_per_worker=1\) cannot"
    ):
        trainable_of(sweep, {"CPU": 8.0, "GPU": 1.0}, nodes)
    _, concurrent = trainable_of(sweep, {"CPU": 16.0, "GPU": 2.0}, [{"CPU": 8.0, "GPU": 1.0}] * 2)
    assert concurrent == 1  # the cluster holds one pair of workers at a time


def test_gpu_workers_of_a_trial_are_pinned_to_one_gpu_model(tmp_path):
    from pipeline.sweep.cluster.placement import ACCELERATOR_SHARE, plan

    run = resolve(tmp_path, {"workers_per_trial": 2, "gpus_per_worker": 1}).run
    a100 = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:A100": 1.0}
    l40s = {"CPU": 8.0, "GPU": 4.0, "accelerator_type:L40S": 1.0}
    # two models: the one holding the most workers (4 L40S) takes every trial's workers, never mixed
    p = plan(run, [a100, l40s])
    assert p.worker == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:L40S": ACCELERATOR_SHARE}
    assert p.max_concurrent == 2  # the two A100s no longer count: a trial's pair fits only the L40S node
    # one model (or none named): no pin
    assert plan(run, [a100, dict(a100)]).worker == {"CPU": 1.0, "GPU": 1.0}
    assert plan(run, [{"CPU": 8.0, "GPU": 2.0}]).worker == {"CPU": 1.0, "GPU": 1.0}
