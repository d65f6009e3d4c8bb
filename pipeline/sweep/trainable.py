"""The Ray Tune trainable: one sweep trial, a thin wrapper around vpn.train.Trainer.

`trial(config)` runs one grid point. config["trial"] is the dict that pipeline.sweep built for the
point (see `trial_config`): the two configs, the absolute data path, the tracking URI and the id of
the MLflow run the driver created for this point.

Reporting, checkpointing and logging hang off the Trainer's hooks:
- every log_every steps the metrics go into a MetricBuffer (nothing is written yet);
- at a validation step (train mode) or a log step (overfit mode) the buffer is flushed to MLflow
  with one log_batch, and the metrics are reported to Tune (progress display, ASHA);
- every ckpt_every steps and at the end the Trainer's checkpoint (plus trial.json with the run id)
  is reported to Tune as a Checkpoint; the last one is also logged as the run's artifact
  checkpoint/checkpoint.pt, for sampling.
- at the end of a train-mode trial the test split is scored with the trial's own frame preparation
  (vpn.train.Trainer.score: model.nll over frames context..T-1, on train.test_sequences sequences or
  all): test_nats_per_frame, and the floor of exactly those frames, test_floor_nats_per_frame.
  A trial that ASHA stops early never reaches its end and has no test score.
- pictures (pipeline.sweep.pictures), for MLflow's image view: at each validation a train-mode trial
  draws run.sample_frames frames after the context of validation sequence 0 ("samples"); an overfit
  trial shows its reconstruction of the sequence ("reconstruction") at its first report, at each
  checkpoint and at its last step. A categorical head's NLLs are also logged in bits per sub-pixel.
- MLflow's system metrics (CPU, memory, disk, network, GPU) unless the spec turned them off
  (run.system_metrics).

Restarts. A trial retried after a crash, or resumed after the sweep was interrupted, restores the
Trainer from its last Tune checkpoint and reattaches to the same MLflow run. Steps the run already
holds are not logged again (MetricBuffer), so its curve has no gap and no duplicate.

Non-finite loss. Trainer raises NonFiniteLossError at the next host sync. The run is then marked
FAILED with tags error and non_finite_step, and the error is raised so that Ray marks the trial
ERROR; the other trials go on. A NaN is deterministic (same batches, same weights), so a retry
that finds its run failed this way raises again at once instead of training to the same NaN.

Data-parallel trials (run.workers_per_trial > 1, pipeline.sweep.distributed) run the same `run_trial` on
every Ray Train worker, with ray.train in place of ray.tune: rank 0 alone talks to MLflow and writes
the checkpoints, every rank reports (a barrier in Ray Train) and scores its share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.sweep import pictures, tracking
from vpn.config import TrainConfig, VPNConfig
from vpn.data import MovingMNIST, training_source
from vpn.evaluate import prepare
from vpn.overfit import sequence_floor
from vpn.train import NonFiniteLossError, Trainer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TRIAL_FILE = "trial.json"


class NonFiniteLoss(RuntimeError):
    """The trial's loss became NaN or infinite: vpn's NonFiniteLossError, with the MLflow run named."""


# Per-checkpoint INFO lines of Ray's storage module ("Checkpoint successfully created at: ..."), and
# MLflow's system-metrics start and stop lines: a sweep's console shows progress, not these.
QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage", "mlflow.system_metrics")


def quiet_framework_logs() -> None:
    """Raise the loggers in QUIET_LOGGERS to WARNING in this process (a trial's worker)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class TrialClosed(RuntimeError):
    """The trial's MLflow run was closed from outside (its trial stopped) while a worker still ran."""


def trial(config: Mapping[str, Any]) -> None:
    """Ray Tune function trainable for one grid point (config["trial"], from trial_config)."""
    from ray import tune

    quiet_framework_logs()
    cfg = config["trial"]
    ctx = tune.get_context()
    granted = dict(ctx.get_trial_resources().required_resources)  # e.g. {"CPU": 1.0, "GPU": 0.5}
    # Threads = the CPUs Ray granted this trial (trials share the node's cores).
    torch.set_num_threads(max(1, int(granted.get("CPU", 1))))
    tags = {
        tracking.TAG_TRIAL_ID: ctx.get_trial_id(),
        tracking.TAG_TRIAL_NAME: ctx.get_trial_name(),
        tracking.TAG_RESOURCES: json.dumps(granted, sort_keys=True),
    }
    run_trial(cfg, tune, tags)


def run_trial(cfg: Mapping[str, Any], session, tags: Mapping[str, Any], rank: int = 0) -> None:
    """Train one grid point in this process and record it (see the module docstring).

    session: ray.tune in a one-worker trial, ray.train on a worker of a data-parallel trial (the
    same report / get_checkpoint / Checkpoint). rank: this worker's rank; only rank 0 touches MLflow
    (tags set here, the run's status, its metrics) and writes checkpoints.
    """
    run_id = cfg["run_id"]
    client = buffer = None
    if rank == 0:
        client = tracking.client(cfg["tracking_uri"])
        run = tracking.retrying(client.get_run, run_id)
        refuse_known_non_finite(run)
        tags = dict(tags)
        if tracking.TAG_STARTED not in run.data.tags:  # the run was created when the sweep started
            tags[tracking.TAG_STARTED] = int(time.time() * 1000)
        tracking.set_tags(client, run_id, tags)
        tracking.retrying(client.update_run, run_id, status="RUNNING")
        buffer = tracking.MetricBuffer(client, run_id, after_step=tracking.last_logged_step(client, run_id))

    model_cfg = VPNConfig.from_dict(cfg["model"])
    train_cfg = TrainConfig.from_dict(cfg["train"])
    runner = _overfit if cfg["mode"] == "overfit" else _train
    monitor = _system_metrics(cfg) if cfg.get("system_metrics") else None
    try:
        runner(cfg, model_cfg, train_cfg, client, buffer, session)
    except NonFiniteLossError as err:
        if rank == 0:
            buffer.flush()  # the finite steps before it belong to the curve
            tracking.set_tags(client, run_id, {tracking.TAG_ERROR: str(err), tracking.TAG_NON_FINITE_STEP: err.step})
            tracking.retrying(client.set_terminated, run_id, status="FAILED")
        raise NonFiniteLoss(f"{err} (MLflow run {run_id})") from None
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(cfg: Mapping[str, Any]):
    """MLflow's system metrics monitor on the trial's run (a thread sampling CPU, memory, disk,
    network, and NVIDIA GPUs where nvidia-ml-py finds one, every 10 s); it stops itself once the run
    is no longer RUNNING. A resumed trial continues the run's system-metric steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(cfg["run_id"], resume_logging=True, tracking_uri=cfg["tracking_uri"])
    monitor.start()
    return monitor


def refuse_known_non_finite(run) -> None:
    """Raise NonFiniteLoss if the run already failed on a non-finite loss (it would again)."""
    run_id = run.info.run_id
    step = run.data.tags.get(tracking.TAG_NON_FINITE_STEP)
    if run.info.status == "FAILED" and step is not None:
        error = run.data.tags.get(tracking.TAG_ERROR, f"non-finite loss at step {step}")
        raise NonFiniteLoss(f"{error} (MLflow run {run_id}; not retrained: a non-finite loss is deterministic)")


def _restore(
    tune, fresh: Callable[[], Trainer], load: Callable[[Path], Trainer], client, run_id: str
) -> tuple[Trainer, dict[str, Any] | None]:
    """The Trainer from the trial's last Tune checkpoint and that checkpoint's trial.json, else a
    fresh Trainer and None. A restore is recorded on the run (tag resumed_from_step)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return fresh(), None
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / TRIAL_FILE).read_text())
        if meta["run_id"] != run_id:
            raise RuntimeError(f"checkpoint {checkpoint.path} belongs to MLflow run {meta['run_id']}, not {run_id}")
        trainer = load(Path(d) / CHECKPOINT_FILE)
    if client is not None:  # rank 0
        tracking.set_tags(client, run_id, {tracking.TAG_RESUMED_FROM: trainer.step})
    log.info("trial %s resumed from its checkpoint at step %d", meta.get("label"), trainer.step)
    return trainer, meta


