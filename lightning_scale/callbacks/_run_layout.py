"""Bridge from a running Trainer to the memory planner: what the planner predicts for this rank.

Reads the layout from the suite's strategies (``ddp``, :class:`ZeroStrategy`,
:class:`TensorParallelStrategy`, :class:`PipelineStrategy` / :class:`Parallel3DStrategy`), the
model shape from a :class:`~lightning_scale.models.GPT`, :class:`~lightning_scale.models.ViT` or
:class:`~lightning_scale.models.ResNet` (``pl_module.model``), the batch shape from the training
batch ((B, T) token ids; (B, C, S, S) square images) and the precision from the Trainer.
Anything else (other models, non-square images, optimizers other than Adam/AdamW/SGD) gives
None: no guess.
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
        if s.zero.implementation != "native":
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
        if s.tp_plan is not None or s.shard_vocab:
            return None
        fields.update(tp=dims.tp, sequence_parallel=s.sequence_parallel)
        return fields, dims.dp
    if isinstance(s, MeshStrategy):  # plain data parallelism (e.g. "ddp_ac"): one all-reduce, no DDP buckets
        if dims.pp != 1 or dims.tp != 1:
            return None
        fields.update(ddp_buckets=False)
        return fields, dims.dp
    # Exact types: subclasses (DeepSpeed, fairscale wrappers, ...) shard or offload differently.
    if type(s) is DDPStrategy:
        return fields, world_size
    if type(s) is SingleDeviceStrategy:
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


def _dp_rank(trainer: Any) -> int:
    """This rank's data-parallel coordinate (ZeRO-3's optimizer shards depend on it)."""
    from lightning_scale.strategies import MeshStrategy

    if isinstance(trainer.strategy, MeshStrategy):
        return trainer.strategy.coordinate("dp")
    return trainer.global_rank  # Lightning's ddp / single device: every rank is a data-parallel rank


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


def _optimizer_impl(trainer: Any, pl_module: Any) -> str:
    """torch's implementation of the run's optimizer: ``fused`` / ``foreach`` when asked for, else
    torch's default for the device (foreach on CUDA, a for-loop on CPU)."""
    opt = trainer.optimizers[0]
    opt = getattr(opt, "optim", opt)
    if opt.defaults.get("fused"):
        return "fused"
    foreach = opt.defaults.get("foreach")
    if foreach is None:
        from lightning_scale.core import device as dev

        foreach = dev.is_cuda(getattr(pl_module, "device", None))  # where the LightningModule's tensors are
    return "foreach" if foreach else "for-loop"


def _model_and_shape(network: Any, batch: Any) -> tuple[Any, dict[str, int]] | None:
    """(ModelSpec, {"b", "seq_len", "image_size"}) of a suite model and its training batch, or None."""
    from lightning_scale.core.planner import ModelSpec
    from lightning_scale.models import GPT, GPTConfig, ResNet, ResNetConfig, ViT, ViTConfig

    config = getattr(network, "config", None)
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not torch.is_tensor(first):
        return None
    if isinstance(network, GPT) and isinstance(config, GPTConfig):
        if first.dim() != 2:
            return None
        b, s = first.shape  # this rank's batch: (B, T) token ids
        return ModelSpec.from_gpt(config), {"b": b, "seq_len": s, "image_size": None}
    if isinstance(network, (ViT, ResNet)) and isinstance(config, (ViTConfig, ResNetConfig)):
        if first.dim() != 4 or first.shape[2] != first.shape[3]:
            return None
        b, _, side, _ = first.shape  # this rank's batch: (B, C, S, S) images
        if isinstance(config, ViTConfig):
            return ModelSpec.from_vit(config), {"b": b, "seq_len": config.seq_len, "image_size": side}
        return ModelSpec.from_resnet(config), {"b": b, "seq_len": 1, "image_size": side}
    return None


def plan_inputs(trainer: Any, pl_module: Any, batch: Any) -> tuple[Any, Any, Any, int] | None:
    """(ModelSpec, Workload, Layout, pipeline rank) of this run, or None when the planner does not
    model it (see the module docstring)."""
    from lightning_scale.core.planner import Layout, Workload

    found = _model_and_shape(getattr(pl_module, "model", None), batch)
    if found is None:
        return None
    model, shape = found
    layout = _layout(trainer)
    optimizer = _optimizer_name(trainer)
    if layout is None or optimizer is None:
        return None
    fields, dp, pp_rank = layout
    workload = Workload(batch_size=shape["b"] * dp, seq_len=shape["seq_len"], precision=str(trainer.precision),
                        optimizer=optimizer, image_size=shape["image_size"], optimizer_impl=_optimizer_impl(trainer, pl_module))
    return model, workload, Layout(**fields), pp_rank


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
    dp_rank = _dp_rank(trainer)
    rank = plan_memory(model, workload, layout, hardware, dp_rank=dp_rank).ranks[pp_rank]
    # Device and host together: the callback's counts include offloaded (CPU) tensors.
    out = {c: getattr(rank, c) + rank.host_by.get(c, 0) for c in ("params", "grads", "optimizer", "activations")}
    out["ddp_buckets"] = rank.detail.get("DDP gradient buckets", 0)  # torch DDP's flat gradient copy
    return out
