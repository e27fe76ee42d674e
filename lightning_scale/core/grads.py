"""Gradient collectives shared by the strategies: data-parallel averaging, tied-copy summing and
the global gradient norm over model-parallel ranks. Torch only.

All functions are no-ops for a ``None`` group or a group of one rank, so single-process runs
take the same code path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Group tensors by (dtype, device) into buckets of at most ``bucket_bytes`` (one tensor may exceed it)."""
    out: list[list[torch.Tensor]] = []
    current: dict[tuple, list[torch.Tensor]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        if sizes.get(key, 0) + t.numel() * t.element_size() > bucket_bytes and current.get(key):
            out.append(current.pop(key))
            sizes[key] = 0
        current.setdefault(key, []).append(t)
        sizes[key] = sizes.get(key, 0) + t.numel() * t.element_size()
    out.extend(b for b in current.values() if b)
    return out


def allreduce_gradients(
    params: Iterable[torch.nn.Parameter],
    group: dist.ProcessGroup | None,
    *,
    average: bool = True,
    bucket_bytes: int = 25 * 2**20,
) -> None:
    """All-reduce ``.grad`` of ``params`` over ``group`` in flat buckets (25 MiB default, as DDP).

    ``average=True`` divides by the group size (data parallelism); ``False`` sums (tied copies).
    Parameters without a gradient take part with zeros so every rank sends the same layout.
    """
    n = _group_size(group)
    if n == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(n)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def global_grad_norm(
    params: Iterable[torch.nn.Parameter],
    groups: Sequence[dist.ProcessGroup | None] = (),
    norm_type: float = 2.0,
) -> torch.Tensor:
    """The norm of all gradients of a model split over ranks.

    ``params`` must hold each logical parameter on exactly one rank of the ``groups`` (for
    example pipeline stages, leaving out tied copies on all but one stage). The local
    ``sum |g|^p`` (or max for inf) is reduced over each group in turn.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if math.isinf(norm_type):
        local = torch.stack([g.detach().abs().max().float() for g in grads]).max() if grads else torch.zeros((), device=device)
        for group in groups:
            if _group_size(group) > 1:
                dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return local
    local = (
        torch.stack([g.detach().float().norm(norm_type) ** norm_type for g in grads]).sum()
        if grads
        else torch.zeros((), device=device)
    )
    for group in groups:
        if _group_size(group) > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    return local ** (1.0 / norm_type)


def clip_grad_norm_(
    local_params: Iterable[torch.nn.Parameter],
    norm_params: Iterable[torch.nn.Parameter],
    max_norm: float,
    groups: Sequence[dist.ProcessGroup | None] = (),
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Scale every local gradient so the global norm is at most ``max_norm``; returns the norm.

    ``norm_params`` is the de-duplicated subset used to compute the norm (see
    :func:`global_grad_norm`); ``local_params`` are all gradients to scale on this rank.
    Same coefficient as ``torch.nn.utils.clip_grad_norm_``: ``max_norm / (norm + 1e-6)``, capped at 1.
    """
    total = global_grad_norm(norm_params, groups, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in local_params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
