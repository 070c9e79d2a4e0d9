"""``ray-s2p bench step``: one zeroth-order step against the floor of two forward passes.

A two-point step needs f(x + rho z) and f(x - rho z): two forwards are the
physical floor. Everything else is overhead: making z (a random generation over
all d parameters, three times per step: once per probe and once for the
update), building the perturbed values, and the update itself. On a CPU the
generation is the big part; it is drawn in chunks on the noise threads
(``cluster.noise_threads``, zo/noise.py). The noise table, Rademacher bits and
low-rank factors are measured beside the Gaussian.

All on one in-process ``ReplicaEngine`` and one fixed batch: for a text
classification task, exactly batch_size x max_length random token ids (no
padding, so every run measures the same number of tokens); other tasks use their
own first training batch. Output keys:

- ``two_forwards_s``: the floor (two bare forwards under no_grad).
- ``variants``: per ``hooks_gaussian``, ``swap_gaussian``, ``hooks_table``,
  ``swap_table``, ``hooks_rademacher``, ``hooks_lowrank`` (full engine steps: ProbeRequest with radii (rho, -rho) plus the
  previous step's update with one (seed, coef) pair) and ``naive_mezo`` (in-place
  +rho, -2 rho, +rho, update; z regenerated with randn each time) and ``plain_gaussian`` (one
  ``ZerothOrderOptimizer.step`` of the plain single-process API, MeZO's rule, the trainer's default
  perturbation and noise threads, on its own copy of the model: what a user of the plain loop pays
  per step): ``step_s`` and
  ``two_forwards_s`` (two bare forwards of the same model, timed in rounds alternating
  with the step's, so both see the same machine; ``common.paired_median_seconds``),
  ``ratio`` (step_s / that two_forwards_s), ``generations_per_step``, ``rng_share``
  (the probes' noise and the update, 2 x copies + update, over step_s; naive: 4 serial
  generations), ``speedup_vs_naive_mezo`` (the naive step's ratio over this one's).
- ``split`` (seconds): ``copies_<distribution>_s`` (one direction's perturbed copies of
  every parameter, noise drawn and added on the noise threads, what the swap probes make;
  for low-rank only the vectors are copied and U, V drawn), ``serial_randn_s`` (one
  ``randn`` per parameter on one thread, as the naive step draws), ``forward_s``,
  ``update_<distribution>_s`` (apply_update with one pair), ``remainder_s`` (the
  hooks + Gaussian step minus 2 copies + 2 forwards + update: hooks, Python, batch handling).
- ``extra_memory_bytes``: per mechanism, from the parameter sizes.
- ``targets``: ``ratio_max`` per distribution (CPU: table 1.3, Rademacher 1.4, low-rank 1.1;
  GPU: 1.1), Gaussian >= 1.3x faster than the naive MeZO step, and ``met`` per variant. With
  ``precision.weights`` bf16 or fp16 on a CPU (every model of the run, the naive and plain ones too, in that
  dtype): the Gaussian step's overhead over its two forwards at most 0.6x the naive step's
  (``overhead_vs_naive`` per variant) and low-rank at most 1.3x two forwards; table and Rademacher have no
  half-precision target.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import torch

from ..config import OptimizerConfig, RunConfig
from ..distributed.engine import WEIGHT_DTYPES, ReplicaEngine, build_space, to_device
from ..distributed.messages import ProbeRequest, Update
from ..zo.directions import DirectionSpace
from ..zo.noise import CHUNK, mix_seed
from ..zo.optimizer import ZerothOrderOptimizer
from ..zo.probes import Prober
from ..zo.space import select_parameters
from ..zo.update import apply_update
from .common import BENCH_SEED, BenchContext, config_essentials, log, median_seconds, paired_median_seconds

VARIANTS = (("hooks", "gaussian"), ("swap", "gaussian"), ("hooks", "table"), ("swap", "table"),
            ("hooks", "rademacher"), ("hooks", "lowrank"))
# Step / two forwards at most, per distribution, on a CPU (on a GPU every variant: 1.1). Gaussian has
# no ratio target; it must beat the naive MeZO step by GAUSSIAN_SPEEDUP_MIN instead.
RATIO_MAX_CPU = {"gaussian": None, "table": 1.3, "rademacher": 1.4, "lowrank": 1.1}
GAUSSIAN_SPEEDUP_MIN = 1.3
# With bf16/fp16 weights on a CPU (every forward and every update pass costs more there): the Gaussian step's
# overhead over two forwards at most this share of the naive MeZO step's, and low-rank at most this ratio.
HALF_GAUSSIAN_OVERHEAD_MAX = 0.6
HALF_RATIO_MAX_CPU = {"gaussian": None, "lowrank": 1.3}
UPDATE_COEF = 1e-7  # a real (non-zero: zeros are skipped) but harmless update coefficient


class FixedBatchTask:
    """A task whose every training batch is one fixed batch; everything else is the wrapped task's.

    The engine asks its task for the batch of each step; the benchmark wants the
    same tokens every time, so step times differ only by the mechanism measured.
    """

    def __init__(self, task: Any, batch: dict[str, Any]) -> None:
        self._task = task
        self._batch = batch

    def train_batch(self, step: int, shard: int, num_shards: int) -> dict[str, Any]:
        return self._batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def fixed_batch(task: Any, model: torch.nn.Module, config: RunConfig) -> dict[str, Any]:
    """The benchmark batch (CPU tensors).

    text_classification: ``batch_size`` x ``max_length`` token ids drawn from a
    seeded generator in [1000, vocab) (away from special tokens; [1, vocab) for
    tiny vocabularies), attention all ones, labels 0/1. Other tasks: their own
    batch of step 1, unchanged.
    """
    sample = task.train_batch(1, 0, 1)
    if config.task.name != "text_classification" or "input_ids" not in sample:
        return sample
    vocab = int(model.get_input_embeddings().num_embeddings)
    low = 1000 if vocab > 1000 else 1
    gen = torch.Generator().manual_seed(mix_seed(BENCH_SEED, 0xBA7C))
    shape = (config.task.batch_size, config.task.max_length)
    ids = torch.randint(low, vocab, shape, generator=gen, dtype=torch.long)
    labels = torch.randint(0, 2, (shape[0],), generator=gen, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "index": torch.arange(shape[0], dtype=torch.long)}


def batch_shape(batch: dict[str, Any]) -> list[int]:
    """Shape of the batch's main tensor (input_ids, else the first tensor)."""
    main = batch.get("input_ids")
    if main is None:
        main = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return list(main.shape)


