"""Every bad input named: one table, one row a bad value (issue 30 item 5).

Each row is the input, the entry point that reads it, and what the message must name: the file (a
spec, a params file, a checkpoint, a data file) and the field or argument. Every row asserts the exit
status (2 for `python -m pipeline.sweep` and `python -m vpn`, 1 for the DVC stages, as they always
exit on a bad params value), a message of one line with no traceback, and nothing written: no MLflow
store, no Ray folder, no results, no output folder; for the sweep, Ray never started (its
connect_ray fails the test). A new field joins by adding a row.

Fast: everything is refused before Ray, in this process, but one row, which runs the real
`python -m pipeline.sweep` as a user does. The GPUs that torch cannot use are refused on a real Ray
in tests/test_sweep_ray.py; the HTML escaping of a trial's error is the last test here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import write_splits

from pipeline.data import generate as gen
from pipeline.report import build
from pipeline.sweep import driver
from vpn import cli
from vpn.checkpoint import CHECKPOINT_FORMAT
from vpn.config import TrainConfig, VPNConfig
from vpn.train import Trainer

REPO = Path(__file__).resolve().parents[1]
MODEL = {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.03125}
TRAIN = {"steps": 2, "batch_size": 2, "seq_len": 4, "context": 2, "device": "cpu", "forecast_samples": 0}
CKPT = "--checkpoint {files}/ckpt.pt --data {files}/good"
SEARCHED = {"algorithm": "random", "train": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}}
DEEP = b"name: deep\nprofiles: {cpu: {}}\ntrain: " + b"[" * 1200 + b"]" * 1200 + b"\n"  # past the parser's recursion
LAUGHS = (  # a "billion laughs": 10 ** 7 values once every alias is expanded, from 8 lines
    "name: bomb\nprofiles: {cpu: {}}\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip("abcdef", "bcdefg"))
).encode()


@dataclass(frozen=True)
class Row:
    """One bad input. `where`: what the message must hold ({spec}, {params}, {files}: the paths)."""

    id: str
    entry: str  # sweep | sweep-process | vpn | generate | report
    where: tuple[str, ...]
    spec: dict[str, Any] = field(default_factory=dict)  # sweep: merged into the base spec
    raw: bytes | None = None  # sweep: the spec file's bytes as they are; generate/report: the params file's
    args: tuple[str, ...] = ()  # after the entry's own (placeholders: {files}, {out})
    env: dict[str, str] = field(default_factory=dict)
    data: str = "good"  # sweep: the data folder, of the module's folders (files/<data>)
    status: int = 2


def sweep(id: str, where: str | tuple[str, ...], in_spec: bool = True, **row: Any) -> Row:
    """A row of `python -m pipeline.sweep`; `in_spec`: the message names the spec file (an argument's or
    the environment's bad value is named by the argument or the variable instead)."""
    where = (where,) if isinstance(where, str) else where
    return Row(id, "sweep", ("{spec}", *where) if in_spec else where, **row)


def vpn(id: str, where: str | tuple[str, ...], command: str) -> Row:
    return Row(id, "vpn", (where,) if isinstance(where, str) else where, args=tuple(command.split()))


def stage(id: str, entry: str, where: str, raw: bytes) -> Row:
    return Row(id, entry, ("{params}", where), raw=raw, status=1)


ROWS = [
    # -- a sweep spec: python -m pipeline.sweep SPEC --profile cpu ---------------------------------------
    sweep("device-int", "train.device", spec={"train": {"device": 0}}),
    sweep("device-traversal", "train.device", spec={"train": {"device": "cuda/../../x"}}),
    sweep("device-cpu-with-gpu", "train.device", spec={"run": {"gpus_per_trial": 1}}),
    sweep("device-cuda-without-gpu", "train.device", spec={"train": {"device": "cuda"}}),
    sweep("data-no-such-user", ("data", "~nouser"), spec={"data": "~nouser/x"}),
    sweep("nested-thousands-deep", "nested deeper than 32", raw=DEEP),
    sweep("nested-40-deep", "nested deeper than 32", raw=b"name: n\nprofiles: {cpu: {}}\nx: " + b"[" * 40 + b"]" * 40),
    sweep("alias-bomb", "more than 100,000 values", raw=LAUGHS),
    sweep("not-utf8", "not UTF-8", raw="name: caf\xe9\nprofiles: {cpu: {}}\n".encode("latin-1")),
    sweep("not-yaml", "not valid YAML at line 2, column 1", raw=b"name: [unclosed\n"),
    sweep("search-seed-2**40", "search.seed", spec={"search": {**SEARCHED, "seed": 2**40}, "run": {"num_samples": 2}}),
    sweep("train-seed-2**40", "train.seed", spec={"train": {"seed": 2**40}}),
    sweep("train-seed-beyond-torch", "train.seed", spec={"train": {"seed": 2**64}}),
    sweep(
        "seeds-pass-2**32",
        "run.seeds",
        spec={"train": {"seed": 2**32 - 1}, "search": SEARCHED, "run": {"num_samples": 2, "seeds": 2}},
    ),
    sweep("gpus-nan", "run.gpus_per_trial", spec={"run": {"gpus_per_trial": float("nan")}}),
    sweep("gpus-below-rays-unit", "run.gpus_per_trial", spec={"run": {"gpus_per_trial": 1.0e-300}}),
    sweep("cpus-inf", "run.cpus_per_trial", spec={"run": {"cpus_per_trial": float("inf")}}),
    sweep("asha-factor-inf", "run.asha.reduction_factor", spec={"run": {"asha": {"reduction_factor": float("inf")}}}),
    sweep("asha-enabled-string", "run.asha.enabled", spec={"run": {"asha": {"enabled": "yes"}}}),
    sweep("max-concurrent-bool", "run.max_concurrent", spec={"run": {"max_concurrent": True}}),
    sweep("max-failures-beyond-int64", "run.max_failures", spec={"run": {"max_failures": 10**30}}),
    sweep("storage-path-no-such-user", "run.storage_path", spec={"run": {"storage_path": "~nouser/ray"}}),
    sweep("cpu-memory-negative", "run.cpu_memory_gb", spec={"run": {"cpu_memory_gb": -1}}),
    sweep("micro-3-of-8", "train.micro_batch_size", spec={"train": {"batch_size": 8, "micro_batch_size": 3}}),
    sweep(
        "micro-of-a-workers-share",
        "train.micro_batch_size",
        spec={"train": {"batch_size": 12, "micro_batch_size": 4}, "run": {"workers_per_trial": 2}},
    ),
    sweep(
        "searched-odd-batches-over-2-workers",
        "search.train.batch_size",
        spec={
            "search": {"algorithm": "random", "train": {"batch_size": {"int": [2, 8]}}},
            "run": {"num_samples": 2, "workers_per_trial": 2},
        },
    ),
    sweep(
        "searched-batch-choice-over-2-workers",
        "search.train.batch_size",
        spec={
            "search": {"algorithm": "random", "train": {"batch_size": [2, 3, 4]}},
            "run": {"num_samples": 2, "workers_per_trial": 2},
        },
    ),
    sweep("lr-true", "train.lr", spec={"train": {"lr": True}}),
    sweep("steps-a-string", "train.steps", spec={"train": {"steps": "10"}}),
    sweep("filter-fraction-nan", "model.filter_fraction", spec={"model": {"filter_fraction": float("nan")}}),
    sweep("width-scale-bool", "search.preset_width_scale", spec={"search": {"preset_width_scale": True}}),
    sweep(
        "range-end-beyond-float",
        "search.train.steps",
        spec={"search": {"algorithm": "random", "train": {"steps": {"int": [1, 10**400]}}}, "run": {"num_samples": 2}},
    ),
    sweep(
        "overfit-tol-inf",
        "overfit.tol_per_subpixel",
        spec={"mode": "overfit", "overfit": {"tol_per_subpixel": float("inf")}},
    ),
    sweep("empty-train-npy", ("data", "train.npy", "holds no data"), data="empty"),
    sweep("corrupt-stats-json", ("data", "stats.json", "not valid JSON"), data="corrupt_stats"),
    sweep(
        "batch-no-memory-holds",
        ("profiles.cpu", "does not fit a CPU trial's memory", "train.batch_size", "run.cpu_memory_gb"),
        spec={"train": {"batch_size": 4099, "seq_len": 6}, "run": {"cpu_memory_gb": 0.6}},
    ),
    sweep("unknown-profile", "profiles", args=("--profile", "gpu")),
    sweep("storage-no-such-user", "--storage", False, args=("--storage", "~nouser/ray")),
    sweep("data-arg-no-such-user", ("--data", "~nouser"), False, args=("--data", "~nouser/x")),
    sweep("data-env-no-such-user", ("VPN_DATA", "~nouser"), False, env={"VPN_DATA": "~nouser/x"}),
    sweep("results-dir-nul", "--results-dir", False, args=("--results-dir", "a\0b")),
    sweep("json-without-plan", "--json: only with --plan", False, args=("--json",)),
    sweep("wait-not-a-number", "VPN_WAIT_FOR_NODES", False, env={"VPN_WAIT_FOR_NODES": "soon"}),
    sweep("wait-nan", "VPN_WAIT_FOR_NODES", False, env={"VPN_WAIT_FOR_NODES": "nan"}),
    sweep("tracking-uri-no-folder", "MLFLOW_TRACKING_URI", False, env={"MLFLOW_TRACKING_URI": "sqlite:///{out}/x.db"}),
    Row("module-not-utf8", "sweep-process", ("{spec}", "not UTF-8"), raw="name: \xe9\n".encode("latin-1")),
    # -- python -m vpn (the arguments after it; {files}: the module's data folders and checkpoints) --------
    vpn("sample-batch-0", "--batch", f"sample {CKPT} --batch 0"),
    vpn("sample-index-beyond", "--index", f"sample {CKPT} --index 99"),
    vpn("sample-temperature-nan", "--temperature", f"sample {CKPT} --temperature nan"),
    vpn("eval-device", "--device", f"eval {CKPT} --device cuda/../x"),
    vpn("eval-context-beyond", "--context", f"eval {CKPT} --context 50"),
    vpn(
        "eval-no-train-config",
        ("{files}/no_train_config.pt", "train_config"),
        "eval --checkpoint {files}/no_train_config.pt --data {files}/good",
    ),
    vpn(
        "eval-other-model",
        ("{files}/other_model.pt", "does not fit its own configs"),
        "eval --checkpoint {files}/other_model.pt --data {files}/good",
    ),
    vpn(
        "sample-other-model",
        ("{files}/other_model.pt", "does not fit"),
        "sample --checkpoint {files}/other_model.pt --data {files}/good",
    ),
    vpn(
        "resume-other-model",
        ("{files}/other_model.pt", "does not fit"),
        "train --data {files}/good --resume {files}/other_model.pt",
    ),
    vpn(
        "resume-with-another-preset",
        ("--preset mini", "{files}/ckpt.pt", "enc_blocks=1"),
        "train --data {files}/good --resume {files}/ckpt.pt --preset mini",
    ),
    vpn("resume-with-overfit", "--resume", "train --data {files}/good --resume {files}/ckpt.pt --overfit"),
    vpn("train-empty-data", ("train.npy", "holds no data"), "train --data {files}/empty"),
    vpn("train-set-lr-true", "lr", "train --data {files}/good --set lr=true"),
    vpn("train-set-deep", "--set lr", "train --data {files}/good --set lr=" + "[" * 1200),
    vpn("train-seed-negative", "--seed", "train --data {files}/good --seed -1"),
    vpn("train-device-traversal", "--device", "train --data {files}/good --device cuda/../x"),
    vpn("train-overfit-index-beyond", "--index", "train --data {files}/good --overfit --index 99"),
    vpn("info-micro-3-of-8", "micro_batch_size", "info --batch-size 8 --micro-batch-size 3"),
    vpn("info-height-0", "--height", "info --height 0"),
    # -- the DVC stages' params.yaml ------------------------------------------------------------------
    stage("generate-step-nan", "generate", "generate.step", b"generate: {step: .nan}\n"),
    stage("generate-seed-bool", "generate", "generate.seed", b"generate: {seed: true}\n"),
    stage("generate-not-utf8", "generate", "not UTF-8", "generate: {seed: \xe9}\n".encode("latin-1")),
    stage("generate-deep", "generate", "nested deeper", b"generate: " + b"[" * 1200),
    stage("report-sweeps-a-string", "report", "report.sweeps", b"report: {sweeps: depth_width}\n"),
    stage("report-sweep-traversal", "report", "report.sweeps", b"report: {sweeps: ['../../etc']}\n"),
    stage("report-seed-bool", "report", "report.sample_seed", b"report: {sample_seed: true}\n"),
]


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Data folders (good, empty, corrupt stats) and checkpoints (good, without train_config, whose
    model_config is not its weights')."""
    root = tmp_path_factory.mktemp("files")
    good = write_splits(root / "good", {"train": 8, "val": 4, "test": 4})
    write_splits(root / "empty", {"train": 0, "val": 4, "test": 4})
    write_splits(root / "corrupt_stats", {"train": 8, "val": 4, "test": 4})
    (root / "corrupt_stats" / "stats.json").write_text('{"params": {"seq_len": 6,')  # cut off mid-write
    trainer = Trainer(VPNConfig.from_dict(MODEL), TrainConfig(**{**TRAIN, "steps": 1}), torch.from_numpy(
        np.load(good / "train.npy")))  # fmt: skip
    state = trainer.state_dict()
    torch.save(state, root / "ckpt.pt")
    torch.save({k: v for k, v in state.items() if k != "train_config"}, root / "no_train_config.pt")
    torch.save({**state, "model_config": {**state["model_config"], "enc_blocks": 3}}, root / "other_model.pt")
    assert state["format"] == CHECKPOINT_FORMAT
    return root


def fill(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_is_named_in_one_sentence_and_nothing_is_written(row, files, tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "out"  # no row may create it, nor anything else in tmp_path beside its input
    paths = {"files": files, "out": out, "spec": tmp_path / "spec.yaml", "params": tmp_path / "params.yaml"}
    for name in ("VPN_DATA", "VPN_SWEEP_STORAGE", "VPN_RESULTS_DIR", "VPN_WAIT_FOR_NODES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for k, v in row.env.items():
        monkeypatch.setenv(k, fill(v, paths))
    args = [fill(a, paths) for a in row.args]
    caplog.set_level("ERROR")
    status, stderr = run_entry(row, paths, args, monkeypatch)
    stderr += capsys.readouterr().err
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    # the message: the logged error, else the last line on stderr ("error: ...", argparse's "... error: ...")
    message = logged[-1] if logged else (stderr.strip().splitlines() or [""])[-1]
    assert status == row.status, (status, message, stderr)
    assert "Traceback" not in stderr and "Traceback" not in "\n".join(logged), stderr
    assert message and "\n" not in message, message
    for part in row.where:
        assert fill(part, paths) in message, message
    written = sorted(p.name for p in tmp_path.iterdir() if p not in (paths["spec"], paths["params"]))
    assert written == [], written  # no mlflow.db, ray/, results/, out/


def run_entry(row: Row, paths: dict[str, Path], args: list[str], monkeypatch) -> tuple[int, str]:
    """Run the row's entry point on its input; (exit status, what it wrote to stderr beyond capsys)."""
    if row.entry in ("sweep", "sweep-process"):
        spec = paths["spec"]
        if row.raw is not None:
            spec.write_bytes(row.raw)
        else:
            base = {"name": "bad", "data": str(paths["files"] / row.data), "model": MODEL, "train": TRAIN,
                    "profiles": {"cpu": {}}}  # fmt: skip
            spec.write_text(yaml.safe_dump(merged(base, row.spec), sort_keys=False))
        tmp = spec.parent
        argv = [str(spec), "--profile", "cpu", "--storage", str(tmp / "ray"), "--results-dir", str(tmp / "results")]
        if row.entry == "sweep-process":
            env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # a Ray that is not there, were it asked
            proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", *argv], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
            return proc.returncode, proc.stderr
        monkeypatch.setattr(driver, "connect_ray", lambda: pytest.fail("Ray was started for a bad input"))
        return exit_status(driver.main, argv + args), ""
    if row.entry == "vpn":
        out = ["--out", str(paths["out"])] if args[0] in ("train", "sample") else []
        return exit_status(cli.main, args + out), ""
    paths["params"].write_bytes(row.raw)
    if row.entry == "generate":
        argv = ["--params", str(paths["params"]), "--mnist", str(paths["out"] / "m.npz"), "--out", str(paths["out"])]
        return exit_status(gen.main, argv), ""
    return exit_status(build.main, ["--params", str(paths["params"])]), ""


def exit_status(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's refusal
        return e.code


# -- 30.6: a trial's error text goes into report.html as text ------------------------------------------
def test_a_trials_error_cannot_inject_html_into_the_report(tmp_path):
    import pandas as pd

    from pipeline.report.tables import TABLE_COLUMNS, markdown_table

    hostile = "<script>alert(1)</script> [click](javascript:alert(2)) <img src=x onerror=alert(3)>\nsecond line"
    summary = pd.DataFrame([
        {"config": "e1", "status": "FAILED", "error": hostile, "run_id": "r1"},
        {"config": "e2<b>", "status": "FINISHED", "error": None, "run_id": "r2"},
    ])  # fmt: skip
    lines = ["# s", "", *build._overview("s", summary), markdown_table(summary, TABLE_COLUMNS)]
    build.write_pages(tmp_path, lines, {})
    page = (tmp_path / "report.html").read_text()
    for tag in ("<script", "<img", "<b>", 'href="javascript'):
        assert tag not in page, tag
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the list of failures and the table
    assert "second line" in page and "[click](javascript:alert(2))" in page  # the text, shown as it was
