"""``build_rule``: the named zeroth-order rule of an ``OptimizerConfig``."""

from __future__ import annotations

from ...config import FIRST_ORDER, OptimizerConfig
from ..schedules import Schedule
from .base import StepRule
from .mezo import mezo, zo_sign
from .random_search import random_search
from .s2p import s2p
from .scaling import StepScaling
from .stp import stp
from .vs2p import vs2p
from .zo_signsgd import zo_signsgd


def build_rule(cfg: OptimizerConfig, total_steps: int, directions: int | None = None) -> StepRule:
    """Build the named zeroth-order rule from an ``OptimizerConfig``.

    Args:
        cfg: the optimizer section; ``cfg.name`` picks the rule, ``cfg.step_scaling`` and
            ``cfg.tuned_directions`` how its move grows with the directions per step (scaling.py).
        total_steps: run length, for the linear and cosine decays.
        directions: Q, the directions per step the run plans (``RunConfig.directions_per_step``), to check
            the scaled weight decay; the rule itself scales every step by the Q it is given.

    Raises:
        ValueError: for "sgd"/"adamw" (first-order, not a StepRule), an unknown name,
            or values the rule cannot use (bad decay arguments, s(Q) * lr * weight_decay >= 1).
    """
    if cfg.name in FIRST_ORDER:
        raise ValueError(f"optimizer {cfg.name!r} is first-order (backprop), not a zeroth-order StepRule. "
                         "Fix: use the first-order training path, or a zeroth-order optimizer name")
    scaling = StepScaling(cfg.step_scaling, cfg.tuned_directions)
    s = scaling.factor(directions) if directions is not None else 1.0
    if s * cfg.lr * cfg.weight_decay >= 1.0:
        raise ValueError(f"optimizer.weight_decay: lr * weight_decay = {s * cfg.lr * cfg.weight_decay} >= 1"
                         + (f" (with the step scaling {s:g} of {directions} directions per step)" if s != 1.0 else "")
                         + " would zero or flip the weights. Fix: lower weight_decay or lr")
    decay = (cfg.decay, total_steps, cfg.decay_final, cfg.decay_steps)
    lr, eta, wd = Schedule(cfg.lr, *decay), Schedule(cfg.eta, *decay), cfg.weight_decay
    if cfg.name == "mezo":
        return mezo(lr, cfg.rho, wd, scaling)
    if cfg.name == "zo_sign":  # an alias: S2P option 1 with the sign trick under ZO-Bench's name
        return zo_sign(lr, cfg.rho, wd, scaling)
    if cfg.name == "zo_signsgd":
        return zo_signsgd(lr, cfg.rho, wd, scaling)
    if cfg.name == "s2p":
        smooth = (cfg.smooth_a, cfg.smooth_l0, cfg.smooth_b, cfg.smooth_l1)
        return s2p(cfg.step_size_option, lr, eta, cfg.rho, cfg.sign_trick, smooth, wd, scaling)
    if cfg.name == "vs2p":
        return vs2p(eta, cfg.rho, cfg.beta, cfg.tau_a, cfg.tau_b, cfg.sigma_window, cfg.sigma_ddof,
                    cfg.sigma_include_current, cfg.sigma_warmup, cfg.clip, cfg.clip_threshold, cfg.sign_trick,
                    lr, wd, scaling)
    if cfg.name == "stp":
        return stp(lr, wd, scaling)
    if cfg.name == "random_search":
        return random_search(lr, cfg.rho, cfg.top_b, wd, scaling)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
