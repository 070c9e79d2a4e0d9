"""Learning curves of one or more run directories in one PNG (``ray-s2p plot``, cli/plot.py).

The figure has four panels, so optimizers are compared both per step and per
unit of compute (zeroth-order methods differ mostly in forward passes per step):

    train loss vs step          train loss vs forward passes
    eval metric vs step         eval metric vs forward passes

Only metrics.parquet is required; config.yaml (or summary.json) supplies the
default label. Rendering uses the Agg canvas directly, never pyplot, so plotting
neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import RayS2PError
from ..files import atomic_path
from ..storage_fs import Location, StoragePath, location, read_parquet

# Trailing moving average over this many logged train points (not steps: rows are
# written every log_every steps). Per-step zeroth-order losses are one noisy
# minibatch each; 20 points hides that noise without hiding divergence. The
# first points average over what exists so far, so the curve starts at the
# first logged step. The raw loss is drawn faintly behind the smoothed curve.
SMOOTHING_WINDOW = 20

_EVAL_METRICS = ("eval_accuracy", "eval_loss")


@dataclass(frozen=True)
class RunCurves:
    """The series of one run that the figure draws."""

    label: str
    train_step: list[int]
    train_passes: list[float | None]
    train_loss: list[float]
    eval_step: list[int]
    eval_passes: list[float | None]
    eval_values: dict[str, list[float | None]]


def moving_average(values: Sequence[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """Trailing mean: out[i] = mean(values[max(0, i - window + 1) : i + 1]).

    Args:
        values: the series, in order.
        window: number of points averaged; 1 returns the series unchanged.

    Returns:
        A list as long as ``values``.

    Raises:
        ValueError: window < 1.
    """
    if window < 1:
        raise RayS2PError(f"smoothing window must be >= 1, got {window}. Fix: use 1 (no smoothing) or more")
    out: list[float] = []
    running = 0.0
    for i, v in enumerate(values):
        running += v
        if i >= window:
            running -= values[i - window]
        out.append(running / min(i + 1, window))
    return out


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def default_label(run_dir: Location) -> str:
    """``"<optimizer.name> (<dir name>)"`` from config.yaml or summary.json, else the dir name."""
    name = None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        name = (config.get("optimizer") or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        pass  # a label is cosmetic: fall through to summary.json, then the bare name
    if name is None:
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            optimizer = summary.get("optimizer")
            name = optimizer.get("name") if isinstance(optimizer, dict) else optimizer
        except (OSError, ValueError, AttributeError):
            pass
    return f"{name} ({run_dir.name})" if name else run_dir.name


def load_curves(run_dir: str | Path | StoragePath, label: str | None = None) -> RunCurves:
    """Read a run's metrics.parquet into plottable series.

    Non-finite train losses (a diverged step) are dropped from the train series.

    Raises:
        ValueError: metrics.parquet is missing, unreadable, or lacks step/kind.
    """
    run_dir = location(run_dir)  # a local path, or a URI read through pyarrow.fs (storage_fs.py)
    path = run_dir / "metrics.parquet"
    if not path.is_file():
        raise RayS2PError(f"run directory {str(run_dir)!r} has no metrics.parquet. "
                         f"Fix: pass a run directory written by `ray-s2p train` (metrics are flushed at each log step)")
    try:
        rows = read_parquet(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for torn or foreign files
        raise RayS2PError(f"run directory {str(run_dir)!r}: metrics.parquet is unreadable ({exc}). "
                         f"Fix: rerun or resume the run to rewrite it") from exc
    if rows and not {"step", "kind"} <= set(rows[0]):
        raise RayS2PError(f"run directory {str(run_dir)!r}: metrics.parquet has no 'step'/'kind' columns. "
                         f"Fix: pass a ray_s2p run directory")
    rows.sort(key=lambda r: r["step"])

    train = [r for r in rows if r["kind"] == "train" and _finite(r.get("loss"))]
    evals = [r for r in rows if r["kind"] == "eval"]
    return RunCurves(
        label=label if label is not None else default_label(run_dir),
        train_step=[r["step"] for r in train],
        train_passes=[r.get("forward_passes") for r in train],
        train_loss=[float(r["loss"]) for r in train],
        eval_step=[r["step"] for r in evals],
        eval_passes=[r.get("forward_passes") for r in evals],
        eval_values={m: [r.get(m) for r in evals] for m in _EVAL_METRICS},
    )


def _choose_eval_metric(runs: Sequence[RunCurves]) -> str:
    # One metric for the whole figure so the panels compare like with like:
    # accuracy when every run that evaluated has it (classification), else loss.
    evaluated = [r for r in runs if r.eval_step]
    if evaluated and all(any(_finite(v) for v in r.eval_values["eval_accuracy"]) for r in evaluated):
        return "eval_accuracy"
    return "eval_loss"


def _pairs(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[float]]:
    """Points where both coordinates are finite (forward_passes may be null)."""
    kept = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
    return [p[0] for p in kept], [p[1] for p in kept]


def _render(runs: Sequence[RunCurves], window: int) -> Figure:
    fig = Figure(figsize=(12, 8.5), dpi=110)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders without pyplot
    axes = fig.subplots(2, 2)
    metric = _choose_eval_metric(runs)
    metric_title = "eval accuracy" if metric == "eval_accuracy" else "eval loss"
    panels = [
        (axes[0][0], "step", "train loss", f"train loss (moving average, {window} points)"),
        (axes[0][1], "forward passes", "train loss", f"train loss vs compute (moving average, {window} points)"),
        (axes[1][0], "step", metric_title, f"{metric_title} vs step"),
        (axes[1][1], "forward passes", metric_title, f"{metric_title} vs compute"),
    ]
    for ax, xlabel, ylabel, title in panels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)

    colors = [f"C{i % 10}" for i in range(len(runs))]
    handles = []
    for run, color in zip(runs, colors):
        smooth = moving_average(run.train_loss, window) if run.train_loss else []
        for ax, xs in ((axes[0][0], run.train_step), (axes[0][1], run.train_passes)):
            x_raw, y_raw = _pairs(xs, run.train_loss)
            x_s, y_s = _pairs(xs, smooth)
            ax.plot(x_raw, y_raw, color=color, alpha=0.2, linewidth=0.8)
            (line,) = ax.plot(x_s, y_s, color=color, linewidth=1.8, label=run.label)
        handles.append(line)
        values = run.eval_values[metric]
        for ax, xs in ((axes[1][0], run.eval_step), (axes[1][1], run.eval_passes)):
            x, y = _pairs(xs, values)
            ax.plot(x, y, color=color, marker="o", markersize=4, linewidth=1.5)

    for ax, _, _, _ in panels:
        if not ax.lines or not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.legend(handles, [r.label for r in runs], loc="lower center", ncol=min(len(runs), 4), fontsize=9,
               frameon=False)
    legend_rows = math.ceil(len(runs) / 4)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * legend_rows, 1, 1))
    return fig


def plot_runs(run_dirs: Sequence[str | Path | StoragePath], output: Path, labels: list[str] | None = None,
              window: int = SMOOTHING_WINDOW) -> Path:
    """Draw the learning curves of several runs on one 2x2 figure and save it as PNG.

    Panels: train loss vs step and vs forward passes (trailing moving average of
    ``window`` logged points over the faint raw curve); eval accuracy (or eval
    loss when some run has no accuracy) vs step and vs forward passes.

    Args:
        run_dirs: run directories (local paths or URIs), each holding metrics.parquet.
        output: the PNG to write; replaced atomically (temporary file in the same
            directory, then os.replace), parent directories are created.
        labels: legend entries, one per run; default "<optimizer.name> (<dir name>)".
        window: moving-average window for the train loss, in logged points.

    Returns:
        ``output``.

    Raises:
        ValueError: no run directories, a label count that does not match, or a
            run directory whose metrics.parquet is missing or unreadable (the
            message names the directory).
    """
    if not run_dirs:
        raise RayS2PError("no run directories to plot. Fix: pass at least one RUN_DIR")
    if labels is not None and len(labels) != len(run_dirs):
        raise RayS2PError(f"{len(labels)} labels for {len(run_dirs)} run directories. "
                         f"Fix: give one label per run directory, in the same order")
    if window < 1:
        raise RayS2PError(f"smoothing window must be >= 1, got {window}. Fix: use 1 (no smoothing) or more")
    runs = [load_curves(d, labels[i] if labels is not None else None) for i, d in enumerate(run_dirs)]
    fig = _render(runs, window)
    output = Path(output)
    # savefig would infer the format from the temporary name (".tmp"), so name it.
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return output
