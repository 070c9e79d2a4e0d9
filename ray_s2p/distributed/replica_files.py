"""A replica's state as files: the tensors a checkpoint holds (the trained parameters and a first-order
optimizer's per-parameter state), putting them back into a replica, and the final export.

The checkpoint file format itself (safetensors + state.json, sha256, atomic writes) is checkpoint.py's;
this module decides what goes in and how it comes back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..files import fsync_tree, replace_dir
from ..storage_fs import StoragePath, location, staged_dir, upload_tree
from ..zo.directions import DirectionSpace
from .checkpoint import CheckpointError

# Checkpoint keys of a first-order optimizer's per-parameter state (AdamW's moments and step count):
# "optimizer_state/<parameter name>/<state key>", saved beside the parameters so a resumed run continues
# with its moments instead of restarting them.
OPTIMIZER_STATE_PREFIX = "optimizer_state/"


def checkpoint_tensors(space: DirectionSpace, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the selected parameters and, for a first-order run, its optimizer's
    per-parameter state (``OPTIMIZER_STATE_PREFIX`` keys). CPU parameters are written as they are
    (no copy: a copy of a 13 B model would double the replica's memory while it is saved)."""
    out = {n: p.detach().to("cpu") for n, p in zip(space.names, space.params)}
    if optimizer is not None:
        for n, p in zip(space.names, space.params):
            for key, value in optimizer.state.get(p, {}).items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{OPTIMIZER_STATE_PREFIX}{n}/{key}"] = tensor.detach().to("cpu")
    return out


def load_tensors(space: DirectionSpace, optimizer: torch.optim.Optimizer | None,
                 tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the selected parameters with a checkpoint's, and a first-order optimizer's state with the
    checkpoint's when there is one.

    Raises:
        CheckpointError: a parameter is missing or has another shape, or the optimizer state names a
            parameter that is not trainable here (the checkpoint belongs to another config).
    """
    missing = [n for n in space.names if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint lacks parameter {missing[0]!r}; it belongs to another config")
    with torch.no_grad():
        for n, p in zip(space.names, space.params):
            src = tensors[n]
            if tuple(src.shape) != tuple(p.shape):
                raise CheckpointError(f"checkpoint parameter {n!r} has shape {tuple(src.shape)}, model has "
                                      f"{tuple(p.shape)}; it belongs to another config")
            p.copy_(src.to(p.device, p.dtype))
    if optimizer is not None:
        _load_optimizer_state(space, optimizer, tensors)


def _load_optimizer_state(space: DirectionSpace, optimizer: torch.optim.Optimizer,
                          tensors: dict[str, torch.Tensor]) -> None:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIMIZER_STATE_PREFIX):
            name, _, item = key[len(OPTIMIZER_STATE_PREFIX):].rpartition("/")
            state.setdefault(name, {})[item] = value
    unknown = sorted(set(state) - set(space.names))
    if unknown:
        raise CheckpointError(f"checkpoint has optimizer state for {unknown[0]!r}, which is not trainable here; "
                              f"it belongs to another config")
    optimizer.state.clear()
    for n, p in zip(space.names, space.params):
        if n in state:
            # AdamW keeps its step count on the CPU and its moments beside the parameter.
            optimizer.state[p] = {k: v.clone() if k == "step" else v.to(p.device) for k, v in state[n].items()}


def export_final(save_final: Callable[[Path], None], run_dir: str | StoragePath) -> dict[str, int]:
    """Write ``save_final``'s output (the task's export of the model) to ``run_dir/final``: staged beside
    it and renamed into place; on a URI or FileSystem written to a local temporary directory first and
    copied (storage_fs.py).

    Returns:
        Relative file name -> size in bytes (the files themselves stay where they are written).

    Raises:
        RuntimeError: the task wrote no files.
    """
    root = location(run_dir)
    if isinstance(root, StoragePath):
        with tempfile.TemporaryDirectory(prefix="ray-s2p-final-") as scratch:
            out = Path(scratch) / "final"
            files = _saved_files(save_final, out)
            with staged_dir(root / "final", ".final.") as stage:
                upload_tree(out, stage)
        return files
    staging = Path(tempfile.mkdtemp(prefix=".final.", dir=root))
    try:
        out = staging / "final"
        files = _saved_files(save_final, out)
        fsync_tree(out)
        replace_dir(out, root / "final")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def _saved_files(save_final: Callable[[Path], None], out: Path) -> dict[str, int]:
    save_final(out)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    if not files:
        raise RuntimeError("the task's save_final wrote no files")
    return files
