"""``Parallel3DStrategy``: pipeline x tensor x data parallelism on one ``("pp", "dp", "tp")`` mesh.

Order of application (the design guide's): pipeline split (each rank keeps a view of its
stages) -> tensor parallelism on that view over the ``tp`` sub-mesh -> (activation
checkpointing, later) -> data parallelism over ``dp`` (gradient averaging at the optimizer step).
``pp x dp x tp`` must equal the world size; ``data_parallel_size=-1`` takes the rest.

Mesh layout: tp innermost (adjacent ranks share layers), pp outermost. With 8 ranks and
pp=2, dp=2, tp=2: ranks 0-3 hold stage 0 (dp replica 0: ranks 0,1; replica 1: ranks 2,3), ranks
4-7 stage 1. Pipeline p2p runs between ranks with equal (dp, tp) coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_scale.core.mesh import ParallelDims
from lightning_scale.strategies.options import check_sequence_parallel_plan, check_bool, check_tp_plan
from lightning_scale.strategies.pipeline import PipelineStrategy
from lightning_scale.strategies.tensor_parallel import parallelize_network, relative_plan


def check_stage_masks(network: nn.Module, sequence_parallel: bool, pp: int) -> None:
    """Sequence parallelism between pipeline stages of a Hugging Face model needs attention that
    builds no mask from the stage's input: a stage after the first receives its sequence shard
    (B, T/t, D), so a shipped stage forward would build a (T/t, T/t) mask for an attention that
    runs over all T tokens (it gathers them first). Under SDPA the causal mask is the kernel's flag
    (no mask tensor); eager attention would raise on stage 0 and leave the other stages waiting.
    Raised at setup, on every rank alike (the same config everywhere)."""
    from lightning_scale.adapters.huggingface import is_hugging_face

    if not (sequence_parallel and pp > 1 and is_hugging_face(network)):
        return
    implementation = getattr(network.config, "_attn_implementation", None)
    if implementation != "sdpa":
        raise ValueError(
            f"Parallel3DStrategy(sequence_parallel=True) with {pp} pipeline stages runs {type(network).__name__}'s "
            f"attention on sequence shards between stages, which needs attn_implementation='sdpa' (the model uses "
            f"{implementation!r}): build the model with attn_implementation='sdpa', or use sequence_parallel=False"
        )


class Parallel3DStrategy(PipelineStrategy):
    """Pipeline (``pipeline_parallel_size`` stages) x tensor (``tensor_parallel_size``) x data parallelism.

    Takes every option of :class:`PipelineStrategy` (schedule, microbatches, split, ...) plus:

    Args:
        pipeline_parallel_size: pipeline ranks (stages) per replica.
        tensor_parallel_size: ranks sharing each layer.
        data_parallel_size: replicas; -1 = world size / (pp x tp).
        sequence_parallel: shard LayerNorm/dropout activations on the sequence dim (TP only).
        tp_plan: ``{pattern: ParallelStyle}``, paths relative to the network or the LightningModule;
            default: the built-in plan for the suite's GPT/ViT.
    """

    strategy_name = "parallel_3d"

    def __init__(
        self,
        pipeline_parallel_size: int = 2,
        tensor_parallel_size: int = 2,
        data_parallel_size: int = -1,
        sequence_parallel: bool = False,
        tp_plan: Mapping[str, ParallelStyle] | None = None,
        **pipeline_kwargs: Any,
    ) -> None:
        check_bool(type(self).__name__, "sequence_parallel", sequence_parallel)
        check_tp_plan(type(self).__name__, "tp_plan", tp_plan)
        check_sequence_parallel_plan(type(self).__name__, sequence_parallel, tp_plan)
        pipeline_kwargs.setdefault("schedule", "1f1b")
        super().__init__(stages=pipeline_parallel_size, **pipeline_kwargs)
        self.dims = ParallelDims(pp=pipeline_parallel_size, dp=data_parallel_size, tp=tensor_parallel_size)
        self.sequence_parallel = sequence_parallel
        self.tp_plan = dict(tp_plan) if tp_plan is not None else None

    def apply_tensor_parallel(self, local_network: nn.Module) -> None:
        """Tensor parallelism on this rank's pipeline stage(s): the stage modules share every leaf
        module with ``local_network``, so they run what this does."""
        assert self.resolved_dims is not None
        if self.resolved_dims.tp == 1:
            return
        check_stage_masks(local_network, self.sequence_parallel, self.resolved_dims.pp)
        user_plan = relative_plan(self.tp_plan, None if self.network_is_module else self.module_name, local_network)
        parallelize_network(local_network, self.device_mesh["tp"], user_plan, self.sequence_parallel,
                            src_data_rank=None if self.deferring else 0)
        dims = self.resolved_dims
        rank_zero_info(f"Parallel3DStrategy: mesh pp x dp x tp = {dims.pp} x {dims.dp} x {dims.tp}")
