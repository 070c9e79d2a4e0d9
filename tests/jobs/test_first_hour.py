"""A new user's first hour, through the real command: what `ray-s2p train`, `replay` and `eval` say and write
when Ray does not start, for a task without a model, on a finished run, at a file, and in their help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.cli import main as cli
from ray_s2p.config import RunConfig
from ray_s2p.distributed.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ray_s2p"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def run_cli(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the tests' Ray
    return subprocess.run(CLI + list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**base, **OFFLINE, **(env or {})})


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`ray-s2p train` of the synthetic task, in-process replicas, 20 steps, the progress bar on."""
    folder = tmp_path_factory.mktemp("first_hour")
    cfg = folder / "smoke.yaml"
    cfg.write_text(yaml.safe_dump(smoke_dict(**{"steps": 20, "progress": True, "cluster.replicas": 1,
                                                "optimizer.tuned_directions": 1})))
    done = run_cli("train", "--config", str(cfg), "--output", str(folder / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run", done


def test_ray_that_does_not_start_is_one_line_that_says_what_to_try(tmp_path):
    # A real start failure of a local Ray: its temp directory cannot be made.
    out = tmp_path / "run"
    done = run_cli("train", "--config", "jobs/configs/smoke.yaml", "--output", str(out),
                   env={"RAY_TMPDIR": "/dev/null/ray"}, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ray-s2p train: error: starting a local Ray failed (NotADirectoryError: ")
    assert "no step ran and nothing was written" in last and "`ray stop`" in last and "--address" in last
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_task_without_a_model_is_named_as_itself_and_its_config_names_no_model(smoke_run):
    run, done = smoke_run
    assert ("ray-s2p: training the synthetic task (a 2-layer MLP on generated Gaussian blobs) with vs2p, "
            "1 replica (direction mode), 20 steps") in done.stderr
    assert "minilm" not in done.stderr and "rotten_tomatoes" not in done.stderr and "1 replicas" not in done.stderr
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert "model" not in written["task"] and "dataset" not in written["task"] and written["task"]["name"] == "synthetic"
    expected = RunConfig.from_dict(smoke_dict(**{"steps": 20, "progress": True, "cluster.replicas": 1,
                                                 "optimizer.tuned_directions": 1}))
    assert RunDirectory.load_config(run) == expected  # the left-out keys come back as they were


def test_the_progress_bar_and_the_wall_time_say_what_they_are(smoke_run):
    run, done = smoke_run
    assert "acc@10=" in done.stderr and "acc=" not in done.stderr  # the evaluation of step 10, labelled so
    summary = json.loads((run / "summary.json").read_text())
    assert summary["startup_seconds"] > 0 and summary["wall_seconds"] > 0
    assert (f"wall {summary['wall_seconds']:.1f}s of training (from the replicas being up; start-up took "
            f"{summary['startup_seconds']:.1f}s more), 20 steps") in done.stdout


def test_resume_of_a_finished_run_says_so_and_touches_nothing(smoke_run):
    run, _ = smoke_run
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    done = run_cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (f"{run} is complete: 20 of 20 steps, final digest {summary['final_digest']}. Nothing to do. "
            f"To train on, raise the step count: --resume {run} --set steps=N") in done.stderr
    assert "replica up" not in done.stderr and "training" not in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()} == before


def test_output_at_a_regular_file_is_refused_and_the_file_kept(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    done = run_cli("train", "--config", "jobs/configs/smoke.yaml", "--output", str(target),
                   "--set", "cluster.use_ray=false")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"output directory {str(target)!r} is a file, not a run directory. Fix: choose another --output" in done.stderr
    assert target.read_text() == "mine"


def test_eval_takes_the_run_like_replay_and_an_earlier_step_keeps_the_final_eval(smoke_run, capsys):
    run, _ = smoke_run
    assert cli(["eval", str(run)]) == 0
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == 20
    assert cli(["eval", str(run), "--step", "10"]) == 0
    assert json.loads((run / "eval-step-10.json").read_text())["step"] == 10
    assert json.loads((run / "eval.json").read_text()) == final  # not overwritten by step 10's numbers
    capsys.readouterr()
    assert cli(["eval", str(run), "--run", str(run.parent)]) == 2
    assert "names two runs" in capsys.readouterr().err


def test_train_help_says_where_the_keys_are_and_that_set_repeats():
    done = run_cli("train", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "Train a model with forward passes only" in text and "docs/config.md" in text
    assert "repeat --set for more keys" in text and "examples:" in text and "ray-s2p train --resume runs/smoke" in text


def test_replay_and_eval_do_not_print_the_models_load_report(tmp_path):
    # MiniLM's pretrained checkpoint has no classifier head: transformers reports it MISSING while the model is
    # built, which reads as if the trained head were lost. The trained head is in the ledger.
    run = tmp_path / "minilm"
    done = run_cli("train", "--output", str(run), "--set", "steps=2", "--set", "cluster.use_ray=false",
                   "--set", "cluster.replicas=1", "--set", "task.eval_size=16", "--set", "eval_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    for argv in (["replay", str(run), "--check"], ["eval", str(run)]):
        shown = run_cli(*argv)
        assert shown.returncode == 0, shown.stderr[-3000:]
        assert "MISSING" not in shown.stderr and "newly initialized" not in shown.stderr, argv
