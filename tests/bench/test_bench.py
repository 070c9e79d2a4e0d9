"""`ray-s2p bench`: every sub-benchmark on a tiny config, its JSON line's documented keys and numbers.

Speed numbers are not checked against targets (the machine may be busy); what
is checked is that each line is complete, positive where it must be, and
checked against what is known independently of the benchmark's own arithmetic (the
parameter count, the replayed digest, which calls crossed the wire, that a recovery
happened), never a ratio recomputed from the line's own parts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ray_s2p.bench.common import emit
from ray_s2p.bench.runner import BENCHES, run_benches
from ray_s2p.cli import main as cli
from ray_s2p.errors import RayS2PError

SYNTHETIC = ["task.name=synthetic", "task.eval_size=32"]
TINY_BERT = ["task.model=tiny-bert", "task.dataset=synthetic_text", "task.eval_size=8",
             "task.options={tokenizer: word, synthetic_size: 96}"]
MACHINE_KEYS = {"cpu_count", "torch_threads", "platform", "python", "torch", "ray", "cuda_device"}
CONFIG_KEYS = {"task", "model", "trainable", "feature_reuse", "batch_size", "max_length", "optimizer", "rho",
               "distribution", "mechanism"}


def read_lines(path: Path) -> dict[str, dict]:
    """The results file as {bench: record}; every line must be strict JSON (no NaN)."""
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
               for line in path.read_text().splitlines()]
    return {r["bench"]: r for r in records}


def check_common(record: dict) -> None:
    assert MACHINE_KEYS <= set(record["machine"])
    assert record["machine"]["cpu_count"] >= 1 and record["machine"]["torch_threads"] >= 1
    assert CONFIG_KEYS <= set(record["config"])
    assert record["time"]


def positive(*values: float) -> None:
    for v in values:
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, values


@pytest.fixture
def ray_or_skip(request):
    """The session's local Ray; the Ray benchmarks are skipped only where Ray cannot start at all."""
    try:
        return request.getfixturevalue("ray_session")
    except Exception as exc:  # noqa: BLE001 - any start failure means: no Ray on this machine
        pytest.skip(f"ray cannot start here: {exc}")


