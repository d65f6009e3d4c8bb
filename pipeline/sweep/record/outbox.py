"""What a trial sends to its MLflow run, held while the tracking server is away, and sent once.

A trial trains on whether or not the server answers (pipeline.sweep.record.outage). Its Outbox holds
- the per-step metrics (`add`; steps the run already held when the trial started are dropped, so a
  trial restarted from an older checkpoint re-trains them without logging them again) and the
  metrics of its end (`add_metrics`);
- its pictures (`add_picture`: the PNG, under artifact names fixed when it was drawn);
- and, in an Outbox of their own, MLflow's system metrics (`SystemMetrics`).

Sending. `flush()` sends what is pending (pictures first, then metrics in log_batch calls of at
most 1000, cut between steps). If the server is away, everything stays pending and flush returns:
the trial trains on. No new try comes before a back-off (0.1 s doubling to 30 s) has passed and the
server answers a 2 s GET /health, so an outage costs the training thread one failed call (about 3 s
for a refused connection: outage.HTTP_DEFAULTS) and then a probe at most every 30 s.
`flush(wait=True)` (a trial's end, a non-finite loss) waits for the server for at most the trial's
wait (outage.wait_s, VPN_TRACKING_WAIT_S) and then raises outage.TrackingUnavailable: the trial
fails, and its next start sends what its last checkpoint holds. A full outbox (LIMIT metrics or
PICTURE_LIMIT pictures) waits the same way, so memory stays bounded.

Exactly once.
- A send that failed may still have landed, wholly or in part (the server died after writing, before
  answering). Before sending again, the outbox reads the last step the run holds of every key
  (`held_steps`: MLflow keeps each key's value at its largest step as the run's latest metric) and
  drops what is there. A key's steps are sent in increasing order and a batch holds whole steps, so
  "up to the last step held" is exactly what landed. (MLflow's SQL stores also ignore a metric sent
  again with the same key, step, timestamp and value; its timestamp is fixed when it is added.)
- A picture's files (MLflow's log_image layout, which its image view reads:
  images/<key>+step+<step>+timestamp+<ms>+<uuid>.png and its +compressed.webp) are named when it is
  drawn, so a picture sent again overwrites its own files. Pictures go before the metrics of their
  step: a run holding step s's metrics holds every picture up to s.
- `save(folder)` writes what is pending into a checkpoint's folder and `load(folder)` reads it back
  on a restart, to be checked against the server as above before it is sent.

System metrics. MLflow's SystemMetricsMonitor ends its thread at the first failed call, for good.
`SystemMetrics` uses MLflow's own samplers (CPU, memory, disk, network, NVIDIA or AMD GPUs) in a
thread of ours, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default), logged as
system/<name> with step = whole seconds since the run was created (or the step after the last, for
samples less than a second apart): a restarted trial continues the series without asking where it
stopped, and no two samples share a step. Its samples wait in its Outbox through an outage; they are
sent from the trial's first report on (a restarted trial has read its checkpoint by then), and
sampling stops once the run is no longer RUNNING.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from pipeline.sweep.record import outage
from pipeline.sweep.record.tracking import MAX_METRICS_PER_BATCH

log = logging.getLogger(__name__)

LIMIT = 200_000  # metrics held at most (about 30 MB of them); past it, a flush waits for the server
PICTURE_LIMIT = 200
WAIT_POLL_S = 2.0  # how often a waiting flush asks whether the server is back
SYSTEM_PREFIX = "system/"
LOGGED_IMAGES_TAG = "mlflow.loggedImages"  # MLflow's tag on a run holding log_image pictures


def _now_ms() -> int:
    return int(time.time() * 1000)


def held_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step of every metric run_id holds (its latest metrics, MLflow's largest step per key:
    RunData._metric_objs, which MLflow's own system-metrics monitor reads to resume)."""
    return {m.key: m.step for m in client.get_run(run_id).data._metric_objs}


