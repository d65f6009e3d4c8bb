"""The MLflow runs of a sweep, one per grid point, created by the driver before any trial starts.

Each holds the params (both configs, the preset, parameter count, FLOPs per frame, frame size) and
the tags (sweep, profile, sweep_id, the code's git commit), with the data as a dataset input; it
starts SCHEDULED, and its trial reattaches to it (TrialConfig.run_id), also after a retry or a resume.
Each is nested under the sweep's parent run (pipeline.sweep.record.parent).
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
from collections.abc import Mapping
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.record import tracking
from pipeline.sweep.spec.data_check import streams
from pipeline.sweep.spec.sweep import Point, Sweep

log = logging.getLogger(__name__)


def point_params(sweep: Sweep, point: Point, frame_hw: tuple[int, int]) -> dict[str, Any]:
    """The run's params: both configs (unprefixed: no field name is shared), the preset, the
    derived widths, the parameter count and the FLOPs of one frame at the frame size trained on."""
    import torch

    from vpn.model import VideoPixelNetwork, count_flops_per_frame

    h, w = frame_hw[0] // point.train.downsample, frame_hw[1] // point.train.downsample
    with torch.device("meta"):  # counts without memory or compute
        parameters = VideoPixelNetwork(point.model).num_parameters()
    params: dict[str, Any] = {**point.model.to_dict(), **point.train.to_dict()}
    params.update(
        preset=point.preset,
        row=point.axes.get("row"),
        preset_width_scale=sweep.search.preset_width_scale if sweep.search.preset else None,
        mu_channels=point.model.mu_channels,
        lstm_channels=point.model.lstm_channels,
        parameters=parameters,
        flops_per_frame=count_flops_per_frame(point.model, h, w),
        frame_height=h,
        frame_width=w,
        mode=sweep.mode,
        data_path=str(sweep.data),  # not `data`: that is TrainConfig's source, fixed or stream
        sample=point.sample,
    )
    if sweep.mode == "overfit":
        params.update({f"overfit_{k}": v for k, v in dataclasses.asdict(sweep.overfit).items()})
    return params


def point_tags(sweep: Sweep, point: Point, sweep_id: str, code: Mapping[str, str]) -> dict[str, str]:
    """The run's tags: where it belongs (sweep, profile, id, point), and the code's git tags."""
    return {
        tracking.TAG_SWEEP: sweep.name,
        tracking.TAG_PROFILE: sweep.profile,
        tracking.TAG_SWEEP_ID: sweep_id,
        tracking.TAG_POINT: str(point.index),
        tracking.TAG_LABEL: point.label,
        tracking.TAG_MODE: sweep.mode,
        tracking.TAG_SPEC: sweep.source,
        tracking.TAG_WORKERS: str(sweep.run.workers_per_trial),
        "mlflow.user": getpass.getuser(),  # MLflow's "User" column
        **code,
    }


def create_runs(
    client, experiment_id: str, sweep: Sweep, sweep_id: str, data_info: Mapping[str, Any], parent: str | None = None
) -> list[str]:
    """One SCHEDULED run per point, with the code's git commit and the data as a dataset input, nested
    under run `parent` (mlflow.parentRunId); runs left by an earlier start of this sweep id are
    deleted. Returns the run ids in grid order."""
    stale = tracking.sweep_runs(client, experiment_id, sweep_id)
    if stale:
        log.warning("sweep %s starts over: deleting %d MLflow run(s) of its earlier start", sweep_id, len(stale))
        for run in stale:
            tracking.retrying(client.delete_run, run.info.run_id)
    frame_hw = data_info["shape"][3:]
    code = tracking.git_tags(repo_root())
    profile = {
        "splits": data_info.get("shapes", {}),
        "identity_of": data_info.get("identity_of"),
        "train.data": "stream" if streams(sweep) else "fixed",
    }
    dataset = tracking.dataset_input(sweep.data, data_info["identity"], profile)
    run_ids = []
    for p in sweep.points:
        params, tags = point_params(sweep, p, frame_hw), point_tags(sweep, p, sweep_id, code)
        if parent is not None:
            tags[tracking.TAG_PARENT] = parent
        run_id = tracking.create_run(client, experiment_id, p.label, params, tags)
        tracking.retrying(client.log_inputs, run_id, datasets=[dataset])
        run_ids.append(run_id)
    return run_ids
