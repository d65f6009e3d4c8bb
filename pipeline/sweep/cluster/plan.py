"""A sweep's memory plan: for every trial, what one GPU must hold and the settings that make it fit.

    python -m pipeline.sweep SPEC --profile P --plan [--json]      # starts no Ray

Per trial: the parameters, the counted FLOPs of one frame, the estimated peak memory of one training
step per GPU (vpn.memory.train_memory, on the meta device) without checkpointing or micro-batches
("plain") and under the settings `auto` would choose on that GPU (vpn.memory.choose_settings, the
function the Trainer calls), those settings, whether they fit, and the estimated GPU-hours
(pipeline.sweep.spec.budget.trial_gpu_hours: counted FLOPs at a stated MFU, an estimate). The sweep runs
the same plan before its first trial (check_plan): a GPU trial that no setting fits is refused there,
named with the fields and the memory it needs, not found by an out-of-memory error hours later.

The GPU planned for: run.gpu_memory_gb when the spec sets it, else the smallest GPU among
sweeps/cluster.yaml's node types (a trial of one GPU a worker may land on any of them). `--plan`
starts no Ray, so that is all it knows. A sweep on a live Ray cluster checks again once it has joined
it, before the first trial, with its GPUs' real memory (check_plan_on_cluster: torch on each GPU node,
pipeline.sweep.cluster.placement.probe_gpus; run.gpu_memory_gb still caps it); where no GPU is visible it
says so and uses the figure above. GPU memory is
sold in GB (1e9 bytes); the plan converts to GiB, as torch reports it. A fractional GPU
(gpus_per_trial 0.33) plans for that fraction of the memory.

The frames are those the budget counts (pipeline.sweep.spec.budget: 64x64 after train.downsample,
train.seq_len or 20 frames); a step's sequences per GPU are train.batch_size / run.workers_per_trial
(1 in mode overfit); the precision is bf16 where train.amp is on (autocast on CUDA), else fp32.
A searched sweep is planned at its space's two corners (memory and cost grow with depth and width).
An estimate takes a fraction of a second of CPU (vpn.memory: each distinct meta op runs once, and
train_memory measures each vpn.memory.estimate_key once per process), so trials that differ only in
fields no estimate reads (seed, lr, steps, ...) and auto's candidates share their estimates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.paths import repo_root
from pipeline.sweep.cluster.placement import GPUProbe
from pipeline.sweep.spec.budget import FRAME_SIZE, MFU, SEQ_LEN, plan_line, trial_gpu_hours
from pipeline.sweep.spec.grid import Point
from pipeline.sweep.spec.sweep import SpecError, Sweep
from vpn.memory import (
    GIB,
    HEADROOM,
    PROCESS_GIB,
    budget_bytes,
    choose_settings,
    host_budget_bytes,
    host_memory_bytes,
    meta_memo,
    train_memory,
)
from vpn.model import VideoPixelNetwork, count_flops_per_frame

log = logging.getLogger(__name__)
GB = 1e9
CLUSTER_YAML = "sweeps/cluster.yaml"
# The GPUs of the instance types sweeps/cluster.yaml may name: (GPU, GPUs a node, GB each), from AWS's
# instance pages and NVIDIA's datasheets.
INSTANCE_GPUS = {
    "g6e.xlarge": ("NVIDIA L40S", 1, 48),
    "g6e.4xlarge": ("NVIDIA L40S", 1, 48),
    "g6e.12xlarge": ("NVIDIA L40S", 4, 48),
    "g5.xlarge": ("NVIDIA A10G", 1, 24),
    "p4d.24xlarge": ("NVIDIA A100", 8, 40),
    "p4de.24xlarge": ("NVIDIA A100", 8, 80),
    "p5.48xlarge": ("NVIDIA H100", 8, 80),
    "p5e.48xlarge": ("NVIDIA H200", 8, 141),
}


@dataclass(frozen=True)
class GPU:
    """The GPU a plan is for: its memory in GB (1e9 bytes) and where that figure came from."""

    memory_gb: float
    source: str

    @property
    def memory_gib(self) -> float:
        return self.memory_gb * GB / GIB


def cluster_gpu(path: Path) -> GPU | None:
    """The smallest GPU among the node types of a Ray cluster launcher config; None without GPU nodes.

    An instance type not in INSTANCE_GPUS that looks like a GPU one (g*, p*) is an error: the plan
    would otherwise ignore the node it might run on.
    """
    raw = yaml.safe_load(path.read_text()) or {}
    found = []
    for name, node in (raw.get("available_node_types") or {}).items():
        instance = ((node or {}).get("node_config") or {}).get("InstanceType")
        if instance in INSTANCE_GPUS:
            gpu, _, gb = INSTANCE_GPUS[instance]
            found.append((gb, f"{gpu}, {gb} GB ({instance}, node type {name})"))
        elif isinstance(instance, str) and instance[:1] in ("g", "p"):
            raise ValueError(
                f"{path}: available_node_types.{name}: the GPU of {instance} is unknown to "
                "pipeline.sweep.cluster.plan.INSTANCE_GPUS; set run.gpu_memory_gb"
            )
    if not found:
        return None
    gb, what = min(found)
    return GPU(gb, f"the smallest GPU of {path.name}: {what}")


def planned_gpu(sweep: Sweep, root: Path | None = None) -> GPU | None:
    """run.gpu_memory_gb, else cluster.yaml's smallest GPU; None when neither is known."""
    if sweep.run.gpu_memory_gb is not None:
        return GPU(float(sweep.run.gpu_memory_gb), f"run.gpu_memory_gb of {sweep.source}")
    path = (root or repo_root()) / CLUSTER_YAML
    return cluster_gpu(path) if path.is_file() else None


