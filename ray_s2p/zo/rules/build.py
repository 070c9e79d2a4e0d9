"""``build_rule``: the named zeroth-order rule of an ``OptimizerConfig``."""

from __future__ import annotations

from ...config import FIRST_ORDER, OptimizerConfig
from ..schedules import Schedule
from .base import StepRule
from .mezo import mezo, zo_sign
from .random_search import random_search
from .s2p import s2p
from .stp import stp
from .vs2p import vs2p
from .zo_signsgd import zo_signsgd


def build_rule(cfg: OptimizerConfig, total_steps: int) -> StepRule:
    """Build the named zeroth-order rule from an ``OptimizerConfig``.

    Args:
        cfg: the optimizer section; ``cfg.name`` picks the rule.
        total_steps: run length, for the linear and cosine decays.

    Raises:
        ValueError: for "sgd"/"adamw" (first-order, not a StepRule), an unknown name,
            or values the rule cannot use (bad decay arguments, lr * weight_decay >= 1).
    """
    if cfg.name in FIRST_ORDER:
        raise ValueError(f"optimizer {cfg.name!r} is first-order (backprop), not a zeroth-order StepRule. "
                         "Fix: use the first-order training path, or a zeroth-order optimizer name")
    if cfg.lr * cfg.weight_decay >= 1.0:
        raise ValueError(f"optimizer.weight_decay: lr * weight_decay = {cfg.lr * cfg.weight_decay} >= 1 "
                         "would zero or flip the weights. Fix: lower weight_decay or lr")
    decay = (cfg.decay, total_steps, cfg.decay_final, cfg.decay_steps)
    lr, eta, wd = Schedule(cfg.lr, *decay), Schedule(cfg.eta, *decay), cfg.weight_decay
    if cfg.name == "mezo":
        return mezo(lr, cfg.rho, wd)
    if cfg.name == "zo_sign":  # an alias: S2P option 1 with the sign trick under ZO-Bench's name
        return zo_sign(lr, cfg.rho, wd)
    if cfg.name == "zo_signsgd":
        return zo_signsgd(lr, cfg.rho, wd)
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
