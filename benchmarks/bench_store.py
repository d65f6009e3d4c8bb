"""The cluster's tracking server under load: N concurrent trial processes log batches through
`mlflow server` on PostgreSQL and on SQLite, in the same run on the same machine (issue 28 item 3).

    python -m benchmarks.bench_store --processes 32 --batches 100 --out benchmarks/results/store.json

Each store gets a fresh `mlflow server` (4 workers, the configs' default; `--workers`) on 127.0.0.1,
plain (no basic-auth: the store is what is compared). PostgreSQL is Debian's, started as in the tests
(tests/conftest.running_postgres: an unprivileged user, a temp folder, a loopback port, fsync on as on
a real server); SQLite is one file, as the configs had it. The stores take turns, the order reversed
each round (`--rounds`), one server at a time.

Each of the N processes is a trial as pipeline.sweep.record.tracking logs one: it creates a run, then
sends `--batches` log_batch calls of `--metrics` metrics at steps 1, 2, ... through MlflowClient,
with MLflow's own HTTP retries, as fast as the server answers. All processes start together (a
barrier, after their imports). Reported per store:

- sent: points in the log_batch calls that returned;
- errors: log_batch calls that raised after MLflow's retries (their points count as not sent);
- lost: points sent but not in the store afterwards (read back with get_metric_history);
- points/s: stored points over the wall time from the barrier to the last process done;
- p50 / p95 ms: one log_batch call's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_json

log = logging.getLogger("bench_store")
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def store_uri(kind: str, folder: Path) -> Iterator[str]:
    """A fresh backend store of `kind` ("postgres" or "sqlite"); yields its URI."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'mlflow.db'}"
        return
    sys.path.insert(0, str(REPO / "tests"))  # the tests' PostgreSQL helper: one way to start it
    from conftest import running_postgres

    with running_postgres(fsync=True) as database:
        yield database("mlflow")


def trial(uri: str, batches: int, metrics: int, barrier, results) -> None:
    """One trial process: a run, then `batches` log_batch calls; puts (run_id, sent, errors, latencies)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("load").experiment_id).info.run_id
    sent, errors, latencies = 0, 0, []
    barrier.wait()
    for step in range(1, batches + 1):
        now = int(time.time() * 1000)
        batch = [Metric(f"m{k}", float(step * k), now, step) for k in range(metrics)]
        start = time.perf_counter()
        try:
            client.log_batch(run_id, metrics=batch)
            sent += metrics
        except Exception:  # the figure: a call that failed after MLflow's retries
            errors += 1
        latencies.append(time.perf_counter() - start)
    results.put((run_id, sent, errors, latencies))


def load(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One store under N processes: its row of the table."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import running_mlflow_server
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix=f"bench-store-{kind}-") as tmp:
        folder = Path(tmp)
        with store_uri(kind, folder) as backend, running_mlflow_server(folder, backend, workers=args.workers) as uri:
            MlflowClient(uri).create_experiment("load")
            ctx = mp.get_context("spawn")
            barrier, results = ctx.Barrier(args.processes + 1), ctx.Queue()
            procs = [ctx.Process(target=trial, args=(uri, args.batches, args.metrics, barrier, results))
                     for _ in range(args.processes)]  # fmt: skip
            for p in procs:
                p.start()
            barrier.wait(timeout=600)  # every process imported MLflow and created its run
            start = time.perf_counter()
            done = [results.get(timeout=3600) for _ in procs]
            wall = time.perf_counter() - start
            for p in procs:
                p.join()
            client = MlflowClient(uri)
            keys = [f"m{k}" for k in range(args.metrics)]
            stored = sum(len(client.get_metric_history(run_id, key)) for run_id, *_ in done for key in keys)
    sent = sum(d[1] for d in done)
    latencies = sorted(t for d in done for t in d[3])
    return {
        "store": kind,
        "processes": args.processes,
        "sent": sent,
        "errors": sum(d[2] for d in done),
        "lost": sent - stored,
        "points/s": stored / wall,
        "p50 ms": 1000 * latencies[len(latencies) // 2],
        "p95 ms": 1000 * latencies[int(len(latencies) * 0.95)],
        "wall s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=32, help="concurrent trial processes (issue 28: >= 32)")
    parser.add_argument("--batches", type=int, default=100, help="log_batch calls per process")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per log_batch call")
    parser.add_argument("--workers", type=int, default=4, help="the server's workers (the configs' default)")
    parser.add_argument("--rounds", type=int, default=1, help="each store once per round, the order reversed")
    parser.add_argument("--stores", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "store.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for r in range(args.rounds):
        for kind in args.stores if r % 2 == 0 else args.stores[::-1]:
            rows.append({"round": r + 1, **load(kind, args)})
            log.info("%s", rows[-1])
    import platform

    env = {"machine": platform.processor() or platform.machine(), "cores": mp.cpu_count(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    write_json({"args": {k: str(v) for k, v in vars(args).items()}, "environment": env, "rows": rows}, args.out)
    columns = ["round", "store", "processes", "sent", "errors", "lost", "points/s", "p50 ms", "p95 ms", "wall s"]
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
