"""The first screen of `ray-s2p train` on Ray: one line per event that matters, library output in a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "smoke.yaml"
# tiny-bert: a transformers model whose replica 0 writes final/ with save_pretrained (a progress bar).
TINY_BERT = ["task.name=text_classification", "task.model=tiny-bert", "task.dataset=synthetic_text",
             "task.options={tokenizer: word, synthetic_size: 96}", "task.eval_size=16", "steps=6",
             "eval_every=3", "checkpoint_every=3"]


def _train(run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "ray_s2p", "train", "--config", str(SMOKE), "--output", str(run), *extra]
    for s in TINY_BERT:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_quiet_by_default_and_the_chatter_is_in_the_replica_logs(tmp_path):
    run = tmp_path / "run"
    done = _train(run)
    assert done.returncode == 0, done.stderr
    screen = done.stdout + done.stderr
    assert "2 replicas up on 1 node (" in screen and "cpu (" in screen
    assert f"replica output in {run}/logs" in screen
    for chatter in ("Writing model shards", "Started a local Ray instance", "ReplicaHost pid="):
        assert chatter not in screen, chatter
    assert "Writing model shards" in (run / "logs" / "replica-0.log").read_text()  # replica 0 wrote final/
    assert (run / "logs" / "replica-1.log").is_file()
    nodes = json.loads((run / "summary.json").read_text())["nodes"]
    assert len(nodes) == 2 and all(n["node_ip"] and n["node_id"] for n in nodes)
    assert len({n["pid"] for n in nodes}) == 2  # one process per replica


def test_verbose_shows_it_on_the_console(tmp_path):
    run = tmp_path / "run"
    done = _train(run, "--verbose")
    assert done.returncode == 0, done.stderr
    screen = done.stdout + done.stderr
    assert "Writing model shards" in screen and "2 replicas up on 1 node" in screen
    assert "replica output in" not in screen and not (run / "logs").exists()


def test_replicas_ask_for_exactly_the_configured_resources(tmp_path, ray_session):
    from ray_s2p.config import load_config
    from ray_s2p.distributed.driver import train

    cfg = load_config(SMOKE, ["steps=4", "eval_every=2", "checkpoint_every=2", "cluster.memory_per_replica_gb=0.25",
                              "progress=false"])
    nodes = train(cfg, tmp_path / "run", log=lambda m: None).summary["nodes"]
    for node in nodes:
        assert node["resources"]["CPU"] == 1.0 and node["resources"]["memory"] == 0.25 * 2**30
        assert "GPU" not in node["resources"]
    too_much = cfg.replace({"cluster.memory_per_replica_gb": 100000.0})
    with pytest.raises(RuntimeError, match="x memory=.* but the cluster has .* Fix: lower cluster.replicas or "
                                           "cluster.memory_per_replica_gb"):
        train(too_much, tmp_path / "run2", log=lambda m: None)
    assert not (tmp_path / "run2").exists()


def test_tune_trials_reserve_the_same_replica_bundles():
    from ray_s2p.config import load_config
    from ray_s2p.sweeps.tune import trial_resources

    cfg = load_config(SMOKE, ["cluster.memory_per_replica_gb=0.5", "cluster.gpus_per_replica=0.5"])
    assert trial_resources(cfg, 1.0).bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.5, "memory": 0.5 * 2**30}] * 2
    local = cfg.replace({"cluster.use_ray": False})
    assert trial_resources(local, 1.0).bundles == [{"CPU": 1.0}]  # in-process replicas live in the driver's bundle
