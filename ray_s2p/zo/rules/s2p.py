"""S2P, the Stochastic Two-Point method (Pang and Zhou, arXiv 2402.01621), Algorithm 1."""

from __future__ import annotations

import math

from ..schedules import Schedule
from ..transforms import chain, scale, scale_by_schedule, sign, soft_clip
from .base import StepRule
from .families import GammaRule, ProbeArgminRule
from .scaling import NO_SCALING, StepScaling


def s2p(option: int, lr: Schedule, eta: Schedule, rho: float, sign_trick: bool = True,
        smooth: tuple[float, float, float, float] = (1.01, 1.0, 1.01, 1.0), weight_decay: float = 0.0,
        scaling: StepScaling = NO_SCALING) -> StepRule:
    """S2P, Algorithm 1, with the paper's four step-size options.

    1. a_k = lr_k (fixed/decayed; general L-smoothness);
    2. a_k = eta_k |gamma| (dynamic; with the sign trick this is exactly MeZO with eta);
    3. a_k = lr_k, the same rule as 1, the setting of the relaxed-smoothness theorem;
    4. a_k = d_k |gamma| / (A L0 + B L1 |gamma|), ``smooth = (A, L0, B, L1)``; d_k is the
       decay factor alone (reconstructed: the theorem has no eta; constant decay = the formula).
    Sign trick: probe +-rho, c = -a_k sign(gamma). Without it: options 1/3 probe +-a_k
    directly, options 2/4 follow up at +-a_k; then c = argmin (ties: +a_k).
    Every option's averaged move is multiplied by s(Q) (``scaling``); a_k and the probes are not.
    """
    if option in (1, 3):
        if not sign_trick:
            return ProbeArgminRule("s2p", lr, stay=False, lr=lr, weight_decay=weight_decay, scaling=scaling)
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
    return GammaRule("s2p", rho, transform, not sign_trick, lr, weight_decay, scaling)
