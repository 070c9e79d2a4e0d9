"""``ray-s2p bench precision``: a replica's memory with bf16 weights against fp32, in fresh processes."""

import json

import pytest

from ray_s2p.bench.common import BenchContext
from ray_s2p.bench.memory import run_child
from ray_s2p.bench.precision import case_config, replica_bytes
from ray_s2p.cli import main as cli
from ray_s2p.config import RunConfig
from ray_s2p.errors import RayS2PError

SYNTHETIC = {"task.name": "synthetic", "task.eval_size": 32, "cluster.use_ray": False}


def test_llama_tiny_through_the_cli_halves_the_parameters(tmp_path):
    results = tmp_path / "r.jsonl"
    assert cli(["bench", "precision", "--cases", "llama-tiny", "--results", str(results)]) == 0
    r = json.loads(results.read_text().splitlines()[-1])
    assert r["bench"] == "precision" and r["config"]["cases"] == ["llama-tiny"]
    runs = r["cases"]["llama-tiny"]["runs"]
    assert runs["fp32"]["weights"] == "fp32" and runs["bf16"]["weights"] == "bf16"
    # LLAMA_TINY: every parameter in the dtype it trains in, 2 bytes against 4.
    assert runs["fp32"]["parameter_bytes"] == 2 * runs["bf16"]["parameter_bytes"] == 4 * 231_744
    for run in runs.values():
        assert run["pre_model_rss"] < run["work_peak_rss"]  # building and training a model costs memory
        assert run["steps"] == 5
    assert "llama-tiny:" in r["verdict"] and "target <= 0.55" in r["verdict"]


def test_every_memory_mode_holds_the_weights_in_the_configured_dtype():
    config = RunConfig().replace({**SYNTHETIC, "precision.weights": "bf16"})
    fp32 = run_child("inference", RunConfig().replace(SYNTHETIC))
    bf16 = run_child("inference", config)
    assert fp32["parameter_bytes"] == 2 * bf16["parameter_bytes"] == 4 * 610  # the synthetic MLP
    assert bf16["weights"] == "bf16"


def test_replica_bytes_and_cases():
    child = {"work_peak_rss": 900, "peak_rss": 1000, "pre_model_rss": 600}
    assert replica_bytes(child) == 300  # the steps' peak, not the build's (peak_rss)
    assert replica_bytes({**child, "cuda_peak": 123}) == 123
    ctx = BenchContext(RunConfig(), {"perturbation.distribution": "lowrank"})
    cfg = case_config("llama-tiny", "bf16", ctx)
    assert cfg.precision.weights == "bf16" and cfg.task.options["dtype"] == "bf16"
    assert cfg.perturbation.distribution == "lowrank"  # the user's --set wins over the case's Gaussian
    with pytest.raises(RayS2PError, match="unknown case 'smoke'"):
        case_config("smoke", "fp32", ctx)
