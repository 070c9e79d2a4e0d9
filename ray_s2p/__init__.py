"""ray_s2p: zeroth-order training (S2P, VS2P and baselines) with scalar-only distributed replicas on Ray.

Rooms, from the ground up: config.py and files.py; zo/ (the math, no Ray); data/;
tasks/ (models, data and losses); distributed/ (driver, replicas, ledger); sweeps/
(Tune, comparisons) and plots/; bench/; cli/ (the ``ray-s2p`` command).
"""

from .config import OptimizerConfig, RunConfig, load_config
from .distributed.digest import model_digest
from .zo.optimizer import ZerothOrderOptimizer, optimizer_config

__version__ = "0.1.0"

__all__ = ["OptimizerConfig", "RunConfig", "ZerothOrderOptimizer", "load_config", "model_digest",
           "optimizer_config", "__version__"]
