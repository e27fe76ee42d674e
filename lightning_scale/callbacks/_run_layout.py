"""Bridge from a running Trainer to the memory planner: what the planner predicts for this rank.

Reads the layout from the suite's strategies (``ddp``, :class:`ZeroStrategy`,
:class:`TensorParallelStrategy`, :class:`PipelineStrategy` / :class:`Parallel3DStrategy`), the
model shape from a :class:`~lightning_scale.models.GPT` (``pl_module.model``), the batch shape
from the training batch ((B, T) token ids) and the precision from the Trainer. Anything else
(other models, optimizers other than Adam/AdamW/SGD) gives None: no guess.
"""

from __future__ import annotations

from typing import Any

import torch


def layout_of(strategy: Any, world_size: int) -> tuple[dict[str, Any], int] | None:
    """(Layout fields, data-parallel size) of ``strategy`` on ``world_size`` devices, or None for a
    strategy (or option) the planner does not model. Works before the strategy is set up."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from lightning_scale.core.activation_model import SCHEDULES
    from lightning_scale.strategies import MeshStrategy, PipelineStrategy, TensorParallelStrategy, ZeroStrategy

    s = strategy
    fields: dict[str, Any] = {}
    ac = getattr(s, "activation_checkpointing", None)
    if ac is not None:
        if ac.policy not in ("none", "full", "selective", "every_k") or ac.offload:
            return None
        fields.update(ac=ac.policy, ac_every=ac.every)
    if isinstance(s, MeshStrategy):
        dims = s.resolved_dims or s.dims.resolve(world_size)
    if isinstance(s, ZeroStrategy):
        if s.zero.backend != "native":
            return None
        fields.update(zero_stage=s.zero.stage, offload=s.zero.offload_optimizer or s.zero.offload_params,
                      bucket_mb=s.zero.bucket_mb, ddp_buckets=False)
        return fields, dims.dp
    if isinstance(s, PipelineStrategy):
        cfg = s.pipeline_config
        if cfg.split_points is not None or cfg.balance != "params" or cfg.schedule not in SCHEDULES:
            return None
        fields.update(pp=dims.pp, tp=dims.tp, schedule=cfg.schedule, microbatches=cfg.resolved_microbatches,
                      virtual_stages=cfg.num_virtual, zero_stage=s.zero_stage,
                      sequence_parallel=bool(getattr(s, "sequence_parallel", False)))
        return fields, dims.dp
    if isinstance(s, TensorParallelStrategy):
        if s.plan is not None or s.shard_vocab:
            return None
        fields.update(tp=dims.tp, sequence_parallel=s.sequence_parallel)
        return fields, dims.dp
    if isinstance(s, MeshStrategy):  # plain data parallelism (e.g. "ddp_ac"): one all-reduce, no DDP buckets
        if dims.pp != 1 or dims.tp != 1:
            return None
        fields.update(ddp_buckets=False)
        return fields, dims.dp
    if isinstance(s, DDPStrategy):
        return fields, world_size
    if isinstance(s, SingleDeviceStrategy):
        fields.update(ddp_buckets=False)
        return fields, 1
    return None


def _layout(trainer: Any) -> tuple[dict[str, Any], int, int] | None:
    """(Layout fields, data-parallel size, this rank's pipeline rank) of a running Trainer."""
    from lightning_scale.strategies import PipelineStrategy

    found = layout_of(trainer.strategy, trainer.world_size)
    if found is None:
        return None
    pp_rank = trainer.strategy.coordinate("pp") if isinstance(trainer.strategy, PipelineStrategy) else 0
    return (*found, pp_rank)


def _optimizer_name(trainer: Any) -> str | None:
    if len(trainer.optimizers) != 1:
        return None
    opt = trainer.optimizers[0]
    opt = getattr(opt, "optim", opt)
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return "adamw"
    if isinstance(opt, torch.optim.SGD):
        return "sgd_momentum" if opt.defaults.get("momentum", 0) else "sgd"
    return None


def plan_inputs(trainer: Any, pl_module: Any, batch: Any) -> tuple[Any, Any, Any, int] | None:
    """(ModelSpec, Workload, Layout, pipeline rank) of this run, or None when the planner does not
    model it (see the module docstring)."""
    from lightning_scale.core.planner import Layout, ModelSpec, Workload
    from lightning_scale.models.gpt import GPT, GPTConfig

    network = getattr(pl_module, "model", None)
    config = getattr(network, "config", None)
    if not isinstance(network, GPT) or not isinstance(config, GPTConfig):
        return None
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not torch.is_tensor(tokens) or tokens.dim() != 2:
        return None
    layout = _layout(trainer)
    optimizer = _optimizer_name(trainer)
    if layout is None or optimizer is None:
        return None
    fields, dp, pp_rank = layout
    b, s = tokens.shape  # this rank's batch: (B, T)
    workload = Workload(batch_size=b * dp, seq_len=s, precision=str(trainer.precision), optimizer=optimizer)
    return ModelSpec.from_gpt(config), workload, Layout(**fields), pp_rank


def predict_run(trainer: Any, pl_module: Any, batch: Any) -> dict[str, int] | None:
    """Planner prediction for this rank, in bytes: ``{"params", "grads", "optimizer", "activations",
    "ddp_buckets"}`` (device and host together), or None when the run's model or layout is not one
    the planner models."""
    from lightning_scale.core.planner import Hardware, plan_memory

    inputs = plan_inputs(trainer, pl_module, batch)
    if inputs is None:
        return None
    model, workload, layout, pp_rank = inputs
    hardware = Hardware(gpus=trainer.world_size, memory_gb=1.0)  # capacity is irrelevant here
    rank = plan_memory(model, workload, layout, hardware).ranks[pp_rank]
    # Device and host together: the callback's counts include offloaded (CPU) tensors.
    out = {c: getattr(rank, c) + rank.host_by.get(c, 0) for c in ("params", "grads", "optimizer", "activations")}
    out["ddp_buckets"] = rank.detail.get("DDP gradient buckets", 0)  # torch DDP's flat gradient copy
    return out
