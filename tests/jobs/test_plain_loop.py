"""jobs/plain_loop.py, the README's plain PyTorch loop: the step-size search picks a step that trains, and the
held-out loss falls by a stated margin."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))

import plain_loop  # noqa: E402


def test_the_searched_step_trains_the_readme_model(capsys):
    out = plain_loop.main(["--steps", "100", "--grid", "1,30", "--search-steps", "25"])
    printed = capsys.readouterr().out
    # eta 1 barely moves this model in 25 steps, eta 30 does: the search must see it on validation.
    assert out["eta"] == 30.0
    assert "eta 1: validation loss" in printed and "eta 30: validation loss" in printed
    # 100 steps at eta 30: the test loss (nats per byte, 5.56 at the start) falls by more than 0.4.
    assert out["start"] > 5.4 and out["end"] < out["start"] - 0.4
    assert "step 100: loss" in printed and "coefficient" in printed