def test_step_through_the_cli(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    argv = ["bench", "step", "--results", str(results), "--repeats", "1"]
    for s in TINY_BERT:
        argv += ["--set", s]
    assert cli(argv) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(out) == 1 and json.loads(out[0])["bench"] == "step"  # stdout: exactly the one result line
    r = read_lines(results)["step"]
    check_common(r)
    assert r["config"]["model"] == "tiny-bert" and r["config"]["batch_shape"] == [16, 64]  # fixed 16 x 64 tokens
    positive(r["two_forwards_s"], r["config"]["trainable_parameters"])
    assert set(r["variants"]) == {"hooks_gaussian", "swap_gaussian", "hooks_table", "swap_table", "hooks_rademacher",
                                  "hooks_lowrank", "naive_mezo", "plain_gaussian"}
    assert set(r["targets"]["met"]) == set(r["variants"]) - {"naive_mezo"}
    for name, v in r["variants"].items():
        positive(v["step_s"], v["two_forwards_s"], v["ratio"], v["rng_share"], v["speedup_vs_naive_mezo"])
        assert v["generations_per_step"] == (4 if name == "naive_mezo" else 3)
    split = r["split"]
    families = ("gaussian", "table", "rademacher", "lowrank")
    assert set(split) == ({f"copies_{d}_s" for d in families} | {f"update_{d}_s" for d in families}
                          | {"serial_randn_s", "forward_s", "remainder_s"})
    positive(*(v for k, v in split.items() if k != "remainder_s"))
    mem = r["extra_memory_bytes"]
    # hooks holds one module at a time, swap the whole selection.
    assert 0 < mem["hooks"] < mem["swap"]


def test_step_with_bf16_weights_times_every_model_in_bf16_against_the_half_precision_targets(tmp_path, monkeypatch):
    import ray_s2p.bench.step as step_bench
    dtypes = set()
    naive = step_bench.naive_mezo_fn

    def recording(params, *args, **kwargs):
        dtypes.update(p.dtype for p in params)
        return naive(params, *args, **kwargs)
    monkeypatch.setattr(step_bench, "naive_mezo_fn", recording)
    results = tmp_path / "r.jsonl"
    assert run_benches(["step"], results=results, repeats=1,
                       sets=[*TINY_BERT, "precision.weights=bf16"]) == 0
    r = read_lines(results)["step"]
    assert r["config"]["weights"] == "bf16" and dtypes == {torch.bfloat16}  # the naive step too
    targets = r["targets"]
    assert targets["gaussian_overhead_vs_naive_max"] == 0.6 and targets["ratio_max"]["lowrank"] == 1.3
    # Table and Rademacher have no half-precision target.
    assert set(targets["met"]) == {"hooks_gaussian", "swap_gaussian", "hooks_lowrank", "plain_gaussian"}
    naive_overhead = r["variants"]["naive_mezo"]["ratio"] - 1.0
    for name, v in r["variants"].items():
        if name == "naive_mezo":
            continue
        if naive_overhead > 0:
            assert v["overhead_vs_naive"] == pytest.approx((v["ratio"] - 1.0) / naive_overhead, rel=1e-3)
        else:  # on a busy machine the tiny model's naive step can time below its forwards: no ratio, not met
            assert v["overhead_vs_naive"] is None and targets["met"].get(name) in (None, False)


def test_hooks_compares_four_probers_that_give_the_same_bits(tmp_path):
    results = tmp_path / "r.jsonl"
    assert run_benches(["hooks"], results=results, sets=TINY_BERT, repeats=1) == 0
    r = read_lines(results)["hooks"]
    check_common(r)
    assert r["rounds"] == 3 and set(r["batches"]) == {"text", "uniform"}
    for batch in r["batches"].values():
        assert batch["same_loss"] is True
        assert 0 < batch["distinct_ids"] <= 16 * 64
        positive(batch["forward_s"], *batch["probe_s"].values())
        assert set(batch["probe_s"]) == set(batch["overhead_s"]) == {"per_module", "lookups", "merged", "both"}
    # Per module, the most held at once is the largest module's parameters; merging never holds more.
    from ray_s2p.bench.runner import bench_config
    from ray_s2p.tasks import build_task
    config, _ = bench_config(None, TINY_BERT)
    model = build_task(config.task, config.seed).build_model()
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())
    held = r["held_copy_bytes"]
    assert held["per_module"] == largest and max(held.values()) == largest and min(held.values()) > 0


def test_memory_and_replay(tmp_path):
    results = tmp_path / "r.jsonl"
    assert run_benches(["memory", "replay"], results=results, sets=SYNTHETIC, steps=3, repeats=1) == 0
    lines = read_lines(results)
    mem = lines["memory"]
    check_common(mem)
    assert set(mem["modes"]) == {"inference", "zeroth_order", "adamw"}
    for m in mem["modes"].values():
        positive(m["baseline_rss"], m["peak_rss"], m["parameter_bytes"])
        assert m["peak_rss"] >= m["baseline_peak_rss"]  # ru_maxrss only grows
    for basis in ("peak", "increment"):
        j = mem["ratios"][basis]
        positive(j["zeroth_order_over_inference"], j["adamw_over_zeroth_order"])
    assert "met" in mem["verdict"] and "AdamW" in mem["verdict"]
    rep = lines["replay"]
    check_common(rep)
    positive(rep["train_steps_per_s"], rep["replay_steps_per_s"], rep["speedup"], rep["replay_seconds"])
    assert rep["steps"] == 3 and rep["digest_match"] is True  # the replayed parameters are the trained ones


