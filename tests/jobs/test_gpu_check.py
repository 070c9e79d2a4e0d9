"""jobs/gpu_check.py: the --quick CPU smoke run, its JSON lines and summary, the budget, the exit codes.

The script is run as the GPU machine would run it: a subprocess, offline, with
the GPU hidden (CUDA_VISIBLE_DEVICES="") so the CPU path is taken everywhere.
Timings are not judged (the machine may be busy); what is checked is that every
documented line is there, complete, strict JSON and positive where it must be.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "jobs" / "gpu_check.py"
TIMEOUT_S = 300  # the quick run takes ~30 s on 2 busy cores; the margin is for a much busier machine
COMMON_KEYS = {"check", "status", "device", "quick", "time", "machine", "check_s"}
STEP_KEYS = {"model", "precision", "batch_shape", "parameters", "trainable_parameters", "two_forwards_s",
             "forward_s", "variants", "ratio_max", "met", "repeats"}
VARIANTS = {"hooks_gaussian", "hooks_philox", "hooks_rademacher", "hooks_lowrank", "naive_mezo"}
MEMORY_KEYS = {"model", "precision", "parameters", "parameter_bytes", "modes", "ratios", "met", "targets", "basis"}
COMPARISON_KEYS = {"optimizer", "step_sizes", "step_size_source", "steps", "seed", "eval_size", "initial_accuracy",
                   "final_accuracy", "initial_loss", "final_loss", "wall_s", "train_wall_s", "forward_passes"}


def run_script(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python jobs/gpu_check.py ARGS`` offline, GPU hidden, from the repository root."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a stdout or results file; strict JSON (NaN would fail)."""
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for line in text.splitlines() if line.startswith("{")]


def positive(*values: Any) -> None:
    for v in values:
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, values


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict[str, Any]:
    """One quick CPU run shared by the tests below: its process result, results file and summary file."""
    out = tmp_path_factory.mktemp("gpu_check")
    results, summary = out / "gpu_check.jsonl", out / "summary.md"
    proc = run_script("--quick", "--device", "cpu", "--results", str(results), "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "records": json_lines(results.read_text()), "summary": summary.read_text()}


def test_quick_run_prints_and_appends_one_line_per_check(quick):
    records = quick["records"]
    assert json_lines(quick["proc"].stdout) == records  # stdout carries the same lines as the file
    got = [(r["check"], r.get("model"), r.get("precision") or r.get("optimizer")) for r in records]
    assert got == [("step_overhead", "tiny-gpt2", "fp32"),
                   ("step_overhead", "llama-tiny", "fp32"), ("memory", "llama-tiny", "fp32"),
                   ("step_overhead", "llama-tiny", "fp32+autocast_bf16"),
                   ("step_overhead", "llama-tiny", "bf16"), ("memory", "llama-tiny", "bf16"),
                   ("comparison", "tiny-gpt2", "vs2p"), ("comparison", "tiny-gpt2", "mezo"),
                   ("comparison", "tiny-gpt2", "zo_sign")]
    for r in records:
        assert COMMON_KEYS <= set(r), r
        assert r["status"] == "ok", r
        assert r["quick"] is True and r["device"] == "cpu"
        positive(r["check_s"], r["machine"]["cpu_count"])


def test_step_overhead_lines(quick):
    for r in (r for r in quick["records"] if r["check"] == "step_overhead"):
        assert STEP_KEYS <= set(r), r
        assert set(r["variants"]) == VARIANTS and set(r["met"]) == VARIANTS
        positive(r["parameters"], r["trainable_parameters"], r["two_forwards_s"], r["forward_s"], r["ratio_max"],
                 *r["batch_shape"])
        assert r["ratio_max"] == 1.3  # the CPU target; 1.1 on a GPU
        for v in r["variants"].values():
            positive(v["step_s"], v["ratio"])


def test_memory_lines(quick):
    for r in (r for r in quick["records"] if r["check"] == "memory"):
        assert MEMORY_KEYS <= set(r), r
        assert set(r["modes"]) == {"inference", "zeroth_order", "adamw"}
        positive(r["parameters"], r["parameter_bytes"], *r["ratios"].values())
        for mode in r["modes"].values():
            assert mode["oom"] is False
            # The weights are resident at the peak of every mode: a peak below them was measured wrongly.
            assert mode["peak_bytes"] >= r["parameter_bytes"] and mode["increment_bytes"] >= 0
        # AdamW holds gradients and two moments on top of the weights, whatever the RSS noise.
        assert r["modes"]["adamw"]["peak_bytes"] > r["modes"]["inference"]["peak_bytes"]
    weights = {r["precision"]: r["parameter_bytes"] for r in quick["records"] if r["check"] == "memory"}
    assert weights["fp32"] == 2 * weights["bf16"]  # the same model, converted


def test_comparison_lines(quick):
    runs = {r["optimizer"]: r for r in quick["records"] if r["check"] == "comparison"}
    for r in runs.values():
        assert COMPARISON_KEYS <= set(r), r
        assert r["steps"] == 3 and r["eval_size"] > 0
        positive(r["wall_s"], r["train_wall_s"], r["forward_passes"], r["initial_loss"], r["final_loss"],
                 *r["step_sizes"].values())
        assert 0.0 <= r["initial_accuracy"] <= 1.0 and 0.0 <= r["final_accuracy"] <= 1.0
    # Same seed and budget: the same held-out start, the same forward passes.
    assert len({r["initial_accuracy"] for r in runs.values()}) == 1
    assert len({r["forward_passes"] for r in runs.values()}) == 1
    assert runs["vs2p"]["step_size_source"] == "config"
    positive(runs["vs2p"]["vs2p_median_sigma"])
    assert "median sigma" in runs["mezo"]["step_size_source"]  # MeZO's lr came from the VS2P run


def test_summary_is_markdown_tables(quick):
    stdout, summary = quick["proc"].stdout, quick["summary"]
    assert summary.strip() in stdout  # the printed summary is the written one
    for header in ("| model | precision | batch |", "| model | precision | weights |", "| optimizer | step sizes |"):
        assert header in summary
    table_rows = [line for line in summary.splitlines() if line.startswith("|")]
    widths = {line.replace("\\|", "").count("|") for line in table_rows if "---" not in line}
    # header + separator + rows: 4 step lines, 2 memory lines, 3 runs; no stray | splits a cell
    assert len(table_rows) == (2 + 4) + (2 + 2) + (2 + 3) and widths <= {12, 9, 7}


def test_budget_skips_checks_and_says_so(tmp_path):
    results = tmp_path / "r.jsonl"
    proc = run_script("--quick", "--device", "cpu", "--only", "memory", "--time-budget", "0",
                      "--results", str(results), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json_lines(results.read_text())
    assert [(r["check"], r["precision"], r["status"]) for r in records] == [
        ("memory", "fp32", "skipped"), ("memory", "bf16", "skipped")]
    assert all("time budget" in r["reason"] for r in records)
    assert "skipped: time budget" in proc.stdout


@pytest.mark.parametrize("args", [(), ("--device", "cpu")], ids=["no-cuda", "cpu-without-quick"])
def test_full_run_needs_a_gpu(tmp_path, args):
    results = tmp_path / "r.jsonl"
    proc = run_script(*args, "--results", str(results), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--quick" in proc.stderr and "Fix:" in proc.stderr
    assert not results.exists()  # nothing ran, nothing written
