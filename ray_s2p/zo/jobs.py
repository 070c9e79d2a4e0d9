"""The noise threads: independent jobs (noise chunks, low-rank products) run on a small thread pool.

A probe's perturbed copies and an update are lists of jobs that each write only their own slice of
memory, so the result is the same bit for bit for any thread count (directions.py, update.py). On a CPU
one generator call uses one core, which is why the noise is cut into jobs at all.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch

Job = tuple[int, Callable[[], None]]  # (cost in elements, work); jobs touch disjoint memory
INLINE_MAX_NUMEL = 1 << 16  # jobs with fewer elements in all run on the calling thread
_IN_WORKER = threading.local()


def _as_worker(fn: Callable[[], None]) -> None:
    _IN_WORKER.active = True  # a job that asks for more noise runs it inline instead of waiting on the pool
    with torch.no_grad():  # grad mode is per thread
        fn()


class JobRunner:
    """Runs lists of independent jobs on ``threads`` threads (the pool starts on first use).

    Args:
        threads: jobs run at once; 1 runs every job inline on the calling thread.

    Raises:
        ValueError: threads below 1.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: list[Job]) -> None:
        """Run ``jobs`` largest first under no_grad and re-raise the first error once all have finished.

        Inside a job, with one thread, or when they are small in all, they run inline in the given order.
        """
        small = sum(cost for cost, _ in jobs) < INLINE_MAX_NUMEL  # waking a thread costs more than the work
        if self.threads == 1 or len(jobs) < 2 or small or getattr(_IN_WORKER, "active", False):
            with torch.no_grad():
                for _, fn in jobs:
                    fn()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ray-s2p-noise")
        futures = [self._pool.submit(_as_worker, fn) for _, fn in sorted(jobs, key=lambda job: -job[0])]
        wait(futures)  # every job has finished writing before an error is raised
        for future in futures:
            future.result()
