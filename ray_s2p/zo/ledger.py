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
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import pyarrow as pa

from ..errors import RayS2PError
from ..storage_fs import Location, StoragePath, location, read_parquet, read_parquet_schema, write_parquet
from .environment import from_metadata, to_metadata

if TYPE_CHECKING:  # only for the annotation: the ledger needs no step rule to read or write rows
    from .rules import StepDecision

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
    pa.field("sign_step", pa.float64(), nullable=True),
    pa.field("shards", pa.int32(), nullable=True),
])
# Columns a ledger written before they existed may lack; reading fills them with nulls (their meaning then).
OPTIONAL_COLUMNS = ("sign_step", "shards")


class LedgerError(RayS2PError, ValueError):
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
    sign_step: float | None = None  # ZO-signSGD: x <- param_scale x - sign_step sign(sum c z); None: linear
    shards: int | None = None  # data/hybrid mode: the data shards (replicas) whose losses were averaged; None: 1


def ledger_rows(step: int, seeds: Sequence[int], radii: Sequence[float], losses: Sequence[Sequence[float]],
                decision: "StepDecision", replicas: Sequence[int] | None = None,
                shards: Sequence[int] | None = None) -> list[LedgerRow]:
    """Ledger rows of one step (one per direction); ``replicas`` and ``shards`` per direction where known."""
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
            param_scale=float(decision.param_scale), sign_step=_clean(decision.sign_step),
            shards=int(shards[i]) if shards is not None else None))
    return rows


def _clean(value: float | None) -> float | None:
    return None if value is None else float(value)


class Ledger:
    """In-memory rows plus atomic flushes to ``path``."""

    def __init__(self, path: str | Path | StoragePath, rows: Sequence[LedgerRow] = (),
                 environment: dict[str, Any] | None = None) -> None:
        self.path: Location = location(path)
        self.rows: list[LedgerRow] = list(rows)
        # Where the run's arithmetic happened (zo/environment.py); kept in the file's metadata.
        self.environment = environment

    @classmethod
    def open(cls, path: str | Path | StoragePath, upto_step: int | None = None) -> "Ledger":
        """Load an existing ledger (or start an empty one), keeping rows with step <= upto_step."""
        p = location(path)
        if not p.exists():
            return cls(p)
        table = read_table(p)
        rows = table_rows(table)
        if upto_step is not None:
            rows = [r for r in rows if r.step <= upto_step]
        return cls(p, rows, read_environment(p))

    def extend(self, rows: Iterable[LedgerRow]) -> None:
        self.rows.extend(rows)

    def truncate(self, upto_step: int) -> None:
        """Drop rows of steps after ``upto_step`` (used on resume from a checkpoint)."""
        self.rows = [r for r in self.rows if r.step <= upto_step]

    def table(self) -> pa.Table:
        cols = {name: [getattr(r, name) for r in self.rows] for name in SCHEMA.names}
        cols["extra_losses"] = [list(v) if v is not None else None for v in cols["extra_losses"]]
        for name in ("radius", "loss_plus", "loss_minus", "gamma", "sigma", "step_size", "sign_step"):
            cols[name] = [_clean(v) for v in cols[name]]
        return pa.table(cols, schema=SCHEMA)

    def flush(self) -> None:
        """Rewrite the file atomically with every row so far."""
        table = self.table()
        if self.environment is not None:
            table = table.replace_schema_metadata(to_metadata(self.environment))
        write_parquet(self.path, table)

    def digest(self, upto_step: int) -> str:
        """sha256 of the rows up to ``upto_step`` (checkpoints record it to detect a swapped ledger)."""
        return rows_digest([r for r in self.rows if r.step <= upto_step])


def rows_digest(rows: Sequence[LedgerRow]) -> str:
    """A stable hash of the (step, direction, seed, coefficient, param_scale[, sign_step]) of each row.

    ``sign_step`` enters only where it is set, so the digests of linear ledgers (checkpoints'
    ``ledger_digest``) are what they were before sign updates existed.
    """
    h = hashlib.sha256()
    for r in rows:
        sign = f":{r.sign_step!r}" if r.sign_step is not None else ""
        h.update(f"{r.step}:{r.direction}:{r.seed}:{r.coefficient!r}:{r.param_scale!r}{sign};".encode())
    return h.hexdigest()


def read_table(path: str | Path | StoragePath) -> pa.Table:
    """Read and schema-check a ledger file (a local path, a URI or a location of storage_fs.py).

    Raises:
        LedgerError: missing, unreadable (truncated/corrupted) or wrong columns.
    """
    p = location(path)
    if not p.is_file():
        raise LedgerError(f"ledger {p.name!r} not found in {p.parent.name!r}. Fix: point at a run directory")
    try:
        table = read_parquet(p)
    except Exception as exc:  # pyarrow raises several types for torn or corrupted files
        raise LedgerError(f"ledger {p.name!r} is truncated or corrupted ({exc}). "
                          f"Fix: restore it, or resume from a checkpoint with --resume") from exc
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    if missing:
        raise LedgerError(f"ledger {p.name!r} lacks column {missing[0]!r}; it is not a ray_s2p ledger")
    return table.select(SCHEMA.names).cast(SCHEMA)


def read_environment(path: str | Path | StoragePath) -> dict[str, Any] | None:
    """The environment a ledger's run recorded (None when it recorded none, or the file is unreadable)."""
    try:
        return from_metadata(read_parquet_schema(location(path)).metadata)
    except Exception:  # a torn file: read_table reports it with the fix
        return None


def table_rows(table: pa.Table) -> list[LedgerRow]:
    """Rows of a ledger table as records."""
    data = table.to_pydict()
    out = []
    for i in range(table.num_rows):
        kw = {name: data[name][i] for name in SCHEMA.names}
        kw["extra_losses"] = tuple(kw["extra_losses"]) if kw["extra_losses"] is not None else None
        out.append(LedgerRow(**kw))
    return out


# (step, [(seed, coefficient)], param_scale, sign_step): what one step applies (docs/ledger.md).
StepUpdate = tuple[int, list[tuple[int, float]], float, Optional[float]]


def updates_by_step(rows: Sequence[LedgerRow]) -> list[StepUpdate]:
    """Group rows into (step, [(seed, coefficient) in direction order], param_scale, sign_step), steps ascending.

    Raises:
        LedgerError: a step appears with gaps, twice, or with inconsistent param_scale or sign_step.
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
        signs = {r.sign_step for r in group}
        if len(signs) != 1:
            raise LedgerError(f"ledger step {step} has inconsistent sign_step values")
        out.append((step, [(r.seed, r.coefficient) for r in group], scales.pop(), signs.pop()))
    return out
