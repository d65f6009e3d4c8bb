"""A tracking server that may be away: how long to wait for it, and MLflow calls that wait.

An `mlflow server` restarts now and then (an upgrade, a crash restarted by systemd, its node
rebooted). What a sweep does meanwhile:

- One call does not wait long. MLflow's own HTTP retries (mlflow/environment_variables.py,
  mlflow/utils/request_utils.py: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with urllib3's back-off
  MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2 x 2^n s, capped at 120 s, about 4 minutes in all, each try up
  to MLFLOW_HTTP_REQUEST_TIMEOUT=120 s) would hold a trial still inside one call and then fail it.
  HTTP_DEFAULTS shortens them in every process that imports pipeline.sweep.record.tracking, unless
  they are set already: 2 retries, factor 1, 30 s a try. A refused connection fails in about
  3 s; a server that drops packets, in at most 3 x 30 s.
- The waiting is ours. `patient(fn, ...)` calls fn again while the server is away (`server_away`:
  no connection, a timeout, 502/503/504, MLflow's retries spent, SQLite's "database is locked"),
  backing off from BACKOFF_FIRST_S up to BACKOFF_MAX_S between tries, for at most `wait_s()` seconds
  (VPN_TRACKING_WAIT_S, default DEFAULT_WAIT_S), then raises TrackingUnavailable. Every method of
  the client that pipeline.sweep.record.tracking.client returns is patient (`PatientClient`): the
  driver's calls (the parent run, the runs, the results tables, the registry), the Tune callbacks'
  and a trial's start and end. Its `.once` is the bare client, for calls that must not wait: a
  trial's metrics, pictures and system metrics go through pipeline.sweep.record.outbox instead,
  which holds them while the server is away and lets the trial train on.
- `probe(uri)`: whether the server answers at all (GET /health, 2 s), so that a trial that knows the
  server is away tries again for the cost of one short request instead of a whole failing call.

A non-idempotent call that reached the server before its answer was lost (create_run) may be made
twice; the metric and picture paths check what the server holds first (pipeline.sweep.record.outbox).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

WAIT_ENV = "VPN_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 1800.0  # 30 min: a server restarted, or its node rebooted, is back well within it
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 30.0
PROBE_TIMEOUT_S = 2.0
# MLflow's per-call retries, short (see the module docstring); a user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
AWAY_STATUS = (502, 503, 504)

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed away longer than the wait allowed."""


def use_short_http_retries() -> None:
    """HTTP_DEFAULTS in this process's environment, where unset (MLflow reads them at every request)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def wait_s(value: float | None = None) -> float:
    """How long a call waits for an away server: value, else VPN_TRACKING_WAIT_S, else DEFAULT_WAIT_S."""
    if value is not None:
        return float(value)
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{WAIT_ENV}={raw!r}: expected seconds >= 0 (how long to wait for the MLflow server)")
    return seconds


def server_away(exc: BaseException) -> bool:
    """Whether exc (or an exception it was raised from) says the store did not answer, or asked to be
    tried later, rather than that the request was wrong. TrackingUnavailable is not: its wait is over."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, TrackingUnavailable):
            return False
        if isinstance(e, requests.exceptions.SSLError):  # a certificate problem: waiting will not fix it
            return False
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(e, (requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True  # RetryError: MLflow's retries spent on 5xx answers
        status = getattr(e, "get_http_status_code", None)
        if callable(status) and status() in AWAY_STATUS:
            return True
        if "database is locked" in str(e):  # SQLite, several trials writing at once
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def short(e: BaseException) -> str:
    """The first line of an error, for a log line."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class Backoff:
    """The pause before the next try: BACKOFF_FIRST_S, doubling up to BACKOFF_MAX_S."""

    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST_S

    def next(self) -> float:
        delay, self.delay = self.delay, min(2 * self.delay, BACKOFF_MAX_S)
        return delay


def patient(fn: Callable[..., T], *args: Any, wait: float | None = None, **kwargs: Any) -> T:
    """fn(*args, **kwargs), called again while the server is away, for at most `wait` seconds
    (wait_s()); then TrackingUnavailable, naming VPN_TRACKING_WAIT_S. Other errors are raised at once."""
    limit = wait_s(wait)
    deadline: float | None = None
    backoff = Backoff()
    warned = False  # SQLite's "database is locked" is routine among concurrent trials: not worth a line
    name = getattr(fn, "__name__", "call")
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not server_away(e):
                raise
            now = time.monotonic()
            deadline = now + limit if deadline is None else deadline
            if now >= deadline:
                raise TrackingUnavailable(
                    f"the MLflow tracking store did not answer for {limit:.0f} s ({WAIT_ENV}): {short(e)}"
                ) from e
            if not warned and "database is locked" not in str(e):
                why = short(e)
                log.warning("MLflow did not answer %s (%s); waiting up to %.0f s (%s)", name, why, limit, WAIT_ENV)
                warned = True
            time.sleep(min(backoff.next(), deadline - now))
            continue
        if warned:
            log.warning("MLflow answers again (%s)", name)
        return result


class PatientClient:
    """An MlflowClient whose every method is patient (see the module docstring); `once` is the bare
    client, whose calls fail after MLflow's own (short) retries."""

    def __init__(self, client: Any, wait: float | None = None) -> None:
        self.once = client
        self.wait = wait

    def __getattr__(self, name: str) -> Any:
        if name in ("once", "wait"):  # not set yet (an unpickled copy): no recursion into itself
            raise AttributeError(name)
        attr = getattr(self.once, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return patient(attr, *args, wait=self.wait, **kwargs)

        return call


def bare(client: Any) -> Any:
    """The MlflowClient under a PatientClient (or the client itself)."""
    return client.once if isinstance(client, PatientClient) else client


def probe(uri: str | None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the tracking server at uri answers (GET /health). Anything but http(s) is local: True.
    Only a refused or timed-out connection, or a 502/503/504, counts as away."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.exceptions.SSLError:
        return True  # the real call will say what is wrong with the certificate
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        return False
    return response.status_code not in AWAY_STATUS
