"""Seeded directions: how z is made from a seed, and the perturbed copies x + t z a probe reads.

The update x <- x + sum_i c_i z_i (or its sign) is update.py; which parameters move is space.py.

A direction z is never stored: it is regenerated from a 64-bit seed. Each
selected parameter gets its own noise stream, keyed ``mix_seed(seed, index)``, where
``index`` is the parameter's position in the *canonical order* (the order of
``model.named_parameters()`` restricted to the selected names, tied parameters
once). So tensors of equal shape get distinct noise, and any one parameter's
noise can be made without the others (which the per-module probe hooks in
``probes.py`` need).

A stream is cut into chunks with their own generators (noise.py), and the work of
a probe or an update is a list of independent jobs, one per chunk (one per
parameter for low-rank and table directions), run on ``DirectionSpace.threads``
threads (jobs.py). Every job writes only its own slice, so results are equal bit for bit
for any thread count. A chunk job holds one chunk of noise (1 MB), so threads cost
no memory there; whole-tensor jobs (low-rank, table and non-contiguous parameters, and
bf16/fp16 copies of them) hold a float32 copy of their tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import COUNTER_DISTRIBUTIONS, DISTRIBUTIONS, NOISE_SOURCES
from . import counter_noise
from .factors import FactorStreams
from .jobs import INLINE_MAX_NUMEL, Job, JobRunner
from .lowrank import materialise
from .noise import NoiseTable, chunk_bounds, draw, fill_chunk, mix_seed

# Part of the low-rank direction's definition (changing it changes the noise): non-matrix parameters of at
# most this many elements take their Gaussian noise from the direction's factor stream.
STREAM_MAX_NUMEL = 1 << 16


@dataclass
class DirectionSpace:
    """The selected parameters in canonical order, and how their noise is made.

    Args:
        names: parameter names in canonical order.
        params: the parameters (same order).
        distribution: gaussian, rademacher, sphere (uniform on the sphere of radius sqrt(d)), table, or
            lowrank (2-D weights get U V^T / sqrt(rank), see lowrank.py; other parameters Gaussian).
        table: the shared noise table (distribution=table only).
        threads: jobs (noise chunks, low-rank products) run at once for perturbed copies and updates.
            Results are bitwise the same for any thread count; on a CPU, where one generator call
            uses one core, 2 threads halve the time of Gaussian noise.
        rank: r of the low-rank directions (distribution=lowrank).
        lowrank_interval: lazy V: V is redrawn every this many steps (1: with every direction).
        run_seed: the run seed, which lazy V's generator seeds and the stochastic rounding of
            bf16/fp16 parameters (``apply_update``) mix in.
        decay_exempt: one flag per parameter, True where weight decay (``param_scale``) must not
            apply (biases and norm weights, ``weight_decay.decay_exempt``); empty: every parameter decays.
        noise_source: ``generator`` (chunks of seeded torch generators, noise.py) or ``philox`` (counter-based
            Gaussian noise made inside fused kernels on an accelerator, counter_noise.py).
    """

    names: list[str]
    params: list[torch.nn.Parameter]
    distribution: str = "gaussian"
    table: NoiseTable | None = None
    threads: int = 1
    rank: int = 2
    lowrank_interval: int = 1
    run_seed: int = 0
    decay_exempt: tuple[bool, ...] = ()
    noise_source: str = "generator"

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; use {', '.join(DISTRIBUTIONS)}")
        if self.noise_source not in NOISE_SOURCES:
            raise ValueError(f"unknown noise source {self.noise_source!r}; use {', '.join(NOISE_SOURCES)}")
        if self.counter_based:
            if self.distribution not in COUNTER_DISTRIBUTIONS:
                raise ValueError(f"noise source 'philox' makes Gaussian and low-rank directions, not "
                                 f"{self.distribution}. Fix: use distribution gaussian or lowrank, or noise source "
                                 "generator")
            for p in self.params:
                counter_noise.check_dtype(p.dtype)
        if self.rank < 1 or self.lowrank_interval < 1:
            raise ValueError(f"rank and lowrank_interval must be >= 1, got {self.rank} and {self.lowrank_interval}")
        if self.distribution == "table" and self.table is None:
            raise ValueError("distribution 'table' needs a NoiseTable")
        if self.decay_exempt and len(self.decay_exempt) != len(self.params):
            raise ValueError(f"decay_exempt has {len(self.decay_exempt)} flags for {len(self.params)} parameters")
        self._sphere_scale: dict[int, float] = {}
        self.jobs = JobRunner(self.threads)  # raises on threads < 1
        matrices = [(i, (int(p.shape[0]), int(p.shape[1]))) for i, p in enumerate(self.params) if self.is_lowrank(i)]
        vectors = [(i, p.numel()) for i, p in enumerate(self.params) if self._in_stream(i)]
        self.factor_streams = FactorStreams(matrices, self.rank, self.lowrank_interval, self.run_seed,
                                            self.params[matrices[0][0]].device if matrices else torch.device("cpu"),
                                            vectors)

    @property
    def counter_based(self) -> bool:
        """True when the noise is counter-based (``noise_source`` philox): element j of parameter i's noise for
        seed s is ``philox.randn(mix_seed(s, i), j)`` (low-rank matrices and the small parameters of low-rank
        directions keep their factor streams), and updates round with counter-based bits."""
        return self.noise_source == "philox"

    def _counter(self, index: int) -> bool:
        # Parameters whose elementwise noise is counter-based: all of them under gaussian; under lowrank the
        # ones that are neither low-rank matrices nor drawn from the factor stream.
        return self.counter_based and not self.is_lowrank(index) and not self._in_stream(index)

    def run_jobs(self, jobs: list[Job]) -> None:
        """Run independent jobs on the space's noise threads (``JobRunner.run``)."""
        self.jobs.run(jobs)

    @property
    def dim(self) -> int:
        """d, the number of selected scalars."""
        return sum(p.numel() for p in self.params)

    def is_lowrank(self, index: int) -> bool:
        """True when parameter ``index`` gets low-rank directions (a 2-D weight under distribution=lowrank)."""
        return self.distribution == "lowrank" and self.params[index].ndim == 2

    def _in_stream(self, index: int) -> bool:
        # Low-rank directions draw small non-matrix parameters (biases, norms) from the direction's one
        # factor stream (factors.py): one generator per direction instead of one per parameter.
        return (self.distribution == "lowrank" and not self.is_lowrank(index)
                and self.params[index].numel() <= STREAM_MAX_NUMEL)

    def scale_of(self, index: int, param_scale: float) -> float:
        """The weight-decay multiplier of parameter ``index``: ``param_scale``, or 1.0 where it is exempt."""
        return 1.0 if self.decay_exempt and self.decay_exempt[index] else param_scale

    def _chunked(self, index: int) -> bool:
        # Gaussian, Rademacher and sphere noise of a contiguous parameter is made chunk by chunk.
        return (self.distribution in ("gaussian", "rademacher", "sphere")
                or (self.distribution == "lowrank" and not self.is_lowrank(index) and not self._in_stream(index))
                ) and self.params[index].is_contiguous()

    def _stream(self) -> str:
        # The chunk distribution: lowrank's vectors and sphere's raw numbers are Gaussian.
        return "rademacher" if self.distribution == "rademacher" else "gaussian"

    def factors(self, seed: int, index: int, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of low-rank parameter ``index`` for direction ``seed`` (``step`` is needed for lazy V).

        Views into the direction's factor streams (factors.py), drawn once for all matrices.
        """
        return self.factor_streams.factors(seed, index, step, self.params[index].device)

    def raw_noise(self, seed: int, index: int, step: int | None = None) -> torch.Tensor:
        """Unscaled noise for parameter ``index`` of direction ``seed`` (float32, on the parameter's device)."""
        p = self.params[index]
        key = mix_seed(seed, index)
        if self.distribution == "table":
            assert self.table is not None
            return self.table.window(key, p.numel()).view(p.shape)
        if self.is_lowrank(index):
            return materialise(*self.factors(seed, index, step))
        if self._in_stream(index):
            return self.factor_streams.vector(seed, index, step, p.device).view(p.shape)
        if self._counter(index):
            return counter_noise.normal(p.numel(), key, p.device).view(p.shape)
        return draw(p.shape, key, self._stream(), p.device)

    def noise(self, seed: int, index: int, step: int | None = None) -> torch.Tensor:
        """z restricted to parameter ``index`` (float32), for direction ``seed``."""
        z = self.raw_noise(seed, index, step)
        if self.distribution == "sphere":
            z = z.mul_(self._sphere(seed))
        return z

    def _sphere(self, seed: int) -> float:
        # Normalising needs the global norm: one extra generation pass per seed (chunk jobs), cached.
        scale = self._sphere_scale.get(seed)
        if scale is None:
            parts: dict[tuple[int, int], float] = {}
            jobs: list[Job] = []
            for i, p in enumerate(self.params):
                for k, (lo, hi) in enumerate(chunk_bounds(p.numel(), p.device)):
                    def square_sum(i: int = i, k: int = k, n: int = hi - lo, device: torch.device = p.device) -> None:
                        z = fill_chunk(torch.empty(n, dtype=torch.float32, device=device), mix_seed(seed, i), k,
                                       "gaussian")
                        parts[(i, k)] = float(z.double().pow(2).sum())
                    jobs.append((hi - lo, square_sum))
            self.run_jobs(jobs)
            sq = sum(parts[key] for key in sorted(parts))  # a fixed order: the same float on every replica
            scale = math.sqrt(self.dim / sq) if sq > 0 else 0.0
            if len(self._sphere_scale) > 64:
                self._sphere_scale.clear()
            self._sphere_scale[seed] = scale
        return scale

    def perturbed_many(self, seed: int, indices: Sequence[int], radius: float, step: int | None = None,
                       out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """New tensors x_i + radius * z_i for each ``i`` in ``indices``, in the parameters' dtypes.

        The parameters themselves are not touched. Chunked noise is drawn into the output and the
        parameter added while the chunk is in cache, on ``threads`` threads. A bf16/fp16 parameter's
        sum is formed in float32 one chunk at a time and rounded to nearest into an output of the
        parameter's dtype, so a probe holds one half-precision copy, never a float32 one of the
        whole tensor (for a 65 M-element embedding: 131 MB instead of 262 + 131 MB).

        Args:
            out: optional buffers of each parameter's size and dtype to write into (None: a new tensor);
                reusing them spares the page faults of a fresh allocation of a large tensor.
        """
        factor = radius * self._sphere(seed) if self.distribution == "sphere" else radius
        outs: list[torch.Tensor] = []
        jobs: list[Job] = []
        for slot, i in enumerate(indices):
            p = self.params[i]
            given = out[slot] if out is not None else None
            buffer = given.view(-1) if given is not None else None
            # float32 and float64 parameters are summed in float32 (and cast back at the end, as before);
            # half-precision ones get an output of their own dtype, filled chunk by chunk.
            dtype = p.dtype if p.dtype in (torch.bfloat16, torch.float16) else torch.float32
            if buffer is None or buffer.numel() != p.numel() or buffer.dtype != dtype or buffer.device != p.device:
                buffer = torch.empty(p.numel(), dtype=dtype, device=p.device)
            out_i = buffer
            outs.append(out_i)
            if self._counter(i):  # one fused pass per weight (slices of it on a CPU)
                jobs.extend(counter_noise.perturb_jobs(out_i, p.detach().reshape(-1), mix_seed(seed, i), factor))
                continue
            if not self._chunked(i):
                def whole(i: int = i, out: torch.Tensor = out_i) -> None:
                    out.copy_(self.params[i].detach().to(torch.float32).add(self.noise(seed, i, step),
                                                                             alpha=radius).reshape(-1))
                jobs.append((self.params[i].numel(), whole))
                continue
            flat = p.detach().reshape(-1)
            bounds = chunk_bounds(p.numel(), p.device)
            if len(bounds) == 1 and p.numel() <= INLINE_MAX_NUMEL:  # one small chunk (a bias, a norm): no job
                _sum_chunk(out_i, flat, mix_seed(seed, i), 0, self._stream(), factor)
                continue
            for k, (lo, hi) in enumerate(bounds):
                def part(k: int = k, lo: int = lo, hi: int = hi, out: torch.Tensor = out_i, flat: torch.Tensor = flat,
                         key: int = mix_seed(seed, i)) -> None:
                    _sum_chunk(out[lo:hi], flat[lo:hi], key, k, self._stream(), factor)
                jobs.append((hi - lo, part))
        self.run_jobs(jobs)
        return [o.view(self.params[i].shape).to(self.params[i].dtype) for i, o in zip(indices, outs)]

    def has_row_noise(self, index: int) -> bool:
        """True when rows of parameter ``index``'s perturbed copy can be made alone (``perturbed_rows``): a
        contiguous table (2-D or more) with chunked generator noise. Counter-based and whole-tensor noise
        (low-rank, table) make their copies whole."""
        return self._chunked(index) and not self._counter(index) and self.params[index].ndim >= 2

    def perturbed_rows(self, seed: int, index: int, rows: torch.Tensor, radius: float) -> torch.Tensor:
        """Rows ``rows`` of x_index + radius * z_index, bit for bit those of ``perturbed``, without the rest.

        What an embedding's probe needs: the rows its batch looks up (a few hundred of a 30 k-row vocabulary)
        instead of a copy of the whole table. Only the noise chunks that hold a wanted element are drawn, each
        into a one-chunk scratch, and every element gets the same float32 arithmetic and rounding as in
        ``perturbed_many``.

        Args:
            rows: sorted, distinct row numbers (int64, on the parameter's device).

        Raises:
            ValueError: the parameter's noise is not made chunk by chunk (see ``has_row_noise``).
        """
        if not self.has_row_noise(index):
            raise ValueError(f"parameter {self.names[index]!r} has no row-wise noise; use perturbed()")
        p = self.params[index]
        width = p.numel() // p.shape[0]
        factor = radius * self._sphere(seed) if self.distribution == "sphere" else radius
        flat = (rows.to(torch.int64).unsqueeze(1) * width + torch.arange(width, device=p.device)).reshape(-1)
        bounds = chunk_bounds(p.numel(), p.device)
        # flat is ascending, so the wanted elements of chunk k are one slice of it: flat[edges[k]:edges[k + 1]].
        starts = torch.tensor([lo for lo, _ in bounds] + [p.numel()], device=p.device)
        edges = torch.searchsorted(flat, starts).tolist()
        z = torch.empty(flat.numel(), dtype=torch.float32, device=p.device)
        key = mix_seed(seed, index)
        jobs: list[Job] = []
        for k, (lo, hi) in enumerate(bounds):
            a, b = edges[k], edges[k + 1]
            if a == b:
                continue

            def gather(k: int = k, lo: int = lo, hi: int = hi, a: int = a, b: int = b) -> None:
                chunk = fill_chunk(torch.empty(hi - lo, dtype=torch.float32, device=p.device), key, k,
                                   self._stream())
                torch.index_select(chunk, 0, flat[a:b] - lo, out=z[a:b])
            jobs.append((hi - lo, gather))
        self.run_jobs(jobs)
        values = z.mul_(factor).add_(p.detach().reshape(-1)[flat].to(torch.float32))
        return values.view(rows.numel(), *p.shape[1:]).to(p.dtype)

    def perturbed(self, seed: int, index: int, radius: float, step: int | None = None) -> torch.Tensor:
        """A new tensor x_index + radius * z_index in the parameter's dtype (x itself is not touched)."""
        return self.perturbed_many(seed, [index], radius, step)[0]


def _sum_chunk(out: torch.Tensor, x: torch.Tensor, key: int, chunk: int, stream: str, factor: float) -> None:
    """``out = x + factor * z`` for one noise chunk: z drawn into ``out`` itself when it is float32, else
    into a float32 scratch of the chunk's size and rounded to nearest into the half-precision ``out``."""
    target = out if out.dtype == torch.float32 else torch.empty(out.numel(), dtype=torch.float32, device=out.device)
    fill_chunk(target, key, chunk, stream).mul_(factor).add_(x.to(torch.float32))
    if target is not out:
        out.copy_(target)
