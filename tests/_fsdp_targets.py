"""Rank functions of ``tests/test_fsdp.py`` (run by ``lightning_scale.testing``)."""

from __future__ import annotations

import torch
from torch import nn


def policy_and_resharding(precision: str, reshard_after_forward: bool) -> dict:
    """Two linear blocks sharded by fully_shard_blocks on 2 ranks: the dtype a block computes
    with, whether its parameters stay gathered after forward, and the dtypes the optimizer sees."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_scale.core.fsdp import fully_shard_blocks, mixed_precision_policy

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fully_shard_blocks(list(net), [net], mesh, mp_policy=mixed_precision_policy(precision),
                       reshard_after_forward=reshard_after_forward)
    seen = {}

    def record(module: nn.Module, args: tuple) -> None:  # runs after FSDP2's own pre-hook (the all-gather)
        seen.setdefault("compute_dtype", str(module.weight.dtype))

    net[0].register_forward_pre_hook(record)
    out = net(torch.randn(4, 8))
    gathered_after_forward = not isinstance(net[0].weight, DTensor)
    out.float().sum().backward()
    return {"compute_dtype": seen["compute_dtype"], "gathered_after_forward": gathered_after_forward,
            "param_dtypes": sorted({str(p.dtype) for p in net.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in net.parameters()})}