def test_ray_benchmarks(tmp_path, ray_or_skip):
    results = tmp_path / "r.jsonl"
    assert run_benches(["scaling", "traffic", "recovery"], results=results, sets=SYNTHETIC, steps=3, repeats=1) == 0
    lines = read_lines(results)
    sc = lines["scaling"]
    check_common(sc)
    assert [r["replicas"] for r in sc["runs"]] == [1, 2]
    for run in sc["runs"]:
        positive(run["seconds_per_step"], run["directions_per_s"])
    positive(sc["efficiency"], sc["probe_seconds"], *sc["update_seconds"].values())
    assert set(sc["lowrank_update_seconds_at"]) == {"8", "64", "512"}
    for dist in ("gaussian", "table", "rademacher"):
        proj = sc["projected_efficiency"][dist]
        assert set(proj) == {"8", "64", "512"}
        assert 1 >= proj["8"] >= proj["64"] >= proj["512"] > 0  # more replicas: more pairs to apply per step
    # Low-rank: u(N) is timed, not extrapolated; 512 pairs (a 1,024-column product) cost clearly more than 8.
    proj = sc["projected_efficiency"]["lowrank"]
    assert set(proj) == {"8", "64", "512"} and 0 < proj["512"] < proj["8"]
    # Lazy V (the config has none: the bench's window of 10 steps) is measured beside it.
    assert sc["lowrank_shared_v_interval"] == 10
    assert set(sc["lowrank_shared_v_update_seconds_at"]) == set(sc["projected_efficiency"]["lowrank_shared_v"])
    positive(*sc["lowrank_shared_v_update_seconds_at"].values())
    floor_one, floor_two = sc["floor_runs"]  # the same work in plain processes: the machine's ceiling
    assert [floor_one["replicas"], floor_two["replicas"]] == [1, 2]
    assert len(floor_two["process_seconds_per_step"]) == 2
    positive(sc["floor_efficiency"], sc["efficiency_vs_floor"], *floor_two["process_seconds_per_step"])
    tr = lines["traffic"]
    check_common(tr)
    assert tr["trainable_parameters"] == 610  # synthetic MLP: 16*32 + 32 + 32*2 + 2
    positive(*tr["bytes_per_step_per_replica"].values())
    assert tr["worst_bytes_per_step_per_replica"] <= 1024 and tr["targets"]["met"] is True  # seeds and scalars only
    rec = lines["recovery"]
    check_common(rec)
    assert rec["replica_failures"] == 1 and rec["steps_completed"] == 3 and rec["kill_after_step"] == 1
    positive(rec["recovery_seconds_total"], rec["kill_to_next_step_s"], rec["step_seconds"])
    assert rec["kill_to_next_step_s"] >= rec["recovery_seconds_total"]  # the next step waited for the recovery


