"""A sweep's results must outlive the folder it runs from: the check for Ray's uploaded working directory.

`ray job submit --working-dir .` zips the working directory, uploads it, and runs the job from the
unpacked copy in the head's Ray session folder (<temp>/session_*/runtime_resources/
working_dir_files/_ray_pkg_<hash>/). `repo_root()` is then that copy, so every default home of a
result (<repo>/mlflow.db with mlartifacts/, <repo>/ray_results, <repo>/results/<sweep>) would be
inside it, and `ray stop` or the next session's clean-up deletes it: the runs are lost.

The driver refuses such a sweep at once (before Ray or MLflow is touched) unless all three are set
to places outside the copy. Refusing rather than choosing other defaults: the job cannot know where
the user's repository is (the copy carries no trace of the path it came from, and on a remote head
it is on another machine), and any guessed folder on the head (~, /tmp) is a second, hidden home of
results that the docs, `dvc repro` and the report would not find.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.sweep.spec.data_check import SweepDataError

RESULTS_ENV = "VPN_RESULTS_DIR"  # the parent of results/<sweep name>, like <repo>/results
STORAGE_ENV = "VPN_SWEEP_STORAGE"
# Ray unpacks `working_dir` and `py_modules` packages under <session>/runtime_resources/
# (ray/_private/runtime_env/packaging.py: RAY_PKG_PREFIX = "_ray_pkg_").
RUNTIME_RESOURCES, RAY_PKG_PREFIX = "runtime_resources", "_ray_pkg_"


def uploaded_copy(root: Path) -> bool:
    """Whether `root` (the repository the code runs from) is a package Ray unpacked for a job."""
    parts = Path(root).resolve().parts
    return RUNTIME_RESOURCES in parts or any(p.startswith(RAY_PKG_PREFIX) for p in parts)


def _inside(path: str, root: Path) -> bool:
    """Whether a local path (relative ones resolve against the cwd, the copy) lies under root."""
    p = Path(path).expanduser()
    p = p.resolve() if p.is_absolute() else (Path.cwd() / p).resolve()
    return p == root or root in p.parents


def _uri_inside(uri: str, root: Path) -> bool:
    """Whether a tracking or storage URI is a file under root (servers and object stores are not)."""
    if uri.startswith("sqlite:///"):
        return _inside(uri.removeprefix("sqlite:///"), root)
    if uri.startswith("file://"):
        return _inside(uri.removeprefix("file://"), root)
    return "://" not in uri and _inside(uri, root)


def example_line(spec: str) -> str:
    """The `ray job submit` line that sets every home of a result, for a local head run from the
    repository (the shell fills in $PWD: the user's repository, where a plain run puts them)."""
    env = (
        '{"env_vars": {'
        '"MLFLOW_TRACKING_URI": "sqlite:///$PWD/mlflow.db", '
        f'"{STORAGE_ENV}": "$PWD/ray_results", '
        f'"{RESULTS_ENV}": "$PWD/results", '
        '"VPN_DATA": "$PWD/data/moving_mnist"}}'
    )
    escaped = env.replace('"', '\\"')
    return f'ray job submit --working-dir . --runtime-env-json "{escaped}" -- python -m pipeline.sweep {spec}'


def check_results_persist(
    root: Path, spec: str, *, storage: str | None, results_dir: str | Path | None, env: dict[str, str] | None = None
) -> None:
    """Raise SweepDataError, naming each setting, when the sweep runs from Ray's uploaded copy `root`
    and its MLflow store, Ray storage or results tables would live only there. `storage` and
    `results_dir` are the command line's; the environment's settings stand in for them."""
    root = Path(root).resolve()
    if not uploaded_copy(root):
        return
    env = dict(os.environ) if env is None else env
    settings = {
        "MLFLOW_TRACKING_URI": env.get("MLFLOW_TRACKING_URI"),
        f"{STORAGE_ENV} (or --storage)": storage or env.get(STORAGE_ENV),
        f"{RESULTS_ENV} (or --results-dir)": str(results_dir) if results_dir else env.get(RESULTS_ENV),
    }
    missing = [name for name, value in settings.items() if not value]
    inside = [f"{name}={value}" for name, value in settings.items() if value and _uri_inside(value, root)]
    if not missing and not inside:
        return
    problems = "; ".join(
        ([f"not set: {', '.join(missing)}"] if missing else [])
        + ([f"inside the copy: {', '.join(inside)}"] if inside else [])
    )
    raise SweepDataError(
        f"this sweep runs from Ray's uploaded copy of the working directory ({root}), which Ray deletes "
        f"with its session; its MLflow runs, Ray storage and results tables would live only there ({problems}). "
        "Set MLFLOW_TRACKING_URI, the storage setting and the results folder to places that persist, "
        f"e.g. from the repository on the head: {example_line(spec)}"
    )
