"""ray_s2p: zeroth-order training (S2P, VS2P and baselines) with scalar-only distributed replicas on Ray.

The pure modules (perturbation, step_rules, schedules, ledger, replay, digest,
zo_optimizer) never import ray; Ray lives in replica.py, driver.py and the
entry points.
"""

from .config import OptimizerConfig, RunConfig, load_config
from .digest import model_digest
from .zo_optimizer import ZerothOrderOptimizer, optimizer_config

__version__ = "0.1.0"

__all__ = ["OptimizerConfig", "RunConfig", "ZerothOrderOptimizer", "load_config", "model_digest",
           "optimizer_config", "__version__"]
