"""The step-rule protocol: (probe losses, state) -> (update coefficients, new state).

Every rule follows one protocol (``StepRule``). Per step the driver asks
``radii`` for the signed offsets t_j to probe, gathers ``losses[i][j] = f(x + t_j z_i)``
for each direction i (plus an optional ``followup`` round), and ``update`` returns a
``StepDecision``: every replica then applies ``x <- param_scale * x + sum_i c_i z_i``
(ZO-signSGD: ``x <- param_scale * x - a sign(sum_i c_i z_i)``, see ``StepDecision.sign_step``).
Rules are pure (state is returned, never stashed or mutated) and use only the
stdlib ``math``; this module never imports torch, numpy or ray.

Shared semantics (our design, see docs/method.md):
  * q-averaging: each c_i is divided by the number of directions with finite
    losses (random search divides by its own b instead), then multiplied by the
    step scaling s(Q) of the Q directions the step evaluated (scaling.py).
  * A direction with any non-finite loss is skipped (c = 0, skipped True),
    leaves the denominator and, when its gamma is non-finite, VS2P's history.
    If no direction has finite losses, nothing moves (param_scale = 1 too).
  * gamma == 0 gives c = 0 (sign(0) = 0); such a direction is not "skipped".
  * argmin between x + a z and x - a z picks +a on a tie (Algorithm 1 always
    moves; the first candidate wins, as Python's min does).
  * Decoupled weight decay: param_scale = 1 - s(Q) * lr_k * weight_decay for every rule,
    with lr_k = cfg.lr * decay (also for eta-scaled rules; reconstructed). Replicas
    apply it to every parameter that ``optimizer.weight_decay_exempt`` does not spare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

RuleState = dict  # JSON-serialisable (floats, ints, lists, None): checkpoints store it as JSON


@dataclass(frozen=True)
class StepDecision:
    """What every replica applies: ``x <- param_scale * x + sum_i coefficients[i] * z_i``.

    With ``sign_step = a`` (ZO-signSGD) the update is ``x <- param_scale * x - a * sign(sum_i c_i z_i)``
    instead: the coefficients define the gradient estimate whose coordinate-wise sign is taken.
    """

    coefficients: tuple[float, ...]
    gammas: tuple[Optional[float], ...]      # (f(x+rho z) - f(x-rho z)) / (2 rho); None where not defined
    sigma: Optional[float]                   # VS2P's sigma (random search: ARS's sigma_R); None otherwise
    step_sizes: tuple[Optional[float], ...]  # a_k per direction, before averaging
    skipped: tuple[bool, ...]
    param_scale: float = 1.0
    sign_step: Optional[float] = None        # None: linear update; a >= 0: the sign update above

    def __post_init__(self) -> None:
        n = len(self.coefficients)
        if not len(self.gammas) == len(self.step_sizes) == len(self.skipped) == n:
            raise ValueError("StepDecision fields must have one entry per direction")


class StepRule(Protocol):
    """A zeroth-order update rule (see the module docstring for the step protocol)."""

    name: str

    def init(self) -> RuleState:
        """State before the first step."""
        ...

    def radii(self, state: RuleState, step: int) -> tuple[float, ...]:
        """Signed offsets t_j probed along every direction: f(x + t_j z_i)."""
        ...

    def followup(self, losses: Sequence[Sequence[float]], state: RuleState,
                 step: int) -> Optional[list[tuple[float, ...]]]:
        """Second-round offsets per direction, given first-round losses; None if the rule has none."""
        ...

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        """Coefficients from all losses (first round, then followup); returns the new state."""
        ...


class StatelessTwoPoint:
    """The probing half of a rule that keeps no state and probes (rho, -rho) with no follow-up.

    Mixed into frozen dataclasses that define ``rho`` and ``update`` (random search, ZO-signSGD).
    """

    rho: float

    def init(self) -> RuleState:
        return {}

    def radii(self, state: RuleState, step: int) -> tuple[float, ...]:
        return (self.rho, -self.rho)

    def followup(self, losses: Sequence[Sequence[float]], state: RuleState,
                 step: int) -> Optional[list[tuple[float, ...]]]:
        return None


def loss_rows(losses: Sequence[Sequence[float]], width: int, what: str) -> list[tuple[float, ...]]:
    """Validate the loss table: at least one direction, ``width`` losses each."""
    rows = [tuple(float(v) for v in row) for row in losses]
    if not rows:
        raise ValueError("losses must hold at least one direction")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"direction {i}: expected {width} losses ({what}), got {len(row)}")
    return rows


def all_finite(row: Sequence[float]) -> bool:
    """True when every loss of the row is finite."""
    return all(math.isfinite(v) for v in row)


def argmin_coefficient(f_plus: float, f_minus: float, a: float) -> float:
    """+a if f(x + a z) <= f(x - a z) else -a (ties pick +a: Algorithm 1 always moves)."""
    return a if f_plus <= f_minus else -a


def average_decision(raw: Sequence[Optional[float]], valid: Sequence[bool], gammas: Sequence[Optional[float]],
              step_sizes: Sequence[Optional[float]], sigma: Optional[float], param_scale: float,
              denominator: Optional[int] = None, scale: float = 1.0) -> StepDecision:
    """Average the per-direction coefficients over the valid directions (q-averaging), times ``scale``.

    ``scale`` is the step scaling s(Q) (scaling.py): c_i = raw_i * s(Q) / n_valid. With s = 1.0 the
    product is exact, so a rule at its tuned Q computes bit for bit what the plain average did.
    """
    n_valid = sum(valid)
    denom = denominator if denominator is not None else n_valid
    keep = [r is not None and ok for r, ok in zip(raw, valid)]
    coefficients = tuple(r * scale / denom + 0.0 if k else 0.0 for r, k in zip(raw, keep))  # + 0.0: no -0.0
    return StepDecision(coefficients, tuple(gammas), sigma,
                        tuple(s if ok else None for s, ok in zip(step_sizes, valid)),
                        tuple(not k for k in keep), param_scale if n_valid else 1.0)
