"""Measuring activation memory: the bytes a forward leaves behind for the backward. Torch only.

Three meters. The first two are exact on any device and need no allocator statistics, so they
work on CPU; the third reads the allocator's events:

* :class:`SavedTensorMeter` counts what autograd saves through ``saved_tensors_hooks`` during a
  forward (``torch.autograd.graph``), by device, each storage once, parameters excluded. It sees
  what plain autograd and full (non-reentrant) checkpointing save. It does not see tensors kept
  by mechanisms that install their own hooks or caches inside the forward (a checkpointed
  block's internals; selective checkpointing's cache; ``save_on_cpu`` nested inside it).
* :class:`HeldActivationMeter` records every storage the forward's ops create (a
  ``TorchDispatchMode``) and, after the forward, counts those still alive: whatever keeps them
  (autograd, a checkpoint's inputs, a selective-checkpoint cache, CPU copies of offloaded
  tensors). Minus the outputs the caller names, that is the activation memory of the step.
* :class:`AllocationMeter` reads the allocator's own events (``torch.profiler`` with
  ``profile_memory=True``): the bytes allocated inside the block and not freed by its end. It
  also sees compiled code, which the other two do not: Inductor's kernels allocate outside the
  dispatcher, and Dynamo runs a frame eagerly while a ``TorchDispatchMode`` is active, so
  :class:`HeldActivationMeter` measures a compiled block's eager twin.

The first two take the tensors to leave out (parameters, buffers, inputs); DTensors are counted
by their local shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_scale.core import device as dev


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _storage_key(t: torch.Tensor) -> int:
    return _local(t).untyped_storage()._cdata


def _exclusions(tensors: Iterable[Any]) -> set[int]:
    keys = set()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            keys.add(_storage_key(t))
    return keys


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: bytes saved for backward during the block it wraps, ``{device type: bytes}``.

    Args:
        exclude: tensors not to count (typically ``module.parameters()``: matmuls save weights).
    """

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        self._skip = _exclusions(exclude)
        self._seen: dict[int, tuple[str, int]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            local = _local(t)
            key = _storage_key(t)
            if key not in self._skip and key not in self._seen:
                self._seen[key] = (local.device.type, local.untyped_storage().nbytes())
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> SavedTensorMeter:
        super().__enter__()
        return self

    @property
    def bytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for device, nbytes in self._seen.values():
            out[device] = out.get(device, 0) + nbytes
        return out

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())


class HeldActivationMeter(TorchDispatchMode):
    """Context manager around a forward: after it, :meth:`held` = bytes of the storages created by
    the forward that are still alive, ``{device type: bytes}``.

    Args:
        exclude: tensors whose storage is not an activation (parameters, buffers, the batch).
    """

    count_meta = False  # meta tensors have no bytes on a device; MetaHeldMeter counts them (planning)

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        super().__init__()
        self._skip = _exclusions(exclude)
        self._created: dict[int, tuple[StorageWeakRef, str, int]] = {}
        self._stance: Any = None

    def __enter__(self) -> HeldActivationMeter:
        # Dynamo does not trace under a dispatch mode: a compiled module runs eagerly inside the
        # meter (so the meter sees the eager execution of the same code). Left to Dynamo, torch
        # 2.13 then keeps that code eager for good, also after the meter (pytorch/pytorch#190286,
        # fixed after 2.13); asking for eager explicitly leaves the compiled code in place.
        self._stance = torch.compiler.set_stance("force_eager")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._stance.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (self.count_meta or t.device.type != "meta"):
                local = _local(t)
                storage = local.untyped_storage()
                key = storage._cdata
                if key in self._skip:
                    continue
                known = self._created.get(key)
                if known is None or known[0].expired():
                    self._created[key] = (StorageWeakRef(storage), local.device.type, storage.nbytes())
        return out

    def held(self, exclude: Iterable[Any] = (), settle: float = 0.0) -> dict[str, int]:
        """Bytes still alive, by device, leaving out ``exclude`` (e.g. the loss or the logits).

        ``settle`` (seconds): when > 0, read again every 10 ms until three reads in a row agree
        (or ``settle`` has passed). Meant for reads right after collectives:
        a gloo worker thread drops its reference to a finished collective's buffers a moment after
        the caller has been woken, so for that moment they still count. Seen once, in CI: three
        16 KiB sequence-parallel buffers too many on one TP rank; not reproduced in 34 local runs
        (with and without CPU contention, with and without the garbage collector), so the worker
        thread is the likely holder, not a proven one.
        """
        if settle <= 0:
            return self._held_now(exclude)
        import time

        deadline = time.monotonic() + settle
        reads = [self._held_now(exclude)]
        while time.monotonic() < deadline and not (len(reads) >= 3 and reads[-1] == reads[-2] == reads[-3]):
            time.sleep(0.01)
            reads.append(self._held_now(exclude))
        return reads[-1]

    def _held_now(self, exclude: Iterable[Any]) -> dict[str, int]:
        skip = _exclusions(tree_leaves(list(exclude)))
        out: dict[str, int] = {}
        for key, (ref, device, nbytes) in self._created.items():
            if key in skip or ref.expired():
                continue
            out[device] = out.get(device, 0) + nbytes
        return out


class AllocationMeter:
    """Context manager: net bytes allocated inside the block, ``{device type: bytes}``, from
    ``torch.profiler``'s memory events (every allocation and free of the CPU and, when ``device``
    (the run's root device) is CUDA, the CUDA caching allocator).

    Net means allocations minus frees in the block: what the block's results and whatever keeps
    them (autograd's saved tensors, a checkpoint's cache) still hold when it ends, minus any older
    storage it freed. Around a training forward that is the activations plus the outputs (subtract
    those yourself). It counts eager and compiled code alike. The profiler adds time of its own, so
    do not time a step inside it.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device  # the run's root device: CUDA events are recorded only for a CUDA run
        self.bytes_by_device: dict[str, int] = {}
        self._profile = None

    def __enter__(self) -> AllocationMeter:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.is_cuda(self.device) else [])
        self._profile = profile(activities=activities, profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._profile is not None
        self._profile.__exit__(*exc)
        # Per-op self figures partition the events: top-level allocations (outside any op) are
        # reported under the "[memory]" key, so the sum over all keys is the net total.
        averages = self._profile.key_averages()
        out = {"cpu": sum(e.self_cpu_memory_usage for e in averages)}
        if dev.is_cuda(self.device):
            out["cuda"] = sum(e.self_device_memory_usage for e in averages)
        self.bytes_by_device = out
        self._profile = None

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())
