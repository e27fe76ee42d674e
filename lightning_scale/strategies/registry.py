"""Register the suite's strategies with Lightning's StrategyRegistry (on import of lightning_scale).

Names do not clash with Lightning's own (``ddp``, ``fsdp``, ``deepspeed``, ...).
"""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from lightning_scale.strategies.parallel3d import Parallel3DStrategy
from lightning_scale.strategies.pipeline import PipelineStrategy
from lightning_scale.strategies.tensor_parallel import TensorParallelStrategy

#: name -> (class, description, init params)
PRESETS: dict[str, tuple[type, str, dict]] = {
    "pipeline": (PipelineStrategy, "Pipeline parallelism, 2 stages, 1F1B, rest data parallel", {}),
    "pipeline_gpipe": (PipelineStrategy, "Pipeline parallelism, 2 stages, GPipe", {"schedule": "gpipe"}),
    "pipeline_1f1b": (PipelineStrategy, "Pipeline parallelism, 2 stages, 1F1B", {"schedule": "1f1b"}),
    "pipeline_interleaved": (
        PipelineStrategy,
        "Pipeline parallelism, 2 stages x 2 virtual stages, interleaved 1F1B",
        {"schedule": "interleaved_1f1b", "virtual_stages": 2},
    ),
    "tensor_parallel": (TensorParallelStrategy, "Tensor parallelism over 2 ranks (DTensor), rest data parallel", {}),
    "tensor_parallel_sp": (
        TensorParallelStrategy,
        "Tensor + sequence parallelism over 2 ranks (DTensor), rest data parallel",
        {"sequence_parallel": True},
    ),
    "parallel_3d": (Parallel3DStrategy, "Pipeline x tensor x data parallelism (pp=2, tp=2, dp=rest)", {}),
}


def register_strategies() -> None:
    for name, (cls, description, params) in PRESETS.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **params)
