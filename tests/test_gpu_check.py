"""`python -m benchmarks.gpu_check --dry-run`: the GPU acceptance run rehearsed on the CPU at tiny size,
so that the script a GPU will run once cannot rot. Every part runs, every check passes, and the JSON
and the markdown block it writes agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import NOT_MEASURED, PARTS

REPO = Path(__file__).resolve().parents[1]
# What each part must report, by name (a part that raised reports <part>_error instead).
CHECKS = {
    "logits": ["logits_pixelcnn", "logits_stacks"],
    "bf16_loss": ["bf16_loss"],
    "sampler": ["sampler_pixelcnn", "sampler_stacks"],
    "sampler_generator": ["sampler_device_generator"],
    "memory": [f"memory_{p}{c}" for p in ("micro", "mini", "full") for c in ("", "_ckpt")],
    "full_step": ["full_step_time"],
    "auto_full_batch": ["auto_full_batch"],
    "channels_last_logits": [],
    "lstm_cell_drift": [],
    "sweep": ["sweep_exit", "sweep_runs", "sweep_system_metrics"],
}
FINDINGS = {
    "sampler": ["sampler_pixelcnn_tf32_defaults", "sampler_stacks_tf32_defaults"],
    "sampler_generator": ["sampler_same_seed_cpu_and_device", "sampler_cpu_generator_cost"],
    "full_step": ["full_mfu_target", "cudnn_benchmark"],
    "channels_last_logits": ["channels_last_logits"],
    "lstm_cell_drift": ["lstm_cell_bf16_drift"],
}


def _dry_run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--threads", "1", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    report["markdown"] = (out / "gpu_check.md").read_text()
    return report


def _assert_complete(report: dict, parts: list[str]) -> None:
    assert report["dry_run"] is True and report["parts"] == parts
    assert report["environment"]["device_type"] == "cpu"
    checks = {r["name"]: r for r in report["results"] if r["kind"] == "check"}
    expected = [name for part in parts for name in CHECKS[part]]
    assert sorted(checks) == sorted(expected)  # every check present, none of them a part's error
    for name, r in checks.items():
        assert r["passed"] is True, (name, r)
        assert r["tolerance"] and r["what"]
        assert f"| `{name}` |" in report["markdown"]
    findings = {r["name"]: r for r in report["results"] if r["kind"] == "finding"}
    expected = [name for part in parts for name in FINDINGS.get(part, [])] + [f["name"] for f in NOT_MEASURED]
    assert sorted(findings) == sorted(expected)
    for name, r in findings.items():
        assert r["shows_defect"] in (True, False, None) and r["threshold"]
        assert f"| `{name}` |" in report["markdown"]
    assert report["passed"] is True
    assert f"**{len(checks)} of {len(checks)} checks passed.**" in report["markdown"]
    assert "| finding | what | measured | threshold | shows it |" in report["markdown"]


def test_dry_run_without_the_sweep(tmp_path):
    parts = [p for p in PARTS if p != "sweep"]
    report = _dry_run(tmp_path, "--skip-sweep")
    _assert_complete(report, parts)
    checks = {r["name"]: r for r in report["results"] if r["kind"] == "check"}
    # the numbers behind the passes are real measurements, not defaults
    assert 0 < checks["memory_full"]["measured_gib"] and checks["memory_full_ckpt"]["estimate_gib"] > 0
    assert checks["memory_full_ckpt"]["measured_gib"] < checks["memory_full"]["measured_gib"]
    assert len(checks["bf16_loss"]["fp32_losses"]) == len(checks["bf16_loss"]["bf16_losses"]) == 3
    assert checks["bf16_loss"]["fp32_losses"] != checks["bf16_loss"]["bf16_losses"]  # bf16 really ran


@pytest.mark.slow  # the sweep adds a Ray start, MLflow's SQLite store and a trial: a minute more on 2 cores
def test_dry_run_of_the_sweep(tmp_path):
    """The sweep part of `python -m benchmarks.gpu_check --dry-run`: with the test above, CI runs every part
    once (the whole --dry-run in one test would run the other parts a second time)."""
    report = _dry_run(tmp_path, "--only", "sweep")
    _assert_complete(report, ["sweep"])
    runs = next(r for r in report["results"] if r["name"] == "sweep_runs")["runs"]
    assert [r["status"] for r in runs.values()] == ["FINISHED"]
    assert all(r["system_metrics"] > 0 for r in runs.values())


def test_markdown_marks_a_failed_check_and_the_exit_status(tmp_path, monkeypatch):
    """A part that raises is a failed check of its own, the others still run, and the run exits 1."""
    from benchmarks import gpu_check

    def broken(scale):
        raise RuntimeError("a broken CUDA path")

    monkeypatch.setitem(gpu_check.PARTS, "lstm_cell_drift", broken)
    assert gpu_check.main(["--dry-run", "--only", "lstm_cell_drift", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = [r for r in report["results"] if r["kind"] == "check"]
    assert [(r["name"], r["passed"]) for r in failed] == [("lstm_cell_drift_error", False)]
    assert "a broken CUDA path" in failed[0]["error"]
    assert "**FAIL**" in (tmp_path / "gpu_check.md").read_text()
