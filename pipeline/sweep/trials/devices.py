"""A GPU that Ray grants is used or refused, never silently skipped: what torch sees on a node, and the
one sentence that refuses a GPU it cannot use.

Ray counts GPUs from the node (nvidia-smi, `ray start --num-gpus`), torch from its own CUDA build and
the driver. The two disagree on a node with a CPU-only torch wheel, a torch built for a newer CUDA than
the driver, or an emptied CUDA_VISIBLE_DEVICES. There `train.device: auto` would train on the CPU
while the GPU sits reserved and idle, and `train.device: cuda` would fail every trial.

- `cuda_report`: what torch sees on this node (the node's address and host, torch's version and its
  CUDA build, the devices visible, CUDA_VISIBLE_DEVICES, the first GPU's name and memory). The
  driver's probe (pipeline.sweep.cluster.placement.probe_gpus) runs it on every GPU node before any
  run is created, and refuses the sweep on a node where torch sees no GPU.
- `require_usable_gpu`: a trial (or a data-parallel worker) granted a GPU checks it first, and fails
  at once with the same sentence (a node that joined after the probe, or a driver changed since).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any


class GPUUnusable(RuntimeError):
    """Ray granted (or offers) a GPU that torch on that node cannot use. The message names the node,
    the torch version and its CUDA build, and the fix."""


def cuda_report() -> dict[str, Any]:
    """What torch sees on this process's node, as plain values (a Ray task's answer)."""
    import torch

    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "node": _node_address(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,  # None: a CPU-only wheel
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "available": bool(torch.cuda.is_available()),
        "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "name": None,
        "total_memory": None,
    }
    if report["available"]:
        props = torch.cuda.get_device_properties(0)
        report.update(name=props.name, total_memory=int(props.total_memory))
    return report


def _node_address() -> str | None:
    """This node's address in the Ray cluster, where the process runs inside one."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # outside Ray (a test, a plain process): the host name says enough
        return None


def unusable_message(report: Mapping[str, Any], granted: str = "offers a GPU") -> str:
    """One sentence: the node, torch and its CUDA build, why it sees no GPU, and the fix."""
    where = f"node {report['node']} ({report.get('host')})" if report.get("node") else f"host {report.get('host')}"
    build = report.get("cuda_build")
    torch_is = f"torch {report.get('torch')} ({f'built for CUDA {build}' if build else 'a CPU-only build, no CUDA'})"
    visible = report.get("cuda_visible_devices")
    if not build:
        why, fix = "it has no CUDA", "install a CUDA build of torch there (https://pytorch.org/get-started/locally/)"
    elif visible is not None and not visible.strip():
        why, fix = "CUDA_VISIBLE_DEVICES is empty", "leave CUDA_VISIBLE_DEVICES to Ray on that node"
    else:
        why = "CUDA reports no usable device (an NVIDIA driver older than that CUDA build, or no driver)"
        fix = "update the NVIDIA driver there (nvidia-smi shows the CUDA it supports) or install a matching torch"
    return (
        f"Ray {granted} on {where}, but {torch_is} cannot use it: {why}; {fix}, or run the sweep's cpu "
        "profile (--profile cpu)"
    )


def require_usable_gpu(gpus: float) -> None:
    """Raise GPUUnusable when this process was granted `gpus` > 0 GPUs and torch sees none."""
    if gpus <= 0:
        return
    report = cuda_report()
    if not report["available"]:
        raise GPUUnusable(unusable_message(report, granted=f"granted this trial {gpus:g} GPU"))
