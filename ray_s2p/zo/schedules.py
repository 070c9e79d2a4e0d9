"""Decay families for step sizes, as pure functions of the step number.

A decay is a multiplier on a base step size (``lr``, ``eta``): 1.0 at step 0,
then shrinking. The families are the ones docs/method.md lists for VS2P's
``Decay(eta, k)`` (reconstructed there: the paper does not pin one down):

    constant      1
    linear        1 - (1 - final) * p                       p = min(step / total_steps, 1)
    cosine        final + (1 - final) * (1 + cos(pi p)) / 2
    inverse_sqrt  sqrt(s / (s + step))                      s = decay_steps or 1
    step          0.5 ** (step // decay_steps)              halve every decay_steps

Only the stdlib ``math`` is used, so the driver, replicas and tests can share
this module without pulling in torch or ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DECAYS


def validate_decay(kind: str, total_steps: int, final: float = 0.0, decay_steps: int | None = None) -> None:
    """Check decay arguments once, so a bad config fails at build time, not mid-run.

    Raises:
        ValueError: unknown kind, or an argument the kind needs is missing/out of range.
    """
    if kind not in DECAYS:
        raise ValueError(f"unknown decay {kind!r}. Fix: use one of {', '.join(DECAYS)}")
    if kind in ("linear", "cosine"):
        if total_steps < 1:
            raise ValueError(f"decay {kind!r} needs total_steps >= 1, got {total_steps}")
        if not (0.0 <= final <= 1.0):
            raise ValueError(f"decay {kind!r}: final fraction must be in [0, 1], got {final}")
    if kind == "step" and (decay_steps is None or decay_steps < 1):
        raise ValueError(f"decay 'step' halves every decay_steps steps; got decay_steps={decay_steps}. "
                         "Fix: set decay_steps to a positive integer")
    if kind == "inverse_sqrt" and decay_steps is not None and decay_steps < 1:
        raise ValueError(f"decay 'inverse_sqrt': decay_steps must be >= 1 or None, got {decay_steps}")


def decay_factor(kind: str, step: int, total_steps: int, final: float = 0.0,
                 decay_steps: int | None = None) -> float:
    """Multiplier applied to a base step size at ``step``.

    Args:
        kind: one of ``DECAYS``.
        step: the 0-based step number (>= 0).
        total_steps: run length; linear and cosine reach ``final`` there and stay.
        final: end fraction for linear/cosine (ignored by the others).
        decay_steps: period of ``step`` decay (required there); time scale of
            ``inverse_sqrt`` (default 1); ignored by the others.

    Returns:
        The factor; 1.0 at step 0 for every kind.

    Raises:
        ValueError: unknown kind, negative step, or missing/bad arguments for the kind.
    """
    validate_decay(kind, total_steps, final, decay_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        scale = decay_steps or 1
        return math.sqrt(scale / (scale + step))
    if kind == "step":
        return 0.5 ** (step // (decay_steps or 1))  # decay_steps validated above
    progress = min(step / total_steps, 1.0)
    if kind == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """A base value times a decay: ``base * decay_factor(kind, step, ...)``.

    A frozen dataclass rather than a closure so that rules holding one stay
    picklable and printable. Arguments are validated when it is built.
    """

    base: float
    kind: str = "constant"
    total_steps: int = 1
    final: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        validate_decay(self.kind, self.total_steps, self.final, self.decay_steps)

    def __call__(self, step: int) -> float:
        """The value at ``step`` (0-based)."""
        return self.base * decay_factor(self.kind, step, self.total_steps, self.final, self.decay_steps)
