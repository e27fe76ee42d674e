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

__all__ = ["PipelineRank", "TraceError", "TracedMemory", "fake_process_group", "fake_tensors",
           "trace_pipeline_step", "trace_step"]

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
    stage_peaks: list[int] = field(default_factory=list)  # a pipeline: each pipeline rank's peak (bytes)
    phase_parts: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> its parts at its peak
    after_parts: dict[str, int] = field(default_factory=dict)  # the parts of ``after_step``


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
               rank: int = 0, world_size: int = 1, before_step: Callable[[], None] | None = None,
               after_step: Callable[[], None] | None = None) -> TracedMemory:
    """Run ``steps`` training steps (``loss(model, batch()).backward(); optimizer.step();
    optimizer.zero_grad()``) of the already built and parallelized ``model`` (its tensors fake)
    under ``MemTracker`` (inside the caller's ``FakeTensorMode``) and return the last step's
    :class:`TracedMemory`. ``precision``: ``*-mixed`` runs the forward under emulated CUDA
    autocast. ``before_step`` / ``after_step``: what a strategy runs around ``optimizer.step()``
    (ZeRO-1/2: the gradient reduce-scatter, the parameter all-gather), inside the step's phase."""
    autocast, cast_batch = _precision_contexts(precision)

    def body(mark: Callable[[str], None], tracker: Any) -> Any:
        inputs = cast_batch(batch())  # alive to the end of the step, as the batch of a Lightning step is
        with autocast():
            out = loss(model, inputs)
        mark("forward")
        with autocast():  # activation checkpointing recomputes the forward in here: cast as the forward did
            out.backward()
        del out
        mark("backward")
        return inputs  # alive through the optimizer step

    return _traced_steps(body, optimizer, [model], steps, rank, world_size, before_step, after_step)


