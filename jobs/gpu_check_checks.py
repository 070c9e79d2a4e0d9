"""The checks of jobs/gpu_check.py: step overhead and the short comparison, and the helpers every check uses
(the memory check is jobs/gpu_check_memory.py)."""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_check_plan import CHECK_SEED, LLAMA_PRECISIONS, STEP_RATIO_MAX, VARIANTS, Plan
from ray_s2p.bench.common import log, median_seconds
from ray_s2p.bench.step import FixedBatchTask, engine_step_fn, naive_mezo_fn
from ray_s2p.config import RunConfig
from ray_s2p.distributed.engine import ReplicaEngine
from ray_s2p.zo.kernels import KernelUnavailable
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.space import select_parameters


# ----------------------------------------------------------------- helpers
def free_memory(device: torch.device) -> None:
    """Drop garbage (engines, optimizers) so the next check starts from what is really held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def oom_errors() -> tuple[type[BaseException], ...]:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (MemoryError,) + ((oom,) if oom is not None else ())


def random_tokens(vocab: int, shape: tuple[int, int], salt: int, device: torch.device,
                  classes: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids (no padding, so every run times the same tokens).

    Ids are drawn in [1000, vocab) where the vocabulary allows, away from special tokens.
    ``classes`` > 0 adds labels (and row indices) for a classification task.
    """
    gen = torch.Generator().manual_seed(mix_seed(CHECK_SEED, salt))
    low = 1000 if vocab > 2000 else 1
    ids = torch.randint(low, vocab, shape, generator=gen, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if classes:
        batch["labels"] = torch.randint(0, classes, (shape[0],), generator=gen, dtype=torch.long)
        batch["index"] = torch.arange(shape[0], dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


class SharedModelTask(FixedBatchTask):
    """A task whose model is one already built object and whose every batch is one fixed batch.

    Several engines (one per mechanism) then probe the same weights instead of each
    building (and, for 1 B parameters, holding) its own copy; a Prober's hooks live
    only during its own forward, so sharing is safe.
    """

    def __init__(self, task: Any, batch: dict[str, Any], model: torch.nn.Module) -> None:
        super().__init__(task, batch)
        self._model = model

    def build_model(self) -> torch.nn.Module:
        return self._model


class NextTokenLoss:
    """The task methods the engine needs for an in-memory causal LM: all parameters, mean next-token CE."""

    def __init__(self, autocast_dtype: torch.dtype | None = None) -> None:
        self.autocast_dtype = autocast_dtype

    def trainable_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]

    def prepare(self, model: torch.nn.Module, batch: dict[str, Any], trainable: list[str]) -> dict[str, Any]:
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device_type = batch["input_ids"].device.type
        context = (torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
                   if self.autocast_dtype is not None else contextlib.nullcontext())
        with context:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["input_ids"], use_cache=False)
        return out.loss.float()


def build_llama(spec: dict[str, int], device: torch.device) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM, fp32, built directly on ``device`` (never saved).

    The init draws from the global generators inside ``fork_rng`` (CPU and every
    visible GPU), seeded from CHECK_SEED: reproducible, and the caller's RNG state
    is left as it was.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec, tie_word_embeddings=False, max_position_embeddings=2048)
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus), torch.device(device):
        torch.manual_seed(mix_seed(CHECK_SEED, 0x11A))
        model = LlamaForCausalLM(config)
    return model.eval()


def engine_config(base: RunConfig, device: torch.device, mechanism: str, distribution: str,
                  table_size: int, noise: str = "generator") -> RunConfig:
    """An in-process engine config; a reserved GPU is what makes the engine put the model on cuda."""
    return base.replace({"cluster.use_ray": False, "cluster.replicas": 1,
                         "cluster.gpus_per_replica": 1 if device.type == "cuda" else 0,
                         "perturbation.mechanism": mechanism, "perturbation.distribution": distribution,
                         "perturbation.table_size": table_size, "perturbation.noise": noise})


def table_size_for(model: torch.nn.Module, base: RunConfig) -> int:
    """A noise table at least twice the largest parameter, so its windows start at many offsets.

    The config's default (2**24 floats) is smaller than an embedding matrix of
    either model, and a window must hold a whole parameter.
    """
    largest = max(p.numel() for p in model.parameters())
    return max(base.perturbation.table_size, 2 * largest)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------- check 1: step overhead
