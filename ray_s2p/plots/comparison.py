"""The comparison figure of ``ray-s2p compare``: test accuracy against forward passes.

Two panels: the optimizers (left) and VS2P with its ablations (right). Each
variant is drawn as the mean over its seeds at each evaluation (the seeds of a
variant evaluate at the same forward-pass counts), with the band between the
worst and best seed. First-order references are dashed. Colours come from a
20-colour map so that no two variants of one panel share a colour.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import FIRST_ORDER
from ..files import atomic_path
from .curves import load_curves


def seed_band(runs: Sequence[Path | Sequence[tuple[float, float | None]]]
              ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(forward passes, mean, min, max) of eval accuracy over runs, at the points every run evaluated.

    Args:
        runs: per run, its directory or its (forward passes, accuracy) evaluations.

    Raises:
        ValueError: a run directory has no metrics.parquet (from ``plot.load_curves``).
    """
    per_run = []
    for run in runs:
        if isinstance(run, (str, Path)):
            curves = load_curves(Path(run))
            run = list(zip(curves.eval_passes, curves.eval_values["eval_accuracy"]))
        per_run.append({float(x): float(y) for x, y in run if x is not None and y is not None})
    common = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    values = [[r[x] for r in per_run] for x in common]
    return (common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def plot_comparison(rows: Sequence[dict[str, Any]], output: str | Path, *, target: float | None = None,
                    ablation_names: Sequence[str] = (), ylabel: str = "held-out accuracy") -> Path:
    """Write the comparison PNG from ``compare``'s result rows (variant, and curve or run_dir, per seed).

    Args:
        rows: one row per run, with ``variant`` and its ``curve`` (evaluations) or ``run_dir``.
        output: the PNG path (written atomically).
        target: accuracy drawn as a dotted horizontal line (the ``--target``), if given.
        ablation_names: variants drawn in the right panel together with ``vs2p``.
        ylabel: what the runs' eval accuracy measured (``compare``'s reruns evaluate the test split).
    """
    by_variant: dict[str, list] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r["curve"] if r.get("curve") else Path(r["run_dir"]))
    main = [v for v in by_variant if v not in ablation_names]
    ablations = [v for v in ("vs2p", *ablation_names) if v in by_variant and (v != "vs2p" or len(by_variant) > 1)]
    panels = [("optimizers", main)] + ([("VS2P ablations", ablations)] if any(
        v in ablation_names for v in ablations) else [])

    fig = Figure(figsize=(6.5 * len(panels), 5.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = colormaps["tab20"]
    for ax, (title, names) in zip(axes, panels):
        for i, name in enumerate(names):
            xs, mean, low, high = seed_band(by_variant[name])
            color = cmap(i % 20)
            style = "--" if name in FIRST_ORDER else "-"
            n = len(by_variant[name])
            ax.plot(xs, mean, style, color=color, marker="o", markersize=3, linewidth=1.6,
                    label=f"{name} ({n} seed{'s' if n != 1 else ''})")
            if n > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.12, linewidth=0)
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
        ax.set_title(f"{title}: mean over seeds, band = min..max", fontsize=10)
        ax.set_xlabel("forward passes (a first-order step counts 3)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return output
