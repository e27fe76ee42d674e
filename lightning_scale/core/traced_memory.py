"""Traced memory of one rank's training step: the real model, on fake tensors, under a fake
process group of the target world size, measured by torch's ``MemTracker``. Torch only.

The closed forms of :mod:`lightning_scale.core.planner` are exact for the suite's GPT and can be
far off for anything else (a SwiGLU MLP, an RMSNorm computed in fp32, eager attention, a
``foreach`` optimizer's temporaries). Here nothing is modelled: the user's module is built under
``FakeTensorMode`` (shapes, dtypes and storages, no data, no memory), parallelized by the code
that parallelizes it in a run (the caller passes it in; the strategies' own ``parallelize``,
see :mod:`lightning_scale.strategies.offline`), and one process plays one rank of the target
world through torch's fake process group (``torch.testing._internal.distributed.fake_pg``:
collectives return at once, shapes as on a real group). Two optimizer steps of forward,
backward and ``optimizer.step`` run under ``torch.distributed._tools.mem_tracker.MemTracker``,
which counts every storage alive, by kind (parameters, buffers, gradients, activations,
temporaries, optimizer states), and keeps the peak. The second step is the one reported: the
optimizer states exist through all of it, as in every step of a run.

Units: bytes of tensor storage. Not counted (state it next to the figure): the CUDA context,
the caching allocator's rounding and fragmentation, communication buffers inside NCCL, and
what a kernel allocates that is not a tensor (cuBLAS workspaces). :mod:`.planner` keeps a
per-device reserve for them.

Mixed precision (``bf16-mixed``, ``16-mixed``) is CUDA autocast, emulated on the fake CPU
tensors by :class:`~lightning_scale.core.meta_activations.CudaAutocastEmulation` (CPU autocast
casts another list of ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["TraceError", "TracedMemory", "fake_process_group", "fake_tensors", "trace_step"]

#: MemTracker's reference kinds -> the planner's names.
_KINDS = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Activation": "activations",
          "Temp": "temporaries", "Optstate": "optimizer", "Other": "other"}


class TraceError(RuntimeError):
    """The model could not be traced (built on fake tensors, parallelized under a fake process
    group, or stepped); the message names the module and the fallback."""


@dataclass
class TracedMemory:
    """One rank's tensor bytes in the traced step.

    ``peak``: the largest total seen; ``parts``: its parts at that moment (params, buffers,
    grads, activations, temporaries, optimizer, other; MemTracker files what the optimizer step
    allocates, its temporaries included, under optimizer); ``phase``: where it happened
    (``"forward"``, ``"backward"``, ``"optimizer step"``); ``phase_peaks``: the peak of each
    phase; ``after_step``: bytes alive between steps (model states and buffers)."""

    peak: int
    parts: dict[str, int]
    phase: str
    phase_peaks: dict[str, int] = field(default_factory=dict)
    after_step: int = 0
    rank: int = 0
    world_size: int = 1
    source: str = "traced"


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """The default process group, for ``world_size`` ranks, as rank ``rank``, faked (no other
    process, no communication: collectives return at once with the shapes a real group gives)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise TraceError("tracing needs its own process: torch.distributed is already initialized here (a traced "
                         "plan runs one rank of the target world under a fake process group)")
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_tensors() -> Any:
    """A ``FakeTensorMode``: tensors made inside have shapes, dtypes and storages, no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def trace_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Callable[[], Any],
               loss: Callable[[nn.Module, Any], torch.Tensor], precision: str = "32-true", steps: int = 2,
               rank: int = 0, world_size: int = 1) -> TracedMemory:
    """Run ``steps`` training steps (``loss(model, batch()).backward(); optimizer.step();
    optimizer.zero_grad()``) of the already built and parallelized ``model`` (its tensors fake)
    under ``MemTracker`` (inside the caller's ``FakeTensorMode``) and return the last step's
    :class:`TracedMemory`. ``precision``: ``*-mixed`` runs the forward under emulated CUDA
    autocast."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lightning_scale.core.meta_activations import CudaAutocastEmulation, compute_dtype

    param_dtype, low = compute_dtype(precision)  # the parameters' dtype; the autocast dtype of *-mixed
    true_dtype = param_dtype if param_dtype != torch.float32 else None
    phase_peaks: dict[str, int] = {}  # phase -> its own peak (bytes)
    part_snapshots: dict[str, Any] = {}  # phase -> MemTracker's snapshot at that peak
    autocast = (lambda: CudaAutocastEmulation(low)) if low is not None else contextlib.nullcontext

    def one_step(tracker: Any = None) -> None:
        inputs = batch()  # alive to the end of the step, as the batch of a Lightning step is
        if true_dtype is not None:  # *-true: Lightning casts the batch's floating tensors too
            inputs = tree_map(lambda t: t.to(true_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                              else t, inputs)
        with autocast():
            out = loss(model, inputs)
        if tracker is not None:
            phase_peaks["forward"] = _peak(tracker)
            part_snapshots["forward"] = tracker.get_tracker_snapshot("peak")
            _restart_peak(tracker)
        with autocast():  # activation checkpointing recomputes the forward in here: cast as the forward did
            out.backward()
        del out
        if tracker is not None:
            phase_peaks["backward"] = _peak(tracker)
            part_snapshots["backward"] = tracker.get_tracker_snapshot("peak")
            _restart_peak(tracker)
        optimizer.step()
        if tracker is not None:
            phase_peaks["optimizer step"] = _peak(tracker)
            part_snapshots["optimizer step"] = tracker.get_tracker_snapshot("peak")
        optimizer.zero_grad(set_to_none=True)
        del inputs

    for _ in range(steps - 1):  # the first step creates the optimizer states
        one_step()
    tracker = MemTracker()  # a fresh tracker: the reported step's peak only
    tracker.track_external(model, optimizer)
    with tracker:
        one_step(tracker)
        after = sum(dev.get("Total", 0) for dev in tracker.get_tracker_snapshot("current").values())
    peak_phase = max(phase_peaks, key=lambda name: phase_peaks[name])
    parts = {}
    for dev in part_snapshots[peak_phase].values():
        for kind, nbytes in dev.items():
            if kind != "Total":
                parts[_KINDS.get(kind, kind)] = parts.get(_KINDS.get(kind, kind), 0) + nbytes
    return TracedMemory(peak=phase_peaks[peak_phase], parts=parts, phase=peak_phase, phase_peaks=phase_peaks,
                        after_step=after, rank=rank, world_size=world_size)


def _peak(tracker: Any) -> int:
    return sum(dev.get("Total", 0) for dev in tracker.get_tracker_snapshot("peak").values())


def _restart_peak(tracker: Any) -> None:
    """Start ``tracker``'s peak again from what is alive now, so that each phase's own peak is
    read. MemTracker has no public reset of its peak: this sets the two fields its peak update
    compares with (``_peak_mem``, ``_peak_mem_snap``, torch 2.5 to 2.13)."""
    current = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap.get("Total", 0) for dev, snap in current.items()}
    tracker._peak_mem_snap = current