def time_steps(model: torch.nn.Module, task: Any, batch: dict[str, Any], base: RunConfig, device: torch.device,
               plan: Plan) -> dict[str, Any]:
    """Two bare forwards vs full engine steps per variant and the naive MeZO step, on one fixed batch."""
    rho = base.optimizer.rho
    shared = SharedModelTask(task, batch, model)
    names = task.trainable_names(model)
    with torch.no_grad():
        prepared = task.prepare(model, batch, names)

    def loss() -> torch.Tensor:
        return task.loss(model, prepared)

    def two_forwards() -> None:
        with torch.no_grad():
            float(loss())
            float(loss())

    log("    two bare forwards")
    floor = median_seconds(two_forwards, plan.repeats, device, plan.warmup)
    table_size = table_size_for(model, base)
    steps: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    trainable = 0
    for name, mechanism, distribution, noise in VARIANTS:
        log(f"    {name}")
        engine = ReplicaEngine(engine_config(base, device, mechanism, distribution, table_size, noise), 0,
                               task=shared)
        trainable = engine.space.dim
        try:
            steps[name] = median_seconds(engine_step_fn(engine, rho), plan.repeats, device, plan.warmup)
        except KernelUnavailable as exc:  # no Triton on this machine: the other variants still count
            unavailable[name] = str(exc)
        del engine
        free_memory(device)
    log("    naive_mezo")
    _, params = select_parameters(model, names)
    # Last on purpose: the in-place round trip does not restore the weights bit for bit.
    steps["naive_mezo"] = median_seconds(naive_mezo_fn(params, loss, rho), plan.repeats, device, plan.warmup)
    target = STEP_RATIO_MAX[device.type]
    variants = {n: {"step_s": s, "ratio": s / floor} for n, s in steps.items()}
    variants.update({n: {"step_s": None, "ratio": None, "error": why} for n, why in unavailable.items()})
    return {"batch_shape": list(batch["input_ids"].shape), "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": trainable, "rho": rho, "table_size": table_size, "repeats": plan.repeats,
            "two_forwards_s": floor, "forward_s": floor / 2.0, "variants": variants, "ratio_max": target,
            "met": {n: v["ratio"] <= target for n, v in variants.items() if v["ratio"] is not None}}


