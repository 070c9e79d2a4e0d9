"""Where a run's arithmetic happened: the device, its kernels and the torch build.

Replicas stay bitwise identical because they run the same kernels on the same inputs.
Across device types (CPU against GPU), GPU models, CPU kernel families (torch's
AVX-512 / AVX2 / generic builds pick other vectorised kernels for ``normal_`` and
``add_``) torch versions or noise implementations (``perturbation.noise``: torch generators, or counter-based noise
from Triton kernels or the CPU reference, whose float32 libraries differ in the last bit) the same ledger
gives other bits. The run records its
environment (the ledger's metadata and summary.json) so that ``replay --check`` can say
so plainly instead of reporting a digest mismatch, and so that a run can refuse
replicas that could never agree.
"""

from __future__ import annotations

import json
from typing import Any

import torch

# The keys that decide the bits of an update; the others are recorded for the reader.
BITWISE_KEYS = ("device_type", "device_name", "cpu_capability", "torch", "cuda", "noise")
# The value a record written before a key existed stands for: every such run drew generator noise.
RECORDED_DEFAULTS = {"noise": "generator"}
METADATA_KEY = b"ray_s2p.environment"


def noise_implementation(device: torch.device, source: str) -> str:
    """What makes the noise: ``generator``, or the counter-based implementation on ``device`` (e.g.
    'philox/triton 3.9.0', 'philox/reference numpy 2.3.5')."""
    if source == "generator":
        return "generator"
    from .counter_noise import implementation
    return implementation(device)


def numerics_environment(device: torch.device, distribution: str, weights: str,
                         noise: str = "generator") -> dict[str, Any]:
    """The environment of one replica's arithmetic.

    Args:
        device: where the replica's parameters live.
        distribution: the direction family (``perturbation.distribution``).
        weights: the weights' dtype (``precision.weights``).
        noise: the noise source (``perturbation.noise``).
    """
    cuda = device.type == "cuda"
    return {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        # On a GPU the noise, the probes and the updates run in CUDA kernels; the CPU's kernel family
        # only matters where the parameters live on the CPU.
        "cpu_capability": None if cuda else torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "distribution": distribution,
        "weights": weights,
        "noise": noise_implementation(device, noise),
        # On a CPU the low-rank update's matrix product (BLAS) can give other bits at another thread count:
        # torch's GEMM splits the output among its threads, and the rows at a split take other kernels. A replay
        # adopts the recorded count (distributed/replay.py). Not a bitwise key: replicas of one run share their
        # count (cluster.threads_per_replica, or one per CPU of a Ray replica), and the digest checks catch a drift.
        "threads": None if cuda else torch.get_num_threads(),
    }


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The bitwise-relevant keys on which two environments differ, as 'key: recorded -> current'."""
    def value(env: dict[str, Any], key: str) -> Any:
        return env.get(key, RECORDED_DEFAULTS.get(key))
    return [f"{k}: {value(recorded, k)} -> {value(current, k)}" for k in BITWISE_KEYS
            if value(recorded, k) != value(current, k)]


def describe(env: dict[str, Any]) -> str:
    """One line: 'cpu (AVX2), torch 2.13.0' or 'cuda (NVIDIA H200, CUDA 12.8), torch 2.13.0, noise philox/triton
    3.9.0' (the noise is named where it is not the generators')."""
    where = env.get("cpu_capability") if env.get("device_type") == "cpu" else \
        f"{env.get('device_name')}, CUDA {env.get('cuda')}"
    noise = env.get("noise", "generator")
    threads = env.get("threads")
    return f"{env.get('device_type')} ({where}), torch {env.get('torch')}" + (
        f", {threads} thread{'s' if threads != 1 else ''}" if threads else "") + (
        f", noise {noise}" if noise != "generator" else "")


def agreed(environments: list[dict[str, Any]]) -> dict[str, Any]:
    """The one environment every replica shares.

    Raises:
        RuntimeError: two replicas differ on a bitwise-relevant key (they could not stay identical).
    """
    first = environments[0]
    for r, env in enumerate(environments[1:], start=1):
        diff = differences(first, env)
        if diff:
            raise RuntimeError(
                f"replica {r} runs on {describe(env)}, replica 0 on {describe(first)} ({'; '.join(diff)}): "
                "their updates would not be bitwise identical. Fix: run every replica on the same device type "
                "and torch build (e.g. a node type or accelerator_type resource per run)")
    return first


def to_metadata(env: dict[str, Any]) -> dict[bytes, bytes]:
    """Parquet schema metadata holding the environment."""
    return {METADATA_KEY: json.dumps(env, sort_keys=True).encode()}


def from_metadata(metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The environment stored by ``to_metadata`` (None for a ledger written before it was recorded)."""
    raw = (metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def settle(recorded: dict[str, Any] | None, current: dict[str, Any], start_step: int) -> tuple[dict[str, Any], str | None]:
    """The environment to record after (re)starting at ``start_step``, and a line to log if it changed.

    A fresh run (or a ledger written before environments were recorded) records ``current``. A
    resume on another device or torch build keeps the first environment and appends the new one
    under ``later`` with the step it took over from: the run is still valid, but its replay can
    no longer be bitwise (``replay --check`` then asks for ``--atol``).
    """
    if recorded is None:
        return dict(current), None
    diff = differences(recorded, current)
    if not diff:
        return recorded, None
    env = {**recorded, "later": [*recorded.get("later", []), {"from_step": start_step, **current}]}
    return env, (f"resumed at step {start_step} on {describe(current)}; steps up to it ran on {describe(recorded)} "
                 f"({'; '.join(diff)}): a replay can match this run only within a tolerance (replay --atol)")


def replay_problem(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a bitwise replay check cannot hold here (None when it can, or when the run recorded nothing)."""
    if recorded is None:
        return None
    later = [e for e in recorded.get("later", []) if differences(recorded, e)]
    if later:
        return (f"the run changed environment at step {later[0]['from_step']} ({describe(recorded)} -> "
                f"{describe(later[0])}), so no single replay reproduces its bits")
    diff = differences(recorded, current)
    if diff:
        return (f"the run was trained on {describe(recorded)} and this replay runs on {describe(current)} "
                f"({'; '.join(diff)}); bitwise equality cannot hold across device types, kernels, torch builds or noise implementations")
    return None
