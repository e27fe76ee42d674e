"""Rank targets of tests/test_gpu_semantics.py (the CPU doubles of GPU behaviour)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lightning_scale.core import device as dev


def audit_host_tensor(gpu_backend: str) -> dict:
    """A host-resident tensor, and a scalar computed from it, sent to an all-reduce of a group whose
    GPU backend is ``gpu_backend``; then the same scalar moved to the device first."""
    dev.set_gpu_backend(gpu_backend)
    host = dev.host_empty(8, torch.float32, "cpu", zero=True)
    host.add_(1.0)
    norm = host.norm()  # derived on the host: host-resident too
    out = {"derived_host": dev.is_host_resident(norm)}
    try:
        dist.all_reduce(norm)
        out["raw"] = "passed"
    except dev.HostTensorCollectiveError as err:
        out["raw"] = str(err)
    moved, transfer = dev.to_device(norm, "cpu")
    transfer.wait()
    dist.all_reduce(moved)  # a device tensor: every backend takes it
    out["moved"] = float(moved)
    out["log"] = [(r["fn"], r["backend"], r["tensors"]) for r in dev.audit_log()]
    return out


def zero_offload_audit(stage: int, nccl_only: bool, ckpt_dir: str) -> dict:
    """ZeRO offload fit with clipping and a checkpoint save. ``nccl_only``: pretend the strategy
    did not ask for the mixed backend (what every CUDA run did before the fix)."""
    import _pipeline_targets as targets
    from lightning_scale.strategies import ZeroStrategy

    if nccl_only:
        ZeroStrategy.communicates_host_tensors = lambda self: False  # type: ignore[method-assign]
    kwargs = dict(zero=True, stage=stage, **({"offload_params": True} if stage == 3 else {"offload_optimizer": True}))
    try:
        targets.fit(kwargs, 2, 4, clip=0.05, ckpt_dir=ckpt_dir)
        error = None
    except dev.HostTensorCollectiveError as err:
        error = str(err)
    log = dev.audit_log()
    return {"error": error, "backend": log[0]["backend"] if log else None, "calls": len(log),
            "host_calls": sum(any(h for _, h in r["tensors"]) for r in log)}


def second_setup_keeps_offloaded_shards() -> dict:
    """ZeRO-3 offload: fit, then validate: the second setup must not move the sharded network
    (on a GPU, ``model.to(cuda)`` would bring the offloaded shards back to the device). A spy on
    the sharded network's ``_apply`` (what ``Module.to`` runs on every submodule) counts moves."""
    import _pipeline_targets as targets
    from lightning_scale.strategies import ZeroStrategy

    moved: list[str] = []
    original_parallelize = ZeroStrategy.parallelize

    def parallelize(self) -> None:
        original_parallelize(self)
        network = self.network()
        if getattr(network, "_spied", False):
            return
        original_apply = network._apply

        def spy(fn, *args, **kwargs):
            moved.append(type(network).__name__)
            return original_apply(fn, *args, **kwargs)

        network._apply = spy  # type: ignore[method-assign]
        network._spied = True

    ZeroStrategy.parallelize = parallelize  # type: ignore[method-assign]
    result = targets.fit(dict(zero=True, stage=3, offload_params=True), 2, 4, validate=True)
    return {"moved": moved, "validated": result["val"] is not None}
