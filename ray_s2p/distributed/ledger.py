"""The ledger: one row per direction per step, the whole trajectory in seeds and scalars.

Rows are buffered in memory and the file is rewritten atomically on every flush
(Parquet files cannot be appended to safely; a ledger of 20k steps is a few
MB, so rewriting is cheap and a crash never leaves a torn file). Columns are
documented in docs/ledger.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_path

if TYPE_CHECKING:  # only for the annotation: the ledger needs no step rule to read or write rows
    from ..zo.rules import StepDecision

SCHEMA = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("direction", pa.int32(), nullable=False),
    pa.field("replica", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("radius", pa.float64(), nullable=True),
    pa.field("loss_plus", pa.float64(), nullable=True),
    pa.field("loss_minus", pa.float64(), nullable=True),
    pa.field("extra_losses", pa.list_(pa.float64()), nullable=True),
    pa.field("gamma", pa.float64(), nullable=True),
    pa.field("sigma", pa.float64(), nullable=True),
    pa.field("step_size", pa.float64(), nullable=True),
    pa.field("coefficient", pa.float64(), nullable=False),
    pa.field("skipped", pa.bool_(), nullable=False),
    pa.field("param_scale", pa.float64(), nullable=False),
])


class LedgerError(ValueError):
    """The ledger file is missing, truncated, corrupted or does not match the run."""


@dataclass(frozen=True)
class LedgerRow:
    """One direction of one step."""

    step: int
    direction: int
    replica: int
    seed: int
    radius: float | None
    loss_plus: float | None
    loss_minus: float | None
    extra_losses: tuple[float, ...] | None
    gamma: float | None
    sigma: float | None
    step_size: float | None
    coefficient: float
    skipped: bool
    param_scale: float


def ledger_rows(step: int, seeds: Sequence[int], radii: Sequence[float], losses: Sequence[Sequence[float]],
                decision: "StepDecision", replicas: Sequence[int] | None = None) -> list[LedgerRow]:
    """Ledger rows of one step (one per direction)."""
    rows = []
    two_point = len(radii) >= 2 and radii[0] == -radii[1] and radii[0] > 0
    for i, seed in enumerate(seeds):
        ls = list(losses[i])
        if two_point:
            plus, minus, extra, radius = ls[0], ls[1], ls[2:], radii[0]
        else:
            plus, minus, extra, radius = None, None, ls, None
        rows.append(LedgerRow(
            step=step, direction=i, replica=replicas[i] if replicas is not None else 0, seed=int(seed),
            radius=radius, loss_plus=plus, loss_minus=minus, extra_losses=tuple(extra) if extra else None,
            gamma=decision.gammas[i], sigma=decision.sigma, step_size=decision.step_sizes[i],
            coefficient=float(decision.coefficients[i]), skipped=bool(decision.skipped[i]),
            param_scale=float(decision.param_scale)))
    return rows


def _clean(value: float | None) -> float | None:
    return None if value is None else float(value)


class Ledger:
    """In-memory rows plus atomic flushes to ``path``."""

    def __init__(self, path: str | Path, rows: Sequence[LedgerRow] = ()) -> None:
        self.path = Path(path)
        self.rows: list[LedgerRow] = list(rows)

    @classmethod
    def open(cls, path: str | Path, upto_step: int | None = None) -> "Ledger":
        """Load an existing ledger (or start an empty one), keeping rows with step <= upto_step."""
        p = Path(path)
        if not p.exists():
            return cls(p)
        table = read_table(p)
        rows = table_rows(table)
        if upto_step is not None:
            rows = [r for r in rows if r.step <= upto_step]
        return cls(p, rows)

    def extend(self, rows: Iterable[LedgerRow]) -> None:
        self.rows.extend(rows)

    def truncate(self, upto_step: int) -> None:
        """Drop rows of steps after ``upto_step`` (used on resume from a checkpoint)."""
        self.rows = [r for r in self.rows if r.step <= upto_step]

    def table(self) -> pa.Table:
        cols = {name: [getattr(r, name) for r in self.rows] for name in SCHEMA.names}
        cols["extra_losses"] = [list(v) if v is not None else None for v in cols["extra_losses"]]
        for name in ("radius", "loss_plus", "loss_minus", "gamma", "sigma", "step_size"):
            cols[name] = [_clean(v) for v in cols[name]]
        return pa.table(cols, schema=SCHEMA)

    def flush(self) -> None:
        """Rewrite the file atomically with every row so far."""
        with atomic_path(self.path) as tmp:
            pq.write_table(self.table(), tmp)

    def digest(self, upto_step: int) -> str:
        """sha256 of the rows up to ``upto_step`` (checkpoints record it to detect a swapped ledger)."""
        return rows_digest([r for r in self.rows if r.step <= upto_step])


def rows_digest(rows: Sequence[LedgerRow]) -> str:
    """A stable hash of the (step, direction, seed, coefficient, param_scale) of each row."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.step}:{r.direction}:{r.seed}:{r.coefficient!r}:{r.param_scale!r};".encode())
    return h.hexdigest()


def read_table(path: str | Path) -> pa.Table:
    """Read and schema-check a ledger file.

    Raises:
        LedgerError: missing, unreadable (truncated/corrupted) or wrong columns.
    """
    p = Path(path)
    if not p.is_file():
        raise LedgerError(f"ledger {p.name!r} not found in {p.parent.name!r}. Fix: point at a run directory")
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for torn or corrupted files
        raise LedgerError(f"ledger {p.name!r} is truncated or corrupted ({exc}). "
                          f"Fix: restore it, or resume from a checkpoint with --resume") from exc
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise LedgerError(f"ledger {p.name!r} lacks column {missing[0]!r}; it is not a ray_s2p ledger")
    return table.select(SCHEMA.names).cast(SCHEMA)


def table_rows(table: pa.Table) -> list[LedgerRow]:
    """Rows of a ledger table as records."""
    data = table.to_pydict()
    out = []
    for i in range(table.num_rows):
        kw = {name: data[name][i] for name in SCHEMA.names}
        kw["extra_losses"] = tuple(kw["extra_losses"]) if kw["extra_losses"] is not None else None
        out.append(LedgerRow(**kw))
    return out


def updates_by_step(rows: Sequence[LedgerRow]) -> list[tuple[int, list[tuple[int, float]], float]]:
    """Group rows into (step, [(seed, coefficient) in direction order], param_scale), steps ascending.

    Raises:
        LedgerError: a step appears with gaps, twice, or with inconsistent param_scale.
    """
    grouped: dict[int, list[LedgerRow]] = {}
    for r in rows:
        grouped.setdefault(r.step, []).append(r)
    out = []
    expected = 1
    for step in sorted(grouped):
        if step != expected:
            raise LedgerError(f"ledger skips from step {expected - 1} to {step}; it is incomplete")
        expected += 1
        group = sorted(grouped[step], key=lambda r: r.direction)
        if len({r.direction for r in group}) != len(group):
            raise LedgerError(f"ledger holds step {step} more than once")
        scales = {r.param_scale for r in group}
        if len(scales) != 1:
            raise LedgerError(f"ledger step {step} has inconsistent param_scale values")
        out.append((step, [(r.seed, r.coefficient) for r in group], scales.pop()))
    return out
