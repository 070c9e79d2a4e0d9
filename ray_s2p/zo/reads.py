"""Where a forward reads the selected parameters: what the ``hooks`` probe mechanism must know.

``hooks`` perturbs a parameter only while a module that owns it runs (probes.py). Two ways a
model can read a parameter elsewhere:

- tied parameters: one ``nn.Parameter`` registered in several modules (tied input and output
  embeddings). Every owner's hook perturbs it during that owner's forward, so they are exact;
  ``owners`` lists them when the model is wrapped.
- functional reads: ``h @ self.emb.weight.T`` in a parent's forward, or ``F.linear(h, other.weight)``.
  No module structure shows them. On the first probe, ``ReadRecorder`` (a ``TorchFunctionMode``)
  watches every torch call of the forward and records the selected parameters passed to one while
  no owner of theirs is running; the prober then swaps those for the whole forward, where every
  read sees the perturbed value. A read that the first batch does not make (a branch taken only
  on some inputs) is not seen: such models should use ``mechanism: swap``.

Separate ``nn.Parameter`` objects that share memory cannot be probed or updated correctly by any
mechanism (perturbing or updating one changes the other behind its back): ``check_no_aliasing``
refuses them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.overrides import TorchFunctionMode

# Tensor attributes and methods that read metadata, not values: a read of these outside the owner
# (``self.weight.dtype``, ``next(model.parameters()).device``) needs no perturbation.
METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "requires_grad", "is_leaf", "layout", "grad", "grad_fn", "is_cuda",
    "is_sparse", "is_quantized", "is_meta", "names", "size", "dim", "numel", "stride", "element_size",
    "is_floating_point", "is_complex", "data_ptr", "is_contiguous", "nelement", "storage_offset",
    "untyped_storage", "get_device", "__len__", "__hash__", "__eq__"})


def owners(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
           names: Sequence[str]) -> dict[str, list[str]]:
    """Selected parameters registered in more than one module: parameter name -> the owning modules' names."""
    index = {id(p): i for i, p in enumerate(params)}
    found: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and id(p) in index:
                found.setdefault(index[id(p)], []).append(module_name or "<root>")
    return {names[i]: sorted(set(mods)) for i, mods in found.items() if len(set(mods)) > 1}


def check_no_aliasing(params: Sequence[torch.nn.Parameter], names: Sequence[str]) -> None:
    """Refuse distinct selected parameters whose memory overlaps.

    Raises:
        ValueError: naming both parameters and the fix (tie them as one parameter, or train only one).
    """
    spans: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        storage = p.untyped_storage()
        size = p.element_size()
        last = p.storage_offset() + sum((n - 1) * s for n, s in zip(p.shape, p.stride()))
        start, end = p.storage_offset() * size, (last + 1) * size
        key = (str(p.device), storage.data_ptr())
        for j, a, b in spans.get(key, []):
            if start < b and a < end:
                raise ValueError(
                    f"parameters {names[j]!r} and {names[i]!r} are separate nn.Parameter objects sharing memory: a "
                    f"probe or an update of one would change the other unseen, whatever the perturbation "
                    f"mechanism. Fix: tie them as one parameter (e.g. `head.weight = emb.weight`), so they are "
                    f"perturbed and updated once, or leave one of them out of the trainable parameters")
        spans.setdefault(key, []).append((i, start, end))


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _reads_values(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):  # a property: T and data read values, shape and dtype do not
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name not in METADATA


class ReadRecorder(TorchFunctionMode):
    """Records the selected parameters a forward passes to torch while none of their owners is running.

    The prober marks an owner's forward with ``enter``/``leave`` and its own bookkeeping (swapping
    ``.data``, drawing noise) with ``paused``, so that only the model's reads are seen.

    Args:
        params: the selected parameters, in canonical order.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        super().__init__()
        self.index = {id(p): i for i, p in enumerate(params)}
        self.inside = [0] * len(params)  # owners of parameter i running now (nested or tied owners count twice)
        self.outside: set[int] = set()
        self.paused = 0

    def enter(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.inside[i] += 1

    def leave(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.inside[i] -= 1

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.paused and _reads_values(func):
            for leaf in _leaves(args) + _leaves(kwargs):
                i = self.index.get(id(leaf))
                if i is not None and self.inside[i] == 0:
                    self.outside.add(i)
        return func(*args, **kwargs)
