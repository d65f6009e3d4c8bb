"""The one-shot GPU acceptance run (issue 18, item 8): every CUDA path of the project, checked once.

    python -m benchmarks.gpu_check [--out DIR]             # one GPU, within 8 minutes
    python -m benchmarks.gpu_check --dry-run [--out DIR]   # every part at tiny size on the CPU (about a minute)
    python -m benchmarks.gpu_check --dry-run --skip-sweep  # the same without the Ray Tune / MLflow sweep

Checks (each with a pass/fail and its tolerance; the exit status is 1 when any fails):

- logits: the mini preset's fp32 logits on CUDA (channels_last, TF32 off) against the CPU's,
  masked decoder and stacks (benchmarks.gpu_check_parts.logits_vs_cpu);
- bf16 training: the loss over 20 steps in bf16 autocast against fp32 (bf16_vs_fp32_loss);
- the cached sampler against the naive one on CUDA (cached_vs_naive), and the sampler driven by a
  CUDA generator (sampler_generator);
- peak memory (torch.cuda.max_memory_allocated) against vpn.memory's estimate, micro, mini and
  full, with and without checkpointing (benchmarks.gpu_check_steps.peak_memory);
- the full preset's step time and MFU at batch 2 and at 16 (checkpointed, micro-batches of 8),
  and `auto`'s own choice at batch 16 (full_step_time, auto_at_big_batch);
- a gpu-profile sweep of two trials through Ray Tune and MLflow (`python -m pipeline.sweep` in a
  subprocess, a local SQLite store, a Ray of its own): every run FINISHED with its curve, its memory
  params and MLflow's GPU system metrics (needs nvidia-ml-py, the project's [gpu] extra);
- the whole run within 8 minutes.

Findings (measured, never failing the run): issue 18's "possible" defects where one GPU can show
them: cudnn.benchmark off against on, channels_last logits' copy in the loss, the ConvLSTM's cell
state drifting in bf16 over 19 steps, the sampler at TF32 defaults against bench_sample's tolerance,
a CPU generator on a CUDA model (its cost, and whether the same seed draws the same frames), the MFU
target. Those one GPU cannot show (fractional-GPU memory caps, `device: cuda:0` under Ray Train) are
listed as not measured.

It writes gpu_check.json and gpu_check.md (a block ready for benchmarks/RESULTS.md) to --out,
else $OUT where that is set, else benchmarks/results/gpu_check_<device>/.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks import gpu_check_parts as parts
from benchmarks import gpu_check_steps as steps
from benchmarks.common import environment, write_json
from benchmarks.gpu_check_parts import Result, Scale, check, finding

log = logging.getLogger("gpu_check")

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 480  # the 8 minutes on one GPU

GPU = Scale(
    dry_run=False,
    device="cuda",
    size=64,
    seq_len=20,
    width=None,
    loss_steps=20,
    loss_batch=4,
    big_batch=16,
    big_micro=8,
    repeats=5,
    memory_slack_gib=0.25,
    sweep={
        "profile": "gpu",
        "presets": ["micro", "mini"],
        "width_scale": 1.0,
        "splits": {"train": 64, "val": 16, "test": 8},
        "frames": 20,
        "train": {"steps": 600, "batch_size": 8, "seq_len": 20, "context": 10, "log_every": 50, "val_every": 300},
        "run": {"cpus_per_trial": 4, "gpus_per_trial": 0.5},
        # MLflow logs a system sample every interval; a short trial must still log several
        "sampling_interval_s": 2,
        "timeout_s": 300,
    },
)
DRY = Scale(
    dry_run=True,
    device="cpu",
    size=8,
    seq_len=4,
    width=1 / 32,
    loss_steps=3,
    loss_batch=2,
    big_batch=4,
    big_micro=2,
    repeats=2,
    memory_slack_gib=1 / 1024,
    sweep={
        "profile": "cpu",
        "presets": ["micro"],
        "width_scale": 1 / 8,
        "splits": {"train": 8, "val": 4, "test": 2},
        "frames": 4,
        "train": {"steps": 4, "batch_size": 2, "seq_len": 4, "context": 1, "log_every": 2, "val_every": 4},
        "run": {"cpus_per_trial": 1, "gpus_per_trial": 0},
        "sampling_interval_s": 1,
        "timeout_s": 240,
    },
)


# -- the sweep ---------------------------------------------------------------------------------------
def sweep_spec(scale: Scale, work: Path) -> Path:
    """A data folder of sparse random sequences and a spec with one profile, in `work`; the spec's path."""
    s = scale.sweep
    data = work / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in s["splits"].items():  # uint8 (N, T, 1, S, S) in {0, 255}, what vpn.data reads
        np.save(data / f"{split}.npy", (rng.random((n, s["frames"], 1, scale.size, scale.size)) < 0.2) * np.uint8(255))
    train = {
        **s["train"],
        "val_batches": 1,
        "ckpt_every": s["train"]["steps"],
        "device": "auto" if scale.device == "cuda" else "cpu",
        "amp": True,
        "test_sequences": s["splits"]["test"],
        "forecast_samples": 0,  # free-running scoring samples every pixel: minutes, and checked above
    }
    spec = {
        "name": "gpu_check",
        "description": "benchmarks.gpu_check's sweep: Ray Tune, MLflow and its system metrics on this device",
        "data": str(data),
        "model": {"output": "bernoulli"},
        "train": train,
        "search": {"preset": s["presets"], "preset_width_scale": s["width_scale"]},
        "run": {**s["run"], "max_failures": 0, "sample_frames": 1, "system_metrics": True},
        "profiles": {s["profile"]: {}},
    }
    path = work / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_part(scale: Scale) -> list[Result]:
    """`python -m pipeline.sweep` on a small spec in a temporary folder; then what MLflow holds."""
    s = scale.sweep
    with tempfile.TemporaryDirectory(prefix="gpu_check_sweep_") as tmp:
        work = Path(tmp)
        spec = sweep_spec(scale, work)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "RAY_ADDRESS": "local",  # a Ray of its own, never another session's `ray start`
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": str(s["sampling_interval_s"]),  # short trials log some too
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        cmd = [sys.executable, "-m", "pipeline.sweep", str(spec), "--profile", s["profile"]]
        cmd += ["--storage", str(work / "ray"), "--results-dir", str(work / "results")]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=s["timeout_s"], check=False
            )
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = None, f"timed out after {s['timeout_s']} s\n{e.stdout or ''}{e.stderr or ''}"
        wall = time.perf_counter() - start
        out = [
            check(
                "sweep_exit",
                f"`python -m pipeline.sweep` on a {s['profile']}-profile spec of {len(s['presets'])} trials "
                f"({', '.join(s['presets'])}, {s['train']['steps']} steps), local SQLite MLflow store",
                rc == 0,
                f"exit status 0 within {s['timeout_s']} s",
                returncode=rc,
                wall_s=wall,
                log_tail=None if rc == 0 else output[-3000:],
            )
        ]
        if rc == 0:
            out += sweep_runs(scale, uri)
    return out