@dataclass(frozen=True, eq=False)
class Picture:
    """One picture on its way: its PNG and the artifact names it will have."""

    key: str
    step: int
    timestamp: int
    uid: str
    png: bytes

    @classmethod
    def of(cls, key: str, step: int, image: Any) -> Picture:
        """image: a PIL image."""
        buffer = BytesIO()
        image.save(buffer, format="PNG")
        return cls(key, step, _now_ms(), str(uuid.uuid4()), buffer.getvalue())

    @property
    def stem(self) -> str:
        return f"{self.key.replace('/', '~')}+step+{self.step}+timestamp+{self.timestamp}+{self.uid}"

    def write(self, folder: Path) -> None:
        """The two files MLflow's image view reads, in folder/images/."""
        from mlflow.tracking.multimedia import compress_image_size
        from PIL import Image

        images = folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        (images / f"{self.stem}.png").write_bytes(self.png)
        compress_image_size(Image.open(BytesIO(self.png))).save(images / f"{self.stem}+compressed.webp")


class Outbox:
    """A run's metrics and pictures on their way to MLflow (see the module docstring).

    after_step: steps up to this one are already in the run (logged before a restart): add() drops
    them. name: the checkpoint's files of this outbox (pending_<name>.json, pending_<name>/).
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        uri: str | None = None,
        after_step: int = 0,
        wait: float | None = None,
        limit: int = LIMIT,
        name: str = "trial",
        origin_ms: int | None = None,
    ) -> None:
        self.client = outage.bare(client)  # its calls must not wait: the outbox does
        self.run_id, self.uri, self.after_step, self.name = run_id, uri, after_step, name
        self.wait, self.limit = outage.wait_s(wait), limit
        self.origin_ms = origin_ms if origin_ms is not None else _now_ms()  # system metrics' step 0
        self.pictures_off = False  # a picture failed for a reason other than an outage: no more
        self.system: SystemMetrics | None = None
        self._metrics: list[Metric] = []
        self._pictures: list[Picture] = []
        self._added = after_step  # the last step add() took
        self._unsure = False  # the server may hold part of what is pending: check before sending
        self._away = False
        self._retry_at = 0.0
        self._backoff = outage.Backoff()
        self._tagged = False
        self._lock = threading.Lock()  # SystemMetrics' thread adds and sends while the trial saves

    # -- what goes in --------------------------------------------------------------------------
    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """One logged step's metrics (dropped if the run held the step when the trial started)."""
        if step <= self.after_step:
            return
        now = _now_ms()
        with self._lock:
            self._metrics += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._added = max(self._added, step)

    def add_metrics(self, metrics: Iterable[Metric]) -> None:
        with self._lock:
            self._metrics += list(metrics)

    def add_picture(self, key: str, step: int, image: Any) -> None:
        if not self.pictures_off:
            picture = Picture.of(key, step, image)
            with self._lock:
                self._pictures.append(picture)

    def __len__(self) -> int:
        return len(self._metrics) + len(self._pictures)

    @property
    def away(self) -> bool:
        """Whether the last send found the server away (and nothing has been sent since)."""
        return self._away

    # -- sending -------------------------------------------------------------------------------
    def flush(self, wait: bool = False) -> bool:
        """Send what is pending; True when nothing is left. See the module docstring for `wait`."""
        if self.system is not None:
            self.system.ready.set()  # from the first report on: a restarted trial has loaded its checkpoint
        deadline = None
        while True:
            if not len(self) or self._try():
                return True
            if not (wait or len(self._metrics) > self.limit or len(self._pictures) > PICTURE_LIMIT):
                return False
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait
                log.warning(
                    "MLflow run %s: waiting up to %.0f s (%s) for the tracking server to take %d metric(s) and %d "
                    "picture(s)", self.run_id, self.wait, outage.WAIT_ENV, len(self._metrics), len(self._pictures),
                )  # fmt: skip
            if now >= deadline:
                raise outage.TrackingUnavailable(
                    f"MLflow run {self.run_id}: the tracking server at {self.uri} did not come back within "
                    f"{self.wait:.0f} s ({outage.WAIT_ENV}); {len(self._metrics)} metric(s) and "
                    f"{len(self._pictures)} picture(s) stay in the trial's last checkpoint"
                )
            time.sleep(max(0.05, min(WAIT_POLL_S, deadline - now)))
            if outage.probe(self.uri):  # waiting, the trial does nothing else: back within seconds
                self.retry_now()

    def _try(self) -> bool:
        """One try, unless the back-off says not yet or the server does not answer its probe; True when
        everything was sent."""
        now = time.monotonic()
        if self._away and (now < self._retry_at or not outage.probe(self.uri)):
            if now >= self._retry_at:
                self._retry_at = now + self._backoff.next()
            return False
        try:
            self._send()
        except Exception as e:
            if not outage.server_away(e):
                raise
            self._unsure = True
            if not self._away:
                log.warning(
                    "MLflow run %s: the tracking server does not answer (%s); holding %d metric(s) and %d picture(s) "
                    "and training on", self.run_id, outage.short(e), len(self._metrics), len(self._pictures),
                )  # fmt: skip
            self._away = True
            self._retry_at = time.monotonic() + self._backoff.next()
            return False
        if self._away:
            log.warning("MLflow run %s: the tracking server answers again; everything held was sent", self.run_id)
        self._away, self._backoff = False, outage.Backoff()
        return True

    def _send(self) -> None:
        """Everything pending, in order: a check against the server first if unsure, pictures, metrics."""
        while True:
            if self._unsure:
                held = held_steps(self.client, self.run_id)
                with self._lock:
                    self._metrics = [m for m in self._metrics if m.step > held.get(m.key, -1)]
                    self._unsure = False
                continue
            with self._lock:
                picture = self._pictures[0] if self._pictures else None
                chunk = None if picture is not None else self._head()
            if picture is not None:
                self._send_picture(picture)
            elif chunk:
                self.client.log_batch(self.run_id, metrics=chunk)
                sent = {id(m) for m in chunk}
                with self._lock:
                    self._metrics = [m for m in self._metrics if id(m) not in sent]
            else:
                self.after_step = max(self.after_step, self._added)
                return

    def _head(self) -> list[Metric]:
        """The first pending metrics for one log_batch: at most MAX_METRICS_PER_BATCH, ending between
        two steps (a step with more than that many metrics is cut)."""
        pending = self._metrics
        if len(pending) <= MAX_METRICS_PER_BATCH:
            return list(pending)
        end = MAX_METRICS_PER_BATCH
        while end > 0 and pending[end].step == pending[end - 1].step:
            end -= 1
        return pending[: end or MAX_METRICS_PER_BATCH]

    def _send_picture(self, picture: Picture) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="vpn-picture-") as d:
                picture.write(Path(d))
                self.client.log_artifacts(self.run_id, d)
            if not self._tagged:
                self.client.set_tag(self.run_id, LOGGED_IMAGES_TAG, "True")  # as MlflowClient.log_image sets it
                self._tagged = True
        except Exception as e:
            if outage.server_away(e):
                raise
            # pictures are a view of the run, not its result: one that fails otherwise ends them
            log.warning("MLflow run %s: no more pictures (%s, step %d): %s", self.run_id, picture.key, picture.step, e)
            self.pictures_off = True
            with self._lock:
                self._pictures.clear()
            return
        with self._lock:
            self._pictures = [p for p in self._pictures if p is not picture]

    def retry_now(self) -> None:
        """The next flush tries at once (after its probe), whatever the back-off said."""
        self._retry_at = 0.0

    def status(self) -> str | None:
        """The run's status, or None while the server is away (a trial trains on meanwhile)."""
        if self._away and not outage.probe(self.uri):
            return None
        try:
            return self.client.get_run(self.run_id).info.status
        except Exception as e:
            if outage.server_away(e):
                return None
            raise

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """What is still pending, into a checkpoint's folder (nothing when nothing is), the system
        metrics' too."""
        if self.system is not None:
            self.system.outbox.save(folder)
        with self._lock:
            metrics, pictures = list(self._metrics), list(self._pictures)
        if not metrics and not pictures:
            return
        for p in pictures:
            (folder / f"pending_{self.name}").mkdir(exist_ok=True)
            (folder / f"pending_{self.name}" / f"{p.uid}.png").write_bytes(p.png)
        held = {
            "run_id": self.run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
            "pictures": [{"key": p.key, "step": p.step, "timestamp": p.timestamp, "uid": p.uid} for p in pictures],
        }
        (folder / f"pending_{self.name}.json").write_text(json.dumps(held))

    def load(self, folder: Path) -> None:
        """What a checkpoint's folder holds for this outbox (and the system metrics'), before anything
        pending: checked against the server before it is sent."""
        if self.system is not None:
            self.system.outbox.load(folder)
        path = folder / f"pending_{self.name}.json"
        if not path.is_file():
            return
        held = json.loads(path.read_text())
        if held["run_id"] != self.run_id:
            raise RuntimeError(f"{path} holds metrics of MLflow run {held['run_id']}, not {self.run_id}")
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in held["metrics"]]
        files = path.with_suffix("")  # pending_<name>/<uid>.png
        pictures = [
            Picture(p["key"], p["step"], p["timestamp"], p["uid"], (files / f"{p['uid']}.png").read_bytes())
            for p in held["pictures"]
        ]
        with self._lock:
            self._metrics = metrics + self._metrics
            self._pictures = pictures + self._pictures
            self._unsure = True
        n = (len(metrics), len(pictures))
        log.info("MLflow run %s: %d metric(s) and %d picture(s) from the checkpoint", self.run_id, *n)

    # -- system metrics ------------------------------------------------------------------------
    def system_metrics(self) -> SystemMetrics:
        """MLflow's system metrics of this run, sampled from now on (SystemMetrics, started)."""
        self.system = SystemMetrics(self.client, self.run_id, self.uri, self.origin_ms, self.wait)
        self.system.start()
        return self.system


