"""Gradient collectives shared by the strategies: data-parallel averaging, tied-copy summing and
the global gradient norm over model-parallel ranks. Torch only.

All functions are no-ops for a ``None`` group or a group of one rank, so single-process runs
take the same code path.

DTensor gradients (tensor parallelism, :mod:`lightning_scale.core.tensor_parallel`): the
collectives here work on each gradient's local shard (``to_local()``, a view of the same
storage), which is exact for data-parallel averaging, tied-copy summing and clipping (all
linear per element). The norm needs the logical tensor: a sharded gradient contributes its
local shard's ``sum |g|^p`` summed over its mesh, a replicated one is counted once (by the
mesh-coordinate-0 replica), and a ``Partial`` one (e.g. a sequence-parallel LayerNorm weight)
is reduced first. Plain-tensor code paths are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lightning_scale.core import device as dev


def _on_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``t`` on the collective's ``device`` (None: where it is). A norm of offloaded (host)
    gradients is a host scalar; NCCL takes device tensors only."""
    if device is None:
        return t
    out, transfer = dev.to_device(t, device)
    transfer.wait()
    return out


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _local_view(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing its storage); a plain tensor itself."""
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


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
    grads = [_local_view(p.grad) for p in params]  # DTensor grads: their local shards, in place
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
    device: torch.device | None = None,
) -> torch.Tensor:
    """The norm of all gradients of a model split over ranks.

    ``params`` must hold each logical parameter on exactly one rank of the ``groups`` (for
    example pipeline stages, leaving out tied copies on all but one stage). The local
    ``sum |g|^p`` (or max for inf) is reduced over each group in turn.

    With DTensor gradients (tensor parallelism) each DTensor is reduced over its own device mesh
    (see :func:`dtensor_grad_norm_contribution`), and plain-tensor gradients beside them are taken
    as replicated over those meshes (counted once). Do not put the TP group in ``groups``.

    ``device``: the run's root device. The partial norms are reduced there (gradients offloaded
    to the host give host scalars, which an NCCL group does not take), and the norm is returned
    there; also where a rank without gradients makes its zero. None: the gradients' device.
    """
    params = [p for p in params if p.grad is not None]
    if any(isinstance(p.grad, DTensor) for p in params):
        reduce_partial_gradients(params)  # the norm needs the reduced value (no-op without Partial)
    grads = [p.grad for p in params]
    dtensors = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    inf = math.isinf(norm_type)
    if plain:
        if inf:
            local = torch.stack([g.detach().abs().max().float() for g in plain]).max()
        else:
            local = torch.stack([g.detach().float().norm(norm_type) ** norm_type for g in plain]).sum()
    else:
        device_here = dtensors[0].to_local().device if dtensors else (device or dev.HOST)
        local = torch.zeros((), device=device_here)
    local = _on_device(local, device)
    if dtensors:  # each DTensor reduced over its own mesh; plain gradients counted as replicated
        part = _on_device(dtensor_grad_norm_contribution(dtensors, norm_type, device), local.device)
        local = torch.maximum(local, part) if inf else local + part
    for group in groups:
        if _group_size(group) > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    return local if inf else local ** (1.0 / norm_type)


def clip_grad_norm_(
    local_params: Iterable[torch.nn.Parameter],
    norm_params: Iterable[torch.nn.Parameter],
    max_norm: float,
    groups: Sequence[dist.ProcessGroup | None] = (),
    norm_type: float = 2.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Scale every local gradient so the global norm is at most ``max_norm``; returns the norm.

    ``norm_params`` is the de-duplicated subset used to compute the norm (see
    :func:`global_grad_norm`); ``local_params`` are all gradients to scale on this rank.
    Same coefficient as ``torch.nn.utils.clip_grad_norm_``: ``max_norm / (norm + 1e-6)``, capped at 1.
    ``device``: the run's root device (see :func:`global_grad_norm`).
    """
    total = global_grad_norm(norm_params, groups, norm_type, device)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    coefs: dict[tuple, torch.Tensor] = {}  # the coefficient on each gradient device and dtype, copied once
    for p in local_params:
        if p.grad is not None:
            grad = _local_view(p.grad)  # the gradient itself for a plain tensor; a DTensor's shard
            key = (grad.device, grad.dtype)
            if key not in coefs:
                if grad.device == coef.device:
                    coefs[key] = coef.to(grad.dtype)
                else:  # offloaded gradients: the coefficient to the host, landed before it is used
                    host, transfer = dev.to_host(coef, grad.dtype, like=coef.device)
                    transfer.wait()
                    coefs[key] = host
            grad.mul_(coefs[key])
    return total