def sweep_runs(scale: Scale, uri: str) -> list[Result]:
    """Every trial's run: FINISHED, its training curve, its memory params and MLflow's system metrics."""
    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.parent import trial_runs

    client = tracking.client(uri)
    exp = client.get_experiment_by_name("gpu_check")
    # the trials' runs, not the sweep's parent run (which holds the spec and the best trial, no curve)
    runs = trial_runs(client.search_runs([exp.experiment_id])) if exp is not None else []
    cuda = scale.device == "cuda"
    gpu_key = "system/gpu_0_utilization_percentage"
    per_run = {}
    for run in runs:
        system = sorted(k for k in run.data.metrics if k.startswith("system/"))
        per_run[run.info.run_name] = {
            "status": run.info.status,
            "curve_points": len(client.get_metric_history(run.info.run_id, tracking.TRAIN_KEY)),
            "memory_params": {k: v for k, v in run.data.params.items() if k.startswith("memory.")},
            "precision": run.data.tags.get(tracking.TAG_PRECISION),
            "system_metrics": len(system),
            "gpu_utilization_max": max(
                (m.value for m in client.get_metric_history(run.info.run_id, gpu_key)), default=None
            ),
            "gpu_metrics": [k for k in system if k.startswith("system/gpu_")],
        }
    want = len(scale.sweep["presets"])
    finished = [r for r in per_run.values() if r["status"] == "FINISHED" and r["curve_points"] > 0]
    with_memory = [r for r in finished if len(r["memory_params"]) == 2]
    system_ok = [r for r in per_run.values() if r["system_metrics"] > 0 and (not cuda or r["gpu_metrics"])]
    try:
        import pynvml  # noqa: F401  (nvidia-ml-py: what MLflow's GPU monitor needs)

        nvml = True
    except ImportError:
        nvml = False
    return [
        check(
            "sweep_runs",
            "one MLflow run per trial, FINISHED, with its training curve and auto's memory params",
            len(per_run) == want and len(with_memory) == want,
            f"{want} runs, each FINISHED with >= 1 point of {tracking.TRAIN_KEY} and memory.* params",
            runs=per_run,
        ),
        check(
            "sweep_system_metrics",
            "MLflow's system metrics on every run" + (", GPU ones included" if cuda else ""),
            len(system_ok) == want,
            "every run has system/ metrics" + (f" and {gpu_key}" if cuda else ""),
            nvidia_ml_py_installed=nvml,
        ),
    ]


