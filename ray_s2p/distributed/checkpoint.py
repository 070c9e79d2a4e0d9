"""Checkpoints: trainable tensors in safetensors, everything else in JSON; never pickle.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding
``params.safetensors`` and ``state.json`` (step, rule state, ledger digest up to
that step, config fingerprint, parameter digest, sha256 of the tensor file).
It is written to a temporary directory and renamed into place, so a crash
leaves either the old or the new checkpoint, never half of one. On an object
store (storage_fs.py), which cannot rename a directory, the tensor file is put
first and state.json last: a checkpoint without state.json, or whose tensor
file fails the checksum, is incomplete and skipped.

Replica 0 writes checkpoints and every replica reads them (engine.py): the
tensors never pass through the driver, which reads only ``state.json``
(``read_checkpoint``, ``checkpoint_candidates``) and keeps a ``Checkpoint``
without tensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..config_history import fingerprint_data
from ..errors import RayS2PError
from ..files import fsync_file, replace_dir
from ..storage_fs import (
    Location,
    StoragePath,
    local_copy,
    location,
    open_input,
    remove_tree,
    staged_dir,
    upload_file,
    write_json,
)

CHECKPOINT_VERSION = 1


class CheckpointError(RayS2PError, ValueError):
    """A checkpoint is missing, truncated, corrupted or belongs to another run."""


@dataclass(frozen=True)
class Checkpoint:
    """What the driver keeps of a checkpoint: its state.json and where it is, never its tensors."""

    step: int
    rule_state: dict[str, Any]
    meta: dict[str, Any]
    path: Location


@dataclass(frozen=True)
class CheckpointRecord:
    """What replica 0 answers after writing a checkpoint (a few hundred bytes, whatever the model)."""

    step: int
    path: str
    digest: str
    params_sha256: str
    params_bytes: int


def config_fingerprint(config_dict: dict[str, Any]) -> str:
    """sha256 of the parts of a config that change the trajectory (not steps, logging or cluster size)."""
    # Renamed keys hash under their old names, added keys at their old meaning not at all: checkpoints stay resumable.
    keep = {k: v for k, v in fingerprint_data(config_dict).items() if k in ("seed", "task", "optimizer", "perturbation")}
    weights = (config_dict.get("precision") or {}).get("weights", "fp32")
    if weights != "fp32":
        # Only half-precision weights change the trajectory; fp32 runs keep the fingerprint they had
        # before the precision section existed.
        keep["precision"] = {"weights": weights}
    perturbation = dict(keep.get("perturbation") or {})
    if perturbation.get("distribution") != "lowrank":
        # The low-rank keys change nothing else, so runs from before they existed keep their fingerprint.
        perturbation.pop("rank", None)
        perturbation.pop("lowrank_interval", None)
        keep["perturbation"] = perturbation
    optimizer = dict(keep.get("optimizer") or {})
    if optimizer.get("step_scaling", "none") == "none":
        # Without step scaling (the plain q-average runs used before the keys existed) neither key changes
        # anything: old checkpoints keep their fingerprint. With scaling both count, whatever the replica
        # count (a resume with another count is the same run with the step scaled for the new Q).
        optimizer.pop("step_scaling", None)
        optimizer.pop("tuned_directions", None)
        keep["optimizer"] = optimizer
    if not optimizer.get("weight_decay"):
        # Without weight decay the exemption changes nothing: runs from before it existed keep their fingerprint.
        optimizer.pop("weight_decay_exempt", None)
        keep["optimizer"] = optimizer
    task = dict(keep.get("task") or {})
    if (task.get("test_size", 0), task.get("eval_split", "validation"), task.get("split_seed")) == (
            0, "validation", config_dict.get("seed")):
        # The split keys reproduce the split of runs made before they existed (split seed = run seed, no
        # test rows): those runs keep their fingerprint; any other split is another trajectory.
        for key in ("test_size", "eval_split", "split_seed"):
            task.pop(key, None)
        keep["task"] = task
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Location) -> str:
    h = hashlib.sha256()
    with open_input(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_path(root: Location, step: int) -> Location:
    """Where the checkpoint of ``step`` lives under the run's ``checkpoints/`` directory."""
    return location(root) / f"step_{step:08d}"