def test_bad_arguments_and_strict_json(tmp_path, capsys):
    with pytest.raises(RayS2PError, match="unknown benchmark"):
        run_benches(["nope"], results=tmp_path / "r.jsonl")
    assert cli(["bench", "step", "--steps", "1", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "--steps 2 or more" in capsys.readouterr().err
    assert set(BENCHES) == {"step", "hooks", "scaling", "traffic", "memory", "recovery", "replay", "driver",
                            "precision"}
    path = tmp_path / "e.jsonl"
    emit({"bench": "x", "value": float("nan"), "n": 1.234567891}, path)
    emit({"bench": "y"}, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # appended, strict JSON
    assert rows[0] == {"bench": "x", "value": None, "n": 1.23457} and rows[1] == {"bench": "y"}


def test_driver_through_the_cli_on_the_smoke_model(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    assert cli(["bench", "driver", "--cases", "smoke", "--results", str(results)]) == 0
    r = read_lines(results)["driver"]
    check_common(r)
    smoke = r["cases"]["smoke"]
    assert smoke["steps"] == 20 and r["config"]["run"]["checkpoint_every"] == 5
    positive(smoke["peak_rss"], smoke["rss_ray_up"], smoke["checkpoint_bytes"], smoke["parameters"])
    assert smoke["parameters"] == 610  # the synthetic MLP: 16*32 + 32 + 32*2 + 2
    traffic = smoke["traffic"]
    assert {"probe", "save_checkpoint", "digest", "evaluate", "write_final", "check_storage"} <= set(
        traffic["per_method"])
    assert traffic["per_method"]["save_checkpoint"]["calls"] == 4  # steps 5, 10, 15, 20
    # No tensor crosses the wire: the largest message is a few hundred bytes, whatever the model.
    assert 0 < r["largest_message"]["bytes"] < 4096 and r["targets"]["largest_message_met"] is True
    assert "largest message" in r["verdict"]


def test_random_llama_task_trains_on_replicas_and_its_final_model_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ray_s2p.bench.common import BenchContext
    from ray_s2p.bench.driver import case_config
    from ray_s2p.bench.random_llama import LLAMA_1B, LLAMA_TINY
    from ray_s2p.config import RunConfig
    from ray_s2p.distributed.driver import train

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "jobs"))
    import gpu_check_plan
    assert LLAMA_1B == gpu_check_plan.LLAMA_1B and LLAMA_TINY == gpu_check_plan.LLAMA_TINY  # one synthetic 1 B spec
    cfg = case_config("llama-tiny", BenchContext(RunConfig()))
    cfg = cfg.replace({"cluster.use_ray": False, "steps": 4, "checkpoint_every": 2, "eval_every": 2})
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.dtype == torch.bfloat16 and final.config.num_hidden_layers == LLAMA_TINY["num_hidden_layers"]
    from ray_s2p.distributed.digest import model_digest
    assert model_digest(final) == result.final_digest  # what replica 0 wrote is the trained model


def test_churn_schedule_is_seeded_and_every_removal_comes_back():
    from ray_s2p.bench.churn import churn_schedule, interpolated
    a = churn_schedule(300, seed=3, removals=3)
    assert a == churn_schedule(300, seed=3, removals=3) != churn_schedule(300, seed=4, removals=3)
    removes = [k for k, kind in a if kind == "remove"]
    adds = [k for k, kind in a if kind == "add"]
    assert len(removes) == len(adds) == 3 and all(5 <= k < 290 for k in removes + adds)
    assert all(10 <= add - rem <= 40 for rem, add in zip(removes, adds))
    assert interpolated({2: 1.0, 4: 3.0}, 3.5) == 2.5 and interpolated({2: 1.0, 4: 3.0}, 1) == 1.0


@pytest.mark.slow
def test_churn_on_its_own_ray_cluster(tmp_path):
    """A node removed and one added during a 120-step synthetic run on a ray.cluster_utils.Cluster: the line has
    the events as they happened, a drop and a join, an exact replay, and the ratio against the runs without churn
    at the sizes used (not checked against the 0.8 target: the machine may be busy)."""
    results = tmp_path / "r.jsonl"
    assert run_benches(["churn"], results=results, sets=SYNTHETIC, steps=120) == 0
    r = read_lines(results)["churn"]
    check_common(r)
    assert r["steps"] == 120 and [kind for _, kind in r["events"]] == ["remove", "add"]
    churn = r["churn"]
    assert churn["replica_drops"] == 1 and churn["replica_joins"] >= 1 and churn["replay_exact"] is True
    sizes = {int(n): k for n, k in churn["steps_at_size"].items()}
    assert set(sizes) == {2, 3} and sum(sizes.values()) == 120
    assert set(r["fixed"]) == {"2", "3"}
    positive(churn["seconds"], churn["steps_per_minute"], r["expected_seconds"], r["ratio"], r["ratio_at_average"])
    assert 2 < r["average_replicas"] < 3 and r["targets"]["ratio_min"] == 0.8
