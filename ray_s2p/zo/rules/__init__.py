"""Zeroth-order step rules, one module per paper algorithm.

- base.py: the ``StepRule`` protocol and the ``StepDecision`` every rule returns;
- families.py: the two shapes the rules share (gamma-driven two-point, argmin over probes);
- s2p.py: S2P, Algorithm 1 (four step-size options, sign trick);
- vs2p.py: VS2P, Algorithm 2;
- mezo.py: MeZO / ZO-SGD, and ZO-SGD-Sign (``zo_sign``, an alias of S2P option 1 with the sign trick);
- zo_signsgd.py: the coordinate-wise ZO-signSGD of Liu et al. 2019 (a sign update, not a sum of directions);
- stp.py: STP; random_search.py: basic random search / ARS;
- scaling.py: ``StepScaling``, how a step's move grows with the directions it evaluates;
- build.py: ``build_rule`` (config -> rule).
"""

from .base import RuleState, StepDecision, StepRule
from .build import build_rule
from .families import GammaRule, ProbeArgminRule
from .mezo import mezo, zo_sign
from .random_search import RandomSearchRule, random_search
from .s2p import s2p
from .scaling import NO_SCALING, StepScaling
from .stp import stp
from .vs2p import vs2p
from .zo_signsgd import ZoSignSgdRule, zo_signsgd

__all__ = ["NO_SCALING", "StepScaling", "GammaRule", "ProbeArgminRule", "RandomSearchRule", "RuleState", "StepDecision", "StepRule",
           "ZoSignSgdRule", "build_rule", "mezo", "random_search", "s2p", "stp", "vs2p", "zo_sign", "zo_signsgd"]
