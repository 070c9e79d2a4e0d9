"""Seeded directions: how z is made from a seed, and how x <- x + sum_i c_i z_i is applied.

A direction z is never stored: it is regenerated from a 64-bit seed. Each
selected parameter gets its own generator seed, ``mix_seed(seed, index)``, where
``index`` is the parameter's position in the *canonical order* (the order of
``model.named_parameters()`` restricted to the selected names, tied parameters
once). So tensors of equal shape get distinct noise, and any one parameter's
noise can be made without the others (which the per-module probe hooks in
``probes.py`` need).

Because every parameter's noise has its own generator, parameters can be
perturbed and updated on several threads at once (``DirectionSpace.threads``)
with results equal bit for bit to one thread: on a CPU a generator call uses
one core, so this is where Gaussian noise gets its speed back.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from .lowrank import add_lowrank, draw_factors, materialise

MASK64 = (1 << 64) - 1
T = TypeVar("T")
DISTRIBUTIONS = ("gaussian", "rademacher", "sphere", "table", "lowrank")


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 finaliser chained over the values).

    Used for per-parameter generator seeds and for step/direction seeds; 63 bits
    because torch.Generator.manual_seed wants a non-negative int64.
    """
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & MASK64)) & MASK64
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def rademacher(shape: torch.Size, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Rademacher (+-1) noise from random bits: one 64-bit draw gives 64 signs.

    Drawing one random word per 64 entries instead of one integer per entry makes it
    about 2.5x cheaper than ``randn`` of the same size on a CPU.
    """
    numel = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 63) // 64,), generator=gen, device=device,
                          dtype=torch.int64)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    bits = ((words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel]
    out = torch.empty(numel, dtype=torch.float32, device=device)
    torch.mul(bits, 2, out=out)
    return out.sub_(1.0).view(shape)


class NoiseTable:
    """A fixed table of N(0, 1) floats; a direction reads windows at seed-derived offsets.

    Reading is a slice (no generation), so applying a direction costs one axpy.
    The table is built once per process from ``table_seed`` on ``device``.
    """

    def __init__(self, size: int, table_seed: int = 0x5EED, device: torch.device | str = "cpu") -> None:
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(table_seed, size))
        self.values = torch.randn(size, generator=gen, device=device, dtype=torch.float32)

    @property
    def size(self) -> int:
        return self.values.numel()

    def window(self, key: int, numel: int) -> torch.Tensor:
        if numel > self.size:
            raise ValueError(
                f"a parameter has {numel} elements but perturbation.table_size is {self.size}. "
                f"Fix: set perturbation.table_size to at least {numel}")
        offset = key % (self.size - numel + 1)
        return self.values[offset:offset + numel]


@dataclass
class DirectionSpace:
    """The selected parameters in canonical order, and how their noise is made.

    Args:
        names: parameter names in canonical order.
        params: the parameters (same order).
        distribution: gaussian, rademacher, sphere (uniform on the sphere of radius sqrt(d)), table, or
            lowrank (2-D weights get U V^T / sqrt(rank), see lowrank.py; other parameters Gaussian).
        table: the shared noise table (distribution=table only).
        threads: parameters processed at once by ``map_params`` (perturbed copies, updates). Each
            parameter's noise and arithmetic are unchanged, so results are bitwise the same for any
            thread count; on a CPU, where one generator call uses one core, 2 threads halve the time.
        rank: r of the low-rank directions (distribution=lowrank).
        lowrank_interval: lazy V: V is redrawn every this many steps (1: with every direction).
        lowrank_seed: the run seed, which lazy V's generator seeds mix in.
    """

    names: list[str]
    params: list[torch.nn.Parameter]
    distribution: str = "gaussian"
    table: NoiseTable | None = None
    threads: int = 1
    rank: int = 2
    lowrank_interval: int = 1
    lowrank_seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; use {', '.join(DISTRIBUTIONS)}")
        if self.rank < 1 or self.lowrank_interval < 1:
            raise ValueError(f"rank and lowrank_interval must be >= 1, got {self.rank} and {self.lowrank_interval}")
        if self.distribution == "table" and self.table is None:
            raise ValueError("distribution 'table' needs a NoiseTable")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self._sphere_scale: dict[int, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        # Submission rank: largest parameters first, so one big tensor does not start last and run alone.
        by_size = sorted(range(len(self.params)), key=lambda i: -self.params[i].numel())
        self._submit_order = {i: r for r, i in enumerate(by_size)}

    def map_params(self, fn: Callable[[int], T], indices: Sequence[int] | range | None = None) -> list[T]:
        """[fn(i) for i in indices] (default: every parameter), on ``threads`` threads, under no_grad.

        ``fn`` must touch only parameter ``i``: the parameters are independent, which is what
        makes the parallel result equal to the sequential one bit for bit.
        """
        order = list(range(len(self.params))) if indices is None else list(indices)

        def call(i: int) -> T:
            with torch.no_grad():  # grad mode is per thread
                return fn(i)

        if self.threads == 1 or len(order) < 2:
            return [call(i) for i in order]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ray-s2p-noise")
        futures = {i: self._pool.submit(call, i) for i in sorted(order, key=self._submit_order.__getitem__)}
        return [futures[i].result() for i in order]

    @property
    def dim(self) -> int:
        """d, the number of selected scalars."""
        return sum(p.numel() for p in self.params)

    def is_lowrank(self, index: int) -> bool:
        """True when parameter ``index`` gets low-rank directions (a 2-D weight under distribution=lowrank)."""
        return self.distribution == "lowrank" and self.params[index].ndim == 2

    def factors(self, seed: int, index: int, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of parameter ``index`` for direction ``seed`` (``step`` is needed for lazy V)."""
        p = self.params[index]
        v_key = None
        if self.lowrank_interval > 1:
            if step is None:
                raise ValueError("lazy V (perturbation.lowrank_interval > 1) needs the step of the direction")
            v_key = mix_seed(self.lowrank_seed, (step - 1) // self.lowrank_interval, index)
        return draw_factors(mix_seed(seed, index), p.shape, self.rank, p.device, v_key)

    def raw_noise(self, seed: int, index: int, step: int | None = None) -> torch.Tensor:
        """Unscaled noise for parameter ``index`` of direction ``seed`` (float32, on the parameter's device)."""
        p = self.params[index]
        key = mix_seed(seed, index)
        if self.distribution == "table":
            assert self.table is not None
            return self.table.window(key, p.numel()).view(p.shape)
        if self.is_lowrank(index):
            return materialise(*self.factors(seed, index, step))
        gen = torch.Generator(device=p.device)
        gen.manual_seed(key)
        if self.distribution == "rademacher":
            return rademacher(p.shape, gen, p.device)
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)

    def noise(self, seed: int, index: int, step: int | None = None) -> torch.Tensor:
        """z restricted to parameter ``index`` (float32), for direction ``seed``."""
        z = self.raw_noise(seed, index, step)
        if self.distribution == "sphere":
            z = z.mul_(self._sphere(seed))
        return z

    def _sphere(self, seed: int) -> float:
        # Normalising needs the global norm: one extra generation pass per seed, cached.
        # (map_params threads may ask at once: they compute the same value, and each returns its own.)
        scale = self._sphere_scale.get(seed)
        if scale is None:
            sq = sum(float(self.raw_noise(seed, i).double().pow(2).sum()) for i in range(len(self.params)))
            scale = math.sqrt(self.dim / sq) if sq > 0 else 0.0
            if len(self._sphere_scale) > 64:
                self._sphere_scale.clear()
            self._sphere_scale[seed] = scale
        return scale

    def perturbed(self, seed: int, index: int, radius: float, step: int | None = None) -> torch.Tensor:
        """A new tensor x_index + radius * z_index in the parameter's dtype (x itself is not touched)."""
        p = self.params[index]
        z = self.noise(seed, index, step)
        out = p.detach().to(torch.float32).add(z, alpha=radius)
        return out.to(p.dtype)


def select_parameters(model: torch.nn.Module, names: Sequence[str] | None = None) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Selected parameters in canonical order (``named_parameters`` order, tied ones once).

    Args:
        model: the model.
        names: names to select; None selects every parameter with requires_grad.

    Raises:
        ValueError: a name is not a parameter of the model, or nothing is selected.
    """
    all_named = list(model.named_parameters())
    if names is None:
        chosen = [(n, p) for n, p in all_named if p.requires_grad]
    else:
        wanted = set(names)
        known = {n for n, _ in all_named}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"parameter {missing[0]!r} is not in the model. Fix: check the trainable selection")
        chosen = [(n, p) for n, p in all_named if n in wanted]
    if not chosen:
        raise ValueError("no trainable parameters selected. Fix: check task.trainable / patterns")
    return [n for n, _ in chosen], [p for _, p in chosen]


def apply_update(space: DirectionSpace, pairs: Sequence[tuple[int, float]], param_scale: float = 1.0,
                 step: int | None = None) -> None:
    """x <- param_scale * x + sum_i c_i z_i, in place, in a fixed order.

    The order is parameter by parameter (canonical order), and within one
    parameter the pairs in the given order; replay uses the same function, so
    training and replay produce the same bits. The sum is accumulated in float32
    and then cast to the parameter's dtype (fp32 master parameters: tiny steps
    are not rounded away). A low-rank parameter takes all directions in one product
    (``lowrank.add_lowrank``), which costs N r (m + n) noise numbers and one GEMM.

    Args:
        space: the selected parameters.
        pairs: (seed, coefficient) per direction; zero coefficients are skipped.
        param_scale: multiplier on x first (weight decay), 1.0 for none.
        step: the step the pairs belong to (needed only for lazy V).
    """
    active = [(s, c) for s, c in pairs if c != 0.0]
    if not active and param_scale == 1.0:
        return

    def update(i: int) -> None:
        p = space.params[i]
        if param_scale != 1.0:
            p.mul_(param_scale)
        if space.is_lowrank(i):
            add_lowrank(p, [(coefficient, *space.factors(seed, i, step)) for seed, coefficient in active])
            return
        for seed, coefficient in active:
            p.add_(space.noise(seed, i, step).to(p.dtype), alpha=coefficient)

    space.map_params(update)
