"""The ZO-SGD family: MeZO (Malladi et al. 2023) and ZO-SGD-Sign."""

from __future__ import annotations

from ..schedules import Schedule
from ..transforms import chain, scale, scale_by_schedule, sign
from .families import GammaRule


def mezo(lr: Schedule, rho: float, weight_decay: float = 0.0) -> GammaRule:
    """MeZO / ZO-SGD (Malladi et al. 2023): c = -lr_k * gamma, x scaled by 1 - lr_k * wd."""
    return GammaRule("mezo", rho, chain(scale_by_schedule(lr), scale(-1.0)), False, lr, weight_decay)


def zo_sign(lr: Schedule, rho: float, weight_decay: float = 0.0) -> GammaRule:
    """ZO-SGD-Sign: c = -lr_k * sign(gamma)."""
    return GammaRule("zo_sign", rho, chain(sign(), scale_by_schedule(lr), scale(-1.0)), False, lr, weight_decay)
