"""The zeroth-order math, importable without Ray (a test enforces it).

- directions.py: seeded directions z (Gaussian, Rademacher, sphere, noise table) and
  the update x <- param_scale * x + sum_i c_i z_i;
- probes.py: f(x + t z) without changing a bit of x (hooks, swap; naive for benchmarks);
- transforms.py: composable pieces of a step rule over scalars (sign, scale, soft clip, sigma);
- schedules.py: decay families of the step sizes;
- rules/: one module per paper algorithm (S2P, VS2P, MeZO, STP, random search);
- optimizer.py: ``ZerothOrderOptimizer`` for a plain PyTorch loop.
"""

from .optimizer import StepRecord, ZerothOrderOptimizer, optimizer_config
from .rules import StepDecision, StepRule, build_rule

__all__ = ["StepDecision", "StepRecord", "StepRule", "ZerothOrderOptimizer", "build_rule", "optimizer_config"]