# --------------------------------------------------------------------------------------------
# DTensor gradients (tensor parallelism)
# --------------------------------------------------------------------------------------------


def _mesh_key(mesh: torch.distributed.device_mesh.DeviceMesh) -> tuple:
    """A rank-independent, sortable identity of a device mesh (same order of collectives everywhere)."""
    return (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), tuple(mesh.mesh_dim_names or ()))


def reduce_partial_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Turn ``Partial`` DTensor gradients into the parameter's placements (an all-reduce each).

    A replicated parameter fed by sequence-sharded activations (a sequence-parallel LayerNorm)
    gets a ``Partial(sum)`` gradient: each rank holds the sum over its sequence shard. The
    optimizer would redistribute it implicitly; the norm must see the reduced value. Call on
    every rank of the mesh with the same parameters (it is a collective per Partial gradient).
    """
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            target = p.placements if isinstance(p, DTensor) else [Replicate()] * g.device_mesh.ndim
            p.grad = g.redistribute(g.device_mesh, target)


def dtensor_grad_norm_contribution(grads: Sequence[DTensor], norm_type: float = 2.0,
                                   device: torch.device | None = None) -> torch.Tensor:
    """``sum |g|^p`` (max |g| for inf) of DTensor gradients over their meshes, as a local fp32 scalar.

    Sharded mesh dimensions are summed (each rank holds a different piece); on a replicated
    dimension only the replica at mesh coordinate 0 contributes, so a replicated tensor is counted
    once, exactly (no division by the replica count). The result is the same on every rank of the
    meshes. ``Partial`` gradients must be reduced first (:func:`reduce_partial_gradients`).
    Collective over every mesh that holds a gradient: call on all of its ranks with the same list.
    ``device``: where the partial sums are reduced (the root device; FSDP2's offloaded gradients
    are host tensors); None: the gradients' device.
    """
    inf = math.isinf(norm_type)
    by_mesh: dict[tuple, list[DTensor]] = {}
    meshes: dict[tuple, torch.distributed.device_mesh.DeviceMesh] = {}
    for g in grads:
        key = _mesh_key(g.device_mesh)
        by_mesh.setdefault(key, []).append(g)
        meshes[key] = g.device_mesh
    total: torch.Tensor | None = None  # on the gradients' device: no host sync per mesh
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    for key in sorted(by_mesh):
        mesh = meshes[key]
        coords = mesh.get_coordinate() or [0] * mesh.ndim
        acc = torch.zeros((), dtype=torch.float32, device=by_mesh[key][0].to_local().device)
        for g in by_mesh[key]:
            if any(pl.is_partial() for pl in g.placements):
                raise ValueError("a DTensor gradient is Partial: call reduce_partial_gradients(params) before the norm")
            local = g.to_local().detach().float()
            if inf:
                if local.numel():
                    acc = torch.maximum(acc, local.abs().max())
            elif not any(pl.is_replicate() and coords[i] != 0 for i, pl in enumerate(g.placements)):
                acc = acc + local.norm(norm_type) ** norm_type  # else another rank counts this replica
        acc = _on_device(acc, device)
        for dim in range(mesh.ndim):  # sum (max) over the whole mesh, one dimension at a time
            if mesh.size(dim) > 1:
                dist.all_reduce(acc, op=op, group=mesh.get_group(dim))
        total = acc if total is None else (torch.maximum(total, acc.to(total.device)) if inf else total + acc.to(total.device))
    return total if total is not None else torch.zeros((), dtype=torch.float32, device=device)
