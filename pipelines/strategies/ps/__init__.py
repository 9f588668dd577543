"""`ps`: asynchronous parameter-server SGD (DistBelief's Downpour)."""
from pipelines.strategies.ps.strategy import ParameterServerStrategy

__all__ = ["ParameterServerStrategy"]
