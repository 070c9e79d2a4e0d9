"""What ``ray-s2p bench speedup`` prints and writes: run and pilot lines, the JSON summary, the report and its figure.

Everything here reads the summaries of speedup_fit.py ``summarise_task`` (plus the preset fields
speedup.py adds: ``budget``, ``about``, ``config_file``, ``step_size_key``, ``step_size``, ``missing``),
so the report is made from the progress file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..files import write_text
from .speedup_fit import E4_MIN, E16_MIN, RATIO_MAX, RATIO_UP_TO_Q
from .speedup_wall_report import plot_replicas, save_png, wall_section


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for a table or a line; "n/a" for None."""
    return "n/a" if value is None else format(value, spec)


def run_line(entry: Mapping[str, Any], s: float | None) -> str:
    """One line per trained run: what it was, its steps and seconds, final accuracy and S."""
    data = f" data x{entry['shards']}" if entry.get("shards", 1) > 1 else ""  # weak data mode, N-fold batch
    line = (f"speedup {entry['task']} Q={entry['q']}{data} m={entry['m']:g} seed {entry['seed']} {entry['split']}: "
            f"{entry['steps']:,} steps in {entry['run_seconds']:.1f} s, final {fmt(entry['final'].get('accuracy'))}, "
            f"S {fmt(s, ',.1f') if s is not None else 'not reached'}")
    return line + (f", error: {entry['error']}" if entry.get("error") else "")


def pilot_lines(task: str, entry: Mapping[str, Any], target: float | None, seed: int) -> str:
    """The pilot's validation curve as text, with the best accuracy reached by each quarter of its steps."""
    curve = entry["curve"]
    lines = [f"speedup pilot {task}: Q = 1, m = 1, seed {seed}, validation, {entry['steps']:,} steps "
             f"(budget {entry['budget']:,} forward passes), {entry['run_seconds']:.0f} s",
             f"{'step':>8} {'passes':>9} {'wall s':>8} {'accuracy':>9}"]
    lines += [f"{s:>8} {p:>9} {w:>8.1f} {fmt(a):>9}" for s, p, w, a in curve]
    for frac in (0.25, 0.5, 0.75, 1.0):
        best = max((a for s, _, _, a in curve if a is not None and s <= frac * entry["steps"]), default=None)
        lines.append(f"best validation accuracy by {frac:.0%} of the steps: {fmt(best)}")
    lines.append(f"target now: {fmt(target) if target is not None else 'not set'} "
                 f"(TARGETS and BUDGETS in ray_s2p/bench/speedup.py)")
    return "\n".join(lines)


