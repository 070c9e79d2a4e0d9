"""Which replicas a run has, step by step: phases redone with the replicas left after a drop, and what the
ledger says about the replica count of every step.

With a replica range (``cluster.min_replicas``, direction mode) a replica whose replacement does not start within
``cluster.replace_timeout_s`` is dropped (healing.py ``Healer._drop``). The phase that was running when it was lost
is redone with the others: a probe round is redone whole, with the directions of the replicas present (seeds
``mix_seed(run_seed, k, j)`` for j < n q, as a run of n replicas makes them), because nothing of a step enters the
ledger before its decision; the other phases (apply, digest, evaluation, checkpoint, export) are asked again. So
no step is lost or repeated, and the ledger, which records every direction a step used and the replica that
evaluated it, stays the whole truth: replay and ``--resume`` read the coefficients it holds.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, Sequence, TypeVar

from ..zo.ledger import LedgerRow
from .healing import ReplicasDropped

F = TypeVar("F", bound=Callable[..., Any])


def redone_on_drop(phase: F) -> F:
    """Run ``phase`` again, with the replicas left, each time replicas are dropped during it."""
    @functools.wraps(phase)
    def run(*args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                return phase(*args, **kwargs)
            except ReplicasDropped:
                continue
    return run  # type: ignore[return-value]


def steps_at_size(rows: Sequence[LedgerRow], directions: int) -> dict[str, int]:
    """{replica count: steps} of a direction-mode run, read from its ledger (each replica evaluates
    ``directions`` directions of a step), so a resumed run counts its steps from before the resume too."""
    per_step = Counter(row.step for row in rows)
    sizes = Counter(count // directions for count in per_step.values())
    return {str(n): sizes[n] for n in sorted(sizes, reverse=True)}