class SystemMetrics:
    """MLflow's system-metric samplers in a thread of ours, through an Outbox (see the module docstring)."""

    def __init__(self, client: Any, run_id: str, uri: str | None, origin_ms: int, wait: float | None = None) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # MLflow's monitor for its samplers and settings (interval, node id) only: its thread never starts.
        self._sampler = SystemMetricsMonitor(run_id, tracking_uri=uri)
        self.interval = float(self._sampler.sampling_interval)
        self.outbox = Outbox(client, run_id, uri, wait=wait, name="system", origin_ms=origin_ms)
        self.ready = threading.Event()  # set by the trial's first flush
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_step = -1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vpn-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
                if self.ready.is_set() and self.outbox.flush() and self.outbox.status() not in (None, "RUNNING"):
                    return  # the run was closed (a trial stopped by the scheduler): nothing more belongs to it
            except Exception as e:  # a monitor must never cost the trial
                log.warning("MLflow run %s: system metrics stopped: %s", self.outbox.run_id, e)
                return

    def sample(self) -> None:
        """One sample of every sampler, averaged over the interval, as system/<name> at this second's step."""
        sampler = self._sampler
        sampler.collect_metrics()
        values = sampler.aggregate_metrics()
        for monitor in sampler.monitors:
            monitor.clear_metrics()
        prefix = SYSTEM_PREFIX + (f"{sampler.node_id}/" if sampler.node_id else "")
        now = _now_ms()
        step = max(0, (now - self.outbox.origin_ms) // 1000, self._last_step + 1)  # samples < 1 s apart: the next
        self._last_step = step
        self.outbox.add_metrics(Metric(prefix + k, float(v), now, step) for k, v in values.items())

    def finish(self) -> None:
        """Stop sampling, and try once more to send what is held."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=120)  # a call in flight ends within MLflow's short retries
        self._thread = None
        try:
            self.outbox.retry_now()  # the trial's end found the server (or gave up): no back-off left to sit out
            self.outbox.flush()
        except Exception as e:
            log.warning("MLflow run %s: the last system metrics were not sent: %s", self.outbox.run_id, e)