def save_checkpoint(root: Location, step: int, tensors: dict[str, torch.Tensor], rule_state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Location:
    """Write ``root/step_NNNNNNNN`` atomically and keep only the newest ``keep`` checkpoints.

    Args:
        root: the run's ``checkpoints/`` directory (a local path, or a location in storage_fs.py).
        step: the step whose parameters ``tensors`` hold.
        tensors: name -> tensor (CPU or not; written in its own dtype).
        rule_state: the step rule's JSON state, ``{"rule": STATE}``.
        meta: further state.json keys (config fingerprint, ledger digest, parameter digest).
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = location(root)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if isinstance(root, StoragePath):
        target = _save_to_storage(root, step, tensors, rule_state, meta)
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt.", dir=root))
        try:
            tensor_file = tmp / "params.safetensors"
            save_file(tensors, str(tensor_file))
            fsync_file(tensor_file)  # the rename below must not land before the data
            state = dict(meta, version=CHECKPOINT_VERSION, step=step, rule_state=rule_state,
                         params_sha256=_file_sha256(tensor_file))
            write_json(tmp / "state.json", state)
            target = checkpoint_path(root, step)
            replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    for old in list_checkpoints(root)[:-keep]:
        remove_tree(old)
    return target


def _save_to_storage(root: StoragePath, step: int, tensors: dict[str, torch.Tensor], rule_state: dict[str, Any],
                     meta: dict[str, Any]) -> StoragePath:
    """``save_checkpoint`` on a URI or FileSystem: the tensor file is written to a local temporary file and
    streamed to the store, state.json last (what completes the checkpoint on an object store)."""
    target = checkpoint_path(root, step)
    with tempfile.TemporaryDirectory(prefix="ray-s2p-ckpt-") as scratch, staged_dir(target, ".ckpt.") as stage:
        local = Path(scratch) / "params.safetensors"
        save_file(tensors, str(local))
        sha = _file_sha256(local)
        upload_file(local, stage / "params.safetensors")
        write_json(stage / "state.json", dict(meta, version=CHECKPOINT_VERSION, step=step, rule_state=rule_state,
                                              params_sha256=sha))
    return target


def list_checkpoints(root: Location) -> list[Location]:
    """Checkpoint directories, oldest first."""
    root = location(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_checkpoint(path: Location, fingerprint: str | None = None, *, verify_tensors: bool = True) -> Checkpoint:
    """Read and verify one checkpoint's state.json (and, by default, the checksum of its tensor file).

    Args:
        path: the checkpoint directory.
        fingerprint: the config fingerprint it must carry (None: not checked).
        verify_tensors: hash params.safetensors against ``params_sha256``. The driver passes False: it
            never reads tensor files; the replicas verify them when they load (``load_tensors``).

    Returns:
        The checkpoint without tensors.

    Raises:
        CheckpointError: missing files, checksum mismatch (truncated/corrupted) or another config.
    """
    path = location(path)
    state_file, tensor_file = path / "state.json", path / "params.safetensors"
    if not state_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(f"checkpoint {path.name!r} is incomplete (state.json or params.safetensors missing)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path.name!r}: state.json is corrupted ({exc})") from exc
    if verify_tensors and _file_sha256(tensor_file) != state.get("params_sha256"):
        raise CheckpointError(f"checkpoint {path.name!r}: params.safetensors fails its checksum "
                              f"(truncated or corrupted). Fix: delete it to fall back to an older checkpoint")
    if fingerprint is not None and state.get("config_fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path.name!r} belongs to another config (seed, task, optimizer, "
                              f"perturbation or precision differ). Fix: resume with the run's own config.yaml")
    return Checkpoint(int(state["step"]), state.get("rule_state") or {}, state, path)


def load_checkpoint(path: Location, fingerprint: str | None = None) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Load and verify one checkpoint, tensors included (what a replica or ``ray-s2p eval`` does).

    On a URI or FileSystem the tensor file is downloaded once, then hashed and loaded from the copy.

    Returns:
        (the checkpoint, name -> tensor).

    Raises:
        CheckpointError: missing files, checksum mismatch (truncated/corrupted) or another config.
    """
    path = location(path)
    if not isinstance(path, StoragePath):
        ckpt = read_checkpoint(path, fingerprint)
        return ckpt, load_file(str(path / "params.safetensors"))
    ckpt = read_checkpoint(path, fingerprint, verify_tensors=False)
    with local_copy(path / "params.safetensors") as local:
        if _file_sha256(local) != ckpt.meta.get("params_sha256"):
            raise CheckpointError(f"checkpoint {path.name!r}: params.safetensors fails its checksum "
                                  f"(truncated or corrupted). Fix: delete it to fall back to an older checkpoint")
        return ckpt, load_file(str(local))


def latest_checkpoint(root: Location, fingerprint: str | None = None,
                      verify: Callable[[Location], str | None] | None = None,
                      log: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that reads and verifies (checksum included); None if there is none.

    Args:
        root: the run's ``checkpoints/`` directory.
        fingerprint: the config fingerprint the checkpoint must carry (None: not checked).
        verify: checks the tensor file instead of hashing it here: path -> error message or None. The
            driver passes a call to replica 0, so that only state.json is read in the driver's process.
        log: told, in one line, when a newer checkpoint was passed over for an older one.

    Raises:
        CheckpointError: checkpoints exist but none verifies (the newest error is raised).
    """
    errors: list[CheckpointError] = []
    for path in reversed(list_checkpoints(root)):
        try:
            ckpt = read_checkpoint(path, fingerprint, verify_tensors=verify is None)
            problem = verify(path) if verify is not None else None
            if problem is not None:
                raise CheckpointError(problem)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        if errors and log is not None:  # a fallback must never be silent: the steps after it are run again
            log(f"checkpoint fallback: skipped {'; '.join(str(e) for e in errors)}; "
                f"using {path.name} and running the steps after it again")
        return ckpt
    if errors:
        raise errors[0]
    return None
