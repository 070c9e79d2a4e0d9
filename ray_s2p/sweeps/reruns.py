"""The reruns of a comparison: one tuned variant trained once per seed on the test split.

Every rerun of every variant is evaluated at the same forward-pass counts (``interval``), so
curves and interpolated passes-to-target compare at equal cost. A finished rerun is reused
from the progress file (any machine) or from its run directory when its config is exactly
the one that would run now; runs can train side by side in one-CPU Ray tasks, and one that
fails becomes a row with its error instead of stopping the others.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..config import RunConfig
from ..config_history import saved_config, trajectory_dict
from .progress import CompareProgress, NotRecorded, fingerprint
from .protocol import passes_to_target as interpolated_passes


def finished_run(run_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly ``config`` in ``run_dir``, else None."""
    import json

    import yaml

    try:
        stored = saved_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # absent, unreadable, or a config this version rejects
        return None
    # Compared without the keys that compute nothing different here (a run made before they existed counts).
    if trajectory_dict(stored) != trajectory_dict(config) or summary.get("steps_completed") != config.steps:
        return None
    return summary


def eval_curve(metrics_path: Path, metric: str = "eval_accuracy") -> list[tuple[float, float | None]]:
    """(forward passes, metric) of every evaluation of a run, in order."""
    rows = pq.read_table(metrics_path).to_pylist()
    return [(float(r["forward_passes"] or 0), r.get(metric)) for r in rows if r["kind"] == "eval"]


def run_seeds(base: RunConfig, name: str, overrides: dict[str, Any], seeds: list[int], out: Path,
              target: float, interval: int, resume: bool = False, parallel: int = 1,
              progress: CompareProgress | None = None, train: bool = True) -> list[dict[str, Any]]:
    """Train the tuned variant once per seed on the test split, evaluated every ``interval`` forward passes.

    Finished identical runs are reused when ``resume``: from ``progress`` (any machine), else from their
    run directory. A run that raises becomes a row with its error. With ``parallel`` > 1 up to that many
    runs train at once, each in a Ray task of one CPU (the configs, and so the run directories and
    fingerprints ``--resume`` compares, are the same either way). ``train`` False implies ``resume`` and
    raises ``NotRecorded`` for a run found in neither place.
    """
    from .tune import passes_per_step

    resume = resume or not train

    rows: dict[int, dict[str, Any]] = {}
    keys: dict[int, str] = {}
    pending: list[tuple[int, RunConfig, Path]] = []
    for seed in seeds:
        cfg = base.replace(overrides | {"seed": seed, "progress": False, "task.eval_split": "test"})
        # The same pass counts for all; metrics and ledger are written at each evaluation (every 50 steps
        # rewrote them whole, a cost that grows with the run).
        every = max(1, interval // passes_per_step(cfg))
        cfg = cfg.replace({"eval_every": every, "log_every": every})
        run_dir = out / "runs" / f"{name}-seed{seed}"
        rows[seed] = {"variant": name, "seed": seed, "split": "test", "eval_interval": interval,
                      "run_dir": str(run_dir), "error": None, "settings": _settings(overrides)}
        keys[seed] = fingerprint(trajectory_dict(cfg))
        done = progress.run(run_dir.name, keys[seed]) if progress is not None and resume else None
        if done is None and resume:
            summary = finished_run(run_dir, cfg)
            if summary is not None:
                done = {"summary": summary, "curve": eval_curve(run_dir / "metrics.parquet")}
                if progress is not None:
                    progress.record_run(run_dir.name, keys[seed], summary, done["curve"])
            elif run_dir.exists() and train:  # a fallback says what it does, in one line
                print(f"compare --resume: {run_dir} holds no finished run of this config; running it again",
                      file=sys.stderr, flush=True)
        if done is None and not train:
            raise NotRecorded(f"{name}: run {run_dir.name} not recorded")
        if done is None:
            pending.append((seed, cfg, run_dir))
        else:
            rows[seed] |= _outcome(done["summary"], done["curve"], target)
    trained = _train_parallel(pending, parallel) if parallel > 1 and len(pending) > 1 else \
        ((seed, _train_one(cfg, run_dir)) for seed, cfg, run_dir in pending)
    for seed, result in trained:
        if isinstance(result, str):
            rows[seed] |= {"error": result}
            continue
        curve = eval_curve(Path(rows[seed]["run_dir"]) / "metrics.parquet")
        if progress is not None:
            progress.record_run(Path(rows[seed]["run_dir"]).name, keys[seed], result, curve)
        rows[seed] |= _outcome(result, curve, target)
    return [rows[seed] for seed in seeds]


def _train_one(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | str:
    """One run's summary, or its error in one line: one failed run must not lose the others."""
    from ..distributed.driver import train

    try:
        return train(cfg, run_dir, overwrite=True, log=lambda m: None).summary
    except Exception as exc:  # noqa: BLE001 - reported in the run's row and by the command's exit status
        return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _train_parallel(pending: list[tuple[int, RunConfig, Path]], parallel: int):
    """(seed, summary or error line) of each pending run, at most ``parallel`` Ray tasks of one CPU at once."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(_train_one)
    queue, running = list(pending), {}
    while queue or running:
        while queue and len(running) < parallel:
            seed, cfg, run_dir = queue.pop(0)
            running[remote.remote(cfg, run_dir)] = seed
        done, _ = ray.wait(list(running), num_returns=1)
        seed = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - the task's worker died: the run failed, the others go on
            result = _one_line(exc)
        yield seed, result


def _outcome(summary: dict[str, Any], curve: list[tuple[float, float | None]], target: float) -> dict[str, Any]:
    final, initial = summary["final_metrics"], summary["initial_metrics"]
    return {"test_accuracy": final.get("eval_accuracy"), "test_loss": final.get("eval_loss"),
            "initial_test_accuracy": initial.get("eval_accuracy"), "forward_passes": summary["forward_passes"],
            "wall_seconds": summary["wall_seconds"], "curve": curve,
            "passes_to_target": interpolated_passes(curve, target)}


def _settings(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                     for k, v in sorted(overrides.items()) if k.startswith("optimizer.") and k != "optimizer.name")
