"""Register the suite's strategies with Lightning's StrategyRegistry (on import of lightning_scale).

Names do not clash with Lightning's own (``ddp``, ``fsdp``, ``deepspeed``, ...).
"""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

from lightning_scale.strategies.base import MeshStrategy
from lightning_scale.strategies.parallel3d import Parallel3DStrategy
from lightning_scale.strategies.pipeline import PipelineStrategy
from lightning_scale.strategies.tensor_parallel import TensorParallelStrategy
from lightning_scale.strategies.zero import ZeroStrategy

#: name -> (class, description, init params)
PRESETS: dict[str, tuple[type, str, dict]] = {
    # Plain data parallelism (gradients all-reduced once per optimizer step, like DDP) with
    # activation checkpointing; also the way to get it on one device (devices=1).
    "ddp_ac": (MeshStrategy, "Data parallel with full activation checkpointing", {"activation_checkpointing": "full"}),
    "ddp_ac_selective": (
        MeshStrategy,
        "Data parallel with selective (op-level) activation checkpointing",
        {"activation_checkpointing": "selective"},
    ),
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
    "zero1": (ZeroStrategy, "ZeRO-1: optimizer state sharded over data-parallel ranks", {"stage": 1}),
    "zero1_offload": (ZeroStrategy, "ZeRO-1, optimizer state and step on CPU", {"stage": 1, "offload_optimizer": True}),
    "zero2": (ZeroStrategy, "ZeRO-2: optimizer state and gradients sharded", {"stage": 2}),
    "zero2_offload": (ZeroStrategy, "ZeRO-2, optimizer state and step on CPU", {"stage": 2, "offload_optimizer": True}),
    "zero3": (ZeroStrategy, "ZeRO-3 (FSDP2): parameters, gradients and optimizer state sharded", {"stage": 3}),
    "zero3_offload": (
        ZeroStrategy,
        "ZeRO-3 (FSDP2) with sharded parameters, gradients and optimizer step on CPU",
        {"stage": 3, "offload_params": True},
    ),
}


def register_strategies() -> None:
    for name, (cls, description, params) in PRESETS.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **params)
