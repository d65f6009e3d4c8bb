"""What a sweep trial's MLflow extras cost: its pictures, MLflow's system metrics, and the outbox
that holds a trial's metrics through a tracking-server outage.

    python -m benchmarks.bench_tracking --out benchmarks/results/tracking_cpu.json
    python -m benchmarks.bench_tracking --parts logging --out benchmarks/results/tracking_logging_cpu.json

The trial is one of the default pipeline's (sweeps/depth_width.yaml, cpu profile: 16x16 frames pooled
from 64x64, 6-frame clips, context 3, batch 8, 200 steps, validation every 50 steps on 4 batches),
on one thread as Ray grants it, logging to a temporary SQLite store as the sweeps do. Synthetic
frames: the cost does not depend on what they show.

1. samples: a training step, a validation (Trainer.evaluate) and one picture (pipeline.sweep.record.pictures.
   sample_strip, `--sample-frames` frames drawn after the context by the cached sampler, then
   tracking.log_image), timed interleaved. A trial's share = V x picture / (S x step + V x
   (validation + picture)), with S steps and V validations.
2. reconstruction (overfit mode): one reconstruction_strip + log_image, against one overfit step
   (batch 1) and the steps between two pictures (the overfit spec's ckpt_every).
3. system metrics (MLflow's monitor: CPU, memory, disk, network, GPU where nvidia-ml-py finds one):
   one sample (collect_metrics) and one publish (log_batch of what it aggregated), timed directly, as a
   share of its 10 s interval; and training steps/s in windows with the monitor running (sampling
   every 10 s, and every 1 s) against without it, interleaved.
4. logging (issue 28): the per-step logging path with the server up, before (the MetricBuffer of
   commit a60b36c, restated here as LegacyBuffer: metrics held until a report, one log_batch) and
   after (pipeline.sweep.record.outbox.Outbox: the same, plus a checkpoint's save of what is
   pending), interleaved, on two runs of one store: a local `mlflow server` on loopback (the
   cluster's path, `--logging-store server`) or the SQLite file (`sqlite`). A repeat logs
   `--log-steps` steps as the cpu profile does (train NLL and speed every log_every = 10 steps, the
   validation NLL every 50, a flush at each validation and a save at each checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, interleaved, markdown_table, median, paired_ratio, write_json
from pipeline.sweep.record import outage, outbox, pictures, tracking
from vpn import VPNConfig
from vpn.config import TrainConfig
from vpn.evaluate import prepare
from vpn.train import Trainer

log = logging.getLogger("bench_tracking")

# The cpu profile of sweeps/depth_width.yaml (train section) and its best and slowest configs.
CPU_TRAIN = {"steps": 200, "batch_size": 8, "lr": 1e-3, "seq_len": 6, "context": 3, "downsample": 4, "log_every": 10,
                 "val_every": 50, "val_batches": 4, "ckpt_every": 100, "device": "cpu"}  # fmt: skip
CONFIGS = {"e1-d3-f0.0625": (1, 3, 0.0625), "e4-d6-f0.0625": (4, 6, 0.0625)}


def synthetic(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 20, 1, 64, 64): sparse bright pixels, the shape of the data stage's sequences."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 20, 1, 64, 64, generator=g) < 0.1).to(torch.uint8) * 255


def bench_samples(label: str, args: argparse.Namespace, client, run_id: str) -> dict[str, Any]:
    enc, dec, frac = CONFIGS[label]
    model_cfg = VPNConfig(enc_blocks=enc, dec_blocks=dec, filter_fraction=frac, output="bernoulli")
    cfg = TrainConfig(**CPU_TRAIN)
    train, val = synthetic(64, 0), synthetic(32, 1)
    trainer = Trainer(model_cfg, cfg, train, val)
    batch = train[: cfg.batch_size]
    shown = prepare(val[:1], cfg)[0]  # (6, 1, 16, 16)
    frames = min(args.sample_frames, len(shown) - cfg.context)
    step = {"n": 0}

    def picture() -> None:
        step["n"] += 1
        image = pictures.sample_strip(trainer.model, shown, cfg.context, frames, seed=0)
        tracking.log_image(client, run_id, image, pictures.SAMPLES_KEY, step["n"])

    times = interleaved(
        {"train_step": lambda: trainer.train_step(batch), "validation": trainer.evaluate, "picture": picture},
        torch.device("cpu"), args.repeats,
    )  # fmt: skip
    t_step, t_val, t_pic = (median(times[k]) for k in ("train_step", "validation", "picture"))
    validations = cfg.steps // cfg.val_every
    trial = cfg.steps * t_step + validations * (t_val + t_pic)
    return {
        "config": label, "frames_sampled": frames, "frame": "16x16", "step_s": t_step, "validation_s": t_val,
        "picture_s": t_pic, "validations": validations, "trial_s_estimate": trial,
        "picture_share_of_trial": validations * t_pic / trial, "times_s": times,
    }  # fmt: skip


def bench_reconstruction(args: argparse.Namespace, client, run_id: str) -> dict[str, Any]:
    """presets_overfit's cpu profile: mini at an eighth of its width (c = 4), one 16x16 sequence of 6 frames."""
    model_cfg = VPNConfig.preset("mini", filter_fraction=0.25 * 0.125, output="bernoulli")
    cfg = TrainConfig(batch_size=1, lr=3e-4, device="cpu", context=1)
    seq = prepare(synthetic(1, 2), TrainConfig(seq_len=6, downsample=4, context=1))[0]
    trainer = Trainer(model_cfg, cfg, seq[None])
    step = {"n": 0}

    def picture() -> None:
        step["n"] += 1
        tracking.log_image(
            client, run_id, pictures.reconstruction_strip(trainer.model, seq), pictures.RECONSTRUCTION_KEY, step["n"]
        )

    times = interleaved(
        {"overfit_step": lambda: trainer.train_step(seq[None]), "picture": picture}, torch.device("cpu"), args.repeats
    )
    t_step, t_pic = median(times["overfit_step"]), median(times["picture"])
    return {"config": "mini x 0.125 (overfit)", "step_s": t_step, "picture_s": t_pic,
            "picture_share_per_500_steps": t_pic / (500 * t_step + t_pic), "times_s": times}  # fmt: skip


