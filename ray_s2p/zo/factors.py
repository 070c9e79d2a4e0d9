"""Low-rank factor streams: every matrix's U and V of one direction, drawn in one go.

A low-rank direction needs U (m x r) and V (n x r) for every selected 2-D weight.
Drawing them matrix by matrix costs one generator per (direction, matrix): on a
transformer that is tens of generator set-ups per direction, which is what the
update of N directions pays N times. Instead a direction's factors are one stream:

- U stream: one generator seeded ``mix_seed(seed, U_STREAM)`` draws the U of every
  low-rank matrix, in canonical order, as one ``randn``;
- V stream: with ``interval == 1`` the same generator goes on to draw every V; with
  lazy V (``interval > 1``) one generator seeded ``mix_seed(run_seed, window, V_STREAM)``
  draws them, once per window of ``interval`` steps, and every direction of the window
  gets the same V tensors (so ``add_lowrank`` can sum the U's first);
- vector stream: the direction's generator then draws the Gaussian noise of every small
  parameter that is not low-rank (biases, norms: at most 2^16 elements each), so they
  need no generator of their own either.

A matrix's factors are views into these streams. Recent directions' streams are kept
(a probe asks for each matrix's factors from its own hook); an update first asks for
all of its directions at once (``prefetch``), so its jobs only read.
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence

import torch

from .noise import mix_seed

U_STREAM = 0x55  # tags that keep the factor streams apart from every other use of a direction's seed
V_STREAM = 0x56
KEEP = 8  # directions' streams kept for probes beyond those of the last prefetch


class FactorStreams:
    """The factor layout of a model's low-rank matrices, and the streams of recent directions.

    Args:
        shapes: (canonical index, (m, n)) of every low-rank matrix, in canonical order.
        rank: r.
        interval: lazy V's window in steps (1: V drawn with every direction).
        run_seed: the run seed, mixed into lazy V's generator seeds.
        device: where the streams are drawn (the first matrix's device).
    """

    def __init__(self, shapes: Iterable[tuple[int, tuple[int, int]]], rank: int, interval: int, run_seed: int,
                 device: torch.device, vectors: Iterable[tuple[int, int]] = ()) -> None:
        self.rank = rank
        self.interval = interval
        self.run_seed = run_seed
        self.device = device
        self.layout: dict[int, tuple[int, int, int, int]] = {}  # index -> (U offset, m, V offset, n)
        u_total = v_total = 0
        for index, (m, n) in shapes:
            self.layout[index] = (u_total, m, v_total, n)
            u_total += m * rank
            v_total += n * rank
        self.u_total, self.v_total = u_total, v_total
        self.vector_layout: dict[int, tuple[int, int]] = {}  # index -> (offset, numel) in the vector stream
        w_total = 0
        for index, numel in vectors:
            self.vector_layout[index] = (w_total, numel)
            w_total += numel
        self.w_total = w_total
        self._streams: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._windows: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def window(self, step: int | None) -> int | None:
        """Lazy V's window of ``step`` (None without lazy V)."""
        if self.interval == 1 or not self.layout:  # no matrices: nothing has a V
            return None
        if step is None:
            raise ValueError("lazy V (perturbation.lowrank_interval > 1) needs the step of the direction")
        return (step - 1) // self.interval

    def _draw(self, seed: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(seed, U_STREAM))

        def normal(count: int) -> torch.Tensor:
            return torch.randn(count, generator=gen, device=self.device, dtype=torch.float32)

        u = normal(self.u_total)
        if window is None:
            v = normal(self.v_total)
            return u, v, normal(self.w_total)
        w = normal(self.w_total)
        v = self._windows.get(window)
        if v is None:
            gen.manual_seed(mix_seed(self.run_seed, window, V_STREAM))
            v = normal(self.v_total)
            self._windows = {k: t for k, t in self._windows.items() if k >= window - 1}  # this window and the last
            self._windows[window] = v
        return u, v, w

    def streams(self, seed: int, step: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat U, V and vector streams of direction ``seed`` (drawn once, then kept while recent)."""
        key = (seed, self.window(step))
        with self._lock:
            found = self._streams.get(key)
            if found is None:
                found = self._draw(*key)
                if len(self._streams) >= KEEP:
                    self._streams.pop(next(iter(self._streams)))  # the oldest
                self._streams[key] = found
            return found

    def prefetch(self, seeds: Iterable[int], step: int | None) -> None:
        """Draw the streams of every direction an update applies, keeping exactly those.

        Memory: (number of directions) x (stream size) floats, until ``trim`` (apply_update trims
        at its end).
        """
        window = self.window(step)
        wanted = [(seed, window) for seed in seeds]
        with self._lock:
            kept = {key: self._streams.get(key) or self._draw(*key) for key in wanted}
            self._streams = kept

    def factors(self, seed: int, index: int, step: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """U (m x r) and V (n x r) of matrix ``index`` for direction ``seed``, on ``device``."""
        u_flat, v_flat, _ = self.streams(seed, step)
        u_off, m, v_off, n = self.layout[index]
        r = self.rank
        u = u_flat[u_off:u_off + m * r].view(m, r)
        v = v_flat[v_off:v_off + n * r].view(n, r)
        return u.to(device), v.to(device)

    def vector(self, seed: int, index: int, step: int | None, device: torch.device) -> torch.Tensor:
        """The (flat, float32) Gaussian noise of small parameter ``index`` for direction ``seed``, on ``device``."""
        offset, numel = self.vector_layout[index]
        return self.streams(seed, step)[2][offset:offset + numel].to(device)

    def combined(self, pairs: Sequence[tuple[int, float]], step: int | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """sum_i c_i U_i over the whole U stream (None unless V is shared) and sum_i c_i w_i over the vector stream.

        Summing the flat streams first costs one pass over r (m + n)-sized vectors per direction and then
        one product (or one addition) per parameter, instead of one small operation per (direction,
        parameter). Call ``prefetch`` for the same pairs first. The sums run in the pairs' order.
        """
        u_sum: torch.Tensor | None = None
        w_sum = torch.zeros(self.w_total, dtype=torch.float32, device=self.device)
        if self.interval > 1:
            u_sum = torch.zeros(self.u_total, dtype=torch.float32, device=self.device)
        for seed, c in pairs:
            u, _, w = self.streams(seed, step)
            w_sum.add_(w, alpha=c)
            if u_sum is not None:
                u_sum.add_(u, alpha=c)
        return u_sum, w_sum

    def slice_u(self, flat: torch.Tensor, index: int, device: torch.device) -> torch.Tensor:
        """Matrix ``index``'s (m x r) part of a flat U-stream-shaped tensor."""
        u_off, m, _, _ = self.layout[index]
        return flat[u_off:u_off + m * self.rank].view(m, self.rank).to(device)

    def slice_w(self, flat: torch.Tensor, index: int, device: torch.device) -> torch.Tensor:
        """Small parameter ``index``'s part of a flat vector-stream-shaped tensor."""
        offset, numel = self.vector_layout[index]
        return flat[offset:offset + numel].to(device)

    def trim(self) -> None:
        """Keep only the ``KEEP`` most recent directions' streams (after an update's prefetch)."""
        with self._lock:
            while len(self._streams) > KEEP:
                self._streams.pop(next(iter(self._streams)))
