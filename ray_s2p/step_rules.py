"""Zeroth-order update rules: (probe losses, state) -> (update coefficients, new state).

Every rule follows one protocol (``StepRule``). Per step the driver asks
``radii`` for the signed offsets t_j to probe, gathers ``losses[i][j] = f(x + t_j z_i)``
for each direction i (plus an optional ``followup`` round), and ``update`` returns a
``StepDecision``: every replica then applies ``x <- param_scale * x + sum_i c_i z_i``.
Rules are pure (state is returned, never stashed or mutated) and use only the
stdlib ``math``; this module never imports torch, numpy or ray.

Shared semantics (our design, see algorithm.md "Distributed reading"):
  * q-averaging: each c_i is divided by the number of directions with finite
    losses (random search divides by its own b instead).
  * A direction with any non-finite loss is skipped (c = 0, skipped True),
    leaves the denominator and, when its gamma is non-finite, VS2P's history.
    If no direction has finite losses, nothing moves (param_scale = 1 too).
  * gamma == 0 gives c = 0 (sign(0) = 0); such a direction is not "skipped".
  * argmin between x + a z and x - a z picks +a on a tie (Algorithm 1 always
    moves; the first candidate wins, as Python's min does).
  * Decoupled weight decay: param_scale = 1 - lr_k * weight_decay for every rule,
    with lr_k = cfg.lr * decay (also for eta-scaled rules; reconstructed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

from ray_s2p.schedules import Schedule
from ray_s2p.step_transforms import (
    Chain, chain, finite_difference, normalise_by_running_std, scale, scale_by_schedule, sign,
    soft_clip, soft_clip_by_running_std, std, weight_decay_scale,
)

if TYPE_CHECKING:  # only for the annotation: importing config would pull in yaml
    from ray_s2p.config import OptimizerConfig

RuleState = dict  # JSON-serialisable (floats, ints, lists, None): checkpoints store it as JSON


@dataclass(frozen=True)
class StepDecision:
    """What every replica applies: ``x <- param_scale * x + sum_i coefficients[i] * z_i``."""

    coefficients: tuple[float, ...]
    gammas: tuple[Optional[float], ...]      # (f(x+rho z) - f(x-rho z)) / (2 rho); None where not defined
    sigma: Optional[float]                   # VS2P's sigma (random search: ARS's sigma_R); None otherwise
    step_sizes: tuple[Optional[float], ...]  # a_k per direction, before averaging
    skipped: tuple[bool, ...]
    param_scale: float = 1.0

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


# -------------------------------------------------------------------- helpers
def _rows(losses: Sequence[Sequence[float]], width: int, what: str) -> list[tuple[float, ...]]:
    """Validate the loss table: at least one direction, ``width`` losses each."""
    rows = [tuple(float(v) for v in row) for row in losses]
    if not rows:
        raise ValueError("losses must hold at least one direction")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"direction {i}: expected {width} losses ({what}), got {len(row)}")
    return rows


def _finite(row: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in row)


def _argmin_coefficient(f_plus: float, f_minus: float, a: float) -> float:
    """+a if f(x + a z) <= f(x - a z) else -a (ties pick +a: Algorithm 1 always moves)."""
    return a if f_plus <= f_minus else -a


def _decision(raw: Sequence[Optional[float]], valid: Sequence[bool], gammas: Sequence[Optional[float]],
              step_sizes: Sequence[Optional[float]], sigma: Optional[float], param_scale: float,
              denominator: Optional[int] = None) -> StepDecision:
    """Average the per-direction coefficients over the valid directions (q-averaging)."""
    n_valid = sum(valid)
    denom = denominator if denominator is not None else n_valid
    keep = [r is not None and ok for r, ok in zip(raw, valid)]
    coefficients = tuple(r / denom + 0.0 if k else 0.0 for r, k in zip(raw, keep))  # + 0.0 turns -0.0 into 0.0
    return StepDecision(coefficients, tuple(gammas), sigma,
                        tuple(s if ok else None for s, ok in zip(step_sizes, valid)),
                        tuple(not k for k in keep), param_scale if n_valid else 1.0)


# ---------------------------------------------------------------- rule kinds
@dataclass(frozen=True)
class GammaRule:
    """Two-point rules driven by gamma: MeZO, ZO-SGD-Sign, S2P with the sign trick or options 2/4, VS2P.

    Probes (rho, -rho); ``transform`` maps each gamma_i to the signed coefficient
    ``-a_k * sign(gamma_i)`` (before averaging). With ``argmin_followup`` the sign
    is not trusted: a second round probes (a_k, -a_k) and the better of x +- a_k z
    wins (S2P Algorithm 1 with a gamma-dependent a_k).
    """

    name: str
    rho: float
    transform: Chain
    argmin_followup: bool = False
    lr: Schedule = Schedule(0.0)
    weight_decay: float = 0.0

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
        _, raw, _ = self._signed_steps(_rows(losses, 2, "f(x+rho z), f(x-rho z)"), state, step)
        # a skipped direction still gets (0, 0) so every direction has the same number of probes
        return [(abs(c), 0.0 - abs(c)) if c is not None else (0.0, 0.0) for c in raw]  # 0.0 - 0.0: no -0.0

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        width, what = (4, "+-rho then followup +-a_k") if self.argmin_followup else (2, "f(x+rho z), f(x-rho z)")
        rows = _rows(losses, width, what)
        # the transform sees only the first round, exactly as in followup(): same a_k, same sigma
        gammas, raw, new_state = self._signed_steps(rows, state, step)
        valid = [_finite(r) and g is not None for r, g in zip(rows, gammas)]
        steps = [None if c is None else abs(c) for c in raw]
        if self.argmin_followup:
            raw = tuple(None if c is None else _argmin_coefficient(r[2], r[3], abs(c)) for c, r in zip(raw, rows))
        scale_x = weight_decay_scale(self.lr(step), self.weight_decay)
        decision = _decision(raw, valid, gammas, steps, self.transform.sigma(new_state), scale_x)
        return decision, {"transform": new_state}


@dataclass(frozen=True)
class ProbeArgminRule:
    """Move to the best probe at +-a_k: STP (``stay=True``) and S2P options 1/3 without the sign trick.

    STP (Bergou et al. 2020): x_{k+1} = argmin{f(x), f(x + a z), f(x - a z)};
    radii (0, a_k, -a_k); staying (f(x) <= both) is a skipped direction that
    still counts in the q-average. S2P Algorithm 1: argmin{f(x + a z), f(x - a z)},
    radii (a_k, -a_k). a_k = step_size(step). gamma is not defined (no rho probes).
    Reconstructed: with q directions each direction decides on its own and the
    moves are averaged (not one argmin over all 2q + 1 points).
    """

    name: str
    step_size: Schedule
    stay: bool
    lr: Schedule = Schedule(0.0)
    weight_decay: float = 0.0

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
        rows = _rows(losses, 3 if self.stay else 2, "f(x), f(x+a z), f(x-a z)" if self.stay else "f(x+a z), f(x-a z)")
        a = self.step_size(step)
        valid = [_finite(r) for r in rows]
        raw: list[Optional[float]] = []
        for row in rows:
            f_plus, f_minus = row[-2], row[-1]
            stays = self.stay and row[0] <= min(f_plus, f_minus)
            raw.append(None if stays else _argmin_coefficient(f_plus, f_minus, a))
        scale_x = weight_decay_scale(self.lr(step), self.weight_decay)
        return _decision(raw, valid, [None] * len(rows), [a] * len(rows), None, scale_x), {}


@dataclass(frozen=True)
class RandomSearchRule:
    """Basic random search / ARS V1-t (Mania et al. 2018, Algorithm 1), for a loss to minimise.

    Probes (rho, -rho) = (nu, -nu). Keeps the ``top_b`` finite directions with the
    smallest min(f+, f-) (all if None; ties by direction index), and
    ``c_i = -lr_k / (b sigma_R) * (f+_i - f-_i)`` with sigma_R the population std
    of the 2b kept losses (1.0 if it is 0). The 1/b is this rule's average, so no
    further division by q. step_sizes are |c_i|; sigma reports sigma_R.
    """

    name: str
    rho: float
    lr: Schedule
    top_b: Optional[int] = None
    weight_decay: float = 0.0

    def init(self) -> RuleState:
        return {}

    def radii(self, state: RuleState, step: int) -> tuple[float, ...]:
        return (self.rho, -self.rho)

    def followup(self, losses: Sequence[Sequence[float]], state: RuleState,
                 step: int) -> Optional[list[tuple[float, ...]]]:
        return None

    def update(self, losses: Sequence[Sequence[float]], state: RuleState,
               step: int) -> tuple[StepDecision, RuleState]:
        rows = _rows(losses, 2, "f(x+rho z), f(x-rho z)")
        gammas = [finite_difference(r[0], r[1], self.rho) for r in rows]
        valid = [g is not None for g in gammas]
        candidates = [i for i, ok in enumerate(valid) if ok]
        b = min(self.top_b or len(candidates), len(candidates))
        kept = sorted(candidates, key=lambda i: (min(rows[i]), i))[:b]
        sigma_r = None
        raw: list[Optional[float]] = [None] * len(rows)
        if kept:
            sigma_r = std([f for i in kept for f in rows[i]]) or 1.0
            for i in kept:
                raw[i] = -self.lr(step) / (b * sigma_r) * (rows[i][0] - rows[i][1])
        steps = [None if c is None else abs(c) for c in raw]
        scale_x = weight_decay_scale(self.lr(step), self.weight_decay)
        return _decision(raw, valid, gammas, steps, sigma_r, scale_x, denominator=1), {}


# --------------------------------------------------------------- named rules
def mezo(lr: Schedule, rho: float, weight_decay: float = 0.0) -> GammaRule:
    """MeZO / ZO-SGD (Malladi et al. 2023): c = -lr_k * gamma, x scaled by 1 - lr_k * wd."""
    return GammaRule("mezo", rho, chain(scale_by_schedule(lr), scale(-1.0)), False, lr, weight_decay)


def zo_sign(lr: Schedule, rho: float, weight_decay: float = 0.0) -> GammaRule:
    """ZO-SGD-Sign: c = -lr_k * sign(gamma)."""
    return GammaRule("zo_sign", rho, chain(sign(), scale_by_schedule(lr), scale(-1.0)), False, lr, weight_decay)


def s2p(option: int, lr: Schedule, eta: Schedule, rho: float, sign_trick: bool = True,
        smooth: tuple[float, float, float, float] = (1.01, 1.0, 1.01, 1.0), weight_decay: float = 0.0) -> StepRule:
    """S2P, Algorithm 1, with the paper's four step-size options.

    1. a_k = lr_k (fixed/decayed; general L-smoothness);
    2. a_k = eta_k |gamma| (dynamic; with the sign trick this is exactly MeZO with eta);
    3. a_k = lr_k, the same rule as 1, the setting of the relaxed-smoothness theorem;
    4. a_k = d_k |gamma| / (A L0 + B L1 |gamma|), ``smooth = (A, L0, B, L1)``; d_k is the
       decay factor alone (reconstructed: the theorem has no eta; constant decay = the formula).
    Sign trick: probe +-rho, c = -a_k sign(gamma). Without it: options 1/3 probe +-a_k
    directly, options 2/4 follow up at +-a_k; then c = argmin (ties: +a_k).
    """
    if option in (1, 3):
        if not sign_trick:
            return ProbeArgminRule("s2p", lr, stay=False, lr=lr, weight_decay=weight_decay)
        transform = chain(sign(), scale_by_schedule(lr), scale(-1.0))
    elif option == 2:
        transform = chain(scale_by_schedule(eta), scale(-1.0))
    elif option == 4:
        a, l0, b, l1 = smooth
        if min(smooth) < 0 or (a * l0 == 0 and b * l1 == 0):
            raise ValueError(f"S2P option 4 needs smooth_a, smooth_l0, smooth_b, smooth_l1 >= 0 and "
                             f"A*L0 + B*L1 > 0; got {smooth}")
        decay_only = Schedule(1.0, eta.kind, eta.total_steps, eta.final, eta.decay_steps)
        limit = 1.0 / (b * l1) if b * l1 > 0 else math.inf
        transform = chain(soft_clip(a * l0, limit), scale_by_schedule(decay_only), scale(-1.0))
    else:
        raise ValueError(f"S2P step_size_option must be 1, 2, 3 or 4, got {option}")
    return GammaRule("s2p", rho, transform, not sign_trick, lr, weight_decay)


def vs2p(eta: Schedule, rho: float, beta: float = 1.0, tau_a: float = 3.0, tau_b: float = 3.0,
         window: int = 16, ddof: int = 0, include_current: bool = False, warmup: str = "abs_gamma",
         clip: str = "soft", clip_threshold: float = 1.0, sign_trick: bool = True,
         lr: Schedule = Schedule(0.0), weight_decay: float = 0.0) -> GammaRule:
    """VS2P, Algorithm 2, in the gamma = 0-safe closed form.

    a_k sign(gamma) = eta_k beta rho gamma / (tau_b sigma + (tau_b / tau_a) |gamma|), so
    c = -(eta_k beta rho / tau_b) * gamma / (sigma + |gamma| / tau_a); sigma = std of
    recent gammas (see ``step_transforms.ScaleByRunningStd`` for window, ddof and
    warm-up, all reconstructed). Limits: |gamma| << sigma gives
    c ~ -eta rho gamma / (tau_b sigma); |gamma| >> sigma gives |c| -> eta rho tau_a / tau_b.
    Clip ablations: "soft" (the formula), "fixed" (sigma := clip_threshold),
    "none" (c = -eta_k beta rho gamma / (tau_b sigma), the linear regime only).
    Without the sign trick a followup probes +-a_k and the argmin wins.
    """
    if clip == "soft":
        normalise = soft_clip_by_running_std(tau_a, window, ddof, include_current, warmup)
    elif clip == "fixed":
        normalise = soft_clip_by_running_std(tau_a, window, ddof, include_current, warmup, fixed_sigma=clip_threshold)
    elif clip == "none":
        normalise = normalise_by_running_std(window, ddof, include_current, warmup)
    else:
        raise ValueError(f"unknown VS2P clip {clip!r}. Fix: use soft, fixed or none")
    transform = chain(normalise, scale_by_schedule(eta), scale(-beta * rho / tau_b))
    return GammaRule("vs2p", rho, transform, not sign_trick, lr, weight_decay)


def stp(lr: Schedule, weight_decay: float = 0.0) -> ProbeArgminRule:
    """STP (Bergou et al. 2020): radii (0, a_k, -a_k), a_k = lr_k; stays if f(x) <= both."""
    return ProbeArgminRule("stp", lr, stay=True, lr=lr, weight_decay=weight_decay)


def random_search(lr: Schedule, rho: float, top_b: Optional[int] = None,
                  weight_decay: float = 0.0) -> RandomSearchRule:
    """Basic random search / ARS (Mania et al. 2018): the best b directions, scaled by 1 / sigma_R."""
    if top_b is not None and top_b < 1:
        raise ValueError(f"random search top_b must be >= 1 or None, got {top_b}")
    return RandomSearchRule("random_search", rho, lr, top_b, weight_decay)


def build_rule(cfg: "OptimizerConfig", total_steps: int) -> StepRule:
    """Build the named zeroth-order rule from an ``OptimizerConfig``.

    Args:
        cfg: the optimizer section; ``cfg.name`` picks the rule.
        total_steps: run length, for the linear and cosine decays.

    Raises:
        ValueError: for "sgd"/"adamw" (first-order, not a StepRule), an unknown name,
            or values the rule cannot use (bad decay arguments, lr * weight_decay >= 1).
    """
    if cfg.name in ("sgd", "adamw"):
        raise ValueError(f"optimizer {cfg.name!r} is first-order (backprop), not a zeroth-order StepRule. "
                         "Fix: use the first-order training path, or a zeroth-order optimizer name")
    if cfg.lr * cfg.weight_decay >= 1.0:
        raise ValueError(f"optimizer.weight_decay: lr * weight_decay = {cfg.lr * cfg.weight_decay} >= 1 "
                         "would zero or flip the weights. Fix: lower weight_decay or lr")
    decay = (cfg.decay, total_steps, cfg.decay_final, cfg.decay_steps)
    lr, eta, wd = Schedule(cfg.lr, *decay), Schedule(cfg.eta, *decay), cfg.weight_decay
    if cfg.name == "mezo":
        return mezo(lr, cfg.rho, wd)
    if cfg.name == "zo_sign":
        return zo_sign(lr, cfg.rho, wd)
    if cfg.name == "s2p":
        smooth = (cfg.smooth_a, cfg.smooth_l0, cfg.smooth_b, cfg.smooth_l1)
        return s2p(cfg.step_size_option, lr, eta, cfg.rho, cfg.sign_trick, smooth, wd)
    if cfg.name == "vs2p":
        return vs2p(eta, cfg.rho, cfg.beta, cfg.tau_a, cfg.tau_b, cfg.sigma_window, cfg.sigma_ddof,
                    cfg.sigma_include_current, cfg.sigma_warmup, cfg.clip, cfg.clip_threshold, cfg.sign_trick,
                    lr, wd)
    if cfg.name == "stp":
        return stp(lr, wd)
    if cfg.name == "random_search":
        return random_search(lr, cfg.rho, cfg.top_b, wd)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