# -- running the parts and reporting ------------------------------------------------------------------
NOT_MEASURED = [
    finding(
        "fractional_gpu_memory_cap",
        "fractional-GPU trials have no memory cap (torch.cuda.set_per_process_memory_fraction)",
        None,
        "not measured: needs a probe inside a trial's process",
    ),
    finding(
        "ray_train_explicit_cuda0",
        "`device: cuda:0` under Ray Train puts every rank on GPU 0",
        None,
        "not measured: needs two or more GPUs",
    ),
]


PARTS: dict[str, Callable[[Scale], list[Result]]] = {
    "logits": parts.logits_vs_cpu,
    "bf16_loss": parts.bf16_vs_fp32_loss,
    "sampler": parts.cached_vs_naive,
    "sampler_generator": parts.sampler_generator,
    "memory": steps.peak_memory,
    "full_step": steps.full_step_time,
    "auto_full_batch": steps.auto_at_big_batch,
    "channels_last_logits": steps.channels_last_logits,
    "lstm_cell_drift": steps.lstm_cell_drift,
    "sweep": sweep_part,
}


def run_parts(scale: Scale, names: list[str]) -> list[Result]:
    """The named parts in turn; a part that raises is a failed check of its own name, and the rest still run."""
    results: list[Result] = []
    for name in names:
        part = PARTS[name]
        log.info("part %s", name)
        start = time.perf_counter()
        try:
            got = part(scale)
        except Exception as e:  # a broken path is a result: record it and go on to the next part
            got = [check(f"{name}_error", f"part {name} raised", False, "no exception", error=repr(e)[:500])]
            log.error("part %s failed:\n%s", name, traceback.format_exc())
        for r in got:
            r["part"], r["part_s"] = name, time.perf_counter() - start
        results += got
    return results + [dict(r) for r in NOT_MEASURED]


def _fmt(v: Any) -> str:
    """A measured value for a table cell: floats to 3 digits, dicts inline (their lists left to the JSON)."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        inner = (f"{k}: {_fmt(x)}" for k, x in v.items() if not isinstance(x, list) and x is not None)
        return "(" + ", ".join(inner) + ")"
    return str(v)


def _measured(r: Result) -> str:
    skip = {"kind", "name", "what", "passed", "tolerance", "threshold", "shows_defect", "part", "part_s", "log_tail"}
    shown = {k: v for k, v in r.items() if k not in skip and not isinstance(v, list) and v is not None}
    return "; ".join(f"{k} = {_fmt(v)}" for k, v in shown.items()).replace("|", "/")


def markdown(report: dict[str, Any]) -> str:
    """The block for benchmarks/RESULTS.md: the device, the command, the checks and the findings."""
    checks = [r for r in report["results"] if r["kind"] == "check"]
    findings = [r for r in report["results"] if r["kind"] == "finding"]
    env = report["environment"]
    passed = sum(r["passed"] for r in checks)
    lines = [
        f"## GPU acceptance run (`python -m benchmarks.gpu_check{' --dry-run' if report['dry_run'] else ''}`)",
        "",
        (
            f"Device: {env['device']}; torch {env['torch']}, CUDA {report['cuda']}; {env['time_utc']}; "
            f"wall {report['wall_s']:.0f} s. **{passed} of {len(checks)} checks passed.**"
        ),
        "",
        "| check | what | measured | tolerance | result |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{r['name']}` | {r['what']} | {_measured(r)} | {r['tolerance']} | {'pass' if r['passed'] else '**FAIL**'} |"
        for r in checks
    ]
    lines += ["", "Findings (issue 18's possible defects):", "", "| finding | what | measured | threshold | shows it |"]
    lines += ["|---|---|---|---|---|"]
    verdict = {True: "**yes**", False: "no", None: "not measured"}
    lines += [
        f"| `{r['name']}` | {r['what']} | {_measured(r)} | {r['threshold']} | {verdict[r['shows_defect']]} |"
        for r in findings
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every part at tiny size on the CPU")
    p.add_argument("--skip-sweep", action="store_true", help="leave out the Ray Tune / MLflow sweep")
    p.add_argument("--only", nargs="+", choices=list(PARTS), default=None, help="run these parts only (a rerun)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run it on a GPU, or with --dry-run for the CPU rehearsal")
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = DRY if args.dry_run else GPU
    out = Path(args.out or os.environ.get("OUT") or f"benchmarks/results/gpu_check_{scale.device}")
    start = time.perf_counter()
    names = [n for n in (args.only or PARTS) if not (args.skip_sweep and n == "sweep")]
    results = run_parts(scale, names)
    wall = time.perf_counter() - start
    if not args.dry_run and names == list(PARTS):
        results.append(
            check("wall_time", "the whole run", wall <= TIME_LIMIT_S, f"<= {TIME_LIMIT_S} s on one GPU", wall_s=wall)
        )
    report = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "parts": names,
        "environment": environment(scale.torch_device),
        "cuda": torch.version.cuda,
        "wall_s": wall,
        "passed": all(r["passed"] for r in results if r["kind"] == "check"),
        "results": results,
    }
    write_json(report, out / "gpu_check.json")
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