def bench_system_metrics(args: argparse.Namespace, client, uri: str, run_id: str) -> dict[str, Any]:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    collect = []
    for _ in range(20):
        start = time.perf_counter()
        monitor.collect_metrics()
        collect.append(time.perf_counter() - start)
    start = time.perf_counter()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
    publish = time.perf_counter() - start

    # Training windows with and without the monitor's thread, interleaved.
    enc, dec, frac = CONFIGS["e1-d3-f0.0625"]
    trainer = Trainer(VPNConfig(enc_blocks=enc, dec_blocks=dec, filter_fraction=frac, output="bernoulli"),
                      TrainConfig(**CPU_TRAIN), synthetic(64, 0))  # fmt: skip
    batch = synthetic(8, 3)
    trainer.train_step(batch)
    start = time.perf_counter()
    for _ in range(5):
        trainer.train_step(batch)
    steps = max(1, round(args.window_s / ((time.perf_counter() - start) / 5)))

    cpu: dict[str, list[float]] = {"off": [], "every_10s": [], "every_1s": []}

    def window(name: str, interval: float | None):
        def run() -> None:
            start = time.process_time()  # CPU seconds of this process, every thread: what the monitor adds
            watcher = None
            if interval is not None:
                watcher = SystemMetricsMonitor(
                    run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri
                )
                watcher.start()
            try:
                for _ in range(steps):
                    trainer.train_step(batch)
            finally:
                if watcher is not None:
                    watcher.finish()
                cpu[name].append(time.process_time() - start)

        return run

    windows = {"off": window("off", None), "every_10s": window("every_10s", 10.0), "every_1s": window("every_1s", 1.0)}
    times = interleaved(windows, torch.device("cpu"), args.system_repeats, warmup=0)
    return {
        "collect_s": median(collect), "publish_s": publish, "monitors": [type(m).__name__ for m in monitor.monitors],
        "share_of_10s_interval": (median(collect) + publish) / 10.0, "window_steps": steps,
        "window_s": {k: median(v) for k, v in times.items()},
        "slowdown_every_10s": 1 / paired_ratio(times["off"], times["every_10s"]),
        "slowdown_every_1s": 1 / paired_ratio(times["off"], times["every_1s"]), "times_s": times,
        "cpu_s": cpu, "cpu_ratio_every_10s": paired_ratio(cpu["every_10s"], cpu["off"]),
        "cpu_ratio_every_1s": paired_ratio(cpu["every_1s"], cpu["off"]),
    }  # fmt: skip


