"""Checkpoints: trainable tensors in safetensors, everything else in JSON; never pickle.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding
``params.safetensors`` and ``state.json`` (step, rule state, ledger digest up to
that step, config fingerprint, parameter digest, sha256 of the tensor file).
It is written to a temporary directory and renamed into place, so a crash
leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import replace_dir, write_json

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or belongs to another run."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    step: int
    tensors: dict[str, torch.Tensor]
    rule_state: dict[str, Any]
    meta: dict[str, Any]


def config_fingerprint(config_dict: dict[str, Any]) -> str:
    """sha256 of the parts of a config that change the trajectory (not steps, logging or cluster size)."""
    keep = {k: v for k, v in config_dict.items() if k in ("seed", "task", "optimizer", "perturbation")}
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
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], rule_state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/step_NNNNNNNN`` atomically and keep only the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt.", dir=root))
    try:
        tensor_file = tmp / "params.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_file))
        state = dict(meta, version=CHECKPOINT_VERSION, step=step, rule_state=rule_state,
                     params_sha256=_file_sha256(tensor_file))
        write_json(tmp / "state.json", state)
        target = root / f"step_{step:08d}"
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def load_checkpoint(path: Path, fingerprint: str | None = None) -> Checkpoint:
    """Load and verify one checkpoint.

    Raises:
        CheckpointError: missing files, checksum mismatch (truncated/corrupted) or another config.
    """
    path = Path(path)
    state_file, tensor_file = path / "state.json", path / "params.safetensors"
    if not state_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(f"checkpoint {path.name!r} is incomplete (state.json or params.safetensors missing)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path.name!r}: state.json is corrupted ({exc})") from exc
    if _file_sha256(tensor_file) != state.get("params_sha256"):
        raise CheckpointError(f"checkpoint {path.name!r}: params.safetensors fails its checksum "
                              f"(truncated or corrupted). Fix: delete it to fall back to an older checkpoint")
    if fingerprint is not None and state.get("config_fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path.name!r} belongs to another config (seed, task, optimizer, "
                              f"perturbation or precision differ). Fix: resume with the run's own config.yaml")
    tensors = load_file(str(tensor_file))
    return Checkpoint(int(state["step"]), tensors, state.get("rule_state") or {}, state)


def latest_checkpoint(root: Path, fingerprint: str | None = None) -> Checkpoint | None:
    """The newest checkpoint that loads and verifies; None if there is none.

    Raises:
        CheckpointError: checkpoints exist but none verifies (the newest error is raised).
    """
    error: CheckpointError | None = None
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, fingerprint)
        except CheckpointError as exc:
            error = error or exc
    if error is not None:
        raise error
    return None
