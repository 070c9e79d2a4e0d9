"""Where a run directory lives: a local path, a URI (file://, s3://, gs://, ...) or a path in a pyarrow FileSystem.

A location is either a ``pathlib.Path`` (a plain local path: the fast route of files.py, unchanged) or
a ``StoragePath``, a path inside a ``pyarrow.fs.FileSystem`` resolved from a URI with
``FileSystem.from_uri`` (as Ray resolves ``RunConfig(storage_path=...)``) or given directly (as
``storage_filesystem``). ``StoragePath`` answers the few ``Path`` questions the run directory asks
(``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``read_bytes``,
``read_text``, ``mkdir``, ``unlink``), so code that reads works on both; the writes below take either.

Atomic writes:

- file systems that rename (local disks, HDFS, a file:// URI, a ``SubTreeFileSystem`` over the local
  disk; ``atomic="rename"``): a temporary file beside the target, then a rename over it; directories
  are staged beside their target and renamed into place;
- object stores (S3, GCS, Azure and any other; ``atomic="put"``): a single put is atomic, so a file
  is written in one stream and appears whole when it closes; a directory is written in place and
  its last file (a checkpoint's state.json; summary.json for final/) is what makes it complete.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from . import files
from .errors import RayS2PError

RENAMING = ("local", "hdfs", "mock")  # pyarrow type names of file systems whose move is an atomic rename
CHUNK = 1 << 20  # bytes per read when copying or hashing a stream


class StorageLocationError(RayS2PError, ValueError):
    """A storage URI that pyarrow.fs cannot open."""


@dataclass(frozen=True)
class StoragePath:
    """A path inside a pyarrow FileSystem, with the URI it came from (None for a given FileSystem object).

    Args:
        filesystem: the pyarrow file system.
        path: the path inside it, without a trailing slash.
        uri: the URI that names the same place (what replicas are sent and what messages show), or None.
        atomic: ``"rename"`` (write beside, rename into place) or ``"put"`` (one stream per file).
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str | None = None
    atomic: str = "put"

    def __truediv__(self, name: str) -> StoragePath:
        return replace(self, path=posixpath.join(self.path, name),
                       uri=_join_uri(self.uri, name) if self.uri else None)

    def __str__(self) -> str:
        return self.uri or f"{self.filesystem.type_name}:{self.path}"

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"

    def __lt__(self, other: StoragePath) -> bool:  # sorted() of directory entries, as for Path
        return self.path < other.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> StoragePath:
        uri = None
        if self.uri:
            parts = urlsplit(self.uri)
            uri = urlunsplit(parts._replace(path=posixpath.dirname(parts.path.rstrip("/"))))
        return replace(self, path=posixpath.dirname(self.path), uri=uri)

    def resolve(self) -> StoragePath:
        """Already absolute (the ``Path.resolve`` of a location that is not local)."""
        return self

    def _type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> list["StoragePath"]:
        """The entries directly under this directory (none when it does not exist)."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / posixpath.basename(i.path.rstrip("/")) for i in infos]

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.filesystem.create_dir(self.path, recursive=parents)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.filesystem.delete_file(self.path)


Location = Path | StoragePath


def location(path: str | os.PathLike[str] | StoragePath, filesystem: pafs.FileSystem | None = None) -> Location:
    """A local path, a URI or a path inside ``filesystem`` as a location.

    Args:
        path: a local path (stays a ``Path``), a URI such as ``file:///data/runs/x`` or ``s3://bucket/runs/x``,
            or a ``StoragePath`` (returned as it is).
        filesystem: a pyarrow FileSystem that ``path`` is a path inside (like Ray's ``storage_filesystem``).

    Raises:
        StorageLocationError: pyarrow.fs cannot open the URI.
    """
    if isinstance(path, StoragePath):
        return path
    if filesystem is not None:
        return StoragePath(filesystem, _strip(str(path)), None, atomic_mode(filesystem))
    text = os.fspath(path)
    if "://" not in text:
        return Path(text)
    try:
        fs, inner = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise StorageLocationError(
            f"cannot open the storage URI {text!r} ({exc}). Fix: give --output/--storage a local path or a URI "
            f"pyarrow.fs understands (file:///absolute/path, s3://bucket/path, gs://bucket/path)") from exc
    return StoragePath(fs, _strip(inner), _strip_uri(text), atomic_mode(fs))


def atomic_mode(filesystem: pafs.FileSystem) -> str:
    """``"rename"`` where moving a file over another is an atomic rename, else ``"put"`` (object stores)."""
    fs = filesystem
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return "rename" if fs.type_name in RENAMING else "put"


def for_replica(loc: Location) -> str | StoragePath:
    """What the driver sends a replica: an absolute local path or a URI as a string; a ``StoragePath``
    whose file system was given as an object travels as itself (pyarrow file systems pickle)."""
    if isinstance(loc, StoragePath):
        return loc.uri if loc.uri else loc
    return str(Path(loc).resolve())


def _strip(path: str) -> str:
    return path.rstrip("/") or "/"


def _strip_uri(uri: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") or "/" if parts.path else ""))


def _join_uri(uri: str, name: str) -> str:
    parts = urlsplit(uri)  # keeps a query such as ?region=... after the path
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", name)))


# ------------------------------------------------------------------------------------------ writes
def write_bytes(target: Location, data: bytes) -> None:
    """Atomically write bytes (see the module docstring for how, per kind of storage)."""
    if isinstance(target, StoragePath):
        _put(target, [data])
    else:
        files.write_bytes(target, data)


def write_text(target: Location, text: str) -> None:
    """Atomically write text (UTF-8)."""
    write_bytes(target, text.encode())


def write_json(target: Location, data: Any) -> None:
    """Atomically write JSON (sorted keys, indented), as files.write_json."""
    write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(target: Location, data: Any) -> None:
    """Atomically write YAML, as files.write_yaml."""
    write_text(target, yaml.safe_dump(data, sort_keys=False))


def _put(target: StoragePath, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` (from a complete source: bytes in memory or a local file) to ``target`` atomically.

    ``put``: one output stream, the object appears when its upload completes.
    ``rename``: a temporary file beside the target, flushed to disk where it is local, renamed over it.
    """
    fs = target.filesystem
    fs.create_dir(target.parent.path, recursive=True)
    if target.atomic == "put":
        with fs.open_output_stream(target.path) as stream:
            for chunk in chunks:
                stream.write(chunk)
        return
    tmp = f"{target.parent.path}/.{target.name}.{os.urandom(6).hex()}.tmp"
    try:
        with fs.open_output_stream(tmp) as stream:
            for chunk in chunks:
                stream.write(chunk)
        _fsync_if_local(fs, tmp)
        fs.move(tmp, target.path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def _fsync_if_local(fs: pafs.FileSystem, path: str) -> None:
    """fsync a file written through a pyarrow file system that is the local disk underneath."""
    prefix = ""
    while isinstance(fs, pafs.SubTreeFileSystem):
        prefix, fs = posixpath.join(fs.base_path, prefix), fs.base_fs
    if fs.type_name == "local":
        files.fsync_file(posixpath.join(prefix, path.lstrip("/")) if prefix else path)


def write_parquet(target: Location, table: pa.Table) -> None:
    """Atomically write a Parquet file (rewritten whole: Parquet cannot be appended to safely)."""
    if isinstance(target, StoragePath):
        buffer = pa.BufferOutputStream()  # the whole file first: a failed write must not reach the store
        pq.write_table(table, buffer)
        _put(target, [buffer.getvalue().to_pybytes()])
    else:
        with files.atomic_path(target) as tmp:
            pq.write_table(table, tmp)


def read_parquet(source: Location) -> pa.Table:
    """Read a Parquet file."""
    if isinstance(source, StoragePath):
        return pq.read_table(source.path, filesystem=source.filesystem)
    return pq.read_table(source)


def read_parquet_schema(source: Location) -> pa.Schema:
    """A Parquet file's schema (with its metadata), without reading the rows."""
    if isinstance(source, StoragePath):
        with source.filesystem.open_input_file(source.path) as handle:
            return pq.read_schema(handle)
    return pq.read_schema(source)


def open_input(source: Location) -> IO[bytes]:
    """A binary stream over a file (for hashing or copying it chunk by chunk)."""
    if isinstance(source, StoragePath):
        return source.filesystem.open_input_stream(source.path)
    return open(source, "rb")


def file_size(source: Location) -> int:
    """A file's size in bytes."""
    if isinstance(source, StoragePath):
        return int(source.filesystem.get_file_info(source.path).size)
    return Path(source).stat().st_size


def remove_tree(loc: Location) -> None:
    """Delete a directory and everything under it; nothing happens when it is absent."""
    if isinstance(loc, StoragePath):
        if loc.exists():
            loc.filesystem.delete_dir(loc.path)
    else:
        shutil.rmtree(loc, ignore_errors=True)


def walk_files(root: Location) -> list[Location]:
    """Every file under ``root`` (recursively), sorted by path; empty when ``root`` is absent."""
    if isinstance(root, StoragePath):
        infos = root.filesystem.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
        names = sorted(posixpath.relpath(i.path, root.path) for i in infos if i.type == pafs.FileType.File)
        return [root / n for n in names]
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ files and directories
def upload_file(local: Path, target: StoragePath) -> None:
    """Copy a local file to ``target`` in chunks, atomically (a model-sized file is never held in memory)."""
    with open(local, "rb") as source:
        _put(target, iter(lambda: source.read(CHUNK), b""))


def upload_tree(local_dir: Path, target: StoragePath) -> None:
    """Copy every file under a local directory to the same relative paths under ``target``."""
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        upload_file(path, target / path.relative_to(local_dir).as_posix())


def export(save: Callable[[Path], None], target: Location) -> None:
    """Let ``save`` write a directory (``save_pretrained`` and the like write local files) at ``target``:
    directly when local, else into a local temporary directory that is then copied into place."""
    if not isinstance(target, StoragePath):
        save(Path(target))
        return
    with tempfile.TemporaryDirectory(prefix="ray-s2p-export-") as scratch:
        out = Path(scratch) / "out"
        save(out)
        with staged_dir(target, f".{target.name}.") as stage:
            upload_tree(out, stage)


@contextmanager
def local_copy(source: Location) -> Iterator[Path]:
    """A local file with ``source``'s content: ``source`` itself when local, else a temporary download."""
    if not isinstance(source, StoragePath):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="ray-s2p-") as tmp:
        local = Path(tmp) / source.name
        with open_input(source) as stream, open(local, "wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
        yield local


@contextmanager
def staged_dir(target: StoragePath, prefix: str) -> Iterator[StoragePath]:
    """A directory to fill that becomes ``target`` when the block ends without an exception.

    ``rename``: staged beside the target under ``prefix`` (a dot name), the old target moved aside to
    ``.NAME.old``, the staged one renamed into place, the old one deleted.
    ``put``: object stores cannot rename a directory; the old target is deleted and the block writes in
    place; the caller writes the file that completes the directory last.
    """
    if target.atomic == "put":
        remove_tree(target)
        yield target
        return
    stage = target.parent / f"{prefix}{os.urandom(6).hex()}"
    stage.mkdir()
    try:
        yield stage
        old = target.parent / f".{target.name}.old"
        remove_tree(old)
        if target.exists():
            target.filesystem.move(target.path, old.path)
        target.filesystem.move(stage.path, target.path)
        remove_tree(old)
    finally:
        remove_tree(stage)
