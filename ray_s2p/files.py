"""Atomic writes for everything in a run directory: temporary file, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml


def _default_mode() -> int:
    # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk (before a rename makes it visible under its final name)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_tree(root: str | Path) -> None:
    """``fsync_file`` every file under ``root`` (a directory about to be renamed into place)."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            fsync_file(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write text (UTF-8)."""
    write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write JSON (sorted keys, indented)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | Path, data: Any) -> None:
    """Atomically write YAML."""
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def replace_dir(source: Path, target: Path) -> None:
    """Move a fully written directory into place, replacing any old one (rename is atomic; the old copy
    is removed only after the new one is in place)."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
