"""saferlhf-fast: a fast, exact implementation of Safe RLHF (PPO-Lagrangian)."""
from . import ops
from .lagrange import LagrangeMultiplier, PIDLagrangeMultiplier

__version__ = "0.1.0"
__all__ = ["LagrangeMultiplier", "PIDLagrangeMultiplier", "ops", "__version__"]
