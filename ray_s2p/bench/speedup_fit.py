"""The arithmetic of ``ray-s2p bench speedup``: steps to a target, the fit S(Q) = S_inf (1 + Q_c / Q), efficiencies.

Pure functions over numbers and plain dicts (no torch, no Ray), so every number of the
report can be checked by hand:

* S(Q), steps to the target: linearly interpolated between the two evaluations around the
  first crossing (``steps_to_target``, the comparison protocol's interpolation over steps
  instead of forward passes); None when the run never reaches the target (censored);
* the fit: S is linear in 1/Q, S = a + b / Q, fitted by least squares on the seed-mean S(Q)
  of the untuned default; S_inf = a, Q_c = b / a (``fit_speedup``);
* per-direction efficiency E(Q) = S(1) / (Q S(Q)) (``efficiency``): 1 when Q directions
  cut the steps Q-fold, and, under the fitted law, (1 + Q_c) / (Q + Q_c);
* the tuning pick (``pick_multiplier``) and the per-task summary with its targets
  (``summarise_task``), which both the JSON line and the report read.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from ..sweeps.protocol import best_index, passes_to_target

# Targets of the report (per task).
E4_MIN = 0.8
E16_MIN = 0.7
RATIO_MAX = 1.15      # the untuned default's S at most 15 % above the per-Q tuned S ...
RATIO_UP_TO_Q = 16    # ... for every Q up to this one
MIN_FIT_POINTS = 3

# (q, m, seed, split) -> a recorded run (speedup.py's progress entry: "steps", "curve", "final").
RunTable = Mapping[tuple[int, float, int, str], Mapping[str, Any]]


def steps_to_target(curve: Sequence[tuple[float, float | None]], target: float) -> float | None:
    """Steps at which the accuracy first reaches ``target``, interpolated; None if it never does.

    Args:
        curve: (step, accuracy) per evaluation in order; a missing accuracy is skipped.
        target: the level to reach (accuracy >= target).

    Returns:
        The step of the first evaluation when it already reaches the target; otherwise the linear
        interpolation between the last evaluation below and the first at or above it (its resolution is
        their distance, the run's ``eval_every``); None when no evaluation reaches it (censored).
    """
    return passes_to_target(curve, target)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of ``values``; std None below 2 values, both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class Fit:
    """S(Q) = a + b / Q fitted by relative least squares, read as S_inf (1 + Q_c / Q).

    Attributes:
        a: the intercept, S_inf (steps with unlimited directions per step).
        b: the slope in 1/Q.
        q_c: b / a, the Q at which S is twice S_inf (None when a <= 0).
        r2: coefficient of determination of the fit on its points, in the fit's relative weights.
        points: the Q values fitted.
        meaningful: whether S_inf and Q_c can be read off (>= 3 points, a > 0, b > 0).
        note: why not, when not.
    """

    a: float | None
    b: float | None
    q_c: float | None
    r2: float | None
    points: tuple[int, ...]
    meaningful: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "s_inf": self.a, "points": list(self.points)}


def fit_speedup(s_by_q: Mapping[int, float]) -> Fit:
    """Least-squares fit of S = a + b / Q over the given (Q, seed-mean S) points, each weighted by 1 / S^2.

    S spans two decades between Q = 1 and Q = 64; in plain least squares the few largest S (and their
    seed noise) would decide the fit alone. Weighted by 1 / S^2 every point's relative error counts the
    same, which is how the steps of a noisy measurement scatter.

    Args:
        s_by_q: Q -> seed-mean steps to target (only Q whose runs all reached it).

    Returns:
        The fit; ``meaningful`` False (with a note) for fewer than ``MIN_FIT_POINTS`` points,
        b <= 0 (more directions did not shorten the run) or a <= 0 (no saturation within the
        measured Q: S falls at least as fast as 1/Q, so Q_c is not finite).
    """
    qs = tuple(sorted(s_by_q))
    if len(qs) < 2 or len({1.0 / q for q in qs}) < 2:
        return Fit(None, None, None, None, qs, False,
                   f"{len(qs)} Q reached the target in every seed; the fit needs {MIN_FIT_POINTS}")
    x = [1.0 / q for q in qs]
    y = [float(s_by_q[q]) for q in qs]
    w = [1.0 / yi ** 2 if yi > 0 else 0.0 for yi in y]
    sw = sum(w) or 1.0
    mx, my = sum(wi * xi for wi, xi in zip(w, x)) / sw, sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    b = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    a = my - b * mx
    ss_tot = sum(wi * (yi - my) ** 2 for wi, yi in zip(w, y))
    ss_res = sum(wi * (yi - (a + b * xi)) ** 2 for wi, xi, yi in zip(w, x, y))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    q_c = b / a if a > 0 else None
    if len(qs) < MIN_FIT_POINTS:
        note = f"only {len(qs)} Q reached the target in every seed; the fit needs {MIN_FIT_POINTS}"
    elif b <= 0:
        note = f"b = {b:.4g} <= 0: more directions per step did not reduce the steps to the target"
    elif a <= 0:
        note = f"S_inf = {a:.4g} <= 0: S falls at least as fast as 1/Q over the measured Q (no saturation seen)"
    else:
        note = ""
    return Fit(a, b, q_c, r2, qs, not note, note)


def efficiency(s1: float | None, q: int, sq: float | None) -> float | None:
    """E(Q) = S(1) / (Q S(Q)): the fraction of the ideal Q-fold cut in steps; None when either S is missing or 0."""
    if s1 is None or sq is None or sq <= 0 or q < 1:
        return None
    return s1 / (q * sq)


def pick_multiplier(results: Sequence[tuple[float, float | None, float | None]]) -> tuple[float | None, str]:
    """The tuning pick among (multiplier, validation steps to target or None, final validation accuracy or None).

    The smallest steps to the target; when no multiplier reaches it, the best final accuracy. Ties go to
    the multiplier nearest the middle of the sorted grid (m = 1 in the 5-point grid), so an untuned
    default that only ties is kept.

    Returns:
        (multiplier, "steps" or "final accuracy"), or (None, reason) when nothing usable was recorded.
    """
    ordered = sorted(results, key=lambda r: r[0])
    best = best_index([r[1] for r in ordered], "min")
    if best is not None:
        return ordered[best][0], "steps"
    best = best_index([r[2] for r in ordered], "max")
    if best is not None:
        return ordered[best][0], "final accuracy"
    return None, "no tuning run finished"


def group(table: RunTable, q: int, m: float | None, seeds: Sequence[int], split: str,
          target: float | None) -> dict[str, Any]:
    """S and final accuracy over the seeds of one (Q, multiplier, split): per seed, mean, std, counts.

    ``S_low`` is the mean with every censored run counted at its last step (a lower bound on the mean
    S); ``complete`` says every recorded run reached the target.
    """
    runs = [table[(q, m, s, split)] for s in seeds if m is not None and (q, m, s, split) in table]
    s_values = [run_steps(r, target) for r in runs]
    reached = [s for s in s_values if s is not None]
    finals = [r["final"]["accuracy"] for r in runs if r.get("final", {}).get("accuracy") is not None]
    s_mean, s_std = mean_std(reached)
    low = [s if s is not None else float(r["steps"]) for s, r in zip(s_values, runs)]
    f_mean, f_std = mean_std(finals)
    walls = [r["final"]["wall_seconds"] for r in runs if r.get("final", {}).get("wall_seconds") is not None]
    return {"m": m, "runs": len(runs), "reached": len(reached), "S": s_values, "S_mean": s_mean, "S_std": s_std,
            "S_low": statistics.fmean(low) if low else None, "complete": bool(runs) and len(reached) == len(runs),
            "final": finals, "final_mean": f_mean, "final_std": f_std,
            "wall_mean": statistics.fmean(walls) if walls else None,
            "errors": sum(1 for r in runs if r.get("error"))}


def run_steps(run: Mapping[str, Any], target: float | None) -> float | None:
    """A recorded run's steps to ``target`` from its curve ([step, passes, wall, accuracy] rows)."""
    if target is None:
        return None
    return steps_to_target([(point[0], point[3]) for point in run.get("curve", [])], target)


def summarise_task(table: RunTable, target: float | None, q_values: Sequence[int], seeds: Sequence[int],
                   multipliers: Sequence[float], tune_seed: int = 0) -> dict[str, Any]:
    """Per-Q rows, the fit of the default and the report's targets, from the recorded runs of one task.

    Args:
        table: (q, m, seed, split) -> recorded run, only runs of the task's current configs.
        target: the task's target accuracy (None: not set, so no S).
        q_values: the Q rows, in order.
        seeds: the seeds of the test-split runs.
        multipliers: the tuning grid of step-size multipliers (1.0 is the default).
        tune_seed: the seed of the validation-split tuning runs.

    Returns:
        {"rows": per Q {q, steps, tune, pick, pick_by, default, tuned, E, E_max, ratio, ratio_bounds},
        "fit", "targets"} with None wherever a number is not recorded yet.
    """
    rows = []
    for q in q_values:
        tune = {m: table[(q, m, tune_seed, "validation")] for m in multipliers
                if (q, m, tune_seed, "validation") in table}
        pick, pick_by = (pick_multiplier([(m, run_steps(r, target), r.get("final", {}).get("accuracy"))
                                          for m, r in tune.items()])
                         if len(tune) == len(multipliers) else (None, f"{len(tune)}/{len(multipliers)} tuning runs"))
        steps = next((r["steps"] for (qq, _, _, _), r in table.items() if qq == q), None)
        rows.append({"q": q, "steps": steps, "pick": pick, "pick_by": pick_by,
                     "tune": {m: {"S": run_steps(r, target), "final": r.get("final", {}).get("accuracy")}
                              for m, r in tune.items()},
                     "default": group(table, q, 1.0, seeds, "test", target),
                     "tuned": group(table, q, pick, seeds, "test", target)})
    base = next((r["default"] for r in rows if r["q"] == 1), None)
    s1 = base["S_mean"] if base is not None and base["complete"] else None
    for row in rows:
        d, t = row["default"], row["tuned"]
        row["E"] = efficiency(s1, row["q"], d["S_mean"]) if d["complete"] else None
        # A censored seed counts at its last step: a lower bound on S, so an upper bound on E.
        row["E_max"] = efficiency(s1, row["q"], d["S_low"]) if d["runs"] and not d["complete"] else row["E"]
        row["ratio"] = d["S_mean"] / t["S_mean"] if d["complete"] and t["complete"] and t["S_mean"] else None
        row["ratio_bounds"] = _ratio_bounds(d, t)
    fit = fit_speedup({r["q"]: r["default"]["S_mean"] for r in rows if r["default"]["complete"]})
    return {"target": target, "rows": rows, "fit": fit.as_dict(), "targets": _targets(rows, q_values)}


def _ratio_bounds(d: Mapping[str, Any], t: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(lower, upper) bounds on S_default / S_tuned when censored seeds leave only bounds."""
    if not d["runs"] or not t["runs"]:
        return None, None
    if d["complete"] and t["complete"]:
        value = d["S_mean"] / t["S_mean"] if t["S_mean"] else None
        return value, value
    if d["complete"] and t["S_low"]:      # tuned censored: its true mean S is at least S_low
        return None, d["S_mean"] / t["S_low"]
    if t["complete"] and t["S_mean"]:     # default censored: its true mean S is at least S_low
        return d["S_low"] / t["S_mean"], None
    return None, None


def _status(met: bool, missed: bool) -> str:
    return "missed" if missed else ("met" if met else "open")


def _targets(rows: Sequence[Mapping[str, Any]], q_values: Sequence[int]) -> dict[str, Any]:
    """Met / missed / open (not enough recorded to say) for each target of the report."""
    by_q = {r["q"]: r for r in rows}
    out: dict[str, Any] = {}
    for q, minimum in ((4, E4_MIN), (16, E16_MIN)):
        row = by_q.get(q)
        e, e_max = (row["E"], row["E_max"]) if row else (None, None)
        out[f"E{q}"] = {"value": e, "min": minimum,
                        "status": _status(e is not None and e >= minimum, e_max is not None and e_max < minimum)}
    upto = [r for r in rows if r["q"] <= RATIO_UP_TO_Q]
    lows = [r["ratio_bounds"][0] for r in upto if r["ratio_bounds"][0] is not None]
    highs = [r["ratio_bounds"][1] for r in upto]
    worst = max((r for r in upto if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
    all_q = {q for q in q_values if q <= RATIO_UP_TO_Q} <= {r["q"] for r in upto}
    out["default_vs_tuned"] = {
        "max": RATIO_MAX, "up_to_q": RATIO_UP_TO_Q, "worst_ratio": worst["ratio"] if worst else None,
        "worst_q": worst["q"] if worst else None,
        "status": _status(all_q and bool(upto) and all(h is not None and h <= RATIO_MAX for h in highs),
                          any(lo > RATIO_MAX for lo in lows))}
    base = by_q.get(1)
    floor = None
    if base and base["default"]["final_mean"] is not None:
        floor = base["default"]["final_mean"] - (base["default"]["final_std"] or 0.0)
    means = {r["q"]: r["default"]["final_mean"] for r in rows if r["default"]["final_mean"] is not None}
    below = sorted(q for q, v in means.items() if floor is not None and v < floor)
    out["final_accuracy"] = {"floor": floor, "below": below,
                             "status": _status(floor is not None and set(q_values) <= set(means) and not below,
                                               bool(below))}
    return out


def json_number(value: Any) -> Any:
    """Non-finite floats as None (strict JSON), for the progress file and the JSON line."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