def engine_step_fn(engine: ReplicaEngine, rho: float) -> Callable[[], None]:
    """One full engine step per call: apply the previous step's update (one pair), probe +rho and -rho."""
    counter = itertools.count(1)

    def step() -> None:
        k = next(counter)
        sign = 1.0 if k % 2 else -1.0  # alternate so the parameters do not walk away over many repeats
        update = Update(engine.applied_step + 1, ((mix_seed(BENCH_SEED, k, 1), sign * UPDATE_COEF),))
        engine.probe(ProbeRequest(engine.applied_step + 2, (mix_seed(BENCH_SEED, k),), (rho, -rho), 0, 1, update))
    return step


def update_fn(space: DirectionSpace) -> Callable[[], None]:
    """apply_update with one (seed, coef) pair per call (alternating sign, see engine_step_fn)."""
    counter = itertools.count(1)

    def update() -> None:
        k = next(counter)
        apply_update(space, [(mix_seed(BENCH_SEED, k, 2), (1.0 if k % 2 else -1.0) * UPDATE_COEF)], step=k)
    return update


def copies_fn(space: DirectionSpace, rho: float) -> Callable[[], None]:
    """One direction's perturbed copies of every parameter at once (low-rank: U, V of the matrices and copies
    of the vectors), as a probe makes them."""
    matrices = [i for i in range(len(space.params)) if space.is_lowrank(i)]
    rest = [i for i in range(len(space.params)) if not space.is_lowrank(i)]
    counter = itertools.count(1)

    def copies() -> None:  # a fresh direction every call: drawing it is part of the cost
        seed = mix_seed(BENCH_SEED, next(counter), 4)
        for i in matrices:
            space.factors(seed, i, step=1)
        space.perturbed_many(seed, rest, rho, step=1)
    return copies


def serial_randn_fn(space: DirectionSpace) -> Callable[[], None]:
    """One randn per parameter from one generator on this thread (how the naive step draws its noise)."""
    def noise() -> None:
        gen = torch.Generator(device=space.params[0].device)
        gen.manual_seed(BENCH_SEED)
        for p in space.params:
            torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
    return noise


def naive_mezo_fn(params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], rho: float,
                  lr: float = 1e-7) -> Callable[[], None]:
    """The MeZO step as published: in-place x += rho z, f, x -= 2 rho z, f, x += rho z, x -= lr g z.

    z is regenerated with torch.randn from a generator seeded with the step's seed
    before each of the four passes (4 generations per step), one generator for
    all parameters in order.
    """
    counter = itertools.count(1)

    def shift(seed: int, scale: float) -> None:
        gen = torch.Generator(device=params[0].device)
        gen.manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype), alpha=scale)

    def step() -> None:
        seed = mix_seed(BENCH_SEED, next(counter), 3)
        with torch.no_grad():
            shift(seed, rho)
            plus = float(loss_fn())
            shift(seed, -2.0 * rho)
            minus = float(loss_fn())
            shift(seed, rho)
            shift(seed, -lr * (plus - minus) / (2.0 * rho))
    return step


