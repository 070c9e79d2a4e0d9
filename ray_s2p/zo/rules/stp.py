"""STP, the Stochastic Three Points method (Bergou et al. 2020)."""

from __future__ import annotations

from ..schedules import Schedule
from .families import ProbeArgminRule
from .scaling import NO_SCALING, StepScaling


def stp(lr: Schedule, weight_decay: float = 0.0, scaling: StepScaling = NO_SCALING) -> ProbeArgminRule:
    """STP (Bergou et al. 2020): radii (0, a_k, -a_k), a_k = lr_k; stays if f(x) <= both; moves scaled by s(Q)."""
    return ProbeArgminRule("stp", lr, stay=True, lr=lr, weight_decay=weight_decay, scaling=scaling)
