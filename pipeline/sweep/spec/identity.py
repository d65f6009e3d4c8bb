"""A sweep's identity, `<name>-<profile>-<fingerprint>`: what decides whether a rerun resumes or starts over.

The fingerprint covers the resolved grid (pipeline.sweep.spec.sweep.Sweep.identity), the data's identity
(pipeline.sweep.spec.data_check) and the code's: the source of every vpn/ and pipeline/ module that a
trial runs. Those files are not listed by hand (a list goes stale with every new module): they are
the modules that the trial's entry points (TRIAL_ENTRY_POINTS) import, followed transitively through
their import statements (read with ast, never imported), package __init__ files included, since
they run too. The CLI, the report and the driver count only if a trial imports them.

base_id_of leaves the code out: a sweep of the same spec, profile and data under other code has the
same base, which is how a driver finds an unfinished one to continue (pipeline.sweep.record.lineage).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from pipeline.paths import repo_root
from pipeline.sweep.spec.sweep import Sweep

# Where a trial's code starts: the one-worker trainable and the data-parallel driver and workers.
TRIAL_ENTRY_POINTS = ("pipeline/sweep/trials/trainable.py", "pipeline/sweep/trials/distributed.py")
# The project's own packages; imports of anything else (torch, ray, the standard library) are not followed.
PACKAGES = ("vpn", "pipeline")


def code_files(root: Path | None = None, entry_points: tuple[str, ...] = TRIAL_ENTRY_POINTS) -> tuple[str, ...]:
    """The repository-relative paths of the modules a trial runs, sorted (see the module docstring)."""
    root = root or repo_root()
    seen: set[str] = set()
    todo = list(entry_points)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += _imported_files(root, path)
    return tuple(sorted(seen))


def _imported_files(root: Path, path: str) -> list[str]:
    """The project files that the module at `path` imports anywhere in its body (function-level imports
    too), with the __init__.py of every package on the way."""
    tree = ast.parse((root / path).read_text(), filename=path)
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.sweep import tracking` names a module; `from vpn.config import X` does not
            modules.append(node.module)
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    parts = Path(path).with_suffix("").parts
    modules += [".".join(parts[:i]) for i in range(1, len(parts))]  # this module's own packages
    files = []
    for module in modules:
        if module.split(".")[0] in PACKAGES:
            files += [f for f in _module_files(root, module) if f != path]
    return files


def _module_files(root: Path, module: str) -> list[str]:
    """The file of `module` (a.b.c: a/b/c.py or a/b/c/__init__.py) and its packages' __init__.py;
    none for a name that is no module (a class imported from one)."""
    parts = module.split(".")
    files = [f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts))]
    for candidate in (f"{'/'.join(parts)}.py", f"{'/'.join(parts)}/__init__.py"):
        if (root / candidate).is_file():
            return [f for f in files if (root / f).is_file()] + [candidate]
    return []


def code_digests(root: Path | None = None) -> dict[str, str]:
    """The sha256 of each file of code_files, by path: what a sweep continued under new code compares."""
    root = root or repo_root()
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in code_files(root)}


def code_identity(root: Path | None = None, digests: dict[str, str] | None = None) -> str:
    """sha256 of the source that determines what a trial computes (code_files, names and contents)."""
    h = hashlib.sha256()
    for name, digest in sorted((digests if digests is not None else code_digests(root)).items()):
        h.update(name.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


def sweep_id_of(sweep: Sweep, data_identity: str, digests: dict[str, str] | None = None) -> str:
    """<name>-<profile>-<fingerprint of the points, the data and the code (code_digests unless given)>."""
    code = code_identity(digests=digests if digests is not None else code_digests())
    return f"{sweep.name}-{sweep.profile}-{sweep.fingerprint(data_identity, code)[:10]}"


def base_id_of(sweep: Sweep, data_identity: str) -> str:
    """The sweep id without the code: equal for the sweeps of one spec, profile and data under any code."""
    return f"{sweep.name}-{sweep.profile}-{sweep.fingerprint(data_identity)[:10]}"