class LegacyBuffer:
    """Today's path before issue 28 (tracking.MetricBuffer at commit a60b36c): metrics held until
    flush(), then log_batch in chunks of 1000, retried only on SQLite's "database is locked"."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id, self.after_step = client, run_id, 0
        self._pending: list = []

    def add(self, step: int, metrics) -> None:
        from mlflow.entities import Metric

        if step <= self.after_step:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), tracking.MAX_METRICS_PER_BATCH):
            for attempt in range(8):
                try:
                    self.client.log_batch(self.run_id, metrics=pending[i : i + tracking.MAX_METRICS_PER_BATCH])
                    break
                except Exception as e:
                    if "database is locked" not in str(e) or attempt == 7:
                        raise
                    time.sleep(0.1 * 2**attempt)
        if pending:
            self.after_step = max(self.after_step, max(m.step for m in pending))


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (a free port), SQLite and artifacts in root; yields its URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (root / "server.log").open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not outage.probe(uri):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def bench_logging(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    """Per logged step: LegacyBuffer against the Outbox, interleaved, each on a run of its own."""
    client = tracking.client(uri)
    exp = tracking.ensure_experiment(client, "bench_logging", uri)
    runs = {name: client.create_run(exp).info.run_id for name in ("before", "after")}
    boxes = {"before": LegacyBuffer(client.once, runs["before"]), "after": outbox.Outbox(client, runs["after"], uri)}
    every, val_every, ckpt_every = CPU_TRAIN["log_every"], CPU_TRAIN["val_every"], CPU_TRAIN["ckpt_every"]
    start = {name: 0 for name in boxes}  # each repeat continues its run's steps

    def variant(name: str):
        box = boxes[name]

        def run() -> None:
            with tempfile.TemporaryDirectory() as ckpt:
                for i in range(1, args.log_steps + 1):
                    step = start[name] + i * every
                    metrics = {tracking.TRAIN_KEY: 1.0 / i, tracking.SPEED_KEY: 6.6}
                    if step % val_every == 0:
                        metrics[tracking.VAL_KEY] = 1.1 / i
                    box.add(step, metrics)
                    if step % val_every == 0:
                        box.flush()
                    if name == "after" and step % ckpt_every == 0:
                        box.save(Path(ckpt))
                box.flush()
            start[name] += args.log_steps * every

        return run

    times = interleaved({name: variant(name) for name in boxes}, torch.device("cpu"), args.repeats)
    per_step = {name: median(t) / args.log_steps for name, t in times.items()}
    for name, run_id in runs.items():  # every step reached the run, once
        steps = [m.step for m in client.get_metric_history(run_id, tracking.TRAIN_KEY)]
        assert steps == sorted(set(steps)) and len(steps) == (args.repeats + 1) * args.log_steps, name
    return {"store": args.logging_store, "log_steps": args.log_steps, "per_step_s": per_step,
            "after_over_before": paired_ratio(times["after"], times["before"]), "times_s": times}  # fmt: skip


PARTS = ("samples", "reconstruction", "system", "logging")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to time (default: all)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument(
        "--sample-frames", type=int, default=1, help="frames drawn per picture (the sweeps' run.sample_frames)"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--system-repeats", type=int, default=3, help="training windows per variant for the system metrics")
    p.add_argument("--window-s", type=float, default=20.0, help="seconds of training per window")
    p.add_argument("--log-steps", type=int, default=200, help="logged steps a repeat of the logging part")
    p.add_argument("--logging-store", default="server", choices=("server", "sqlite"))
    p.add_argument("--out", default="benchmarks/results/tracking_cpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # a cpu-profile trial runs on the one CPU Ray grants it
    device = torch.device("cpu")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = tracking.client(uri)
        exp = tracking.ensure_experiment(client, "bench", uri)
        run_id = client.create_run(exp).info.run_id  # RUNNING, as a trial's run
        if "samples" in args.parts:
            out["samples"] = [bench_samples(label, args, client, run_id) for label in args.configs]
        if "reconstruction" in args.parts:
            out["reconstruction"] = bench_reconstruction(args, client, run_id)
        if "system" in args.parts:
            out["system_metrics"] = bench_system_metrics(args, client, uri, run_id)
        if "logging" in args.parts:
            with contextlib.ExitStack() as stack:
                store = stack.enter_context(mlflow_server(Path(tmp))) if args.logging_store == "server" else uri
                out["logging"] = bench_logging(args, store)
    env = environment(device)
    print(f"\n{env['device']}; one thread, SQLite store\n")
    report(out)
    write_json({"environment": env, "args": vars(args), **out}, Path(args.out))
    print(f"\nwrote {args.out}")
    return 0


def report(out: dict[str, Any]) -> None:
    """The parts timed, as markdown and lines."""
    if "samples" in out:
        columns = ["config", "frames_sampled", "step_s", "validation_s", "picture_s", "picture_share_of_trial"]
        print(markdown_table(out["samples"], columns))
    if recon := out.get("reconstruction"):
        print(
            f"\nreconstruction: {recon['picture_s']:.3f} s a picture, overfit step {recon['step_s']:.4f} s: "
            f"{recon['picture_share_per_500_steps']:.2%} of 500 steps"
        )
    if system := out.get("system_metrics"):
        print(
            f"\nsystem metrics: one sample {system['collect_s'] * 1e3:.1f} ms + publish "
            f"{system['publish_s'] * 1e3:.1f} ms = {system['share_of_10s_interval']:.3%} of its 10 s interval "
            f"({', '.join(system['monitors'])}); "
            f"{system['window_steps']} steps a window: {system['window_s']['off']:.1f} s off, "
            f"{system['window_s']['every_10s']:.1f} s sampling every 10 s ({system['slowdown_every_10s'] - 1:+.1%}), "
            f"{system['window_s']['every_1s']:.1f} s every 1 s ({system['slowdown_every_1s'] - 1:+.1%}); CPU time of "
            f"the process: {system['cpu_ratio_every_10s'] - 1:+.1%} (every 10 s), "
            f"{system['cpu_ratio_every_1s'] - 1:+.1%} (every 1 s)"
        )
    if logged := out.get("logging"):
        before, after = (logged["per_step_s"][k] * 1e6 for k in ("before", "after"))
        print(
            f"\nlogging ({logged['store']}): {before:.0f} us a logged step before (MetricBuffer), {after:.0f} us "
            f"after (Outbox): after / before {logged['after_over_before']:.3f} (median of paired repeats)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
