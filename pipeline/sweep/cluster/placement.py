"""Where a sweep's trials run: the profile for the cluster, its resources, and a placement that can hold them.

Every check here runs before anything is created (no MLflow run, no Ray experiment): a trial that can
never be placed would otherwise wait forever.

- `choose_profile`: `--profile auto` is `gpu` on a cluster with GPUs, else `cpu`.
- `wait_for_nodes`: an autoscaling cluster starts with its worker nodes still booting;
  VPN_WAIT_FOR_NODES=<seconds> waits for them (sweeps/cluster.yaml sets it).
- `trial_resources`: a one-worker trial's {"cpu", "gpu"}. A profile that asks for GPUs on a cluster
  without any is refused (in Ray 2.60 its request would leave the trial PENDING forever; training on
  the CPU instead would silently skip the GPUs it asked for): `--profile auto` picks cpu there.
- `plan`: the workers of a data-parallel trial (run.workers_per_trial > 1,
  pipeline.sweep.trials.distributed). A TorchTrainer places its workers across nodes, so a trial fits when
  the live nodes together hold N per-worker bundles. The trial's driver asks for no CPU or GPU (a
  small logical `memory` request, or a share of the custom resource `trial_driver` where a node
  offers it: Ray's advice is to keep drivers on a node that training cannot take down, such as the
  head), and the sweep runs at most as many trials at once as the cluster holds worker groups
  (max_concurrent_trials), so idle drivers do not pile up waiting for workers. GPU workers never mix
  GPU models: on a cluster of several (Ray's `accelerator_type:<model>` node resources) each worker
  also asks for a sliver of one model's resource, the model that holds the most workers.
- `trainable_of`: the Tune trainable with those resources.
- `probe_gpus`: what torch sees on each live node that offers GPUs (one task of one GPU a node): the
  GPUs' memory, for the sweep's memory plan (pipeline.sweep.cluster.plan.check_plan_on_cluster), and
  the nodes whose GPUs torch cannot use, which `refuse_unusable_gpus` refuses before any run is
  created (pipeline.sweep.trials.devices: the node, torch and its CUDA build, the fix).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.sweep.spec.data_check import SweepDataError
from pipeline.sweep.spec.inputs import WAIT_ENV
from pipeline.sweep.spec.sweep import RunSettings, Sweep, SweepSpec
from pipeline.sweep.trials.devices import cuda_report, unusable_message

log = logging.getLogger(__name__)

# A custom resource that marks the nodes where trial drivers should run (sweeps/cluster.yaml puts it
# on the head). Absent, a driver asks for DRIVER_MEMORY bytes of Ray's logical `memory` resource:
# a request that takes no CPU or GPU from the workers (Tune refuses a request of nothing at all).
DRIVER_RESOURCE = "trial_driver"
DRIVER_SHARE = 0.01
DRIVER_MEMORY = 256 * 2**20
# Ray gives each node with a detected GPU the resource "accelerator_type:<model>" (1.0), e.g. A100, H100.
ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SHARE = 0.001  # what a worker asks of it: a pin to the model, not a share of the node


def choose_profile(spec: SweepSpec, requested: str, cluster: Mapping[str, float] | None) -> str:
    if requested != "auto":
        return requested
    has_gpu = bool(cluster and cluster.get("GPU", 0))
    for name in ("gpu", "cpu") if has_gpu else ("cpu",):
        if name in spec.profiles:
            return name
    return spec.profiles[0]


def wait_for_nodes(
    ray, need: Mapping[str, float], wait_s: float, bundles: list[dict[str, float]] | None = None
) -> dict[str, float]:
    """The cluster's resources, after waiting up to wait_s for it to offer `need` ({"CPU": n, "GPU": g}).

    An autoscaling cluster starts with its worker nodes still booting (or none at all): what it has
    at submit time is not what it will have. VPN_WAIT_FOR_NODES (seconds, default 0) sets wait_s.
    While it waits, `bundles` (one trial's workers) are asked of the autoscaler, so that node types
    with min_workers 0 (sweeps/cluster.yaml's 8-GPU nodes) are started too.
    """
    import time

    cluster = dict(ray.cluster_resources())
    deadline = time.monotonic() + wait_s
    announced = False
    while any(float(cluster.get(k, 0)) < v for k, v in need.items() if v) and time.monotonic() < deadline:
        if not announced:
            log.info("waiting up to %.0f s for the cluster to offer %s (it has %s)", wait_s, dict(need), cluster)
            announced = True
            if bundles:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=bundles)
        time.sleep(5)
        cluster = dict(ray.cluster_resources())
    if announced and bundles:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])  # the trials' own requests keep the nodes from here on
    return cluster


def trial_resources(sweep: Sweep, cluster: Mapping[str, float]) -> dict[str, float]:
    """{"cpu": n, "gpu": g} of a one-worker trial; GPUs asked of a cluster without any are refused (the
    request would hang, and CPU trials would skip the GPUs asked for). Data-parallel trials: `plan`."""
    run = sweep.run
    gpus = float(cluster.get("GPU", 0))
    want = run.worker_gpus
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    if want and not gpus:
        raise SweepDataError(f"{sweep.source}: profiles.{sweep.profile}: {no_gpu_refusal(gpu_field, want)}")
    if want > gpus:
        raise SweepDataError(f"{sweep.source}: run.{gpu_field}={want:g} but the cluster has only {gpus:g} GPU(s)")
    cpus = run.worker_cpus
    if cpus > float(cluster.get("CPU", 0)):
        have = float(cluster.get("CPU", 0))
        cpu_field = "cpus_per_worker" if run.cpus_per_worker is not None else "cpus_per_trial"
        raise SweepDataError(f"{sweep.source}: run.{cpu_field}={cpus:g} but the cluster has {have:g} CPU(s)")
    return {"cpu": cpus, "gpu": want}


def no_gpu_refusal(gpu_field: str, want: float) -> str:
    """Why a profile whose trials ask for GPUs cannot run on a cluster without any, and what to do."""
    return (
        f"run.{gpu_field}={want:g} asks for GPUs but the Ray cluster offers none; run the cpu "
        "profile (--profile cpu, or --profile auto, which picks cpu where no GPU exists), or start the cluster's GPU "
        f"nodes first (on an autoscaling cluster {WAIT_ENV}=<seconds> waits for them)"
    )


@dataclass(frozen=True)
class Plan:
    """How a data-parallel trial runs on this cluster (the driver gets it as a plain dict)."""

    workers: int
    worker: dict[str, float]  # Ray resources of each worker, {"CPU": c} or {"CPU": c, "GPU": 1}
    driver: dict[str, float]  # the Tune trial's, in tune.with_resources' keys
    max_concurrent: int  # worker groups the cluster holds at once
    max_failures: int  # Ray Train's restarts of the worker group per driver start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bundles_per_node(nodes: Iterable[Mapping[str, float]], bundle: Mapping[str, float]) -> list[int]:
    """How many copies of `bundle` each node holds (its total resources, not what is free now)."""
    out = []
    for node in nodes:
        fits = [math.floor(float(node.get(k, 0)) / v + 1e-9) for k, v in bundle.items() if v > 0]
        out.append(min(fits) if fits else 0)
    return out


def plan(run: RunSettings, nodes: list[Mapping[str, float]]) -> Plan:
    """The placement of run.workers_per_trial workers on the live nodes' resources (ray.nodes()).

    Raises ValueError naming the spec's fields when no placement can ever hold one trial.
    """
    n = run.workers_per_trial
    cpu_field = "cpus_per_worker" if run.cpus_per_worker is not None else "cpus_per_trial"
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    gpus = run.worker_gpus
    cluster_gpus = sum(float(node.get("GPU", 0)) for node in nodes)
    if gpus and not cluster_gpus:
        raise ValueError(no_gpu_refusal(gpu_field, gpus))
    worker = {"CPU": run.worker_cpus, **({"GPU": gpus} if gpus else {})}
    if gpus and n > 1:  # one GPU model for all of a trial's workers: the slowest would pace the rest
        worker.update(one_accelerator(nodes, worker))
    per_node = bundles_per_node(nodes, worker)
    if sum(per_node) < n:
        held = ", ".join(f"{ {k: node.get(k, 0) for k in worker} }" for node in nodes)
        raise ValueError(
            f"run.workers_per_trial={n} workers of {worker} each (run.{cpu_field}={run.worker_cpus:g}, "
            f"run.{gpu_field}={gpus:g}) cannot be placed: the cluster's nodes ({held}) hold {sum(per_node)} such "
            f"worker(s). Lower run.workers_per_trial or the per-worker resources, or add nodes "
            f"(on an autoscaling cluster, VPN_WAIT_FOR_NODES waits for them)"
        )
    if any(float(node.get(DRIVER_RESOURCE, 0)) > 0 for node in nodes):
        driver = {DRIVER_RESOURCE: DRIVER_SHARE}
    else:
        driver = {"memory": float(DRIVER_MEMORY)}
    return Plan(n, worker, driver, max(1, sum(per_node) // n), run.max_failures)


def one_accelerator(nodes: list[Mapping[str, float]], worker: Mapping[str, float]) -> dict[str, float]:
    """{"accelerator_type:<model>": share} pinning a data-parallel trial's GPU workers to one GPU model,
    where the cluster's GPU nodes have several (else {}): the model whose nodes hold the most workers
    (ties: the first by name). All-reduce waits for the slowest rank, and each rank's share of the batch
    is the same, so a mixed trial runs at its slowest GPU's pace and its memory plan at the smallest's."""
    gpu_nodes = [node for node in nodes if float(node.get("GPU", 0)) > 0]
    models = sorted({k for node in gpu_nodes for k in node if k.startswith(ACCELERATOR_PREFIX)})
    if len(models) < 2:
        return {}
    held = {m: sum(bundles_per_node([node for node in nodes if node.get(m)], worker)) for m in models}
    best = max(models, key=lambda m: held[m])  # max keeps the first of equals, in name order
    log.info("the cluster has GPUs of %d models (%s): each trial's workers are pinned to %s", len(models),
             ", ".join(f"{m.removeprefix(ACCELERATOR_PREFIX)}: {held[m]} worker(s)" for m in models), best)  # fmt: skip
    return {best: ACCELERATOR_SHARE}


def trainable_of(sweep: Sweep, cluster: Mapping[str, float], nodes: list[Mapping[str, float]]):
    """The Tune trainable with its resources, and the most trials to run at once (None: Tune's choice).

    One worker per trial: pipeline.sweep.trials.trainable.trial, which trains in the Tune trial itself. Several:
    pipeline.sweep.trials.distributed.driver, which runs them through Ray Train, placed by `plan`.
    """
    from ray import tune

    if sweep.run.workers_per_trial == 1:
        from pipeline.sweep.trials.trainable import trial

        return tune.with_resources(trial, trial_resources(sweep, cluster)), sweep.run.max_concurrent or None
    from pipeline.sweep.trials import distributed

    try:
        placed = plan(sweep.run, nodes)
    except ValueError as e:
        raise SweepDataError(f"{sweep.source}: {e}") from e
    log.info(
        "%d worker(s) of %s per trial, at most %d trial(s) at once; drivers ask for %s",
        placed.workers, placed.worker, placed.max_concurrent, placed.driver,
    )  # fmt: skip
    driver = tune.with_parameters(distributed.driver, plan=placed.to_dict())
    return tune.with_resources(driver, placed.driver), sweep.run.max_concurrent or placed.max_concurrent


GPU_PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GPUProbe:
    """What probe_gpus found: (node id, GPU name, total bytes) of each node that answered with a CUDA
    device; where none did, why (no node offers a GPU, torch there sees none, no answer in time); and
    what torch reported on each node that offers GPUs it cannot use (pipeline.sweep.trials.devices.cuda_report)."""

    gpus: tuple[tuple[str, str, int], ...] = ()
    why_none: str = ""
    unusable: tuple[Mapping[str, Any], ...] = ()


def probe_gpus(ray, timeout_s: float = GPU_PROBE_TIMEOUT_S) -> GPUProbe:
    """What torch sees on each live node that offers GPUs: a task of num_gpus=1 pinned to each
    (NodeAffinitySchedulingStrategy), so a node type whose GPU differs is measured too. Nodes still
    booting are not seen; a task not run within timeout_s (every GPU busy) is cancelled, and the nodes
    that answered count."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    if not nodes:
        return GPUProbe(why_none="no node of the Ray cluster offers a GPU")
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(cuda_report)
    refs = {n: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes}
    done, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    answers = {n: ray.get(ref) for n, ref in refs.items() if ref in done}
    gpus = tuple((n, a["name"], a["total_memory"]) for n, a in answers.items() if a["available"])
    unusable = tuple(a for a in answers.values() if not a["available"])
    if gpus:
        return GPUProbe(gpus, unusable=unusable)
    if not answers:
        return GPUProbe(why_none=f"no node with a GPU ran the probe within {timeout_s:g} s")
    why = f"Ray offers GPUs on {len(answers)} node(s), but torch there sees no CUDA device"
    return GPUProbe(why_none=why, unusable=unusable)


def refuse_unusable_gpus(sweep: Sweep, probe: GPUProbe) -> None:
    """Refuse a sweep whose trials ask for GPUs (SweepDataError) when the cluster offers none, or when
    torch on a node that offers some cannot use them: its trials would train on the CPU (device auto)
    or fail (device cuda) while the GPU stays reserved. A probe that no node answered in time
    (every GPU busy) refuses nothing: the trials check their own GPU (trials.devices.require_usable_gpu)."""
    run = sweep.run
    if run.worker_gpus <= 0:
        return
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    where = f"{sweep.source}: profiles.{sweep.profile}"
    if not probe.gpus and not probe.unusable and probe.why_none.startswith("no node of the Ray cluster"):
        raise SweepDataError(f"{where}: {no_gpu_refusal(gpu_field, run.worker_gpus)}")
    if probe.unusable:
        more = f" (and {len(probe.unusable) - 1} more node(s))" if len(probe.unusable) > 1 else ""
        first = unusable_message(probe.unusable[0])
        raise SweepDataError(f"{where}: run.{gpu_field}={run.worker_gpus:g}: {first}{more}")
