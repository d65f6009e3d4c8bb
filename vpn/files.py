"""File utilities: atomic output (a reader sees the old file or the complete new one, never a half-written
one, also after a power loss) and content hashes.

Durability: a rename is atomic, but without a sync the file system may commit the rename before the
data, so a power loss can leave the new name on an empty or partial file. So the new file is synced
(os.fsync) before the rename, and on POSIX the folder is synced after it, so that the rename itself
survives. A set of files that belong together (a sweep's three tables) is written as a folder
(`atomic_dir`), replaced whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# renameat2(2)'s flag that swaps two paths atomically (Linux >= 3.15; glibc >= 2.28 has the wrapper).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit sync it and move it onto `path` with os.replace.

    If the block raises, the temporary file is removed and `path` is left as it was. The parent folder
    is created if needed. The temporary name starts with a dot, so globs of outputs skip it, and lives
    in the same folder, so the rename stays on one file system and is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on a clean exit its files replace the folder `path`
    whole: a reader finds the old set of files or the new one, never a mix.

    Every file in it is synced first. Where `path` exists, the two folders are swapped atomically
    (Linux's renameat2 RENAME_EXCHANGE), else it is moved aside and the new one moved in (a reader in
    between finds no folder, never a mixed one); the old folder is then removed. If the block raises,
    the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_dir(tmp)
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old folder after a swap
    fsync_dir(path.parent)


def _temporary(path: Path) -> Path:
    # Not tempfile.mkstemp: its 0600 mode would end up on the output. The writer creates the file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _swap_in(new: Path, path: Path) -> None:
    """Put folder `new` at `path`; what was at `path` ends at `new` (removed by the caller)."""
    if not path.exists():
        try:
            new.rename(path)  # onto nothing: atomic
            return
        except OSError:  # created meanwhile: swapped below
            if not path.is_dir():
                raise
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder; cannot replace it with a folder")
    if _exchange(new, path):
        return
    aside = path.with_name(f"{new.name}.old")
    path.rename(aside)
    new.rename(path)
    aside.rename(new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically where the OS can (Linux renameat2); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a file system or kernel without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(path: str | Path) -> None:
    """Flush a file's data to the disk (a folder: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Sync a folder on POSIX, so that a rename into it survives a power loss (elsewhere: nothing)."""
    if os.name == "posix":
        fsync_path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file at `path`; ValueError naming the file when it is not UTF-8 JSON
    holding an object (truncated, corrupt, edited by hand)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not the JSON file expected there") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (a file of any size costs 1 MiB of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