def mechanism_memory(prober: Prober, space: DirectionSpace, table_size: int) -> dict[str, int]:
    """Extra bytes each mechanism holds during a probe, from the parameter sizes.

    hooks: the largest set of whole copies one hook pair holds (``Prober.held_copy_bytes``: looked-up
    embedding rows aside) plus one float32 noise chunk per noise thread; swap: a copy of every selected
    parameter plus the chunks; table: the table itself (4 bytes a float), on top of the mechanism; naive:
    the largest noise tensor.
    """
    chunks = space.threads * CHUNK * 4
    return {"hooks": prober.held_copy_bytes + chunks,
            "swap": sum(p.numel() * p.element_size() for p in space.params) + chunks,
            "table": int(table_size) * 4, "naive": max(p.numel() for p in space.params) * 4}


def bench_step(ctx: BenchContext) -> dict[str, Any]:
    """The ``step`` benchmark (see the module docstring for the keys)."""
    base = ctx.local_config()
    task = ctx.task()
    rho = base.optimizer.rho
    repeats = ctx.repeats

    def variant_config(mechanism: str, distribution: str) -> RunConfig:
        return base.replace({"perturbation.mechanism": mechanism, "perturbation.distribution": distribution})

    log("  building the engine (hooks, gaussian)")
    first = ReplicaEngine(variant_config(*VARIANTS[0]), 0, task=task)
    batch = fixed_batch(task, first.model, base)
    fixed = FixedBatchTask(task, batch)
    first.task = fixed  # built with the plain task only because the batch needs the model's vocabulary
    device = first.device
    on_device = to_device(batch, device)
    with torch.no_grad():
        prepared = task.prepare(first.model, on_device, first.trainable)

    def loss() -> torch.Tensor:
        return task.loss(first.model, prepared)

    def two_forwards_of(model: torch.nn.Module, trainable: list[str]) -> Callable[[], None]:
        """Two bare forwards of ``model`` (the floor a step of that model is paired with)."""
        with torch.no_grad():
            inputs = task.prepare(model, on_device, trainable)

        def run() -> None:
            with torch.no_grad():
                float(task.loss(model, inputs))
                float(task.loss(model, inputs))
        return run

    two_forwards = two_forwards_of(first.model, first.trainable)

    floor = median_seconds(two_forwards, repeats, device)
    forward = floor / 2.0

    # The split, on the hooks/gaussian engine's parameters.
    space_g = first.space
    spaces = {"gaussian": space_g, "table": build_space(first.model, first.trainable, variant_config("hooks", "table")),
              "rademacher": build_space(first.model, first.trainable, variant_config("hooks", "rademacher")),
              "lowrank": build_space(first.model, first.trainable, variant_config("hooks", "lowrank"))}
    split = {f"copies_{d}_s": median_seconds(copies_fn(sp, rho), repeats, device) for d, sp in spaces.items()}
    split["serial_randn_s"] = median_seconds(serial_randn_fn(space_g), repeats, device)
    split["forward_s"] = forward
    split.update({f"update_{d}_s": median_seconds(update_fn(sp), repeats, device) for d, sp in spaces.items()})
    memory = mechanism_memory(first.prober, space_g, base.perturbation.table_size)

    # Each step is timed in alternation with two bare forwards: its ratio compares the two on the same machine.
    steps: dict[str, float] = {}
    floors: dict[str, float] = {}
    for mechanism, distribution in VARIANTS:
        name = f"{mechanism}_{distribution}"
        log(f"  timing {name}")
        engine = first if name == "hooks_gaussian" else ReplicaEngine(variant_config(mechanism, distribution), 0,
                                                                      task=fixed)
        floors[name], steps[name] = paired_median_seconds(two_forwards_of(engine.model, engine.trainable),
                                                          engine_step_fn(engine, rho), repeats, device)
        if engine is not first:
            del engine  # one extra model at a time
    split["remainder_s"] = steps["hooks_gaussian"] - (2 * split["copies_gaussian_s"] + 2 * forward
                                                      + split["update_gaussian_s"])

    def fresh_model() -> tuple[torch.nn.Module, list[str], Any]:
        """A new copy of the model on the device, its trainable names and its prepared benchmark batch."""
        model = task.build_model()
        weights = WEIGHT_DTYPES[base.precision.weights]
        if weights != torch.float32:  # the naive and plain steps run on weights of the engines' dtype
            model.to(weights)
        names = task.trainable_names(model)
        if device.type != "cpu":
            model.to(device)
        with torch.no_grad():
            return model, names, task.prepare(model, on_device, names)

    def time_naive_mezo() -> tuple[float, float]:  # its own scope: the extra model is freed on return
        model, names, inputs = fresh_model()
        _, params = select_parameters(model, names)
        return paired_median_seconds(two_forwards_of(model, names),
                                     naive_mezo_fn(params, lambda: task.loss(model, inputs), rho), repeats, device)

    log("  timing the naive MeZO step")
    floors["naive_mezo"], steps["naive_mezo"] = time_naive_mezo()

    def time_plain_api() -> tuple[float, float]:  # its own scope, as time_naive_mezo
        model, names, inputs = fresh_model()
        perturbation = dataclasses.replace(base.perturbation, mechanism="hooks", distribution="gaussian")
        # MeZO's rule with the naive step's tiny lr: the same update work, parameters that stay put.
        opt = ZerothOrderOptimizer(model, OptimizerConfig(name="mezo", lr=1e-7, rho=rho), seed=BENCH_SEED,
                                   names=names, perturbation=perturbation, noise_threads=base.cluster.noise_threads)
        return paired_median_seconds(two_forwards_of(model, names),
                                     lambda: opt.step(lambda: task.loss(model, inputs)), repeats, device)

    log("  timing the plain API step (ZerothOrderOptimizer)")
    floors["plain_gaussian"], steps["plain_gaussian"] = time_plain_api()

    variants = {}
    met: dict[str, bool] = {}
    # Half-precision weights on a CPU have targets of their own (see the module docstring).
    half_cpu = base.precision.weights != "fp32" and device.type != "cuda"
    # naive_mezo first: the half-precision targets compare every variant's overhead with its.
    for name, seconds in sorted(steps.items(), key=lambda item: item[0] != "naive_mezo"):
        generations = 4 if name == "naive_mezo" else 3  # naive: +rho, -2rho, +rho, update; else 2 probes + update
        distribution = name.split("_", 1)[1]
        noise = (4 * split["serial_randn_s"] if name == "naive_mezo"
                 else 2 * split[f"copies_{distribution}_s"] + split[f"update_{distribution}_s"])
        ratio = seconds / floors[name]
        variants[name] = {"step_s": seconds, "two_forwards_s": floors[name], "ratio": ratio,
                          "generations_per_step": generations, "rng_share": noise / seconds,
                          # Both ratios are to their own paired floors, so machine drift between them cancels.
                          "speedup_vs_naive_mezo": steps["naive_mezo"] / floors["naive_mezo"] / ratio}
        if name == "naive_mezo":
            continue
        if half_cpu:
            # The Gaussian step's overhead over its two forwards against the naive
            # step's (both paid in the same dtype), low-rank against the two forwards.
            naive = variants["naive_mezo"]["ratio"] - 1.0
            variants[name]["overhead_vs_naive"] = (ratio - 1.0) / naive if naive > 0 else float("nan")
            if distribution in HALF_RATIO_MAX_CPU:  # table and Rademacher have no half-precision target
                limit = HALF_RATIO_MAX_CPU[distribution]
                met[name] = (ratio <= limit if limit is not None
                             else variants[name]["overhead_vs_naive"] <= HALF_GAUSSIAN_OVERHEAD_MAX)
            continue
        limit = 1.1 if device.type == "cuda" else RATIO_MAX_CPU[distribution]
        met[name] = (variants[name]["ratio"] <= limit if limit is not None
                     else variants[name]["speedup_vs_naive_mezo"] >= GAUSSIAN_SPEEDUP_MIN)
    return {"config": {**config_essentials(base), "device": str(device), "batch_shape": batch_shape(batch),
                       "trainable_parameters": space_g.dim},
            "repeats": repeats, "two_forwards_s": floor, "variants": variants, "split": split,
            "extra_memory_bytes": memory,
            "targets": ({"ratio_max": HALF_RATIO_MAX_CPU, "gaussian_overhead_vs_naive_max": HALF_GAUSSIAN_OVERHEAD_MAX,
                         "met": met} if half_cpu else
                        {"ratio_max": RATIO_MAX_CPU if device.type != "cuda" else 1.1,
                         "gaussian_speedup_vs_naive_min": GAUSSIAN_SPEEDUP_MIN, "met": met})}


__all__ = ["FixedBatchTask", "bench_step", "engine_step_fn", "fixed_batch", "mechanism_memory", "naive_mezo_fn",
           "update_fn"]
