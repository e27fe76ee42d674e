"""ZeRO-3 on FSDP2 (``torch.distributed.fsdp.fully_shard``): which modules become sharding units,
and where their parameters live. Torch only.

Each repeated block (found by :class:`lightning_scale.core.blocks.BlockFinder`) is one unit: its
parameters are all-gathered just before its forward and backward and freed after, and its
gradients reduce-scattered once per step. The roots (the network, or a pipeline rank's stage
modules) hold the remaining parameters (embeddings, final norm, head) as one more unit. ZeRO
stages 1 and 2 are in :mod:`lightning_scale.core.sharding`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_scale.core import device as dev


def fully_shard_blocks(blocks: Sequence[nn.Module], roots: Sequence[nn.Module], mesh: Any,
                       offload_params: bool = False) -> int:
    """ZeRO-3 with FSDP2: ``fully_shard`` each of ``blocks`` (found by
    :class:`lightning_scale.core.blocks.BlockFinder`) on ``mesh``, then each of ``roots`` (the
    module(s) whose forward runs the blocks: the network, or a pipeline rank's stage modules),
    which hold the remaining parameters. Returns the block count.

    ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (sharded parameters, gradients and the
    optimizer step on CPU); pinned memory when the mesh is on CUDA (pinning needs an accelerator)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=dev.pin_host_memory(mesh.device_type)) if offload_params else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    for root in roots:
        fully_shard(root, mesh=mesh, offload_policy=policy)
    return len(blocks)
