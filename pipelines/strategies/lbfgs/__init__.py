"""`lbfgs`: distributed L-BFGS (DistBelief's Sandblaster)."""
from pipelines.strategies.lbfgs.strategy import LbfgsStrategy

__all__ = ["LbfgsStrategy"]
