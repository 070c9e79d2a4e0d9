"""Is the run directory the same directory for the driver and every replica?

Replica 0 writes checkpoints and ``final/`` into the run directory itself, and
every replica reads checkpoints from it, so the driver, which writes the ledger
and reads ``state.json`` there, must see the same directory at the same path as
every replica. On one node that always holds; on several nodes it holds only on
a shared filesystem (NFS or similar) mounted at the same path everywhere, or at a
URI (s3://, gs://; storage_fs.py) that every node can reach with its credentials.

The check, before step 1: the driver writes a random token into
``RUN_DIR/.storage-check/driver.token``; each replica reads it back (``probe_storage``,
run by engine.py), writes ``replica-R.probe`` beside it and reads that back; the
driver then reads every replica's probe. Any miss stops the run with
``StorageError`` before a step is taken.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Sequence

from ..errors import RayS2PError
from ..storage_fs import Location, StoragePath, for_replica, location, remove_tree, write_text
from .pool import ReplicaPool

CHECK_DIR = ".storage-check"  # a dot name: temporary, removed after the check (docs/ledger.md)


class StorageError(RayS2PError, RuntimeError):
    """The run directory is not reachable, or not the same directory, from every replica."""


def probe_storage(directory: str | Path | StoragePath, token: str, replica: int) -> dict[str, Any]:
    """Replica side: read the driver's token, write and read back this replica's probe file.

    Args:
        directory: the run directory as the driver names it (a path, a URI, or a ``StoragePath``).
        token: the token the driver wrote.
        replica: this replica's index (names the probe file).

    Returns:
        ``{"replica", "host", "error"}``; ``error`` is None when the directory is reachable and writable.
    """
    host = socket.gethostname()
    out: dict[str, Any] = {"replica": replica, "host": host, "error": None}
    try:
        check = location(directory) / CHECK_DIR
        seen = (check / "driver.token").read_text()
    except (OSError, ValueError) as exc:  # ValueError: the URI does not open on this node (storage_fs.py)
        out["error"] = f"cannot read {directory}/{CHECK_DIR}/driver.token ({exc.strerror or exc})"
        return out
    if seen != token:
        out["error"] = f"{directory} on host {host} is another directory than the driver's (its token differs)"
        return out
    probe = check / f"replica-{replica}.probe"
    try:
        write_text(probe, f"{token} {host}")
        if probe.read_text() != f"{token} {host}":
            out["error"] = f"wrote {probe} but read back something else"
    except (OSError, ValueError) as exc:
        out["error"] = f"cannot write {probe} ({exc.strerror or exc})"
    return out


def check_storage(pool: ReplicaPool, directory: str | Location, timeout: float | None = None,
                  replicas: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Driver side: every replica must see the driver's run directory, and the driver every replica's writes.

    Args:
        pool: the replica pool.
        directory: the run directory (a local path or a location of storage_fs.py).
        timeout: seconds the replicas may take.
        replicas: the positions to check (None: every replica; a replica joining a range: its own).

    Returns:
        Each replica's probe answer (replica, host, error None).

    Raises:
        StorageError: some replica cannot read or write the run directory, or writes where the driver does not
            read; the message names the run directory (``--output``) and the fix.
    """
    root = location(directory).resolve()
    check = root / CHECK_DIR
    token = os.urandom(16).hex()  # not the run's RNG: only tells this check's directory apart from any other
    write_text(check / "driver.token", token)
    try:
        idx = list(range(pool.size)) if replicas is None else list(replicas)
        answers = pool.call("check_storage", [(for_replica(root), token)] * len(idx), replicas=idx, timeout=timeout)
        problems = [f"replica {a['replica']} on host {a['host']}: {a['error']}" for a in answers if a["error"]]
        for a in answers:
            if a["error"] is None:
                probe = check / f"replica-{a['replica']}.probe"
                seen = probe.read_text() if probe.is_file() else None
                if seen != f"{token} {a['host']}":
                    problems.append(f"replica {a['replica']} on host {a['host']}: the driver cannot see the file it "
                                    f"wrote ({probe})")
    finally:
        remove_tree(check)
    if problems:
        raise StorageError(
            f"the run directory {str(root)!r} (--output, or --storage for jobs/train.py) is not reachable from "
            f"every replica: {'; '.join(problems)}. Replicas write checkpoints and final/ there themselves, so a "
            f"multi-node run needs it on a shared filesystem (NFS or similar) mounted at the same path on every "
            f"node, or at a URI (s3://, gs://) that every node can reach. Fix: point --output/--storage at such a "
            f"path or URI")
    return answers
