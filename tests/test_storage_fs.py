"""Locations of run directories: local paths stay paths, URIs and FileSystem objects go through pyarrow.fs,
and every write is atomic in the way the storage allows (rename beside the target, or one put)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ray_s2p import storage_fs
from ray_s2p.storage_fs import (
    StorageLocationError,
    StoragePath,
    atomic_mode,
    export,
    for_replica,
    local_copy,
    location,
    read_parquet,
    read_parquet_schema,
    remove_tree,
    staged_dir,
    upload_file,
    walk_files,
    write_bytes,
    write_json,
    write_parquet,
)


def every_file(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def subtree(root: Path, atomic: str | None = None, path: str = "runs/a") -> StoragePath:
    root.mkdir(parents=True, exist_ok=True)
    loc = location(path, pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    return StoragePath(loc.filesystem, loc.path, None, atomic) if atomic else loc


def test_local_paths_stay_paths_and_uris_resolve_through_pyarrow(tmp_path):
    assert location("runs/x") == Path("runs/x") and location(tmp_path) == tmp_path
    assert for_replica(Path("runs/x")) == str(Path("runs/x").resolve())
    run = location(f"file://{tmp_path}/run/")
    assert isinstance(run, StoragePath) and run.path == f"{tmp_path}/run" and run.atomic == "rename"
    assert str(run / "checkpoints" / "step_00000010") == f"file://{tmp_path}/run/checkpoints/step_00000010"
    assert for_replica(run / "final") == f"file://{tmp_path}/run/final"  # a URI travels as a string
    assert (run / "final").parent == run and (run / "final").name == "final"
    # A query (region, endpoint) stays after the path when a name is joined.
    assert storage_fs._join_uri("s3://bucket/runs?region=eu-west-1", "a") == "s3://bucket/runs/a?region=eu-west-1"
    with pytest.raises(StorageLocationError, match="--output/--storage"):
        location("nosuchscheme://bucket/run")


def test_atomic_mode_follows_the_file_system_under_a_subtree(tmp_path):
    assert atomic_mode(pafs.LocalFileSystem()) == "rename"
    assert atomic_mode(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())) == "rename"
    loc = subtree(tmp_path / "store")
    again = pickle.loads(pickle.dumps(loc))  # what a Ray replica receives when no URI names the place
    assert again == loc and for_replica(loc) is loc and again.filesystem.base_path == f"{tmp_path}/store/"


@pytest.mark.parametrize("atomic", ["rename", "put"])
def test_files_round_trip_and_leave_no_temporary_files(tmp_path, atomic):
    store = tmp_path / "store"
    run = subtree(store, atomic)
    write_json(run / "summary.json", {"b": 2, "a": 1})
    write_bytes(run / "summary.json", b'{"a": 3}\n')  # replaced whole
    table = pa.table({"step": [1, 2]}).replace_schema_metadata({"k": "v"})
    write_parquet(run / "ledger.parquet", table)
    assert (run / "summary.json").read_text() == '{"a": 3}\n'
    assert read_parquet(run / "ledger.parquet").equals(table)
    assert read_parquet_schema(run / "ledger.parquet").metadata[b"k"] == b"v"
    assert sorted(p.name for p in run.iterdir()) == ["ledger.parquet", "summary.json"]
    assert (run / "summary.json").is_file() and run.is_dir() and not (run / "nope").exists()
    assert every_file(store) == ["runs/a/ledger.parquet", "runs/a/summary.json"]
    remove_tree(run)
    assert not run.exists() and every_file(store) == []
    remove_tree(run)  # absent: nothing happens


def test_a_failed_write_keeps_the_old_content_on_a_file_system(tmp_path):
    store = tmp_path / "store"
    target = subtree(store) / "metrics.parquet"
    write_bytes(target, b"old")

    def torn():
        yield b"new, half of it"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage_fs._put(target, torn())
    assert target.read_bytes() == b"old" and every_file(store) == ["runs/a/metrics.parquet"]


@pytest.mark.parametrize("atomic", ["rename", "put"])
def test_staged_directories_replace_the_old_one(tmp_path, atomic):
    store = tmp_path / "store"
    final = subtree(store, atomic) / "final"
    with staged_dir(final, ".final.") as stage:
        write_bytes(stage / "old.bin", b"1")
    with staged_dir(final, ".final.") as stage:
        write_bytes(stage / "sub" / "model.bin", b"2")
    assert [p.name for p in walk_files(final)] == ["model.bin"]
    assert every_file(store) == ["runs/a/final/sub/model.bin"]
    if atomic == "rename":  # a failed write leaves the previous directory as it was, and no staging
        with pytest.raises(RuntimeError), staged_dir(final, ".final.") as stage:
            write_bytes(stage / "partial.bin", b"3")
            raise RuntimeError("replica died")
        assert every_file(store) == ["runs/a/final/sub/model.bin"]


def test_large_files_are_streamed_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_fs, "CHUNK", 1000)
    blob = bytes(range(256)) * 40  # 10 chunks
    source = tmp_path / "params.safetensors"
    source.write_bytes(blob)
    target = subtree(tmp_path / "store") / "checkpoints" / "step_00000001" / "params.safetensors"
    upload_file(source, target)
    assert storage_fs.file_size(target) == len(blob)
    with local_copy(target) as copy:
        assert copy.read_bytes() == blob and copy != source
    assert not copy.exists()  # the download is temporary
    with local_copy(source) as same:
        assert same == source  # a local file is used where it is


def test_export_writes_a_local_directory_to_a_location(tmp_path):
    def save(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")

    export(save, tmp_path / "local")
    export(save, location(f"file://{tmp_path}/uri"))
    assert every_file(tmp_path / "local") == every_file(tmp_path / "uri") == ["config.json"]
