"""``cluster.batch_scaling``: weak (task.batch_size per data shard) and strong (task.batch_size per group, split).

Strong scaling must make the shards of a step draw, together, exactly the batch one replica
draws at that step, so a strong data-mode run matches a 1-replica run up to float summation
order; weak scaling must draw the batches it always drew.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig
from ray_s2p.data.batching import shard_batch_size, train_positions
from ray_s2p.distributed.driver import train
from ray_s2p.distributed.engine import use_shard_batch_size
from ray_s2p.tasks import build_task

# Small offline tasks (as tests/tasks/test_tasks.py builds them): 96 generated rows, 16 held out, so 80
# train rows; a group batch of 12 does not divide 80, so some steps straddle two epochs.
HF_TASKS = {
    "text_classification": {"model": "tiny-bert", "dataset": "synthetic_text", "tiny_width": 32, "max_length": 24,
                            "options": {"tokenizer": "word", "synthetic_size": 96}},
    "image_classification": {"model": "resnet18", "dataset": "synthetic_images", "tiny_width": 4,
                             "options": {"synthetic_size": 96}},
}
GROUP_BATCH = 12


def run_config(task: dict, mode: str = "data", replicas: int = 1, scaling: str = "strong", groups: int = 1,
               **overrides) -> RunConfig:
    """A config of the given task and layout (the task section replaced whole)."""
    data = smoke_dict(**{"cluster.mode": mode, "cluster.replicas": replicas, "cluster.groups": groups,
                         "cluster.batch_scaling": scaling, **overrides})
    data["task"] = task
    return RunConfig.from_dict(data)


def shard_tasks(task: dict, replicas: int, **layout) -> list:
    """One task per replica, set up by the engine's rule for the config (as each replica's engine does)."""
    config = run_config(task, replicas=replicas, **layout)
    tasks = []
    for _ in range(replicas):
        built = build_task(config.task, config.seed)
        use_shard_batch_size(built, config)
        tasks.append(built)
    return tasks


def assert_union_is_one_replica_batch(task: dict, shards: int, steps: range) -> None:
    """Data mode, strong: shard s of ``shards`` draws its slice, in order, of the 1-replica batch of each step."""
    (single,) = shard_tasks(task, 1)
    parts = shard_tasks(task, shards)
    per_shard = task["batch_size"] // shards
    for step in steps:
        whole = single.train_batch(step, 0, 1)
        batches = [t.train_batch(step, s, shards) for s, t in enumerate(parts)]
        assert all(b["index"].numel() == per_shard for b in batches)
        assert torch.equal(torch.cat([b["index"] for b in batches]), whole["index"]), f"step {step}"
        assert whole["index"].numel() == task["batch_size"]


# ---------------------------------------------------------------- (1) the shards split the single-replica batch
@pytest.mark.parametrize("shards", [2, 4])
def test_strong_shards_of_a_step_are_the_one_replica_batch_synthetic(shards: int) -> None:
    # 100 train examples, group batch 12: 8 steps per epoch (the task's own epoch arithmetic), so steps
    # 1-20 cross two epoch boundaries.
    task = {"name": "synthetic", "batch_size": GROUP_BATCH, "eval_size": 64, "options": {"train_examples": 100}}
    assert_union_is_one_replica_batch(task, shards, range(1, 21))


@pytest.mark.parametrize("name", sorted(HF_TASKS))
@pytest.mark.parametrize("shards", [2, 4])
def test_strong_shards_of_a_step_are_the_one_replica_batch_hf(name: str, shards: int) -> None:
    task = {"name": name, "batch_size": GROUP_BATCH, "eval_size": 16, **HF_TASKS[name]}
    assert_union_is_one_replica_batch(task, shards, range(1, 15))  # 14 x 12 = 168 positions: into epoch 2


def test_strong_shards_of_random_llama_are_the_one_replica_batch() -> None:
    # The benchmark task draws random tokens per (step, shard); strong slices the one-replica batch.
    from ray_s2p.bench.random_llama import LLAMA_TINY
    task = {"name": "ray_s2p.bench.random_llama:build", "batch_size": 8, "max_length": 6, "eval_size": 4,
            "options": dict(LLAMA_TINY)}
    (single,) = shard_tasks(task, 1)
    parts = shard_tasks(task, 4)
    for step in (1, 5):
        whole = single.train_batch(step, 0, 1)["input_ids"]
        batches = [t.train_batch(step, s, 4)["input_ids"] for s, t in enumerate(parts)]
        assert whole.shape == (8, 6) and all(b.shape == (2, 6) for b in batches)
        assert torch.equal(torch.cat(batches), whole)
    (weak,) = shard_tasks(task, 4, scaling="weak")[:1]
    assert weak.train_batch(1, 1, 4)["input_ids"].shape == (8, 6)  # weak: task.batch_size per shard, as before


def test_strong_hybrid_splits_each_groups_batch_among_its_shards() -> None:
    # 4 replicas in 2 groups: 2 shards per group, each of 12 / 2 = 6 examples; every group draws the batch
    # of one replica (the shard index runs 0..1 within a group).
    task = {"name": "synthetic", "batch_size": GROUP_BATCH, "eval_size": 64, "options": {"train_examples": 100}}
    config = run_config(task, mode="hybrid", replicas=4, groups=2)
    (single,) = shard_tasks(task, 1)
    parts = shard_tasks(task, 4, mode="hybrid", groups=2)
    assert [t.train_batch_size for t in parts] == [6, 6, 6, 6]
    assert shard_batch_size(GROUP_BATCH, 2, config.cluster.batch_scaling) == 6
    for step in (1, 9, 17):
        whole = single.train_batch(step, 0, 1)["index"]
        halves = [parts[r].train_batch(step, r % 2, 2)["index"] for r in range(4)]
        assert torch.equal(torch.cat(halves[:2]), whole) and torch.equal(torch.cat(halves[2:]), whole)


def test_strong_eval_batches_keep_task_batch_size() -> None:
    task = {"name": "text_classification", "batch_size": GROUP_BATCH, "eval_size": 16,
            **HF_TASKS["text_classification"]}
    (strong,) = shard_tasks(task, 2)[:1]
    (weak,) = shard_tasks(task, 2, scaling="weak")[:1]
    assert strong.train_batch_size == 6 and weak.train_batch_size is None
    for shard in range(2):
        a, b = list(strong.eval_batches(shard, 2)), list(weak.eval_batches(shard, 2))
        assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    assert [x["index"].numel() for x in strong.eval_batches(0, 1)] == [12, 4]  # chunks of task.batch_size


# ---------------------------------------------------------------- (2) a strong run matches one replica
def ledger_losses(run_dir: Path) -> list[tuple[int, int, float, float]]:
    """(step, direction, loss_plus, loss_minus) of every ledger row, in step and direction order."""
    table = pq.read_table(run_dir / "ledger.parquet").to_pydict()
    rows = zip(table["step"], table["direction"], table["loss_plus"], table["loss_minus"])
    return sorted(rows)


def assert_same_losses(a: Path, b: Path) -> None:
    left, right = ledger_losses(a), ledger_losses(b)
    assert len(left) == len(right) > 0
    for (step, direction, plus, minus), (step_b, direction_b, plus_b, minus_b) in zip(left, right):
        assert (step, direction) == (step_b, direction_b)
        # Shard means averaged vs one mean: equal up to float summation order. Over 10 steps of the
        # smoke config the largest relative difference is about 2e-7.
        assert math.isclose(plus, plus_b, rel_tol=1e-6) and math.isclose(minus, minus_b, rel_tol=1e-6), \
            f"step {step} direction {direction}: {plus} vs {plus_b}, {minus} vs {minus_b}"


def run(tmp_path: Path, name: str, **overrides) -> object:
    config = RunConfig.from_dict(smoke_dict(**{"steps": 10, "checkpoint_every": 0, "eval_every": 0,
                                               "task.batch_size": 32, **overrides}))
    return train(config, tmp_path / name, log=lambda m: None)


@pytest.mark.parametrize("replicas", [2, 4])
def test_strong_data_run_has_the_losses_of_one_replica(tmp_path: Path, replicas: int) -> None:
    run(tmp_path, "one", **{"cluster.mode": "data", "cluster.replicas": 1})
    strong = run(tmp_path, "strong", **{"cluster.mode": "data", "cluster.replicas": replicas,
                                        "cluster.batch_scaling": "strong"})
    assert_same_losses(tmp_path / "strong", tmp_path / "one")
    # Strong with group batch 32 gives each shard 32 / N examples: the very batches of weak at 32 / N.
    weak = run(tmp_path, "weak", **{"cluster.mode": "data", "cluster.replicas": replicas,
                                    "task.batch_size": 32 // replicas})
    assert strong.final_digest == weak.final_digest


def test_strong_hybrid_run_has_the_losses_of_direction_mode(tmp_path: Path) -> None:
    # 2 groups of 2 shards each probe the batch one replica of a 2-replica direction run probes.
    run(tmp_path, "direction", **{"cluster.mode": "direction", "cluster.replicas": 2})
    run(tmp_path, "hybrid", **{"cluster.mode": "hybrid", "cluster.replicas": 4, "cluster.groups": 2,
                               "cluster.batch_scaling": "strong"})
    assert_same_losses(tmp_path / "hybrid", tmp_path / "direction")


# ---------------------------------------------------------------- (3) weak scaling is unchanged
def test_weak_shards_draw_task_batch_size_each() -> None:
    task = {"name": "text_classification", "batch_size": GROUP_BATCH, "eval_size": 16,
            **HF_TASKS["text_classification"]}
    parts = shard_tasks(task, 2, scaling="weak")
    assert [t.train_batch_size for t in parts] == [None, None]
    assert shard_batch_size(GROUP_BATCH, 2, "weak") == GROUP_BATCH
    n = len(parts[0].data.train)
    for step in (1, 7):
        for shard, t in enumerate(parts):
            rows = train_positions(n, GROUP_BATCH, seed=3, step=step, shard=shard, num_shards=2)
            assert torch.equal(t.train_batch(step, shard, 2)["index"], t.data.train.ids[rows])
    blobs = shard_tasks({"name": "synthetic", "batch_size": 32, "eval_size": 64}, 2, scaling="weak")
    assert all(t.train_batch(3, s, 2)["index"].numel() == 32 for s, t in enumerate(blobs))


def test_one_shard_layouts_keep_task_batch_size_under_strong() -> None:
    # Direction mode and first-order references have one shard per group: nothing to split.
    task = {"name": "synthetic", "batch_size": 30, "eval_size": 64}
    for config in (run_config(task, mode="direction", replicas=3),
                   run_config(task, replicas=1, **{"optimizer.name": "adamw", "optimizer.lr": 1e-3})):
        built = build_task(config.task, config.seed)
        use_shard_batch_size(built, config)
        assert built.train_batch_size is None and built.train_batch(1, 0, 1)["index"].numel() == 30


# ---------------------------------------------------------------- (4) errors
@pytest.mark.parametrize("mode,replicas,groups,shards", [("data", 4, 1, 4), ("hybrid", 4, 2, 2)])
def test_strong_refuses_a_batch_size_the_shards_do_not_divide(mode: str, replicas: int, groups: int,
                                                              shards: int) -> None:
    task = {"name": "synthetic", "batch_size": 33, "eval_size": 64}
    with pytest.raises(ConfigError, match=(
            rf"config field 'cluster.batch_scaling': strong: task.batch_size 33 does not split evenly among "
            rf"{shards} data shards. Fix: use a task.batch_size divisible by the shards per group, or weak")):
        run_config(task, mode=mode, replicas=replicas, groups=groups)
    run_config(task, mode=mode, replicas=replicas, groups=groups, scaling="weak")  # weak: any batch size
    with pytest.raises(ValueError, match="task.batch_size 33 does not split evenly among 2 data shards"):
        shard_batch_size(33, 2, "strong")


def test_strong_refuses_a_task_without_train_batch_size() -> None:
    config = run_config({"name": "synthetic", "batch_size": 32, "eval_size": 64}, replicas=2)
    with pytest.raises(ConfigError, match=r"'cluster.batch_scaling': strong needs 16 examples per data shard.*"
                                          r"no train_batch_size attribute. Fix: use weak"):
        use_shard_batch_size(object(), config)  # type: ignore[arg-type]
    use_shard_batch_size(object(), config.replace({"cluster.batch_scaling": "weak"}))  # weak needs no share


def test_batch_scaling_config_values() -> None:
    with pytest.raises(ConfigError, match="cluster.batch_scaling.*got 'medium'"):
        RunConfig.from_dict(smoke_dict(**{"cluster.batch_scaling": "medium"}))
    assert RunConfig.from_dict(smoke_dict()).cluster.batch_scaling == "weak"
    assert RunConfig.from_dict(smoke_dict(**{"cluster.batch_scaling": "strong"})).cluster.batch_scaling == "strong"
