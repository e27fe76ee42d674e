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


def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a Lightning precision, as torchtitan configures it:
    ``"bf16-mixed"`` (``"16-mixed"``): parameters all-gathered and computed in bf16 (fp16), so the
    all-gathers move half the bytes of fp32; gradients reduce-scattered in fp32; the sharded fp32
    parameters stay what the optimizer steps. None for fp32 and for ``*-true`` (the parameters
    themselves are 16-bit there: nothing to cast)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low is not None else None


def fully_shard_blocks(blocks: Sequence[nn.Module], roots: Sequence[nn.Module], mesh: Any,
                       offload_params: bool = False, mp_policy: Any = None,
                       reshard_after_forward: bool = True) -> int:
    """ZeRO-3 with FSDP2: ``fully_shard`` each of ``blocks`` (found by
    :class:`lightning_scale.core.blocks.BlockFinder`) on ``mesh``, then each of ``roots`` (the
    module(s) whose forward runs the blocks: the network, or a pipeline rank's stage modules),
    which hold the remaining parameters. Returns the block count.

    ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (sharded parameters, gradients and the
    optimizer step on CPU); pinned memory when the mesh is on CUDA (pinning needs an accelerator).
    ``mp_policy``: :func:`mixed_precision_policy` (None: fp32 all the way).
    ``reshard_after_forward=False`` keeps each block's gathered parameters from its forward to its
    backward: under a pipeline schedule that runs several microbatches' forwards before their
    backwards, resharding would all-gather each block again for every microbatch."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=dev.pin_host_memory(mesh.device_type)) if offload_params else OffloadPolicy()
    options = dict(mesh=mesh, offload_policy=policy, mp_policy=mp_policy or MixedPrecisionPolicy(),
                   reshard_after_forward=reshard_after_forward)
    for block in blocks:
        fully_shard(block, **options)
    for root in roots:
        fully_shard(root, **options)
    return len(blocks)