class _Reporter:
    """Checkpoint saving, MLflow flushes and Tune reports of one trial, shared by both modes.

    client and buffer are None on the ranks > 0 of a data-parallel trial: they only report
    (every rank must, the same number of times) and write nothing.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        trainer: Trainer,
        client,
        buffer: tracking.MetricBuffer | None,
        tune,
        frame: Tensor,
    ) -> None:
        """frame: one prepared frame (C, H, W), the size the NLLs are per."""
        self.cfg, self.trainer, self.client, self.buffer, self.tune = cfg, trainer, client, buffer, tune
        self.run_id = cfg["run_id"]
        self.latest: dict[str, float] = {}
        self.fault = cfg.get("fault") or {}
        self.no_pictures = False
        # bits per sub-pixel beside nats per frame for the categorical head (tracking.with_bits)
        self.subpixels = frame.numel() if trainer.model_cfg.output == "categorical" else 0
        if client is not None:  # rank 0
            tracking.set_tags(client, self.run_id, {tracking.TAG_PRECISION: trainer.precision})

    def _with_bits(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        if not self.subpixels:
            return dict(metrics)
        finite = {k: v for k, v in metrics.items() if v is not None}
        return {**metrics, **tracking.with_bits(finite, self.subpixels)}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._maybe_die(step)
        metrics = self._with_bits(metrics)
        if self.buffer is not None:
            self.buffer.add(step, metrics)
        self.latest.update(metrics)

    def picture(self, step: int, key: str, draw: Callable[[], Any]) -> None:
        """Log draw()'s image under key at step, unless the run already holds that step (a restart).
        A picture that fails is reported once and not tried again: it must never cost the trial."""
        if self.client is None or step <= self.buffer.after_step or self.no_pictures:
            return  # ranks > 0 draw nothing: rank 0 logs the pictures
        try:
            tracking.log_image(self.client, self.run_id, draw(), key, step)
        except Exception as e:  # pictures are a view of the run, not its result
            log.warning("trial %s: no more %s pictures (step %d): %s", self.cfg["label"], key, step, e)
            self.no_pictures = True

    def report(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        if self.buffer is not None:
            self._flush()
        self.tune.report(self._result(step, extra))

    def _flush(self) -> None:
        # Workers of a data-parallel trial outlive a stop of their trial (ASHA ends the driver; Ray
        # takes the workers down a moment later): once the driver side has closed the run
        # (pipeline.sweep.callbacks.TrackingCallback), nothing more may reach it.
        if self.trainer.world_size > 1:
            status = tracking.retrying(self.client.get_run, self.run_id).info.status
            if status != "RUNNING":
                raise TrialClosed(f"MLflow run {self.run_id} is {status}: this trial was stopped; not logging")
        self.buffer.flush()

    def _result(self, step: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"step": step, **self.latest, **{k: v for k, v in (extra or {}).items() if v is not None}}

    def checkpoint(self, step: int, final: bool, extra: Mapping[str, Any] | None = None) -> None:
        """Save, flush, (at the end: artifact + FINISHED,) then report with the checkpoint."""
        extra = self._with_bits(extra) if extra else extra
        if self.client is None:  # a rank > 0: rank 0 writes the checkpoint
            self.tune.report(self._result(step, extra))
            return
        with tempfile.TemporaryDirectory(prefix="vpn-ckpt-") as d:
            self.trainer.save(Path(d) / CHECKPOINT_FILE)
            meta = {"run_id": self.run_id, "step": step, "label": self.cfg["label"], "final": final, **(extra or {})}
            (Path(d) / TRIAL_FILE).write_text(json.dumps(meta))
            self._flush()
            if final:
                for k, v in (extra or {}).items():
                    if v is not None:
                        tracking.retrying(self.client.log_metric, self.run_id, k, float(v), step=step)
                tracking.retrying(self.client.log_artifact, self.run_id, str(Path(d) / CHECKPOINT_FILE), "checkpoint")
                tracking.retrying(self.client.set_terminated, self.run_id, status="FINISHED")
            self.tune.report(self._result(step, extra), checkpoint=self.tune.Checkpoint.from_directory(d))

    def _maybe_die(self, step: int) -> None:
        # Test hooks (never set by a spec), each once per marker file:
        # kill_at_step: on rank fault["rank"] (default 0), write the step to fault["marker"] and
        #   SIGKILL this worker, like a lost node.
        # hold_at_step: on that rank, write {"node_id", "pid", "step"} to fault["marker"] and wait
        #   (hold_s, default 300 s), so that a test can kill this worker's node at a known step.
        # kill_driver_at_step: on rank 0 of a data-parallel trial, SIGKILL the trial's driver
        #   (fault["driver_pid"], set by pipeline.sweep.distributed.driver), then wait to be torn down.
        fault, rank = self.fault, self.trainer.rank
        if fault.get("kill_driver_at_step") == step and rank == 0 and _first_to(fault["driver_marker"], str(step)):
            os.kill(fault["driver_pid"], signal.SIGKILL)
            _hold(float(fault.get("hold_s", 300)))
        if rank != fault.get("rank", 0) or step not in (fault.get("kill_at_step"), fault.get("hold_at_step")):
            return
        if fault.get("kill_at_step") == step:
            if _first_to(fault["marker"], str(step)):
                os.kill(os.getpid(), signal.SIGKILL)
            return
        import ray

        note = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "step": step}
        if _first_to(fault["marker"], json.dumps(note)):
            _hold(float(fault.get("hold_s", 300)))


def _first_to(path: str, text: str) -> bool:
    """Create `path` holding `text`, atomically; False if it exists (another worker, or an earlier try)."""
    marker = Path(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, marker)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _hold(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)


def test_metrics(trainer: Trainer, data_root: str) -> dict[str, float]:
    """The test split scored as the paper scores it, with its floor (see the module docstring)."""
    result = trainer.score(MovingMNIST(data_root, "test"), trainer.cfg.test_sequences)
    metrics = {tracking.TEST_KEY: result.nats_per_frame, tracking.TEST_SEQUENCES_KEY: float(result.sequences)}
    if result.floor_nats_per_frame is not None:
        metrics[tracking.TEST_FLOOR_KEY] = result.floor_nats_per_frame
    return metrics


def _train(cfg, model_cfg: VPNConfig, train_cfg: TrainConfig, client, buffer, tune) -> None:
    # fixed: the data stage's train.npy; stream: fresh sequences from its training digits.
    train_data = training_source(cfg["data"], train_cfg.data, train_cfg.seed)
    val_data = MovingMNIST(cfg["data"], "val")
    trainer, _ = _restore(
        tune,
        lambda: Trainer(model_cfg, train_cfg, train_data, val_data),
        lambda p: Trainer.from_checkpoint(p, train_data, val_data),
        client,
        cfg["run_id"],
    )
    shown = prepare(val_data[0][None], train_cfg)[0]  # (T, C, H, W): validation sequence 0 as trained on
    rep = _Reporter(cfg, trainer, client, buffer, tune, shown[0])
    until = train_cfg.steps
    context = train_cfg.context
    n_sampled = min(cfg.get("sample_frames", 0), len(shown) - context)

    def is_checkpoint(step: int) -> bool:  # the Trainer's own rule for calling on_checkpoint
        return step == until or bool(train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0)

    def samples():  # the same sequence and seed at every validation: only the weights differ
        return pictures.sample_strip(trainer.model, shown, context, n_sampled, seed=train_cfg.seed)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        rep.log(step, metrics)
        if tracking.VAL_KEY in metrics and n_sampled > 0:
            rep.picture(step, pictures.SAMPLES_KEY, samples)
        if tracking.VAL_KEY in metrics and not is_checkpoint(step):
            rep.report(step)

    def on_checkpoint(step: int) -> None:
        final = step == until
        rep.checkpoint(step, final=final, extra=test_metrics(trainer, cfg["data"]) if final else None)

    if trainer.step >= until:  # restored from the final checkpoint: nothing left but the bookkeeping
        rep.checkpoint(trainer.step, final=True, extra=test_metrics(trainer, cfg["data"]))
        return
    trainer.fit(until, on_log=on_log, on_checkpoint=on_checkpoint, progress=False)


def _overfit(cfg, model_cfg: VPNConfig, train_cfg: TrainConfig, client, buffer, tune) -> None:
    """The blog post's experiment with checkpoints: one sequence, the loss of every step logged,
    stopping at the first step within tol of the sequence's floor (as vpn.train.overfit)."""
    settings = cfg["overfit"]
    data = MovingMNIST(cfg["data"], settings["split"])
    seq = prepare(data[settings["index"]][None], train_cfg)[0]  # (T, C, H, W) after seq_len/downsample
    floor = sequence_floor(model_cfg, seq)
    tol = settings["tol_per_subpixel"] * seq[0].numel()
    batch = seq[None]  # (1, T, C, H, W): the same batch every step
    # seq is already cut and pooled: the Trainer must not do it again.
    inner = train_cfg.replace(batch_size=1, seq_len=None, downsample=1, data="fixed")
    trainer, meta = _restore(
        tune,
        lambda: Trainer(model_cfg, inner, batch),
        lambda p: Trainer.from_checkpoint(p, batch),
        client,
        cfg["run_id"],
    )
    tracking.set_tags(
        client, cfg["run_id"], {"floor_nats_per_frame": f"{floor:.6f}", "tol_nats_per_frame": f"{tol:.6f}"}
    )
    rep = _Reporter(cfg, trainer, client, buffer, tune, seq[0])
    if meta is not None and meta.get("final"):  # restored from its final checkpoint: only bookkeeping left
        _finish_overfit(rep, client, cfg["run_id"], trainer.step, meta.get("converged_step"))
        return
    show = cfg.get("sample_frames", 0) > 0  # the same switch as the train mode's samples

    def reconstruction():
        return pictures.reconstruction_strip(trainer.model, seq)

    steps, every, ckpt_every = train_cfg.steps, train_cfg.log_every, train_cfg.ckpt_every
    tick, tick_step = time.perf_counter(), trainer.step
    converged: int | None = None
    while trainer.step < steps:
        loss = float(trainer.train_step(batch))  # a host sync per step: this is a diagnostic
        step = trainer.step
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, loss)
        metrics = {tracking.TRAIN_KEY: loss}
        if loss <= floor + tol:
            converged = step
        if step % every == 0 or step == steps or converged:
            now = time.perf_counter()
            metrics[tracking.SPEED_KEY] = (step - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, step
        rep.log(step, metrics)
        final = converged is not None or step == steps
        if show and (final or step == every or (ckpt_every and step % ckpt_every == 0)):
            rep.picture(step, pictures.RECONSTRUCTION_KEY, reconstruction)
        if final:
            _finish_overfit(rep, client, cfg["run_id"], step, converged)
            return
        if ckpt_every and step % ckpt_every == 0:
            rep.checkpoint(step, final=False)
        elif step % every == 0:
            rep.report(step)


def _finish_overfit(rep: _Reporter, client, run_id: str, step: int, converged: int | None) -> None:
    # Tagged before the run is marked FINISHED, so a finished run always says whether it converged.
    tracking.set_tags(client, run_id, {"converged": str(converged is not None).lower()})
    rep.checkpoint(step, final=True, extra={"converged_step": converged})
