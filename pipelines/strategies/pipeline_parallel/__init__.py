"""`pipeline`: pipeline model parallelism (GPipe, 1F1B) over stage actors."""
from pipelines.strategies.pipeline_parallel.strategy import PipelineStrategy

__all__ = ["PipelineStrategy"]
