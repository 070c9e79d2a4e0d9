"""The two shapes most rules share: gamma-driven two-point rules and argmin over probes.

One paper algorithm is one named constructor (s2p.py, vs2p.py, mezo.py, stp.py);
these classes are what those constructors configure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..schedules import Schedule
from ..transforms import Chain, finite_difference, weight_decay_scale
from .base import RuleState, StepDecision, all_finite, argmin_coefficient, average_decision, loss_rows
from .scaling import NO_SCALING, StepScaling


@dataclass(frozen=True)
class GammaRule:
    """Two-point rules driven by gamma: MeZO, ZO-SGD-Sign, S2P with the sign trick or options 2/4, VS2P.

    Probes (rho, -rho); ``transform`` maps each gamma_i to the signed coefficient
    ``-a_k * sign(gamma_i)`` (before averaging). With ``argmin_followup`` the sign
    is not trusted: a second round probes (a_k, -a_k) and the better of x +- a_k z
    wins (S2P Algorithm 1 with a gamma-dependent a_k). ``scaling`` multiplies the averaged move
    (and the weight decay) by s(Q); the probes, follow-up radii and the transform's history (VS2P's
    sigma) stay per direction, so they do not change with Q.
    """

    name: str
    rho: float
    transform: Chain
    argmin_followup: bool = False
    lr: Schedule = Schedule(0.0)
    weight_decay: float = 0.0
    scaling: StepScaling = NO_SCALING

    def init(self) -> RuleState:
        return {"transform": self.transform.init()}

    def radii(self, state: RuleState, step: int) -> tuple[float, ...]:
        return (self.rho, -self.rho)

    def _signed_steps(self, rows: Sequence[Sequence[float]], state: RuleState,
                      step: int) -> tuple[tuple[Optional[float], ...], tuple[Optional[float], ...], dict]:
        """(gammas, -a_k sign(gamma) per direction, new transform state) from the first-round losses."""
        gammas = tuple(finite_difference(r[0], r[1], self.rho) for r in rows)
        raw, new_state = self.transform.update(gammas, state["transform"], step)
        return gammas, raw, new_state

    def followup(self, losses: Sequence[Sequence[float]], state: RuleState,
                 step: int) -> Optional[list[tuple[float, ...]]]:
        if not self.argmin_followup:
            return None
        _, raw, _ = self._signed_steps(loss_rows(losses, 2, "f(x+rho z), f(x-rho z)"), state, step)
        # a skipped direction still gets (0, 0) so every direction has the same number of probes
        return [(abs(c), 0.0 - abs(c)) if c is not None else (0.0, 0.0) for c in raw]  # 0.0 - 0.0: no -0.0

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        width, what = (4, "+-rho then followup +-a_k") if self.argmin_followup else (2, "f(x+rho z), f(x-rho z)")
        rows = loss_rows(losses, width, what)
        # the transform sees only the first round, exactly as in followup(): same a_k, same sigma
        gammas, raw, new_state = self._signed_steps(rows, state, step)
        valid = [all_finite(r) and g is not None for r, g in zip(rows, gammas)]
        steps = [None if c is None else abs(c) for c in raw]
        if self.argmin_followup:
            raw = tuple(None if c is None else argmin_coefficient(r[2], r[3], abs(c)) for c, r in zip(raw, rows))
        s = self.scaling.factor(len(rows))
        scale_x = weight_decay_scale(s * self.lr(step), self.weight_decay)
        decision = average_decision(raw, valid, gammas, steps, self.transform.sigma(new_state), scale_x, scale=s)
        return decision, {"transform": new_state}


@dataclass(frozen=True)
class ProbeArgminRule:
    """Move to the best probe at +-a_k: STP (``stay=True``) and S2P options 1/3 without the sign trick.

    STP (Bergou et al. 2020): x_{k+1} = argmin{f(x), f(x + a z), f(x - a z)};
    radii (0, a_k, -a_k); staying (f(x) <= both) is a skipped direction that
    still counts in the q-average. S2P Algorithm 1: argmin{f(x + a z), f(x - a z)},
    radii (a_k, -a_k). a_k = step_size(step). gamma is not defined (no rho probes).
    Reconstructed: with q directions each direction decides on its own and the
    moves are averaged (not one argmin over all 2q + 1 points), then scaled by s(Q):
    the probes stay at +-a_k, so with linear scaling at Q_t = 1 every direction moves
    exactly the a_k it probed.
    """

    name: str
    step_size: Schedule
    stay: bool
    lr: Schedule = Schedule(0.0)
    weight_decay: float = 0.0
    scaling: StepScaling = NO_SCALING

    def init(self) -> RuleState:
        return {}

    def radii(self, state: RuleState, step: int) -> tuple[float, ...]:
        a = self.step_size(step)
        return (0.0, a, -a) if self.stay else (a, -a)

    def followup(self, losses: Sequence[Sequence[float]], state: RuleState,
                 step: int) -> Optional[list[tuple[float, ...]]]:
        return None

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        rows = loss_rows(losses, 3 if self.stay else 2, "f(x), f(x+a z), f(x-a z)" if self.stay else "f(x+a z), f(x-a z)")
        a = self.step_size(step)
        valid = [all_finite(r) for r in rows]
        raw: list[Optional[float]] = []
        for row in rows:
            f_plus, f_minus = row[-2], row[-1]
            stays = self.stay and row[0] <= min(f_plus, f_minus)
            raw.append(None if stays else argmin_coefficient(f_plus, f_minus, a))
        s = self.scaling.factor(len(rows))
        scale_x = weight_decay_scale(s * self.lr(step), self.weight_decay)
        return average_decision(raw, valid, [None] * len(rows), [a] * len(rows), None, scale_x, scale=s), {}
