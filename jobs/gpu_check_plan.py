"""jobs/gpu_check.py's sizes, constants and time budget (what the checks, the runner and the report share)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

# The GPU machine has no internet: a library reaching for the hub would stall on network timeouts.
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

import _common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

ROOT = _common.ROOT
DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "smollm2_prompt_rt.yaml"
CHECK_SEED = 0x6C0C  # seeds of this script's own model init and token batches (never the global RNG)

# The engine step variants of check 1 (name, mechanism, distribution, noise source); naive MeZO is timed
# separately. philox is the counter-based noise of the fused Triton kernels (perturbation.noise).
VARIANTS = (("hooks_gaussian", "hooks", "gaussian", "generator"), ("hooks_philox", "hooks", "gaussian", "philox"),
            ("hooks_rademacher", "hooks", "rademacher", "generator"), ("hooks_lowrank", "hooks", "lowrank", "generator"))
VARIANT_LABELS = {"hooks_gaussian": "gaussian", "hooks_philox": "gaussian (philox kernels)",
                  "hooks_rademacher": "rademacher", "hooks_lowrank": "low-rank", "naive_mezo": "naive MeZO"}
STEP_RATIO_MAX = {"cuda": 1.1, "cpu": 1.3}
MEMORY_ZO_MAX, MEMORY_ADAMW_MIN = 1.2, 3.0

# ~1.1 B in the brief's words; 16 layers with full-width key/value heads come to ~0.95 B (reported exactly).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024)
# (label, parameter dtype, autocast dtype): bf16 weights as MeZO runs them, and fp32 master weights with a
# bf16 forward, which is what this project's task.autocast: bf16 does.
LLAMA_PRECISIONS = (("fp32", torch.float32, None), ("fp32+autocast_bf16", torch.float32, torch.bfloat16),
                    ("bf16", torch.bfloat16, None))
MEMORY_PRECISIONS = ("fp32", "bf16")
CHECK_NAMES = ("step", "memory", "comparison")


@dataclass(frozen=True)
class Plan:
    """Sizes of one invocation: the full GPU check or the ``--quick`` smoke test."""

    quick: bool
    lm_model: str                 # task.model of checks 1a and 3
    lm_batch: tuple[int, int]     # (batch, tokens) of check 1a
    llama: dict[str, int]
    llama_batch: tuple[int, int]
    repeats: int
    warmup: int
    steps: int                    # training steps per optimizer in check 3
    eval_size: int
    estimates: dict[str, float] = field(default_factory=dict)  # seconds per check, for the budget

    @classmethod
    def make(cls, quick: bool, repeats: int | None, steps: int | None) -> "Plan":
        if quick:
            return cls(True, "tiny-gpt2", (4, 32), LLAMA_TINY, (4, 32), repeats or 1, 1, steps or 3, 32,
                       {"step_lm": 15, "step_llama": 5, "memory": 5, "comparison": 15})
        # GPU estimates are deliberately generous: SmolLM2's GGUF conversion (~30 s, once per machine)
        # and the 1 B model's build land in the first check that needs them.
        return cls(False, "smollm2", (16, 64), LLAMA_1B, (16, 128), repeats or 10, 2, steps or 300, 256,
                   {"step_lm": 60, "step_llama": 45, "memory": 25, "comparison": 60})


# ----------------------------------------------------------------- budget
class BudgetExceeded(BaseException):
    """Raised by SIGALRM inside a check that overran the budget.

    A BaseException, so that no ``except Exception`` inside the libraries swallows it.
    """


class Budget:
    """Seconds allowed since ``start`` (the script's first line); checks that would not fit are skipped."""

    def __init__(self, seconds: float, start: float) -> None:
        self.seconds = float(seconds)
        self.start = start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds

    @contextlib.contextmanager
    def deadline(self) -> Iterator[None]:
        """Raise BudgetExceeded in this block once the budget is spent (SIGALRM; main thread, POSIX only)."""
        if not hasattr(signal, "setitimer"):
            yield
            return

        def alarm(signum: int, frame: Any) -> None:
            raise BudgetExceeded(f"the time budget of {self.seconds:.0f} s ran out")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
            signal.signal(signal.SIGALRM, previous)
