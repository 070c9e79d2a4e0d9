"""The comparison's markdown: tuning.md (every grid point on validation) and summary.md (test, over seeds).

Every number a table shows names its split, and every protocol fact a reader needs
to judge it (grid size and extensions, evaluation interval and so the resolution of
"passes to target", seeds per row, failures) is printed beside it.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

from .protocol import EXTENSION_POINTS, MAX_EXTENSIONS, MIN_GRID_POINTS, Tuned
from .stats import mean_std, paired_comparison

REFERENCE = "vs2p"  # the rule every other row is compared with, seed by seed


def _f(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def grid_note(tuned: Tuned) -> str:
    """How a variant's grid went: its size, the extensions, the refinement, and whether the best is still on
    an edge."""
    note = f"{tuned.points} points"
    if tuned.extensions:
        note += ", extended " + ", then ".join(f"{side} (+{EXTENSION_POINTS})" for side in tuned.extensions)
    if tuned.refined:
        note += f", refined around the best (+{tuned.refined})"
    if tuned.on_edge:
        note += f"; **best still on the {tuned.on_edge} edge**"
    return note


def tuning_summary(tuned: Sequence[Tuned], trials: int) -> str:
    """Markdown: every tuning trial's step size and final validation metric, per variant, in step-size order."""
    metric = next((t["metric"] for tn in tuned for t in tn.trials), "eval_accuracy")
    lines = [f"Tuning on the validation split only: the final validation {metric} of one run per grid point, "
             f"every run with the same forward-pass budget. Grid: {trials} log-spaced step sizes"
             + (f" (fewer than the protocol's {MIN_GRID_POINTS})" if trials < MIN_GRID_POINTS else "")
             + f"; when the best point is on an edge, {EXTENSION_POINTS} more on that side, at most "
             f"{MAX_EXTENSIONS} times; then once the log-midpoints between the best point and its neighbours. "
             f"Best point in bold.", "",
             "| optimizer | step size | grid | validation result at each grid point |", "|---|---|---|---|"]
    for tn in tuned:
        values = [t["value"] for t in tn.trials]
        best = max((v for v in values if v is not None), default=None)
        points = ", ".join(
            f"{t['step_size']:.3g}: " + ("failed" if t["value"] is None else
                                        f"**{t['value']:.3f}**" if t["value"] == best else f"{t['value']:.3f}")
            for t in tn.trials)
        key = tn.trials[0]["key"] if tn.trials else "?"
        lines.append(f"| {tn.name} | {key} | {grid_note(tn)} | {points} |")
    return "\n".join(lines) + "\n"


def summarise(rows: Sequence[dict[str, Any]], tuned: Sequence[Tuned], target: float, interval: int,
              budget: int) -> str:
    """Markdown: per variant the test accuracy over seeds, passes to ``target``, settings and grid; then VS2P
    against every other variant, paired by seed."""
    order = list(dict.fromkeys(r["variant"] for r in rows))
    notes = {t.name: grid_note(t) for t in tuned}
    lines = [f"Test split; {budget:,} forward passes per run; evaluation every {interval:,} forward passes "
             f"(the same pass counts for every optimizer, {budget // interval} points per curve after the start). "
             f"Forward passes to {target:.0%} are interpolated linearly between the two evaluations around the "
             f"first crossing: resolution {interval:,} passes. Step sizes were chosen on the validation split "
             f"(tuning.md).", "",
             f"| optimizer | seeds | final test accuracy (mean +- std) | forward passes to {target:.0%} "
             f"(mean of runs that reached it) | tuned settings | step-size grid |", "|---|---|---|---|---|---|"]
    for name in order:
        runs = [r for r in rows if r["variant"] == name]
        done = [r for r in runs if r.get("error") is None]
        mean, std = mean_std([r["test_accuracy"] for r in done if r.get("test_accuracy") is not None])
        reached = [r["passes_to_target"] for r in done if r.get("passes_to_target") is not None]
        passes = (f"{statistics.fmean(reached):,.0f} ({len(reached)}/{len(runs)} runs)" if reached
                  else f"not reached (0/{len(runs)})")
        seeds = f"{len(runs)}" + (f" ({len(runs) - len(done)} failed)" if len(done) < len(runs) else "")
        grid = notes.get(name, f"{REFERENCE}'s settings")
        lines.append(f"| {name} | {seeds} | {mean:.4f} +- {std:.4f} | {passes} | {runs[0]['settings']} | {grid} |")
    if REFERENCE in order and len(order) > 1:
        lines += ["", paired_table(rows, [n for n in order if n != REFERENCE], target)]
    return "\n".join(lines) + "\n"


def paired_table(rows: Sequence[dict[str, Any]], others: Sequence[str], target: float) -> str:
    """Markdown: VS2P against each other variant, seed by seed (final test accuracy; speed to the target)."""
    def per_seed(name: str, key: str) -> dict[int, Optional[float]]:
        return {r["seed"]: r.get(key) for r in rows if r["variant"] == name and r.get("error") is None}

    ref_acc, ref_passes = per_seed(REFERENCE, "test_accuracy"), per_seed(REFERENCE, "passes_to_target")
    lines = [f"VS2P against each other variant, paired by seed (same split, initialisation and batch order; "
             f"two-sided p-values; the verdict reads the paired t-test at 0.05). Speed-up: the other's mean "
             f"passes to {target:.0%} over VS2P's, on the seeds where both reached it, with the seeds where VS2P "
             f"got there sooner and the paired tests of the passes.", "",
             "| other | paired seeds | VS2P - other, final test accuracy (mean) | VS2P wins / ties / losses "
             "| paired t-test p | Wilcoxon p | verdict | speed-up to target |", "|---|---|---|---|---|---|---|---|"]
    for name in others:
        result = paired_comparison(ref_acc, per_seed(name, "test_accuracy"))
        speed = speed_up(ref_passes, per_seed(name, "passes_to_target"))
        lines.append(f"| {name} | {result.n} | {_f(result.mean_difference, '+.4f')} | "
                     f"{result.wins} / {result.ties} / {result.losses} | {_f(result.t_p, '.3g')} | "
                     f"{_f(result.wilcoxon_p, '.3g')} | {result.verdict('VS2P', name)} | {speed} |")
    return "\n".join(lines) + "\n"


def speed_up(ref: dict[int, Optional[float]], other: dict[int, Optional[float]]) -> str:
    """The other rule's mean passes to the target over VS2P's on the seeds where both reached it, and whether
    VS2P's lead is significant: seeds where it got there sooner, paired t-test and Wilcoxon p of the passes.

    Seeds where either run never reached the target leave the pairing (the table's passes column says how
    many runs reached it).
    """
    both = sorted(s for s in ref if ref[s] is not None and other.get(s) is not None)
    if not both or statistics.fmean(ref[s] for s in both) <= 0:  # type: ignore[misc]
        return "n/a"
    ratio = statistics.fmean(other[s] for s in both) / statistics.fmean(ref[s] for s in both)  # type: ignore[misc]
    # Fewer passes is better: compare the negated passes, so a "win" is VS2P reaching the target sooner.
    result = paired_comparison({s: -ref[s] for s in both}, {s: -other[s] for s in both})  # type: ignore[operator]
    seeds = f"{len(both)} seed" + ("s" if len(both) != 1 else "")
    return (f"{ratio:.2f}x ({seeds}; VS2P sooner in {result.wins}, t p {_f(result.t_p, '.3g')}, "
            f"Wilcoxon p {_f(result.wilcoxon_p, '.3g')})")