def compact_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The per-task numbers of the JSON line: S per Q (default and tuned), the picks, E, the ratio, final
    accuracy, the fit and the targets, keyed by Q."""
    rows = summary["rows"]

    def by_q(f: Any) -> dict[str, Any]:  # one number per Q, keyed by Q as text (JSON object keys)
        return {str(r["q"]): f(r) for r in rows}

    fit = summary["fit"]
    return {"target": summary["target"], "budget": summary.get("budget"),
            "steps": by_q(lambda r: r["steps"]),
            "S_default": by_q(lambda r: r["default"]["S_mean"]), "S_default_std": by_q(lambda r: r["default"]["S_std"]),
            "reached_default": by_q(lambda r: f"{r['default']['reached']}/{r['default']['runs']}"),
            "pick": by_q(lambda r: r["pick"]), "S_tuned": by_q(lambda r: r["tuned"]["S_mean"]),
            "reached_tuned": by_q(lambda r: f"{r['tuned']['reached']}/{r['tuned']['runs']}"),
            "E": by_q(lambda r: r["E"]), "default_over_tuned": by_q(lambda r: r["ratio"]),
            "final_accuracy": by_q(lambda r: [r["default"]["final_mean"], r["default"]["final_std"]]),
            "fit": {k: fit[k] for k in ("s_inf", "q_c", "r2", "points", "meaningful", "note")},
            "targets": {name: dict(t) for name, t in summary["targets"].items()},
            "missing": len(summary.get("missing", []))}


# ------------------------------------------------------------------ the report
def _s_cell(group: Mapping[str, Any]) -> str:
    if not group["runs"]:
        return "not run"
    if not group["reached"]:
        return f"not reached ({group['runs']} run{'s' if group['runs'] != 1 else ''})"
    std = f" +- {group['S_std']:,.0f}" if group["S_std"] is not None else ""
    return f"{group['S_mean']:,.0f}{std} ({group['reached']}/{group['runs']})"


def _acc_cell(group: Mapping[str, Any]) -> str:
    if group["final_mean"] is None:
        return "not run" if not group["runs"] else "failed"
    std = f" +- {group['final_std']:.4f}" if group["final_std"] is not None else ""
    return f"{group['final_mean']:.4f}{std}" + (f" ({group['errors']} failed)" if group["errors"] else "")


def _target_cell(t: Mapping[str, Any], value: float | None = None) -> str:
    mark = {"met": "met", "missed": "**missed**", "open": "open"}[t["status"]]
    return f"{mark} ({fmt(value, '.3f')})" if value is not None else mark


def task_section(task: str, s: Mapping[str, Any], multipliers: Sequence[float]) -> list[str]:
    """The markdown of one task: setup, the per-Q table, the tuning table, the fit."""
    target = s["target"]
    out = [f"## {task}: {s.get('about', '')}", "",
           f"Config `{s.get('config_file')}`; {s.get('step_size_key')} at Q = 1: {s.get('step_size')}; "
           f"budget {s.get('budget', 0):,} forward passes per run; target accuracy "
           f"{fmt(target) if target is not None else '**not set** (no S until the pilot fixes it)'}.", "",
           "| Q | steps B(Q) | multiplier picked | S default (m = 1), mean +- std (reached/runs) | S tuned | E(Q) | "
           "default / tuned | final test accuracy, default | wall s per run, default |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        d, t = r["default"], r["tuned"]
        pick = f"{r['pick']:g} (by {r['pick_by']})" if r["pick"] is not None else r["pick_by"]
        tuned = "= default" if r["pick"] == 1.0 else _s_cell(t)
        e = fmt(r["E"], ".3f") if r["E"] is not None else (f"< {r['E_max']:.3f}" if r["E_max"] is not None else "n/a")
        lo, hi = r["ratio_bounds"]
        ratio = fmt(r["ratio"], ".3f") if r["ratio"] is not None else (
            f">= {lo:.3f}" if lo is not None else (f"<= {hi:.3f}" if hi is not None else "n/a"))
        out.append(f"| {r['q']} | {fmt(r['steps'], ',')} | {pick} | {_s_cell(d)} | {tuned} | {e} | {ratio} | "
                   f"{_acc_cell(d)} | {fmt(d['wall_mean'], '.1f')} |")
    out += ["", "Tuning (validation split, seed 0): steps to the target per step-size multiplier, or the final "
            "validation accuracy where the target was not reached; the pick in bold.", "",
            "| Q | " + " | ".join(f"m = {m:g}" for m in multipliers) + " |",
            "|---|" + "---|" * len(multipliers)]
    for r in s["rows"]:
        cells = []
        for m in multipliers:
            got = r["tune"].get(m)
            text = "not run" if got is None else (f"S {got['S']:,.0f}" if got["S"] is not None else
                                                  f"acc {fmt(got['final'], '.3f')}")
            cells.append(f"**{text}**" if r["pick"] == m else text)
        out.append(f"| {r['q']} | " + " | ".join(cells) + " |")
    fit = s["fit"]
    points = ", ".join(str(q) for q in fit["points"]) or "none"
    if fit["meaningful"]:
        line = (f"Fit S(Q) = S_inf (1 + Q_c / Q) on the seed-mean S of the default at Q = {points}: "
                f"S_inf = {fit['s_inf']:,.1f} steps, Q_c = {fit['q_c']:.2f}, R^2 = {fmt(fit['r2'], '.3f')}.")
    else:
        line = f"Fit S(Q) = S_inf (1 + Q_c / Q) (points Q = {points}): not meaningful: {fit['note']}."
    return out + ["", line, ""]


def markdown(summaries: Mapping[str, Mapping[str, Any]], figure: str, multipliers: Sequence[float]) -> str:
    """The whole report: the protocol, the targets per task, one section per task, what is missing."""
    out = ["# Steps to a target accuracy against the directions per step Q (`ray-s2p bench speedup`)", "",
           "Every run is one in-process replica with Q directions per step (what Q direction-mode replicas "
           "compute), step scaling linear from tuned_directions 1, and the same forward-pass budget P at every "
           "Q: B(Q) = ceil(P / passes per step) steps (2 Q passes per step), about 25 evaluations per run. "
           "S(Q): steps to the target accuracy on the test split, interpolated linearly between the two "
           "evaluations around the first crossing (resolution: the run's evaluation interval), seeds 0-2; a run "
           "that never reaches it is counted as not reached, and a mean S is given over the runs that reached "
           "it. Default: the Q = 1 step size at every Q (multiplier m = 1); tuned: the multiplier in "
           "{1/4, 1/2, 1, 2, 4} with the fewest validation steps to the target (seed 0), else the best final "
           "validation accuracy. E(Q) = S(1) / (Q S(Q)) from the default's seed means, only where every seed "
           "reached the target (\"< x\": an upper bound, counting a censored run at its last step).", "",
           "## Targets", "",
           f"| task | E(4) >= {E4_MIN} | E(16) >= {E16_MIN} | default within {RATIO_MAX - 1:.0%} of tuned up to "
           f"Q = {RATIO_UP_TO_Q} | no final accuracy (default, seed mean) below Q = 1's mean - 1 std |",
           "|---|---|---|---|---|"]
    for task, s in summaries.items():
        t = s["targets"]
        below = t["final_accuracy"]["below"]
        where = f" (Q = {', '.join(map(str, below))})" if below else ""
        out.append(f"| {task} | {_target_cell(t['E4'], t['E4']['value'])} | "
                   f"{_target_cell(t['E16'], t['E16']['value'])} | "
                   f"{_target_cell(t['default_vs_tuned'], t['default_vs_tuned']['worst_ratio'])} | "
                   f"{_target_cell(t['final_accuracy'])}{where} |")
    out += ["", "\"open\": not enough is recorded yet to say.", "", f"![S(Q) against Q]({figure})", "",
            "Figure: seed-mean S against Q, log-log; a hollow marker is a mean over only the seeds that reached "
            "the target; error bars one standard deviation; dotted, the ideal S(1) / Q.", ""]
    for task, s in summaries.items():
        out += task_section(task, s, multipliers)
    out += ["## Wall clock: what N replicas cost per step, and how soon they reach the target", "",
            "![speed-up against replicas](" + figure.replace("_steps.png", "_replicas.png") + ")", "",
            "Figure: the projected time-to-target speed-up S(1) T(1) / (S(N) T(N)) per task (S measured, T "
            "modelled from timed components), the measured 2-replica runs as stars, and the linear speed-up.", ""]
    for task, s in summaries.items():
        out += wall_section(task, s)
    missing = [line for s in summaries.values() for line in s.get("missing", [])]
    out += ["## What is missing", ""] + ([f"- {line}" for line in missing] or ["Nothing: every run is recorded."])
    return "\n".join(out) + "\n"


def plot_steps(summaries: Mapping[str, Mapping[str, Any]], output: str | Path) -> Path:
    """speedup_steps.png: S(Q) against Q (log-log) per task, default and tuned, with the ideal S(1) / Q.

    A filled marker is a Q where every seed reached the target (error bar: std over seeds); a hollow one
    the mean of the seeds that did. The fit is drawn where it is meaningful.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * max(1, len(summaries)), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(summaries)), squeeze=False)[0]
    for ax, (task, s) in zip(axes, summaries.items()):
        for name, style, color in (("default", "-", "tab:blue"), ("tuned", "--", "tab:orange")):
            pts = [(r["q"], r[name]) for r in s["rows"] if r[name]["S_mean"] is not None]
            if not pts:
                continue
            ax.plot([q for q, _ in pts], [g["S_mean"] for _, g in pts], style, color=color, linewidth=1.4,
                    label="default (m = 1)" if name == "default" else "tuned (per-Q multiplier)")
            for q, g in pts:
                ax.errorbar([q], [g["S_mean"]], yerr=[[g["S_std"] or 0.0], [g["S_std"] or 0.0]], fmt="o",
                            color=color, markerfacecolor=color if g["complete"] else "white", markersize=5)
        s1 = next((r["default"]["S_mean"] for r in s["rows"] if r["q"] == 1 and r["default"]["complete"]), None)
        qs = [r["q"] for r in s["rows"]]
        if s1 and qs:
            ax.plot(qs, [s1 / q for q in qs], ":", color="gray", label="ideal S(1) / Q")
        fit = s["fit"]
        if fit["meaningful"] and qs:
            ax.plot(qs, [fit["a"] + fit["b"] / q for q in qs], "-", color="tab:green", linewidth=0.8,
                    label=f"fit: S_inf {fit['s_inf']:,.0f}, Q_c {fit['q_c']:.1f}")
        if not any(r["default"]["runs"] or r["tuned"]["runs"] for r in s["rows"]):
            ax.text(0.5, 0.5, "nothing recorded", transform=ax.transAxes, ha="center", va="center")
        else:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(qs, [str(q) for q in qs])
        target = fmt(s["target"], ".3g") if s["target"] is not None else "not set"
        ax.set_title(f"{task} (target {target})", fontsize=10)
        ax.set_xlabel("directions per step Q")
        ax.set_ylabel("steps to the target (test, seeds 0-2)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    return save_png(fig, output)


def write_report(summaries: Mapping[str, Mapping[str, Any]], path: str | Path,
                 multipliers: Sequence[float]) -> list[Path]:
    """Write the markdown report at ``path`` and its figure beside it (``<stem>_steps.png``).

    Returns:
        [the markdown path, the S(Q) figure, the speed-up figure].
    """
    path = Path(path)
    figure = path.with_name(f"{path.stem}_steps.png")
    plot_steps(summaries, figure)
    replicas = plot_replicas(summaries, path.with_name(f"{path.stem}_replicas.png"))
    write_text(path, markdown(summaries, figure.name, multipliers))
    return [path, figure, replicas]
