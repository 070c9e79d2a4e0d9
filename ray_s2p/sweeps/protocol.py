"""The comparison protocol's arithmetic: step-size grids, their extension, evaluation spacing, passes to a target.

Pure functions over numbers (no Ray, no torch), so every protocol decision is
testable with plain values:

* grids: at least ``MIN_GRID_POINTS`` log-spaced step sizes per optimizer
  (``log_grid``); when the best point is strictly the best and lies on an edge, the
  grid is extended by ``EXTENSION_POINTS`` points on that side with the same
  spacing (``extension``), at most ``MAX_EXTENSIONS`` times (``edge_side``); then,
  once, the log-midpoints between the best point and each neighbour
  (``refinement``), so that a rule whose range is wide (a coarse grid) or whose
  working window is narrow is not judged on points half a grid cell away from it;
* evaluation: one interval of forward passes for every optimizer, a multiple of
  each one's passes per step, so all curves are evaluated at the same pass counts
  with at least ``MIN_EVAL_POINTS`` points (``eval_interval``);
* passes to a target: interpolated linearly between the two evaluations that
  bracket the first crossing (``passes_to_target``); its resolution is the
  evaluation interval;
* ``Tuned``: what one variant's grid did, written by compare.py and read by report.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

MIN_GRID_POINTS = 5
EXTENSION_POINTS = 2
MAX_EXTENSIONS = 2
REFINE_POINTS = 2  # at most: one log-midpoint on each side of the best point
MIN_EVAL_POINTS = 25


def log_grid(low: float, high: float, points: int) -> list[float]:
    """``points`` log-spaced values over [low, high], at the midpoints of equal cells in log space.

    Raises:
        ValueError: a non-positive bound, low >= high, or fewer than one point.
    """
    if not (0 < low < high) or points < 1:
        raise ValueError(f"a log grid needs 0 < low < high and points >= 1, got {low}, {high}, {points}")
    step = (math.log(high) - math.log(low)) / points
    return [math.exp(math.log(low) + (i + 0.5) * step) for i in range(points)]


def extension(values: Sequence[float], side: str, count: int = EXTENSION_POINTS) -> list[float]:
    """``count`` new values beyond the ``side`` ("lower" or "upper") edge of a sorted log grid, same ratio.

    The ratio is that of the two outermost values on that side, so an extended grid stays log-spaced.

    Raises:
        ValueError: fewer than two values, or an unknown side.
    """
    if len(values) < 2:
        raise ValueError("a grid needs two points to be extended with its own spacing")
    ordered = sorted(values)
    if side == "lower":
        ratio = ordered[0] / ordered[1]
        return [ordered[0] * ratio ** k for k in range(count, 0, -1)]
    if side == "upper":
        ratio = ordered[-1] / ordered[-2]
        return [ordered[-1] * ratio ** k for k in range(1, count + 1)]
    raise ValueError(f"unknown side {side!r}: use lower or upper")


def refinement(values: Sequence[float], best: int) -> list[float]:
    """The log-midpoints (geometric means) between ``values[best]`` and each neighbour of a sorted grid.

    Two values for an interior best, one for a best on an edge, none for a one-point grid.

    Raises:
        IndexError: ``best`` is not an index of ``values``.
    """
    ordered = sorted(values)
    if not 0 <= best < len(ordered):
        raise IndexError(f"best index {best} is outside a grid of {len(ordered)} values")
    return [math.sqrt(ordered[best] * ordered[j]) for j in (best - 1, best + 1) if 0 <= j < len(ordered)]


def best_index(results: Sequence[Optional[float]], mode: str = "max") -> Optional[int]:
    """Index of the best result (None: failed or missing, never best); ties go to the point nearest the middle.

    Ties to the middle: when an edge point only ties an interior one, the grid does not count as
    needing an extension. Returns None when every result is missing.
    """
    sign = 1.0 if mode == "max" else -1.0
    scored = [(sign * r, -abs(i - (len(results) - 1) / 2), i) for i, r in enumerate(results)
              if r is not None and not math.isnan(r)]
    return max(scored)[2] if scored else None


def edge_side(results: Sequence[Optional[float]], mode: str = "max") -> Optional[str]:
    """"lower" or "upper" when the best result (grid sorted by step size) is on that edge, else None."""
    best = best_index(results, mode)
    if best is None or len(results) < 2:
        return None
    if best == 0:
        return "lower"
    if best == len(results) - 1:
        return "upper"
    return None


def eval_interval(budget: int, passes_per_step: Sequence[int], points: int = MIN_EVAL_POINTS) -> int:
    """Forward passes between evaluations, the same for every optimizer compared.

    The largest multiple of the least common multiple of every optimizer's passes per step
    that still gives at least ``points`` evaluations within ``budget`` (so every optimizer
    evaluates at exactly the same pass counts); the least common multiple itself when the
    budget is too small for that many points.

    Raises:
        ValueError: a non-positive budget, points, or passes per step.
    """
    if budget < 1 or points < 1 or not passes_per_step or min(passes_per_step) < 1:
        raise ValueError(f"eval_interval needs budget, points and passes per step >= 1, got {budget}, {points}, "
                         f"{list(passes_per_step)}")
    unit = math.lcm(*passes_per_step)
    return max(unit, budget // points // unit * unit)


def passes_to_target(evals: Sequence[tuple[float, Optional[float]]], target: float) -> Optional[float]:
    """Forward passes at which the metric first reaches ``target``, interpolated; None if it never does.

    Args:
        evals: (forward passes, metric) per evaluation, in order; missing metrics are skipped.
        target: the level to reach (metric >= target).

    Returns:
        The passes of the first evaluation when it already reaches the target; otherwise the linear
        interpolation between the last evaluation below and the first at or above it. The true
        crossing lies between those two evaluations, so the resolution is their distance.
    """
    points = [(float(p), float(m)) for p, m in evals if m is not None and not math.isnan(m)]
    for i, (passes, metric) in enumerate(points):
        if metric >= target:
            if i == 0:
                return passes
            p0, m0 = points[i - 1]
            return p0 + (target - m0) / (metric - m0) * (passes - p0)
    return None


@dataclass
class Tuned:
    """One variant's tuning: the chosen overrides (None when every trial failed) and what the grid did."""

    name: str
    overrides: dict[str, Any] | None
    trials: list[dict[str, Any]]
    points: int                                           # grid points run, extensions included
    extensions: list[str] = field(default_factory=list)  # the side of each extension, in order
    on_edge: str | None = None                            # the best is still on this edge after the last one
    refined: int = 0                                      # log-midpoints added around the best after extending
