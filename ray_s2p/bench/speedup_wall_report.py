"""The wall-clock half of the speedup report: what N replicas cost per step, the projected and the measured
time-to-target speed-up, which mode reaches the target first, and the speed-up figure.

Reads only the recorded entries (speedup.py ``summaries``: ``wall`` from speedup_wall.py, ``data`` the weak
data-mode runs), so ``--report-only`` rebuilds it from the progress file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..files import atomic_path
from .speedup_wall import mode_times

PROJECT_TARGETS = {8: 6.0, 64: 20.0}   # projected speed-up wanted at N replicas
MEASURED_TARGET = 1.7                  # 2 real Ray replicas against 1, wall-clock to the target


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ints(d: Mapping[Any, Any] | None) -> dict[int, Any]:
    """JSON turns int keys into strings: back to ints."""
    return {int(k): v for k, v in (d or {}).items()}


def wall_section(task: str, s: Mapping[str, Any]) -> list[str]:
    """Markdown of one task's wall-clock entry (empty list when none is recorded)."""
    w = s.get("wall")
    out = [f"### {task}: wall clock", ""]
    if not w:
        return out + ["Not measured yet (`ray-s2p bench speedup --phase wall --tasks " + task + " --resume`).", ""]
    ray = _ints(w["ray_seconds_per_step"])
    costs, model = w["costs"], w["model"]
    u = _ints(costs["update_seconds_at"])
    modelled = _ints(model["seconds_per_step"])
    check = model["model_check"]
    machine = w.get("machine", {})
    out += [f"Measured on {machine.get('cpu_count', '?')} CPU cores ({machine.get('platform', '?')}), torch "
            f"{machine.get('torch', '?')}, Ray {machine.get('ray', '?')}; one thread per replica. Ray runs: "
            f"{_f(ray.get(1), '.4f')} s a step with 1 replica, {_f(ray.get(2), '.4f')} s with 2 (direction mode, "
            f"one direction each). On one engine: T_p = {costs['probe_seconds']:.4f} s (one direction's two "
            f"probes), u(1) = {_f(u.get(1), '.4f')} s, so the driver's round trip and Ray's overhead is "
            f"t_d = {model['driver_seconds']:.4f} s. Model T(N) = T_p + u(N) + t_d: T(2) = "
            f"{_f(check.get('modelled_2'), '.4f')} s against {_f(check.get('measured_2'), '.4f')} s measured "
            f"(ratio {_f(check.get('ratio'), '.2f')}).", "",
            "| N replicas | u(N) s (timed) | T(N) s (model) | S(N) steps (default, test) | E(N) | "
            "T(1) / T(N) | projected speed-up | linear | limited by |", "|---|---|---|---|---|---|---|---|---|"]
    proj = _ints(w.get("projection"))
    s_of_q = _ints(w.get("s_of_q"))
    for n in sorted(modelled):
        p = proj.get(n, {})
        out.append(f"| {n} | {_f(u.get(n), '.4f')} | {modelled[n]:.4f} | {_f(s_of_q.get(n), ',.0f')} | "
                   f"{_f(p.get('step_efficiency'), '.3f')} | {_f(p.get('time_per_step_ratio'), '.3f')} | "
                   f"{_f(p.get('speedup'), '.2f')} | {n} | {p.get('limited_by', 'n/a')} |")
    for n, want in PROJECT_TARGETS.items():
        got = proj.get(n, {}).get("speedup")
        verdict = ("n/a (S not measured)" if got is None else
                   f"{got:.2f}x, " + ("met" if got >= want else "**missed**"))
        out.append(f"\nTarget: projected speed-up >= {want:g}x at N = {n}: {verdict}.")
    ttt = w.get("time_to_target")
    if ttt:
        ones = ", ".join(_f(x, ".1f") for x in ttt["seconds_one"])
        twos = ", ".join(_f(x, ".1f") for x in ttt["seconds_two"])
        med = ttt.get("speedup_median")
        verdict = "n/a" if med is None else ("met" if med >= MEASURED_TARGET else "**missed**")
        rng = ttt.get("speedup_range")
        # Entries recorded before each pair got its own seed have no "seeds": they repeat one trajectory.
        seeds = (f", seeds {', '.join(map(str, ttt['seeds']))}" if "seeds" in ttt else ", one seed repeated")
        out += ["", f"Measured, 1 against 2 Ray replicas, the same config, wall-clock seconds (replica start-up "
                f"excluded, evaluations included) to validation accuracy {ttt['target']}: 1 replica {ones} s; "
                f"2 replicas {twos} s; speed-up {_f(med, '.2f')} (median of {len(ttt['speedups'])} alternating "
                f"pairs{seeds}, range {_f(rng[0], '.2f') if rng else 'n/a'}-{_f(rng[1], '.2f') if rng else 'n/a'}). "
                f"Target >= {MEASURED_TARGET}x: {verdict}."]
    return out + [""] + mode_section(s)


def mode_section(s: Mapping[str, Any]) -> list[str]:
    """Which mode reaches the target first with N replicas: measured steps times modelled step costs."""
    w, data = s.get("wall"), _ints(s.get("data"))
    s_weak = {n: g["S_mean"] for n, g in data.items() if g.get("complete")}
    if not w:
        return []
    s_of_q = _ints(w.get("s_of_q"))
    costs = {**w["costs"], "update_seconds_at": _ints(w["costs"]["update_seconds_at"]),
             "probe_seconds_shard": _ints(w["costs"].get("probe_seconds_shard"))}
    model = {**w["model"], "seconds_per_step": _ints(w["model"]["seconds_per_step"])}
    rows = mode_times(s_of_q, s_weak, costs, model)
    if not rows:
        return []
    out = ["Which mode first, N replicas (modelled seconds to the target = measured steps x modelled step "
           "cost; data mode weak: each replica draws task.batch_size, measured S over seeds 0-2; strong: the "
           "batch split N ways, S(1) steps of a shard's probe cost):", "",
           "| N | direction | data, weak batch scaling | data, strong batch scaling | first |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        out.append(f"| {n} | {_f(r.get('direction'), '.1f')} | {_f(r.get('data_weak'), '.1f')} | "
                   f"{_f(r.get('data_strong'), '.1f')} | {r['first'].replace('_', ' ')} |")
    return out + [""]


def plot_replicas(summaries: Mapping[str, Mapping[str, Any]], output: str | Path) -> Path:
    """speedup_replicas.png: time-to-target speed-up against N replicas, projected per task, the measured
    2-replica runs as points, and the linear line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top = 2
    for task, s in summaries.items():
        w = s.get("wall")
        proj = _ints((w or {}).get("projection"))
        if not proj:
            continue
        ns = sorted(proj)
        top = max(top, ns[-1])
        line, = ax.plot(ns, [proj[n]["speedup"] for n in ns], "o-", linewidth=1.3, markersize=4,
                        label=f"{task}: projected")
        for x in (w.get("time_to_target") or {}).get("speedups", []):
            ax.plot([2], [x], "*", color=line.get_color(), markersize=11)
    ax.plot([1, top], [1, top], ":", color="gray", label="linear")
    ax.plot([], [], "*", color="black", label="measured: 2 Ray replicas")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("replicas N (direction mode, one direction each)")
    ax.set_ylabel("time-to-target speed-up over 1 replica")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return save_png(fig, output)


def save_png(fig: Any, output: str | Path) -> Path:
    """Lay out a matplotlib figure and write it as a PNG at ``output``, atomically."""
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return output
