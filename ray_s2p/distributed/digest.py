"""Canonical parameter digest: one sha256 that says whether two models are bitwise equal."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (works for bf16/fp16, which numpy lacks)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def digest_named(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given.

    The order used everywhere is ``model.named_parameters()`` (tied parameters
    once), which is the canonical order documented in docs/ledger.md.
    """
    h = hashlib.sha256()
    for name, tensor in named:
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(repr(tuple(tensor.shape)).encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter of the model, trainable or not."""
    return digest_named(model.named_parameters())
