"""Lightning strategies of the suite (thin adapters over :mod:`lightning_scale.core`)."""

from lightning_scale.strategies.interface import PipelineOutput, data_parallel_group, outputs_here, share_from_output_ranks
from lightning_scale.strategies.base import MeshStrategy
from lightning_scale.strategies.parallel3d import Parallel3DStrategy
from lightning_scale.strategies.pipeline import PipelineStrategy
from lightning_scale.strategies.registry import PRESETS, register_strategies
from lightning_scale.strategies.tensor_parallel import TensorParallelStrategy
from lightning_scale.strategies.zero import ZeroStrategy

register_strategies()

__all__ = [
    "MeshStrategy",
    "Parallel3DStrategy",
    "PipelineStrategy",
    "TensorParallelStrategy",
    "ZeroStrategy",
    "PipelineOutput",
    "outputs_here",
    "data_parallel_group",
    "share_from_output_ranks",
    "PRESETS",
]
