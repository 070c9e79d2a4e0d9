"""Exact two-point probes: f(x + t z) evaluated without changing a bit of x.

The in-place round trip x += t z; x -= t z rounds (errors ~1e-7) and replicas
that probe different seeds then drift apart. We never do arithmetic on the
stored tensor during a probe: the perturbed values live in a temporary tensor
that is *swapped in* for the parameter's storage and swapped back, so the
original storage is restored untouched. Mechanisms (``PerturbationConfig.mechanism``):

- ``hooks`` (default): a forward pre-hook on each module that owns selected
  parameters swaps in x + t z for that module only; its forward hook swaps the
  original back. Extra memory: one module's parameters plus its noise. Modules are
  merged into a parent's hook pair while the parent's copies take no more memory
  than the largest single module's (hook_scopes.py): fewer, larger rounds of noise jobs.
  A CPU ``nn.Embedding`` with chunked noise gets no copy of its table: its pre-hook
  looks up only the rows the batch uses (``DirectionSpace.perturbed_rows``), swaps in that
  small table and renumbers the ids, so the forward reads the same values for a few
  hundred rows' memory (one ``torch.unique`` per lookup; on an accelerator it would cost a
  host sync, and the table is a single noise chunk there anyway).
  A parameter tied into several modules is perturbed in each of them. Parameters
  read outside every owner's forward (``h @ emb.weight.T``), or whose owner never
  runs, are found on the first probe (reads.py) and swapped for the whole forward
  instead, so every read sees x + t z.
- ``swap``: every selected parameter is swapped for the whole forward. Extra
  memory: one copy of the selected parameters. Works on bare parameter lists.
  Low-rank weights of linear, Conv1D and embedding layers (``distribution: lowrank``)
  are not swapped at all: their forward hook adds rho (x V) U^T / sqrt(r) to the
  layer's output (lowrank.py); other layers' low-rank weights get a perturbed copy.
- ``naive``: the MeZO-style in-place round trip, kept only as the benchmark
  baseline; not exact.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

from ..config import MECHANISMS
from .directions import DirectionSpace
from .hook_scopes import merge_scopes
from .lowrank import add_output_delta, supports_output_delta
from .reads import ReadRecorder, check_no_aliasing, owners

# Layers whose forward reads their parameters without returning a view of them, so a perturbed copy
# can be overwritten once their forward has returned.
COPYING_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Conv1d, torch.nn.Conv2d)
REUSE_MIN_NUMEL = 1 << 18  # 1 MB of float32: below this the allocator reuses memory by itself


class Prober:
    """Evaluates f(x + t z) with the chosen mechanism, leaving x bitwise unchanged (except ``naive``)."""

    def __init__(self, model: torch.nn.Module | None, space: DirectionSpace, mechanism: str = "hooks", *,
                 row_lookups: bool = True, merge: bool = True) -> None:
        """A prober for ``model``'s parameters in ``space``.

        Args:
            row_lookups, merge: under ``hooks``, let CPU embeddings look up perturbed rows only, and merge
                modules into parents (hook_scopes.py). Both on by default; off only to measure what each
                saves (``ray-s2p bench hooks``): the losses are the same bits either way.
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; use {', '.join(MECHANISMS)}")
        if mechanism == "hooks" and model is None:
            raise ValueError("mechanism 'hooks' needs the model; use 'swap' for bare parameters")
        check_no_aliasing(space.params, space.names)  # no mechanism can probe two parameters sharing memory
        self.model = model
        self.space = space
        self.mechanism = mechanism
        # Tied parameters (one nn.Parameter in several modules): name -> owning modules. Informational: each
        # owner's hook perturbs the parameter during that owner's forward.
        self.tied = owners(model, space.params, space.names) if model is not None else {}
        self._eager: set[int] | None = None  # params swapped for the whole forward under 'hooks'
        # (module, parameters swapped for its forward, low-rank weights added to its output)
        self._owners: list[tuple[torch.nn.Module, list[int], list[int]]] = []
        # Embeddings whose lookups read perturbed rows instead of a perturbed table: module -> weight index.
        self._lookups: dict[torch.nn.Module, int] = {}
        # Large float32 parameters of layers whose outputs never alias their weights get their perturbed
        # copies in buffers kept from one probe to the next (numel -> free buffers): a fresh allocation of
        # tens of MB costs page faults every probe. Held between probes: one buffer per distinct large
        # parameter size and device (for a transformer, a handful of layer shapes).
        self._reusable: set[tuple[int, int]] = set()  # (id(module), parameter index)
        self._scratch: dict[tuple[int, str, torch.dtype], list[torch.Tensor]] = {}  # (numel, device, dtype) -> free
        if mechanism == "hooks":
            by_id = {id(p): i for i, p in enumerate(space.params)}
            swapped_of: dict[torch.nn.Module, list[int]] = {}
            added_of: dict[torch.nn.Module, list[int]] = {}
            for module in model.modules():  # type: ignore[union-attr]
                owned = [by_id[id(p)] for p in module._parameters.values() if p is not None and id(p) in by_id]
                added = [i for i in owned if space.is_lowrank(i) and supports_output_delta(module, space.params[i])]
                swapped = [i for i in owned if i not in added]
                looked_up = _row_lookup(module, by_id, space) if row_lookups else None
                if looked_up is not None and looked_up in swapped:
                    self._lookups[module] = looked_up
                    swapped.remove(looked_up)
                if swapped:
                    swapped_of[module] = swapped
                if added:
                    added_of[module] = added
            # Whole copies are swapped by the highest module that holds no more of them than one leaf does.
            scopes = (merge_scopes(model, swapped_of, [p.numel() * p.element_size() for p in space.params])
                      if merge else swapped_of)
            for module in model.modules():  # type: ignore[union-attr]
                swapped, added = scopes.get(module, []), added_of.get(module, [])
                if swapped or added or module in self._lookups:
                    self._owners.append((module, swapped, added))
                for i in swapped:
                    # Exact types only (a subclass may override forward); any dtype: a bf16 weight's copy is bf16.
                    if space.params[i].numel() >= REUSE_MIN_NUMEL and all(
                            type(m) in COPYING_LAYERS for m in module.modules() if i in swapped_of.get(m, ())):
                        self._reusable.add((id(module), i))

    def evaluate(self, loss_fn: Callable[[], torch.Tensor], seed: int, radius: float,
                 step: int | None = None) -> float:
        """f(x + radius * z_seed) as a Python float (radius 0 is a plain forward).

        ``step`` is the direction's step; only lazy low-rank V needs it.
        """
        return float(self.loss(loss_fn, seed, radius, step))

    def loss(self, loss_fn: Callable[[], torch.Tensor], seed: int, radius: float,
             step: int | None = None) -> torch.Tensor:
        """f(x + radius * z_seed) as the loss tensor, left on its device (``evaluate`` without the host sync).

        A step's probes queue their forwards back to back and read every loss at once (``read_losses``); the
        weights are restored as soon as each forward is queued, which on one device stream is after it ran.
        """
        with torch.no_grad():
            if radius == 0.0:
                return _detached(loss_fn())
            if self.mechanism == "naive":
                return self._naive(loss_fn, seed, radius, step)
            if self.mechanism == "swap":
                with self._swapped(range(len(self.space.params)), seed, radius, step):
                    return _detached(loss_fn())
            return self._hooked(loss_fn, seed, radius, step)

    @contextlib.contextmanager
    def _swapped(self, indices: Sequence[int] | range, seed: int, radius: float,
                 step: int | None) -> Iterator[None]:
        originals = []
        perturbed = self.space.perturbed_many(seed, list(indices), radius, step)
        try:
            for i, values in zip(indices, perturbed):
                p = self.space.params[i]
                originals.append((p, p.data))
                p.data = values
            yield
        finally:
            for p, data in originals:
                p.data = data

    @property
    def held_copy_bytes(self) -> int:
        """The most bytes of whole perturbed copies a ``hooks`` probe holds at once: the largest hook pair's,
        plus those swapped for the whole forward (known after the first probe). An embedding's looked-up rows
        (a batch's worth) and the noise threads' one-chunk scratches are not counted; ``swap`` holds a copy of
        every parameter."""
        params = self.space.params
        if self.mechanism != "hooks":
            return sum(p.numel() * p.element_size() for p in params) if self.mechanism == "swap" else 0
        eager = self._eager or set()
        scoped = [sum(params[i].numel() * params[i].element_size() for i in swapped if i not in eager)
                  for _, swapped, _ in self._owners]
        return max(scoped, default=0) + sum(params[i].numel() * params[i].element_size() for i in eager)

    @property
    def whole_forward(self) -> list[str]:
        """Names of the parameters ``hooks`` swaps for the whole forward (known after the first probe)."""
        return [self.space.names[i] for i in sorted(self._eager or ())]

    def _hooked(self, loss_fn: Callable[[], torch.Tensor], seed: int, radius: float,
                step: int | None) -> torch.Tensor:
        fired: set[int] = set()
        saved: dict[int, list[torch.Tensor]] = {}
        padding: list[tuple[torch.nn.Embedding, int | None]] = []  # lookups in progress, innermost last
        handles = []
        # First probe only: record the parameters the model reads outside their owners' forwards.
        recorder = ReadRecorder(self.space.params) if self._eager is None else None

        def quiet(hook: Callable) -> Callable:
            if recorder is None:
                return hook

            def wrapped(*args: object, **kwargs: object) -> object:
                recorder.paused += 1  # the hook's own .data swaps and noise are not the model's reads
                try:
                    return hook(*args, **kwargs)
                finally:
                    recorder.paused -= 1
            return wrapped

        def active(indices: list[int]) -> list[int]:
            return [i for i in indices if self._eager is None or i not in self._eager]

        def pre_hook(indices: list[int]) -> Callable:
            def hook(module: torch.nn.Module, args: object) -> None:
                chosen = active(indices)
                buffers = [self._take(module, i) for i in chosen]
                for i, values in zip(chosen, self.space.perturbed_many(seed, chosen, radius, step, buffers)):
                    p = self.space.params[i]
                    saved.setdefault(i, []).append(p.data)
                    p.data = values
                    fired.add(i)
            return hook

        def post_hook(indices: list[int]) -> Callable:
            def hook(module: torch.nn.Module, args: object, output: object) -> None:
                for i in indices:
                    stack = saved.get(i)
                    if stack:
                        p = self.space.params[i]
                        if (id(module), i) in self._reusable:  # only the module that took it gives it back
                            self._scratch.setdefault((p.numel(), str(p.device), p.dtype), []).append(p.data)
                        p.data = stack.pop()
            return hook

        def lookup_hook(index: int) -> Callable:
            # An embedding: perturb only the rows its ids name and renumber the ids into that small table.
            def hook(module: torch.nn.Embedding, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                if not active([index]):
                    return None
                ids = args[0] if args else kwargs["input"]
                p = self.space.params[index]
                rows, renumbered = torch.unique(ids, sorted=True, return_inverse=True)
                if rows.numel() == 0 or int(rows[0]) < 0 or int(rows[-1]) >= p.shape[0]:
                    return None  # the table itself: the forward raises torch's own error for a bad id
                saved.setdefault(index, []).append(p.data)
                p.data = self.space.perturbed_rows(seed, index, rows, radius)
                # padding_idx only shapes the gradient, and a small table may hold fewer rows than it names.
                padding.append((module, module.padding_idx))
                module.padding_idx = None
                fired.add(index)
                if args:
                    return (renumbered, *args[1:]), kwargs
                return args, {**kwargs, "input": renumbered}
            return hook

        def lookup_done(index: int) -> Callable:
            def hook(module: torch.nn.Embedding, args: object, output: object) -> None:
                stack = saved.get(index)
                if stack and padding and padding[-1][0] is module:
                    self.space.params[index].data = stack.pop()
                    module.padding_idx = padding.pop()[1]
            return hook

        def delta_hook(indices: list[int]) -> Callable:
            # Low-rank weights: W is never touched; rho * (x V) U^T / sqrt(r) is added to the output.
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
                inputs = args if args else tuple(kwargs.values())
                for i in active(indices):
                    u, v = self.space.factors(seed, i, step)
                    output = add_output_delta(module, inputs, output, u, v, radius)
                    fired.add(i)
                return output
            return hook

        try:
            for module, swapped, added in self._owners:
                if recorder is not None:  # the owner's forward is where its parameters may be read
                    owned = swapped + added + ([self._lookups[module]] if module in self._lookups else [])
                    handles.append(module.register_forward_pre_hook(lambda m, a, o=owned: recorder.enter(o)))
                    handles.append(module.register_forward_hook(lambda m, a, out, o=owned: recorder.leave(o)))
                if swapped:
                    handles.append(module.register_forward_pre_hook(quiet(pre_hook(swapped))))
                    handles.append(module.register_forward_hook(quiet(post_hook(swapped))))
                if added:
                    handles.append(module.register_forward_hook(quiet(delta_hook(added)), with_kwargs=True))
                if module in self._lookups:
                    index = self._lookups[module]
                    handles.append(module.register_forward_pre_hook(quiet(lookup_hook(index)), with_kwargs=True))
                    handles.append(module.register_forward_hook(quiet(lookup_done(index))))
            eager = sorted(self._eager) if self._eager is not None else []
            with self._swapped(eager, seed, radius, step):
                if recorder is None:
                    loss = _detached(loss_fn())
                else:
                    with recorder:
                        loss = _detached(loss_fn())
        finally:
            for h in handles:
                h.remove()
            for i, stack in saved.items():  # an exception mid-forward: restore from the bottom of the stack
                if stack:
                    self.space.params[i].data = stack[0]
            for module, padding_idx in reversed(padding):
                module.padding_idx = padding_idx
        if self._eager is None:
            # First probe: parameters whose owner's forward never ran are either unused or read outside
            # their module, and some were read outside it as well; swap those for the whole forward from
            # now on, and redo this probe.
            assert recorder is not None
            self._eager = (set(range(len(self.space.params))) - fired) | recorder.outside
            if self._eager:
                return self._hooked(loss_fn, seed, radius, step)
        return loss

    def _take(self, module: torch.nn.Module, index: int) -> torch.Tensor | None:
        """A kept buffer for parameter ``index``'s perturbed copy in ``module``, or None (a new one is allocated)."""
        if (id(module), index) not in self._reusable:
            return None
        p = self.space.params[index]
        free = self._scratch.get((p.numel(), str(p.device), p.dtype))
        return free.pop() if free else None

    def _naive(self, loss_fn: Callable[[], torch.Tensor], seed: int, radius: float,
               step: int | None) -> torch.Tensor:
        for i, p in enumerate(self.space.params):
            p.data.add_(self.space.noise(seed, i, step).to(p.dtype), alpha=radius)
        try:
            return _detached(loss_fn())
        finally:
            for i, p in enumerate(self.space.params):
                p.data.add_(self.space.noise(seed, i, step).to(p.dtype), alpha=-radius)


def _row_lookup(module: torch.nn.Module, by_id: dict[int, int], space: DirectionSpace) -> int | None:
    """The index of ``module``'s weight when its probe can read perturbed rows only: a plain CPU
    ``nn.Embedding`` (a subclass may override forward; ``max_norm`` writes into the table) whose weight has
    row-wise noise."""
    if type(module) is not torch.nn.Embedding or module.max_norm is not None:
        return None
    index = by_id.get(id(module.weight))
    if index is None or module.weight.device.type != "cpu" or not space.has_row_noise(index):
        return None
    return index


def _detached(value: torch.Tensor | float) -> torch.Tensor:
    # A closure may return a tensor (kept on its device) or a plain number.
    return value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)


def read_losses(rows: Sequence[Sequence[torch.Tensor]]) -> list[tuple[float, ...]]:
    """The Python floats of a step's loss tensors, in one device-to-host copy (float64 holds every float32,
    bf16 or float64 loss exactly, so each value is what ``float(tensor)`` gives)."""
    flat = [t.reshape(()).to(torch.float64) for row in rows for t in row]
    values = torch.stack(flat).tolist() if flat else []
    out, k = [], 0
    for row in rows:
        out.append(tuple(values[k:k + len(row)]))
        k += len(row)
    return out
