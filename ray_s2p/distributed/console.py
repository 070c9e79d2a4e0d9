"""What the console shows while a run goes: the line once the replicas are up, the progress bar, and the
line when Ray does not start.

Kept apart from run_dir.py (the run's files) and driver.py (the phases of a step): what a user reads on
the terminal is its own concern, and the files never depend on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..zo.environment import describe


def replicas_up(infos: list[dict[str, Any]], places: list[dict[str, Any]], env: dict[str, Any] | None,
                logs: Path | None) -> str:
    """One line once the replicas are up: how many, on which nodes, which device, what moves."""
    nodes: dict[str, int] = {}
    for place in places:
        nodes[place["node_ip"]] = nodes.get(place["node_ip"], 0) + 1
    where = ", ".join(f"{ip}: {n}" for ip, n in nodes.items())
    first = infos[0]
    line = (f"{len(infos)} replica{'s' if len(infos) != 1 else ''} up on {len(nodes)} node"
            f"{'s' if len(nodes) != 1 else ''} ({where}), {describe(env) if env else 'device unknown'}; "
            f"{first['trainable_parameters']:,} of {first['total_parameters']:,} parameters trainable")
    return line + (f"; replica output in {logs}" if logs is not None else "")


def ray_start_failure(exc: BaseException, address: str | None, nothing_written: bool) -> str:
    """The one line a user reads when ``ray.init`` fails: what failed, what was left, what to try."""
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    where = f"connecting to the Ray cluster at {address}" if address else "starting a local Ray"
    fixes = ("check the address and that the cluster is up (`ray status` on its head node)" if address else
             "run the command again; if a Ray left over from an earlier run is in the way, stop it with `ray stop`; "
             "or connect to a running cluster with --address (or RAY_ADDRESS)")
    return (f"{where} failed ({type(exc).__name__}: {reason}), so no step ran"
            f"{' and nothing was written' if nothing_written else ''}. Fix: {fixes}. Ray's own logs are in "
            f"its session directory (by default /tmp/ray/session_latest/logs); --debug shows the traceback")


class ProgressBar:
    """A tqdm bar with step, loss, the newest eval metric and its step, and steps/s (tqdm prints steps/s)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        self.last = time.perf_counter()

    def update(self, step: int, loss: float, eval_metrics: dict[str, float], eval_step: int = 0) -> None:
        """Advance one step: the step's training loss, and the newest evaluation labelled with the step it
        was taken at (``acc@250``), since it is not this step's."""
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}"}
        if "eval_accuracy" in eval_metrics:
            post[f"acc@{eval_step}"] = f"{eval_metrics['eval_accuracy']:.3f}"
        elif "eval_loss" in eval_metrics:
            post[f"eval_loss@{eval_step}"] = f"{eval_metrics['eval_loss']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
