"""VS2P, the variance-scaled S2P variant (Pang and Zhou, arXiv 2402.01621), Algorithm 2."""

from __future__ import annotations

from ...config import CLIPS, Clip, SigmaWarmup
from ..schedules import Schedule
from ..transforms import chain, normalise_by_running_std, scale, scale_by_schedule, soft_clip_by_running_std
from .families import GammaRule
from .scaling import NO_SCALING, StepScaling


def vs2p(eta: Schedule, rho: float, beta: float = 1.0, tau_a: float = 3.0, tau_b: float = 3.0,
         window: int = 16, ddof: int = 0, include_current: bool = False, warmup: SigmaWarmup = "abs_gamma",
         clip: Clip = "soft", clip_threshold: float = 1.0, sign_trick: bool = True,
         lr: Schedule = Schedule(0.0), weight_decay: float = 0.0, scaling: StepScaling = NO_SCALING) -> GammaRule:
    """VS2P, Algorithm 2, in the gamma = 0-safe closed form.

    a_k sign(gamma) = eta_k beta rho gamma / (tau_b sigma + (tau_b / tau_a) |gamma|), so
    c = -(eta_k beta rho / tau_b) * gamma / (sigma + |gamma| / tau_a); sigma = std of
    recent gammas (see ``transforms.ScaleByRunningStd`` for window, ddof and
    warm-up, all reconstructed). Limits: |gamma| << sigma gives
    c ~ -eta rho gamma / (tau_b sigma); |gamma| >> sigma gives |c| -> eta rho tau_a / tau_b.
    Clip ablations: "soft" (the formula), "fixed" (sigma := clip_threshold),
    "none" (c = -eta_k beta rho gamma / (tau_b sigma), the linear regime only).
    Without the sign trick a followup probes +-a_k and the argmin wins. With Q directions the
    averaged move is multiplied by s(Q) (``scaling``): eta_k acts as s(Q) eta_k, clip limit included,
    while sigma keeps the per-direction gamma history.
    """
    if clip == "soft":
        normalise = soft_clip_by_running_std(tau_a, window, ddof, include_current, warmup)
    elif clip == "fixed":
        normalise = soft_clip_by_running_std(tau_a, window, ddof, include_current, warmup, fixed_sigma=clip_threshold)
    elif clip == "none":
        normalise = normalise_by_running_std(window, ddof, include_current, warmup)
    else:
        raise ValueError(f"unknown VS2P clip {clip!r}. Fix: use one of {', '.join(CLIPS)}")
    transform = chain(normalise, scale_by_schedule(eta), scale(-beta * rho / tau_b))
    return GammaRule("vs2p", rho, transform, not sign_trick, lr, weight_decay, scaling)
