"""Shared fixtures: offline environment, one local Ray per session, small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                   "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
                   # Triton's kernels run in its interpreter on CPU tensors (tests/zo/test_kernels.py); triton
                   # reads this when it is imported, and nothing has imported it yet.
                   "TRITON_INTERPRET": "1"}.items():
    os.environ.setdefault(key, value)
# Ray workers inherit PYTHONPATH: they must import the fault-injection tasks in tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(TESTS), str(TESTS.parent),
                                                       os.environ.get("PYTHONPATH", "")] if p)
sys.path.insert(0, str(TESTS))


def smoke_dict(**overrides) -> dict:
    """A fast synthetic-task config as plain data (tests override fields)."""
    base = {
        "seed": 3, "steps": 30, "eval_every": 10, "checkpoint_every": 10, "log_every": 5, "progress": False,
        "task": {"name": "synthetic", "batch_size": 32, "eval_size": 256},
        "optimizer": {"name": "vs2p", "eta": 2.0, "rho": 0.01, "lr": 0.05},
        "cluster": {"replicas": 2, "mode": "direction", "use_ray": False, "digest_every": 5,
                    "step_timeout_s": 60, "startup_timeout_s": 120},
    }
    for dotted, value in overrides.items():
        node = base
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return base


@pytest.fixture
def ray_session():
    """A local Ray with 2 CPUs, started once and shared (tests that need their own cluster shut it down)."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024,
                 log_to_driver=False)
    yield ray


class TinyLM(torch.nn.Module):
    """Embedding -> Linear -> tanh -> Linear -> LayerNorm: every layer kind the low-rank probe handles."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)
        self.norm = torch.nn.LayerNorm(4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.tanh(self.fc1(self.emb(ids)))).mean(1)).float()  # fp32 loss for half models