@dataclass(frozen=True)
class TrialPlan:
    """One trial's plan (the JSON object of `--plan --json`). Memory in GiB, per GPU (per process on CPU).

    gpu_memory_gib, activation_checkpointing, micro_batch_size: under the settings chosen (the most
    frugal when nothing fits). fits: within budget_gib (None: a CPU trial, no GPU planned for).
    """

    label: str
    parameters: int
    flops_per_frame: int
    frames: tuple[int, int, int]
    sequences_per_gpu: int
    precision: str
    plain_memory_gib: float
    gpu_memory_gib: float
    activation_checkpointing: bool
    micro_batch_size: int | None
    budget_gib: float | None
    fits: bool | None
    gpu_hours: float


def _frames_and_share(sweep: Sweep, point: Point) -> tuple[tuple[int, int, int], int]:
    t = point.train
    side = max(1, FRAME_SIZE // t.downsample)
    share = 1 if sweep.mode == "overfit" else t.batch_size // sweep.run.workers_per_trial
    return ((t.seq_len or SEQ_LEN), side, side), share


def _fixed(value: Any, auto: Any) -> Any:
    return auto if value == "auto" else value


def plan_trial(sweep: Sweep, point: Point, gpu: GPU | None) -> TrialPlan:
    """The plan of one point: see the module docstring."""
    with meta_memo():  # the model is built on the meta device three times and measured: each op asked once
        return _plan_trial(sweep, point, gpu)


def _plan_trial(sweep: Sweep, point: Point, gpu: GPU | None) -> TrialPlan:
    t, gpus = point.train, sweep.run.worker_gpus
    frames, share = _frames_and_share(sweep, point)
    on_gpu = gpus > 0 and gpu is not None
    precision = "bf16" if (t.amp and gpus > 0) else "fp32"
    plain = train_memory(
        point.model, t.replace(activation_checkpointing=False, micro_batch_size=None), frames, precision, share
    )
    budget = budget_bytes(gpu.memory_gib * min(gpus, 1.0)) if on_gpu else None
    if budget is None:  # on CPU auto keeps the plain step (vpn.train.Trainer._memory_settings)
        ckpt, micro = _fixed(t.activation_checkpointing, False), _fixed(t.micro_batch_size, None)
        cfg = t.replace(activation_checkpointing=ckpt, micro_batch_size=micro)
        chosen, fits = train_memory(point.model, cfg, frames, precision, share), None
    else:
        found = choose_settings(point.model, t, frames, precision, budget, share)
        if found is not None:
            (ckpt, micro, chosen), fits = found, True
        else:  # the most frugal candidate, to say how far it is
            ckpt, micro = _fixed(t.activation_checkpointing, True), _fixed(t.micro_batch_size, 1)
            cfg = t.replace(activation_checkpointing=ckpt, micro_batch_size=micro)
            chosen, fits = train_memory(point.model, cfg, frames, precision, share), False
    with torch.device("meta"):
        parameters = VideoPixelNetwork(point.model).num_parameters()
    return TrialPlan(
        label=point.label,
        parameters=parameters,
        flops_per_frame=count_flops_per_frame(point.model, frames[1], frames[2]),
        frames=frames,
        sequences_per_gpu=share,
        precision=precision,
        plain_memory_gib=plain.total_gib,
        gpu_memory_gib=chosen.total_gib,
        activation_checkpointing=bool(ckpt),
        micro_batch_size=None if micro == share else micro,
        budget_gib=None if budget is None else budget / GIB,
        fits=fits,
        gpu_hours=trial_gpu_hours(sweep, point),
    )


def plan_sweep(sweep: Sweep, gpu: GPU | None) -> list[TrialPlan]:
    """Every trial's plan, in the sweep's order (a searched sweep: its two corners)."""
    return [plan_trial(sweep, p, gpu) for p in sweep.points]


def check_plan(sweep: Sweep, root: Path | None = None, gpu: GPU | None = None) -> list[TrialPlan]:
    """The plan of a sweep, refusing a trial whose step cannot fit (SpecError).

    A GPU sweep: no setting fits its GPU (gpu: the GPU to plan for; default planned_gpu, the spec's
    run.gpu_memory_gb, else cluster.yaml's). A CPU sweep (run.gpus_per_trial / gpus_per_worker 0):
    its step, under the settings it runs with, does not fit a trial process's share of the memory
    (check_host_memory); its plans then hold only what that check measured ([]: all fit).
    """
    if sweep.run.worker_gpus <= 0:
        check_host_memory(sweep)
        return []
    gpu = planned_gpu(sweep, root) if gpu is None else gpu
    if gpu is None:
        return []
    plans = plan_sweep(sweep, gpu)
    refused = [p for p in plans if p.fits is False]
    if refused:
        raise SpecError(f"{sweep.source}: profiles.{sweep.profile}: {refusal(sweep, refused, gpu)}")
    return plans


def host_share(sweep: Sweep) -> GPU:
    """The memory one CPU trial process may use (in GB, with where the figure comes from): the spec's
    run.cpu_memory_gb, else this machine's memory (vpn.memory.host_memory_bytes) shared by the trial
    processes that run at once (its cores / run.cpus_per_trial, or run.max_concurrent x the workers)."""
    run = sweep.run
    if run.cpu_memory_gb is not None:
        return GPU(float(run.cpu_memory_gb), f"run.cpu_memory_gb of {sweep.source}")
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    at_once = max(1, int(cores // run.worker_cpus))
    if run.max_concurrent:
        at_once = min(at_once, run.max_concurrent * run.workers_per_trial)
    total = host_memory_bytes()
    return GPU(
        total / at_once / GB,
        f"this machine's {total / GIB:.1f} GiB shared by {at_once} trial process(es) at once ({cores} cores)",
    )


def check_host_memory(sweep: Sweep) -> None:
    """Refuse a CPU sweep (SpecError) whose step, with the settings it runs with (on CPU `auto` is the
    whole share without checkpointing), needs more than a trial process's share of the memory
    (host_share: HEADROOM of it, less PROCESS_GIB for the process's imports)."""
    host = host_share(sweep)
    budget = host_budget_bytes(host.memory_gib)
    for point in sweep.points:
        frames, share = _frames_and_share(sweep, point)
        t = point.train
        cfg = t.replace(
            activation_checkpointing=_fixed(t.activation_checkpointing, False),
            micro_batch_size=_fixed(t.micro_batch_size, None),
        )
        with meta_memo():  # the model built on the meta device and measured: each op asked once
            need = _estimate(point.model, cfg, frames, share)
        if need is None or need.total > budget:
            raise SpecError(f"{sweep.source}: profiles.{sweep.profile}: {host_refusal(sweep, point, need, host)}")


def _estimate(model, cfg, frames, share):
    """vpn.memory.train_memory, or None where the step is too large to estimate (sizes beyond int64)."""
    try:
        return train_memory(model, cfg, frames, "fp32", share)
    except (RuntimeError, OverflowError, MemoryError):
        return None


def _largest_fitting_micro(point: Point, frames: tuple[int, int, int], share: int, budget: int) -> int | None:
    """The largest micro-batch (a divisor of the share) whose checkpointed step fits `budget`, or None.
    A step's memory grows with its micro-batch, so a bisection over the divisors measures a handful."""
    divisors = [d for d in range(1, share + 1) if share % d == 0]
    lo, hi, best = 0, len(divisors) - 1, None
    with meta_memo():
        while lo <= hi and budget > 0:
            mid = (lo + hi) // 2
            cfg = point.train.replace(activation_checkpointing=True, micro_batch_size=divisors[mid])
            need = _estimate(point.model, cfg, frames, share)
            if need is not None and need.total <= budget:
                best, lo = divisors[mid], mid + 1
            else:
                hi = mid - 1
    return best


def host_refusal(sweep: Sweep, point: Point, need, host: GPU) -> str:
    """Why a CPU trial is refused: its step's memory against its share, and the settings that would fit."""
    frames, share = _frames_and_share(sweep, point)
    budget = host_budget_bytes(host.memory_gib)
    step = f"a step of {share} sequence(s) of {frames} frames"
    needs = "is too large to estimate" if need is None else f"needs {need.total_gib:.1f} GiB (vpn.memory)"
    fix = "lower train.batch_size, train.seq_len or the model's size"
    micro = _largest_fitting_micro(point, frames, share, budget) if need is not None else None
    if micro is not None:
        fix = f"set train.micro_batch_size: {micro} and train.activation_checkpointing: true (it fits then), or {fix}"
    return (
        f"trial {point.label} does not fit a CPU trial's memory: {step} in fp32 {needs}, and a step may use "
        f"{max(budget, 0) / GIB:.1f} GiB of the {host.memory_gib:.1f} GiB a trial process has ({host.source}; "
        f"{HEADROOM:.0%} of it less {PROCESS_GIB:g} GiB for the process's imports); {fix}, or lower run.max_concurrent "
        "or set run.cpu_memory_gb"
    )


def gpu_from_probe(planned: GPU | None, probe: GPUProbe) -> tuple[GPU | None, str]:
    """The GPU a sweep on a live cluster plans for, and a line saying where it comes from.

    The smallest GPU the probe measured (pipeline.sweep.cluster.placement.probe_gpus: torch on the nodes),
    unless the spec's run.gpu_memory_gb asks for less (a cap the spec chose); without a probed GPU,
    `planned` (planned_gpu: run.gpu_memory_gb, else cluster.yaml's smallest GPU), said so.
    """
    if not probe.gpus:
        if planned is None:
            return None, f"no GPU visible ({probe.why_none}) and no GPU memory known: the trials are not planned"
        return planned, f"no GPU visible ({probe.why_none}), using {planned.source}"
    _, name, total = min(probe.gpus, key=lambda g: g[2])
    nodes = f"the smallest of {len(probe.gpus)} node(s)" if len(probe.gpus) > 1 else "1 node"
    probed = GPU(total / GB, f"the cluster's GPU as torch reads it: {name}, {total / GIB:.1f} GiB ({nodes})")
    spec_cap = planned is not None and planned.source.startswith("run.gpu_memory_gb")
    if spec_cap and planned.memory_gb < probed.memory_gb:
        return planned, f"using {planned.source}, below {probed.source}"
    return probed, f"using {probed.source}"


def check_plan_on_cluster(ray, sweep: Sweep, root: Path | None = None) -> list[TrialPlan]:
    """check_plan with the GPUs' real memory, before the first trial of a sweep on a live Ray cluster
    (gpu_from_probe); logs where the figure came from. A CPU sweep probes nothing."""
    if sweep.run.worker_gpus <= 0:
        return []
    from pipeline.sweep.cluster.placement import probe_gpus, refuse_unusable_gpus

    probe = probe_gpus(ray)
    refuse_unusable_gpus(sweep, probe)  # GPUs that torch cannot use, or none at all: refused, never skipped
    gpu, where = gpu_from_probe(planned_gpu(sweep, root), probe)
    log.info("memory plan of %s, profile %s: %s", sweep.name, sweep.profile, where)
    return check_plan(sweep, root, gpu) if gpu is not None else []


def refusal(sweep: Sweep, refused: list[TrialPlan], gpu: GPU) -> str:
    """Why the first trial that cannot fit is refused: the trial, the fields, the memory."""
    p = refused[0]
    more = f" (and {len(refused) - 1} more trial(s))" if len(refused) > 1 else ""
    return (
        f"trial {p.label}{more} does not fit one GPU: even with train.activation_checkpointing true and "
        f"train.micro_batch_size {p.micro_batch_size or p.sequences_per_gpu}, a step of {p.sequences_per_gpu} "
        f"sequence(s) of {p.frames} frames in {p.precision} needs {p.gpu_memory_gib:.1f} GiB "
        f"({p.plain_memory_gib:.1f} GiB plain), and a step may use {p.budget_gib:.1f} GiB of the "
        f"{gpu.memory_gib * min(sweep.run.worker_gpus, 1.0):.1f} GiB planned for (run.gpus_per_trial="
        f"{sweep.run.worker_gpus:g} of {gpu.source}); lower the model's size or train.seq_len, or raise "
        "run.workers_per_trial or run.gpu_memory_gb"
    )


def format_plan(sweep: Sweep, plans: list[TrialPlan], gpu: GPU | None) -> str:
    """The plan as text: a header naming the GPU and its source, one line a trial, the totals."""
    g = sweep.run.worker_gpus
    if g > 0 and gpu is not None:
        share = f"{g:g} of " if g < 1 else ""
        where = (
            f"{share}a {gpu.memory_gb:g} GB GPU ({gpu.memory_gib:.1f} GiB) per worker, from {gpu.source}; a step "
            f"may use {HEADROOM:.0%} of it less 1 GiB (vpn.memory.budget_bytes). --plan starts no Ray: a sweep on a "
            "live cluster checks again with its GPUs' real memory before the first trial"
        )
    else:
        where = "CPU trials (no GPU planned for): memory per trial process, the plain step"
    corners = " (a searched space: its two corners)" if sweep.search.searched else ""
    lines = [f"plan of {sweep.name}, profile {sweep.profile}: {len(plans)} trial(s){corners}; {where}"]
    head = ("trial", "params", "GFLOP/frame", "seqs/GPU", "prec", "plain GiB", "GiB", "ckpt", "micro", "fits", "GPU-h*")
    rows = [head]
    for p in plans:
        fits = "-" if p.fits is None else ("yes" if p.fits else "NO")
        rows.append((
            p.label, f"{p.parameters:,}", f"{p.flops_per_frame / 1e9:.2f}", str(p.sequences_per_gpu), p.precision,
            f"{p.plain_memory_gib:.2f}", f"{p.gpu_memory_gib:.2f}", "yes" if p.activation_checkpointing else "no",
            str(p.micro_batch_size or "-"), fits, f"{p.gpu_hours:.3g}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(_totals(sweep, plans))
    lines.append(
        f"* GPU-hours: counted FLOPs at {MFU:.0%} MFU of an H100's bf16 peak (pipeline.sweep.spec.budget), an estimate"
    )
    if sweep.run.budget_gpu_hours is not None:
        lines.append(plan_line(sweep.run.budget_gpu_hours, [p.gpu_hours for p in plans], sweep.trial_count))
    return "\n".join(lines)


def _totals(sweep: Sweep, plans: list[TrialPlan]) -> str:
    fit = sum(p.fits is True for p in plans)
    fits = "" if all(p.fits is None for p in plans) else f", {fit} fit, {sum(p.fits is False for p in plans)} do not"
    hours = sum(p.gpu_hours for p in plans)
    peak = max(p.gpu_memory_gib for p in plans)
    what = "of the corners" if sweep.search.searched else "in all"
    return (
        f"total: {len(plans)} trial(s){fits}; largest step {peak:.2f} GiB a GPU; "
        f"{hours:.4g} GPU-hours {what} (estimate)"
    )


def plan_json(plans: list[TrialPlan]) -> str:
    return json.dumps([asdict(p) for p in plans], indent=2)


def show_plan(sweep: Sweep, as_json: bool, root: Path | None = None) -> str:
    """What `--plan` prints (text, or with as_json the JSON list)."""
    gpu = planned_gpu(sweep, root) if sweep.run.worker_gpus > 0 else None
    plans = plan_sweep(sweep, gpu)
    return plan_json(plans) if as_json else format_plan(sweep, plans, gpu)
