"""Composable pieces of zeroth-order step rules, in the optax style.

A transform maps one value per direction to one value per direction::

    init() -> state
    update(values, state, step) -> (values, new_state)

``values[i]`` is a float, or ``None`` for a direction that contributes nothing
(non-finite losses, VS2P warm-up skip); every transform passes ``None`` through.
The step rules feed the per-direction gammas in and read signed coefficients
``c_i = -a_k * sign(gamma_i)`` out; ``chain`` composes transforms left to right.

States are plain JSON-serialisable dicts (checkpoints store them as JSON) and
``update`` never mutates the state it is given. Only the stdlib ``math`` is
used: no torch, no numpy, never ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from ..config import SIGMA_WARMUPS

Values = tuple[Optional[float], ...]
TransformState = dict


class Transform(Protocol):
    """One composable piece: pure ``init`` and ``update``."""

    def init(self) -> TransformState:
        """The state before the first step."""
        ...

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        """Transform per-direction values; returns (values, new state)."""
        ...


# ----------------------------------------------------------------- scalar math
def sign_of(value: float) -> float:
    """sign(value) with sign(0) = 0, so gamma == 0 moves nothing."""
    return 1.0 if value > 0 else -1.0 if value < 0 else 0.0


def finite_difference(f_plus: float, f_minus: float, radius: float) -> float | None:
    """gamma = (f(x + r z) - f(x - r z)) / (2 r); None when not finite.

    The central estimate used for gamma_k (docs/method.md, section 1). Overflow of the
    difference of two huge finite losses also gives None.
    """
    if not (math.isfinite(f_plus) and math.isfinite(f_minus)):
        return None
    gamma = (f_plus - f_minus) / (2.0 * radius)
    return gamma if math.isfinite(gamma) else None


def std(values: Sequence[float], ddof: int = 0) -> float | None:
    """Standard deviation with ``ddof`` (0: population, 1: sample); None if n <= ddof."""
    n = len(values)
    if n == 0 or n <= ddof:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - ddof))


def soft_clip_value(value: float, scale: float, limit: float) -> float:
    """``value / (scale + |value| / limit)``: the soft clip of S2P option 4 and VS2P.

    ~ value / scale while |value| << scale * limit (linear regime);
    -> limit * sign(value) when |value| >> scale * limit (clipped regime).
    ``limit = inf`` is plain normalisation by ``scale``. value == 0 gives 0
    (no 0/0 when scale == 0).
    """
    if value == 0.0:
        return 0.0
    return value / (scale + abs(value) / limit)


def weight_decay_scale(lr: float, weight_decay: float) -> float:
    """Decoupled weight decay as a multiplier on x: ``1 - lr * weight_decay``.

    MeZO's ``x <- x - lr (gamma z + wd x)`` split into ``x <- (1 - lr wd) x - lr gamma z``.
    Not a Transform: it scales the parameters, not the per-direction coefficients.
    """
    return 1.0 - lr * weight_decay


def _map(fn: Callable[[float], float], values: Values) -> Values:
    return tuple(None if v is None else fn(v) for v in values)


# ----------------------------------------------------------- stateless pieces
@dataclass(frozen=True)
class Scale:
    """values * factor."""

    factor: float

    def init(self) -> TransformState:
        return {}

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        return _map(lambda v: v * self.factor, values), {}


@dataclass(frozen=True)
class ScaleBySchedule:
    """values * schedule(step), e.g. a ``schedules.Schedule`` (lr_k, eta_k)."""

    schedule: Callable[[int], float]

    def init(self) -> TransformState:
        return {}

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        factor = self.schedule(step)
        return _map(lambda v: v * factor, values), {}


@dataclass(frozen=True)
class Sign:
    """sign(values) with sign(0) = 0: the S2P sign trick's direction choice."""

    def init(self) -> TransformState:
        return {}

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        return _map(sign_of, values), {}


@dataclass(frozen=True)
class SoftClip:
    """values / (scale + |values| / limit) with a constant scale (see ``soft_clip_value``)."""

    scale: float
    limit: float = math.inf

    def __post_init__(self) -> None:
        if self.scale < 0 or not self.limit > 0 or (self.scale == 0 and math.isinf(self.limit)):
            raise ValueError(f"soft clip needs scale >= 0, limit > 0 and not both scale == 0 and limit == inf; "
                             f"got scale={self.scale}, limit={self.limit}")

    def init(self) -> TransformState:
        return {}

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        return _map(lambda v: soft_clip_value(v, self.scale, self.limit), values), {}