def step_lm(base: RunConfig, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Check 1a: the prompt-classification LM (SmolLM2-135M; tiny-gpt2 with --quick), every parameter trainable."""
    from ray_s2p.tasks import build_task

    cfg = base.replace({"task.model": plan.lm_model, "task.trainable": "all", "task.feature_reuse": False,
                        "task.batch_size": plan.lm_batch[0], "task.max_length": plan.lm_batch[1],
                        "task.eval_size": plan.eval_size, "task.autocast": "fp32"})
    log(f"  building {plan.lm_model} and the task")
    task = build_task(cfg.task, cfg.seed)
    model = task.build_model().to(device).eval()
    vocab = int(model.get_input_embeddings().num_embeddings)
    batch = random_tokens(vocab, plan.lm_batch, 0xBA7C, device, classes=len(cfg.task.label_words))
    try:
        return {"task": cfg.task.name, "dataset": cfg.task.dataset, **time_steps(model, task, batch, cfg, device, plan)}
    finally:
        del model, task
        free_memory(device)


class LlamaHolder:
    """The in-memory Llama, built once (fp32) and converted to bf16 for the later checks."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.model: torch.nn.Module | None = None

    def get(self, dtype: torch.dtype) -> torch.nn.Module:
        if self.model is None:
            log("  building the random Llama")
            self.model = build_llama(self.plan.llama, self.device)
        if next(self.model.parameters()).dtype != dtype:
            log(f"  converting the Llama to {dtype}")
            self.model.to(dtype)
            free_memory(self.device)
        return self.model

    def release(self) -> None:
        self.model = None
        free_memory(self.device)


def step_llama(holder: LlamaHolder, precision: str, base: RunConfig, device: torch.device,
               plan: Plan) -> dict[str, Any]:
    """Check 1b: the random Llama on random tokens, in one of LLAMA_PRECISIONS."""
    _, dtype, autocast = next(p for p in LLAMA_PRECISIONS if p[0] == precision)
    model = holder.get(dtype)
    batch = random_tokens(plan.llama["vocab_size"], plan.llama_batch, 0x11B, device)
    return {"task": "next_token_random", "llama_config": dict(plan.llama),
            **time_steps(model, NextTokenLoss(autocast), batch, base, device, plan)}


# ----------------------------------------------------------------- check 3: comparison
def vs2p_typical_step(opt: Any) -> float:
    """VS2P's move along z when |gamma| = sigma: eta beta rho / (tau_b + tau_b / tau_a) (docs/method.md)."""
    return opt.eta * opt.beta * opt.rho / (opt.tau_b + opt.tau_b / opt.tau_a)


def median_sigma(run_dir: Path) -> float | None:
    """Median of the VS2P run's running std of gamma (ledger column ``sigma``), None if it has none."""
    import pyarrow.parquet as pq

    path = run_dir / "ledger.parquet"
    if not path.is_file():
        return None
    values = [v for v in pq.read_table(path, columns=["sigma"]).column("sigma").to_pylist()
              if v is not None and math.isfinite(v) and v > 0]
    return statistics.median(values) if values else None


@dataclass
class Comparison:
    """Check 3 state: the common config, the run directories, and what the VS2P run taught the others."""

    base: RunConfig
    device: torch.device
    plan: Plan
    workdir: Path
    mezo_lr: float | None = None
    sign_lr: float | None = None
    vs2p_sigma: float | None = None

    def config(self, name: str, overrides: dict[str, Any]) -> RunConfig:
        steps = self.plan.steps
        return self.base.replace({
            "steps": steps, "eval_every": 0, "checkpoint_every": 0, "log_every": max(1, steps // 6),
            "progress": False, "task.eval_size": self.plan.eval_size,
            **({"task.model": self.plan.lm_model} if self.plan.quick else {}),  # else the config's own model
            "cluster.use_ray": False, "cluster.replicas": 1, "cluster.mode": "direction",
            "cluster.gpus_per_replica": 1 if self.device.type == "cuda" else 0,
            "cluster.digest_every": 0,  # one replica: nothing to compare digests with until the end
            "optimizer.name": name, **overrides})

    def step_sizes(self, name: str) -> tuple[dict[str, Any], str]:
        """Overrides and a note on where they come from.

        VS2P: eta and rho of the config. ZO-SGD-Sign moves lr per step: lr = VS2P's
        step at |gamma| = sigma. MeZO moves lr |gamma|: lr = that step / the VS2P
        run's median sigma, so at a typical gamma both baselines move as far as VS2P.
        ``--sign-lr`` / ``--mezo-lr`` override.
        """
        opt = self.base.optimizer
        typical = vs2p_typical_step(opt)
        if name == "vs2p":
            return {"optimizer.eta": opt.eta, "optimizer.rho": opt.rho}, "config"
        if name == "zo_sign":
            if self.sign_lr is not None:
                return {"optimizer.lr": self.sign_lr, "optimizer.rho": opt.rho}, "--sign-lr"
            return {"optimizer.lr": typical, "optimizer.rho": opt.rho}, "VS2P step at |gamma| = sigma"
        if self.mezo_lr is not None:
            return {"optimizer.lr": self.mezo_lr, "optimizer.rho": opt.rho}, "--mezo-lr"
        if self.vs2p_sigma:
            return ({"optimizer.lr": typical / self.vs2p_sigma, "optimizer.rho": opt.rho},
                    f"VS2P step at |gamma| = sigma / VS2P median sigma {self.vs2p_sigma:.4g}")
        return {"optimizer.lr": 1e-6, "optimizer.rho": opt.rho}, "MeZO paper default (no VS2P sigma)"

    def run(self, name: str) -> dict[str, Any]:
        from ray_s2p.distributed.driver import train

        overrides, source = self.step_sizes(name)
        cfg = self.config(name, overrides)
        run_dir = self.workdir / name
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        result = train(cfg, run_dir, log=log)
        wall = time.perf_counter() - started
        if name == "vs2p":
            self.vs2p_sigma = median_sigma(run_dir)
        summary = result.summary
        first, last = summary.get("initial_metrics") or {}, summary.get("final_metrics") or {}
        return {"optimizer": name, "step_sizes": {k.split(".", 1)[1]: v for k, v in overrides.items()},
                "step_size_source": source, "model": cfg.task.model, "dataset": cfg.task.dataset,
                "trainable": cfg.task.trainable, "seed": cfg.seed, "steps": cfg.steps,
                "eval_size": cfg.task.eval_size, "forward_passes": summary.get("forward_passes"),
                "initial_accuracy": first.get("eval_accuracy"), "final_accuracy": last.get("eval_accuracy"),
                "initial_loss": first.get("eval_loss"), "final_loss": last.get("eval_loss"),
                "train_wall_s": summary.get("wall_seconds"), "wall_s": wall,
                "vs2p_median_sigma": self.vs2p_sigma if name == "vs2p" else None}


