"""What a sweep takes besides its spec: the command line's paths and the environment's settings, each
checked before Ray starts, so that `python -m pipeline.sweep` refuses a bad one with one sentence
naming it (exit status 2) and nothing written (no MLflow run, no results, no Ray folder).

- `local_path`: a path as a user wrote it (~ expanded, relative to a base) made absolute; ValueError
  in one sentence where it cannot be (`~nouser/x`: no such user; a NUL byte).
- `check_run_inputs`: --data, --storage and --results-dir, and VPN_DATA, VPN_SWEEP_STORAGE,
  VPN_RESULTS_DIR, VPN_WAIT_FOR_NODES and MLFLOW_TRACKING_URI: SpecError naming the one at fault.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.sweep.spec.validate import SpecError

# The environment's settings the driver reads (pipeline.sweep.cluster.persist, placement, record.tracking).
PATH_ENV = ("VPN_DATA", "VPN_SWEEP_STORAGE", "VPN_RESULTS_DIR")
WAIT_ENV = "VPN_WAIT_FOR_NODES"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def local_path(value: str | Path, base: Path | None = None) -> Path:
    """`value` with ~ expanded, relative to `base` (default: the working directory), absolute and resolved.

    Raises ValueError (one sentence, without the setting's name: the caller names it).
    """
    text = str(value)
    if not text:
        raise ValueError("must be a path, got an empty string")
    if "\0" in text:
        raise ValueError(f"must be a path, got {text!r}, which holds a NUL byte")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        user = text[1:].split("/", 1)[0]
        raise ValueError(f"{text!r} starts with ~{user}, but there is no user {user or '(home)'} here") from None
    try:
        return (path if path.is_absolute() else (base or Path.cwd()) / path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise ValueError(f"{text!r} cannot be resolved: {e}") from None


def check_run_inputs(
    *,
    data: str | Path | None = None,
    storage: str | None = None,
    results_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Refuse (SpecError) a command-line path or an environment setting the sweep could not use."""
    env = os.environ if env is None else env
    # the driver's main passes VPN_DATA on as --data: named as the user set it
    data_name = "VPN_DATA" if data is not None and data == env.get("VPN_DATA") else "--data"
    paths = {data_name: data, "--storage": storage, "--results-dir": results_dir}
    paths.update({name: env.get(name) for name in PATH_ENV})
    for name, value in paths.items():
        if value is None or (name.startswith("VPN_") and not value):  # an empty variable is an unset one
            continue
        if "://" in str(value):  # storage on s3://, gs://: Ray's to reach
            continue
        try:
            local_path(value)
        except ValueError as e:
            raise SpecError(f"{name}: {e}") from None
    wait = env.get(WAIT_ENV)
    if wait:
        try:
            seconds = float(wait)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise SpecError(f"{WAIT_ENV}: must be a number of seconds >= 0, got {wait!r}")
    _check_tracking_uri(env.get(TRACKING_ENV))


def _check_tracking_uri(uri: str | None) -> None:
    """A SQLite store's folder must exist: MLflow creates the file, not the folders above it."""
    if not uri or not uri.startswith("sqlite:///"):
        return
    try:
        folder = local_path(uri.removeprefix("sqlite:///")).parent
    except ValueError as e:
        raise SpecError(f"{TRACKING_ENV}: {e}") from None
    if not folder.is_dir():
        raise SpecError(f"{TRACKING_ENV}: {uri!r} names a SQLite file in {folder}, which is not a folder")
