"""The ZO-SGD family: MeZO (Malladi et al. 2023) and ZO-Bench's ZO-SGD-Sign (``zo_sign``)."""

from __future__ import annotations

import dataclasses

from ..schedules import Schedule
from ..transforms import chain, scale, scale_by_schedule
from .families import GammaRule
from .s2p import s2p
from .scaling import NO_SCALING, StepScaling


def mezo(lr: Schedule, rho: float, weight_decay: float = 0.0, scaling: StepScaling = NO_SCALING) -> GammaRule:
    """MeZO / ZO-SGD (Malladi et al. 2023): c = -s(Q) lr_k gamma / q, x scaled by 1 - s(Q) lr_k wd."""
    return GammaRule("mezo", rho, chain(scale_by_schedule(lr), scale(-1.0)), False, lr, weight_decay, scaling)


def zo_sign(lr: Schedule, rho: float, weight_decay: float = 0.0, scaling: StepScaling = NO_SCALING) -> GammaRule:
    """ZO-SGD-Sign as ZO-Bench writes it: c = -lr_k * sign(gamma), whole directions scaled by a sign.

    This is *the same rule* as S2P option 1 with the sign trick (built here from it, only the
    name differs), so comparisons list it once, as ``s2p_opt1``. The coordinate-wise
    ZO-signSGD of Liu et al. (2019) is ``zo_signsgd``.
    """
    return dataclasses.replace(s2p(1, lr, lr, rho, True, weight_decay=weight_decay, scaling=scaling), name="zo_sign")
