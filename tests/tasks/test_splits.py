"""A fixed train / validation / test split per task: the run seed changes weights and batch order, never the data."""

from __future__ import annotations

import pytest
import torch

from ray_s2p.config import ConfigError, TaskConfig
from ray_s2p.data.batching import split_rows
from ray_s2p.tasks import build_task

TASKS = {  # small tasks of every data path: bundled-style rows carved (text, images) and generated blobs
    "text": dict(name="text_classification", model="tiny-bert", dataset="synthetic_text", tiny_width=32,
                 options={"tokenizer": "word", "synthetic_size": 96}, eval_size=16, test_size=16, batch_size=4,
                 max_length=16),
    "image": dict(name="image_classification", model="cnn", dataset="synthetic_images", tiny_width=4,
                  options={"synthetic_size": 96}, eval_size=16, test_size=16, batch_size=4),
    "synthetic": dict(name="synthetic", eval_size=32, test_size=32, batch_size=8, train_size=128),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_set(task) -> torch.Tensor:
    """Every evaluated example's features, in order (ids for the row-based tasks, inputs for the blobs)."""
    if hasattr(task, "eval_x"):
        return task.eval_x
    examples = task.eval if hasattr(task, "eval") else task.data.eval
    return examples.ids


def train_set(task) -> torch.Tensor:
    if hasattr(task, "train_x"):
        return task.train_x
    examples = task.train if hasattr(task, "train") and not callable(task.train) else task.data.train
    return examples.ids


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_two_seeds_see_the_same_split_and_differ_in_weights_and_batch_order(kind):
    a, b = (build_task(TaskConfig(**TASKS[kind]), seed) for seed in (0, 5))
    assert torch.equal(eval_set(a), eval_set(b)) and torch.equal(train_set(a), train_set(b))
    wa, wb = (dict(t.build_model().named_parameters()) for t in (a, b))
    assert any(not torch.equal(wa[n], wb[n]) for n in wa)  # the seed draws the new weights
    order = [t.train_batch(1, 0, 1)["index"] for t in (a, b)]
    assert not torch.equal(order[0], order[1])  # and the batch order
    other = build_task(TaskConfig(**{**TASKS[kind], "split_seed": 1}), 0)
    assert not torch.equal(eval_set(other), eval_set(a))  # the split seed is what moves the split


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_eval_split_test_evaluates_the_test_rows(kind):
    val = build_task(TaskConfig(**TASKS[kind]), 0)
    test = build_task(TaskConfig(**{**TASKS[kind], "eval_split": "test"}), 0)
    assert torch.equal(train_set(val), train_set(test))  # one split, two evaluation sets
    assert len(eval_set(val)) == len(eval_set(test)) == TASKS[kind]["test_size"]
    if kind != "synthetic":  # row ids: validation and test are disjoint, and neither is trained on
        v, t, tr = (set(x.tolist()) for x in (eval_set(val), eval_set(test), train_set(val)))
        assert not v & t and not (v | t) & tr
    else:
        assert not torch.equal(eval_set(val), eval_set(test))


def test_a_test_split_comes_out_of_the_training_rows_and_leaves_validation_alone():
    without, with_test = (split_rows(100, split_seed=2, eval_size=20, test_size=n) for n in (0, 15))
    assert torch.equal(without.eval, with_test.eval)
    assert set(with_test.train.tolist()) | set(with_test.test.tolist()) == set(without.train.tolist())
    assert without.test.numel() == 0 and with_test.evaluated("test").numel() == 15
    held = split_rows(100, split_seed=2, eval_size=20, test_size=15, held_out_rows=50)  # a source's own split
    assert held.eval_from_held_out and held.train.numel() == 100
    assert not set(held.eval.tolist()) & set(held.test.tolist()) and max(held.test.tolist()) < 50
    with pytest.raises(ValueError, match="unknown split 'train'"):
        held.evaluated("train")


def test_eval_split_is_validated_where_the_config_is_built():
    with pytest.raises(ConfigError, match=r"task.eval_split.*test_size is 0.*Fix: set task.test_size"):
        TaskConfig(eval_split="test")
    with pytest.raises(ConfigError, match=r"task.eval_split.*Fix: use validation .* or test"):
        TaskConfig(eval_split="val", test_size=4)
    with pytest.raises(ConfigError, match=r"task.test_size"):
        TaskConfig(test_size=-1)
