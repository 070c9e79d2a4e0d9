"""Noise streams: how the numbers of one parameter's direction are drawn from a seed.

A parameter's noise is cut into chunks of ``CHUNK`` consecutive elements (of the
flattened tensor), and chunk k is drawn from its own generator, seeded with
``chunk_key(key, k)`` where ``key = mix_seed(seed, parameter index)``. Why chunks:

- speed: a CPU generator call runs on one core; chunks of one tensor can be drawn
  on several threads at once, and MiniLM's word embedding alone is half the model;
- cache: drawing 1 MB, then adding it to the parameter while it is still in cache,
  is ~1.5x faster than one pass of ``randn`` over the whole tensor followed by a
  second pass for the add (measured on a 2-core CPU, docs/benchmarks.md);
- results do not depend on the thread count: each chunk's numbers and arithmetic
  are fixed by its key and its position, never by which thread drew it.

Chunk 0 uses ``key`` itself, so a parameter of at most ``CHUNK`` elements has the
same noise as one ``randn`` over the whole tensor.
"""

from __future__ import annotations

import math

import torch

MASK64 = (1 << 64) - 1
CHUNK = 1 << 18  # elements per generator stream (1 MB of float32): the fastest size measured (docs/benchmarks.md)
ACCELERATOR_CHUNK = 1 << 24  # on a GPU: one generator per 16 M elements
_SIGNS: dict[str, torch.Tensor] = {}


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


def chunk_key(key: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of the stream ``key`` (chunk 0: ``key`` itself)."""
    return key if chunk == 0 else mix_seed(key, chunk)


def chunk_bounds(numel: int, device: torch.device | str = "cpu") -> list[tuple[int, int]]:
    """[(start, stop)] of the chunks of a tensor with ``numel`` elements on ``device``.

    On a CPU chunks have ``CHUNK`` elements; on an accelerator ``ACCELERATOR_CHUNK``: its
    generator kernels are parallel already, and many small ones would cost launches.
    (CPU and accelerator generators give different streams anyway: a ledger replays
    bit for bit only on the device type it was trained on.)
    """
    size = CHUNK if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK
    return [(lo, min(lo + size, numel)) for lo in range(0, max(numel, 1), size)]


def _signs(device: torch.device) -> torch.Tensor:
    # Row b holds the 8 bits of byte b as +-1 (lowest bit first): one gather turns bytes into signs.
    table = _SIGNS.get(str(device))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits * 2 - 1).to(torch.float32).to(device)
        _SIGNS[str(device)] = table
    return table


def rademacher_fill(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill the 1-D float32 ``out`` with +-1 from random bits: one 64-bit draw gives 64 signs.

    One random word per 64 entries and one table gather per byte make it about 10x
    cheaper than ``randn`` of the same size on a CPU.
    """
    numel = out.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 63) // 64,), generator=gen, device=out.device,
                          dtype=torch.int64)
    index = words.view(torch.uint8).to(torch.int64)
    if numel % 64 == 0:
        torch.index_select(_signs(out.device), 0, index, out=out.view(-1, 8))
    else:
        out.copy_(_signs(out.device).index_select(0, index).view(-1)[:numel])
    return out


def fill_chunk(out: torch.Tensor, key: int, chunk: int, distribution: str) -> torch.Tensor:
    """Fill the 1-D float32 ``out`` (one chunk) with chunk ``chunk`` of the stream ``key``.

    Args:
        out: the chunk's storage (contiguous, float32, on the parameter's device).
        key: the parameter's stream key, ``mix_seed(seed, index)``.
        chunk: the chunk's number within the parameter.
        distribution: gaussian or sphere (N(0, 1) before the sphere's scaling), or rademacher.
    """
    gen = torch.Generator(device=out.device)
    gen.manual_seed(chunk_key(key, chunk))
    if distribution == "rademacher":
        return rademacher_fill(out, gen)
    return out.normal_(generator=gen)


def draw(shape: torch.Size, key: int, distribution: str, device: torch.device) -> torch.Tensor:
    """The whole noise tensor of stream ``key`` (float32), chunk by chunk on this thread."""
    out = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
    for k, (lo, hi) in enumerate(chunk_bounds(out.numel(), device)):
        fill_chunk(out[lo:hi], key, k, distribution)
    return out.view(shape)


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
        """The ``numel`` table entries a parameter with stream key ``key`` reads (a view, not a copy)."""
        if numel > self.size:
            raise ValueError(
                f"a parameter has {numel} elements but perturbation.table_size is {self.size}. "
                f"Fix: set perturbation.table_size to at least {numel}")
        offset = key % (self.size - numel + 1)
        return self.values[offset:offset + numel]
