"""Timing helpers shared by the benchmarks.

The dev machines are shared, so their speed drifts by several times over tens of seconds. Every
benchmark therefore times the reference and the fast variant in the same run, interleaved
(one call of each per repeat, the order alternating between repeats so neither always runs
first), and reports medians of the times and the median of the per-repeat ratios: a slow phase
slows both members of a pair, so the ratio survives it better than either time does.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vpn.files import atomic_path
from vpn.train import cpu_has_native_bf16


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA if present, else CPU), "cpu" or "cuda[:N]" -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of fn, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each of fns `repeats` times, interleaved: repeat r runs every fn once, in the given order
    for even r and reversed for odd r. Each fn first runs `warmup` untimed calls (allocator, oneDNN
    and cuDNN algorithm choice, compilation). Returns name -> list of seconds, one per repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_once(fns[name], device))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(reference: Sequence[float], fast: Sequence[float]) -> float:
    """Median over repeats of reference time / fast time (how many times faster fast is)."""
    return median([r / f for r, f in zip(reference, fast)])


def device_name(device: torch.device) -> str:
    """A human-readable name of the machine the numbers come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return (
        f"CPU ({model}, {torch.backends.cpu.get_cpu_capability()}, {bf16}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )


def cpu_flags() -> list[str]:
    """The CPU flags that decide which kernels torch runs (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(set(line.split(":", 1)[1].split()) & SPEED_FLAGS)
    except OSError:
        pass
    return []


# avx512_bf16 / amx_bf16 (x86) or bf16 (Arm) are what make cpu_amp fast; the rest say which SIMD.
SPEED_FLAGS = {
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "bf16",
    "asimd",
    "sve",
}


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on besides the code: recorded in every JSON result."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        # torch's kernel level (DEFAULT, AVX2, AVX512, ...) and whether bf16 is in hardware: a
        # cpu_amp figure holds only for CPUs that match.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(obj: Any, path: str | Path) -> Path:
    """Write obj as indented JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:  # creates the folder too
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """rows of {column: value} -> a markdown table (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