# ------------------------------------------------------------ the sigma piece
@dataclass(frozen=True)
class ScaleByRunningStd:
    """Divide by sigma = std of recent values, softly clipped: VS2P's noise normalisation.

    Output per direction: ``v / (sigma + |v| / limit)`` (``limit = inf``: ``v / sigma``).
    This is VS2P's a_k * sign(gamma) up to the factor eta_k beta rho / tau_b, with
    ``limit = tau_a`` (docs/method.md, section 4: Algorithm 2).

    Reconstructed choices (configurable, documented in docs/method.md, section 4):
      * sample: the last ``window`` finite values of previous steps; with
        ``include_current`` the current step's finite values are appended first.
      * ``ddof``: 0 population std, 1 sample std.
      * warm-up, when the sample cannot give a sigma (fewer than 2 values, n <= ddof,
        non-finite, or sigma == 0 with no clip where v / 0 is undefined):
        "abs_gamma" sigma = |v| per direction, "skip" the direction gives None,
        "unit" sigma = 1.
      * ``fixed_sigma``: the "fixed" clip ablation; sigma is that constant, never warm-up.
      * sigma == 0 with a finite limit is kept: the output is the clip, limit * sign(v).
    Every finite value enters the history (also warm-up-skipped ones, else "skip"
    would never end); ``None`` values do not.

    State: ``{"history": [float, ...], "sigma": float | None}``; ``sigma`` is the
    shared value used at the last step, None when it was per-direction or skipped.
    """

    window: int
    ddof: int = 0
    include_current: bool = False
    warmup: str = "abs_gamma"
    limit: float = math.inf
    fixed_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"sigma window must be >= 2, got {self.window}")
        if self.ddof < 0:
            raise ValueError(f"sigma ddof must be >= 0, got {self.ddof}")
        if self.warmup not in SIGMA_WARMUPS:
            raise ValueError(f"unknown sigma warm-up {self.warmup!r}. Fix: use one of {', '.join(SIGMA_WARMUPS)}")
        if not self.limit > 0:
            raise ValueError(f"limit must be > 0, got {self.limit}")
        if self.fixed_sigma is not None and not (self.fixed_sigma > 0 and math.isfinite(self.fixed_sigma)):
            raise ValueError(f"fixed sigma must be a positive finite number, got {self.fixed_sigma}")

    def init(self) -> TransformState:
        return {"history": [], "sigma": None}

    def shared_sigma(self, history: Sequence[float], current: Sequence[float]) -> float | None:
        """The sigma for this step, or None when the warm-up rule applies."""
        if self.fixed_sigma is not None:
            return self.fixed_sigma
        sample = (list(history) + list(current) if self.include_current else list(history))[-self.window:]
        sigma = std(sample, self.ddof) if len(sample) >= 2 else None
        if sigma is None or not math.isfinite(sigma) or (sigma == 0.0 and math.isinf(self.limit)):
            return None
        return sigma

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        history = [float(h) for h in state["history"]]  # a copy: the input state stays untouched
        current = [v for v in values if v is not None]
        sigma = self.shared_sigma(history, current)
        if sigma is None and self.warmup == "unit":
            sigma = 1.0
        out: list[float | None] = []
        for v in values:
            if v is None or (sigma is None and self.warmup == "skip"):
                out.append(None)
                continue
            s = sigma if sigma is not None else abs(v)  # abs_gamma: v / (|v| + |v| / limit)
            out.append(soft_clip_value(v, s, self.limit))
        return tuple(out), {"history": (history + current)[-self.window:], "sigma": sigma}


# --------------------------------------------------------------------- chain
@dataclass(frozen=True)
class Chain:
    """Apply transforms left to right. State: ``{"chain": [state_0, state_1, ...]}``."""

    transforms: tuple[Transform, ...]

    def init(self) -> TransformState:
        return {"chain": [t.init() for t in self.transforms]}

    def update(self, values: Values, state: TransformState, step: int) -> tuple[Values, TransformState]:
        states = state["chain"]
        if len(states) != len(self.transforms):
            raise ValueError(f"chain state has {len(states)} entries for {len(self.transforms)} transforms; "
                             "was it saved by a different rule?")
        new_states = []
        for transform, sub_state in zip(self.transforms, states):
            values, sub_state = transform.update(values, sub_state, step)
            new_states.append(sub_state)
        return values, {"chain": new_states}

    def sigma(self, state: TransformState) -> float | None:
        """The shared sigma recorded by a ScaleByRunningStd in this chain's state, if any."""
        for transform, sub_state in zip(self.transforms, state["chain"]):
            if isinstance(transform, ScaleByRunningStd):
                return sub_state["sigma"]
        return None


# ------------------------------------------------- optax-style constructors
def chain(*transforms: Transform) -> Chain:
    """Compose transforms, applied left to right."""
    return Chain(tuple(transforms))


def scale(factor: float) -> Scale:
    """Multiply by a constant."""
    return Scale(factor)


def scale_by_schedule(schedule: Callable[[int], float]) -> ScaleBySchedule:
    """Multiply by schedule(step)."""
    return ScaleBySchedule(schedule)


def sign() -> Sign:
    """Replace values by their sign (sign(0) = 0)."""
    return Sign()


def soft_clip(scale: float, limit: float = math.inf) -> SoftClip:
    """v / (scale + |v| / limit) with constant scale (S2P option 4: scale = A L0, limit = 1 / (B L1))."""
    return SoftClip(scale, limit)


def normalise_by_running_std(window: int, ddof: int = 0, include_current: bool = False,
                             warmup: str = "abs_gamma") -> ScaleByRunningStd:
    """v / sigma, sigma = std of recent values (VS2P with clip "none")."""
    return ScaleByRunningStd(window, ddof, include_current, warmup)


def soft_clip_by_running_std(limit: float, window: int, ddof: int = 0, include_current: bool = False,
                             warmup: str = "abs_gamma", fixed_sigma: float | None = None) -> ScaleByRunningStd:
    """v / (sigma + |v| / limit), sigma = std of recent values or ``fixed_sigma`` (VS2P soft / fixed clip)."""
    return ScaleByRunningStd(window, ddof, include_current, warmup, limit, fixed_sigma)