def _precision_contexts(precision: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(the forward's autocast context factory, the batch cast of ``*-true``) for ``precision``."""
    from lightning_scale.core.meta_activations import CudaAutocastEmulation, compute_dtype

    param_dtype, low = compute_dtype(precision)  # the parameters' dtype; the autocast dtype of *-mixed
    true_dtype = param_dtype if param_dtype != torch.float32 else None
    autocast = (lambda: CudaAutocastEmulation(low)) if low is not None else contextlib.nullcontext

    def cast_batch(inputs: Any) -> Any:
        if true_dtype is None:
            return inputs
        # *-true: Lightning casts the batch's floating tensors too
        return tree_map(lambda t: t.to(true_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                        inputs)

    return autocast, cast_batch


def _traced_steps(body: Callable[[Callable[[str], None], Any], Any], optimizer: torch.optim.Optimizer,
                  external: list[Any], steps: int, rank: int, world_size: int,
                  before_step: Callable[[], None] | None = None,
                  after_step: Callable[[], None] | None = None) -> TracedMemory:
    """``steps`` times: ``body(mark, tracker)`` (forward and backward; ``mark(phase)`` closes a
    phase; ``tracker``: the MemTracker, None on the untracked steps; it returns what stays alive
    to the end of the step: the batch, as in a Lightning step),
    ``optimizer.step()``, ``zero_grad``; the last one under a fresh ``MemTracker`` that also
    counts ``external`` (modules and tensors made before it: parameters, persistent buffers)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    phase_peaks: dict[str, int] = {}  # phase -> its own peak (bytes)
    part_snapshots: dict[str, Any] = {}  # phase -> MemTracker's snapshot at that peak

    def one_step(tracker: Any = None) -> None:
        def mark(phase: str) -> None:
            if tracker is not None:
                phase_peaks[phase] = _peak(tracker)
                part_snapshots[phase] = tracker.get_tracker_snapshot("peak")
                _restart_peak(tracker)

        kept = body(mark, tracker)
        if before_step is not None:
            before_step()
        optimizer.step()
        if after_step is not None:
            after_step()
        mark("optimizer step")
        optimizer.zero_grad(set_to_none=True)
        del kept

    for _ in range(steps - 1):  # the first step creates the optimizer states
        one_step()
    tracker = MemTracker()  # a fresh tracker: the reported step's peak only
    tracker.track_external(*external, optimizer)
    with tracker:
        one_step(tracker)
        current = tracker.get_tracker_snapshot("current")
        after = sum(dev.get("Total", 0) for dev in current.values())
    peak_phase = max(phase_peaks, key=lambda name: phase_peaks[name])
    phase_parts = {phase: _parts(snapshot) for phase, snapshot in part_snapshots.items()}
    return TracedMemory(peak=phase_peaks[peak_phase], parts=phase_parts[peak_phase], phase=peak_phase,
                        phase_peaks=phase_peaks, after_step=after, rank=rank, world_size=world_size,
                        phase_parts=phase_parts, after_parts=_parts(current))


def _parts(snapshot: dict[Any, dict[str, int]]) -> dict[str, int]:
    """MemTracker's snapshot (device -> kind -> bytes) as the planner's kinds summed over devices."""
    parts: dict[str, int] = {}
    for dev in snapshot.values():
        for kind, nbytes in dev.items():
            if kind != "Total":
                parts[_KINDS.get(kind, kind)] = parts.get(_KINDS.get(kind, kind), 0) + nbytes
    return parts


@dataclass
class PipelineRank:
    """One pipeline rank's part of a schedule, as :func:`trace_pipeline_step` runs it.

    ``stages``: stage index -> the module run as that stage (its forward takes what the previous
    stage returns; stage 0 takes the batch's inputs); ``actions``: torch's action list for this
    rank (``schedule.pipeline_order[pp_rank]``: ``F``, ``B``, or ``I`` then ``W`` for the
    zero-bubble schedules; other kinds and ``None`` are skipped); ``inputs``: stage index -> the
    (shape, dtype) of each tensor it receives per microbatch (stages > 0)."""

    stages: dict[int, nn.Module]
    actions: list[Any]
    num_stages: int
    microbatches: int
    inputs: dict[int, list[tuple[tuple[int, ...], torch.dtype]]]
    # ZeRO-3 stages (FSDP2): torch's PipelineStage runs each backward without gradient sync or
    # reshard (unsharded gradients accumulate over the microbatches) and reduces them at
    # REDUCE_GRAD: stage index -> the stage's perform_reduce_grad (None: not FSDP)
    reduce_grad: dict[int, Callable[[], None]] = field(default_factory=dict)


def trace_pipeline_step(rank_plan: PipelineRank, optimizer: torch.optim.Optimizer,
                        batch: Callable[[], tuple[tuple, Any]], loss: Callable[[Any, Any], torch.Tensor],
                        precision: str = "32-true", steps: int = 2, rank: int = 0,
                        world_size: int = 1) -> TracedMemory:
    """One pipeline rank's traced step: the rank's stage modules run its schedule's actions in
    order, microbatch by microbatch, holding what torch's ``PipelineStage`` holds:

    * per microbatch in flight, the stage's output and its autograd graph (the saved
      activations) from its ``F`` to its ``B`` (or ``W``: ``I`` computes the input gradient with
      the graph retained, as torch's zero-bubble stages do);
    * for the whole run, one receive buffer per microbatch for each activation a stage gets from
      another rank, and one per microbatch for each gradient it gets back (torch allocates them
      when the stage first runs and keeps them);
    * the whole batch (stage 0 splits it into views), and on the last stage the loss of each
      microbatch.

    ``batch()``: (the stage-0 inputs, the target) of this rank's batch (rows = microbatches x
    rows per microbatch; split along dim 0 as torch's schedule does); ``loss(output, target)``:
    the last stage's microbatch loss. Sends and receives carry nothing (no peer runs): a received
    tensor is its buffer. Phases: ``"schedule"`` (forward and backward interleaved) and
    ``"optimizer step"``."""
    from torch.distributed.pipelining.schedules import _ComputationType as Kind

    autocast, cast_batch = _precision_contexts(precision)
    m, last = rank_plan.microbatches, rank_plan.num_stages - 1
    local = set(rank_plan.stages)
    # Receive buffers: m per received tensor (activations from stage s - 1, gradients from s + 1).
    act_buffers = {s: [[torch.empty(shape, dtype=dtype) for shape, dtype in rank_plan.inputs[s]] for _ in range(m)]
                   for s in local if s > 0 and s - 1 not in local}
    grad_buffers = {s: [[torch.empty(shape, dtype=dtype) for shape, dtype in rank_plan.inputs[s + 1]]
                        for _ in range(m)] for s in local if s < last and s + 1 not in local}
    persistent = [t for bufs in (*act_buffers.values(), *grad_buffers.values()) for mb in bufs for t in mb]
    modules = list(rank_plan.stages.values())

    def body(mark: Callable[[str], None], tracker: Any) -> Any:
        inputs, target = cast_batch(batch())
        chunks = tuple(x.tensor_split(m) if isinstance(x, torch.Tensor) else [x] * m for x in inputs)
        first_inputs = [tuple(c[i] for c in chunks) for i in range(m)]
        targets = target.tensor_split(m) if isinstance(target, torch.Tensor) else [target] * m
        cache: dict[tuple[int, int], tuple[tuple, tuple]] = {}  # (stage, mb) -> (outputs or loss, inputs)
        same_rank_out: dict[tuple[int, int], tuple] = {}  # outputs handed to the next stage on this rank
        same_rank_grad: dict[tuple[int, int], tuple] = {}  # input gradients handed to the previous stage
        forwards = dict.fromkeys(local, 0)
        losses = []
        reduced: set[int] = set()
        for action in rank_plan.actions:
            if action is None:
                continue
            s, kind = action.stage_index, action.computation_type
            if kind == Kind.REDUCE_GRAD:
                if s in rank_plan.reduce_grad:
                    rank_plan.reduce_grad[s]()
                reduced.add(s)
                continue
            if s in rank_plan.reduce_grad and kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
                module = rank_plan.stages[s]  # as torch's backward_maybe_with_nosync does for an FSDP stage
                module.set_is_last_backward(False)
                module.set_reshard_after_backward(False)
                module.set_requires_gradient_sync(False)
            if kind == Kind.FORWARD:
                mb = forwards[s]  # forwards run in microbatch order on every schedule
                if tracker is not None:
                    # MemTracker's per-module statistics refuse a second forward of a root module
                    # (it takes it for the next iteration): the stage's entry starts again (only
                    # the totals and kinds are read here)
                    tracker.memory_tracking.pop(rank_plan.stages[s], None)
                forwards[s] += 1
                if s == 0:
                    args = first_inputs[mb]
                elif s - 1 in local:
                    args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in same_rank_out.pop((s - 1, mb)))
                else:
                    args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in act_buffers[s][mb])
                with autocast():
                    out = rank_plan.stages[s](*args)
                outs = out if isinstance(out, tuple) else (out,)
                if s == last:
                    with autocast():
                        value = loss(out, targets[mb])
                    losses.append(value.detach())
                    cache[(s, mb)] = ((value, *outs), args)  # torch keeps the output too until the backward
                else:
                    cache[(s, mb)] = (outs, args)
                    if s + 1 in local:
                        same_rank_out[(s, mb)] = outs
            elif kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
                pending = [k for k in cache if k[0] == s]
                mb = action.microbatch_index if (s, action.microbatch_index) in cache else min(k[1] for k in pending)
                outs, args = cache[(s, mb)]
                if s == last:
                    tensors, grads = (outs[0],), None
                elif s + 1 in local:  # kept from I to W
                    grads = same_rank_grad[(s + 1, mb)] if kind == Kind.BACKWARD_INPUT else same_rank_grad.pop((s + 1, mb))
                    tensors = outs
                else:
                    tensors, grads = outs, tuple(grad_buffers[s][mb])
                wants = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
                with autocast():  # recomputation under activation checkpointing casts as the forward did
                    if kind == Kind.BACKWARD_INPUT and wants:
                        # (backward with inputs=, not autograd.grad: MemTracker's module hooks
                        # refuse leaves under autograd.grad)
                        torch.autograd.backward(tensors, grads, inputs=wants, retain_graph=True)
                        got = tuple(a.grad for a in wants)
                        for a in wants:
                            a.grad = None
                        if s - 1 in local:
                            same_rank_grad[(s, mb)] = got
                        del got  # else sent to the previous stage's rank
                        continue  # the graph stays for the weight gradients
                    if kind == Kind.BACKWARD_INPUT:
                        continue  # stage 0: nothing to send; its W runs the backward
                    # B, or W after I: the weight gradients (and, again after I, the input
                    # gradient, an activation-sized transient torch's W does not make; FSDP's
                    # parameters are only in the graph unsharded, so no inputs= restriction)
                    torch.autograd.backward(tensors, grads)
                    if kind == Kind.FULL_BACKWARD and wants and s - 1 in local:
                        same_rank_grad[(s, mb)] = tuple(a.grad for a in wants)
                del cache[(s, mb)], tensors, grads, outs, args, wants
        for s in sorted(set(rank_plan.reduce_grad) - reduced):  # schedules whose order lists no REDUCE_GRAD
            rank_plan.reduce_grad[s]()
        mark("schedule")
        del chunks, first_inputs, targets, losses
        return inputs, target  # the batch: alive through the optimizer step

    return _traced_steps(body, optimizer, [*modules, *persistent], steps, rank, world_size)


def _peak(tracker: Any) -> int:
    return sum(dev.get("Total", 0) for dev in tracker.get_tracker_snapshot("peak").values())


def _restart_peak(tracker: Any) -> None:
    """Start ``tracker``'s peak again from what is alive now, so that each phase's own peak is
    read. MemTracker has no public reset of its peak: this sets the two fields its peak update
    compares with (``_peak_mem``, ``_peak_mem_snap``, torch 2.5 to 2.13)."""
    current = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: snap.get("Total", 0) for dev, snap in current.items()}
    tracker._peak_mem_snap = current
