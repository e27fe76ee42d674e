"""Splitting an unchanged ``forward`` into pipeline stages with torch's tracing frontend. Torch only.

The stage-view path (:mod:`lightning_scale.core.pipeline`) needs a forward that skips the
modules a stage does not own. Most users' forwards do not (``h = self.embed(x)`` on a stage
without ``embed``). This path needs nothing from the forward: ``torch.distributed.pipelining.
pipeline`` exports it with ``torch.export`` and cuts the graph at the plan's split points
(``SplitPoint.BEGINNING`` of each stage's first block); each stage runs its part of the graph.

How it is used here:

* **Traced on the meta device.** The network is copied with every parameter and buffer on
  ``meta`` (no bytes), and that copy is traced for one microbatch's input shapes. Tracing again
  for another shape (a smaller eval batch, generation lengths) needs no real weights, so this
  rank can drop the parts it does not own right after setup.
* **Real tensors bound by name.** The stage graph modules keep the network's parameter names
  (``blocks.2.fc1.weight``); this rank's stages get this rank's real parameters and buffers by
  those names, so the optimizer, checkpoints and gradient hooks see the same tensors.
* **Device constants.** Tracing on meta records ``device=meta`` for tensors the forward creates
  (``torch.ones(t, t, device=x.device)``); those are rewritten to the compute device.

Limits (each raised at setup with the fix): the forward must be exportable (no data-dependent
Python control flow; export's own message is attached), and parameters shared by modules on
different stages (tied embeddings) need the stage-view path.

Shapes: ``microbatch`` is one microbatch of the network's positional inputs (B/m rows).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class TraceError(RuntimeError):
    """torch.export could not capture the forward (the message names the fallback)."""


def meta_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` whose parameters and buffers are on ``meta`` (no data copied);
    tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for p in network.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in network.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    # Attributes that are not modules or tensors (a Lightning trainer reference, configs, process
    # groups held by metrics) are shared, not copied: the copy only runs forward.
    # Hook registries start empty, so hooks added to the original later (FSDP2, TP, profilers)
    # never run on the copy.
    for module in network.modules():
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, nn.Module)):
                continue
            if "hook" in key and isinstance(value, dict):
                memo.setdefault(id(value), type(value)())
            elif isinstance(value, (set, list, dict)):
                continue  # containers (e.g. _non_persistent_buffers_set) are copied, not shared
            else:
                memo.setdefault(id(value), value)
    copied = copy.deepcopy(network, memo)
    from lightning_scale.core.deferred_init import discard_record

    for module in copied.modules():  # an instance forward (activation checkpointing) or a compiled
        module.__dict__.pop("forward", None)  # call belongs to the real module: the copy runs its class's
        module.__dict__.pop("_compiled_call_impl", None)
        discard_record(module)  # a deferred construction's record belongs to the original (it is freed once materialized)
    return copied


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = value  # type: ignore[assignment]
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def _fix_devices(stage: nn.Module, device: torch.device) -> None:
    """Rewrite ``device=meta`` recorded during the meta trace to ``device``, in the stage's graph
    and the graphs of the traced submodules it holds (the user's own modules have no graph)."""
    for module in stage.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        changed = False
        for node in graph.nodes:
            dev_kw = node.kwargs.get("device") if node.op == "call_function" else None
            if isinstance(dev_kw, torch.device) and dev_kw.type == "meta":
                node.update_kwarg("device", device)
                changed = True
        if changed and isinstance(module, torch.fx.GraphModule):
            module.recompile()


class TracedSplit:
    """The traced stages of one network, for the stage indices of one pipeline rank.

    Args:
        network: the full model (same weights on every rank).
        split_points: module paths where stages 1.. begin (``["blocks.2"]``), p x v - 1 of them.
        owner: how errors name the strategy.
    """

    def __init__(self, network: nn.Module, split_points: Sequence[str], owner: str = "PipelineStrategy") -> None:
        self.meta = meta_copy(network)
        self.split_points = list(split_points)
        self.owner = owner
        self.num_stages = len(self.split_points) + 1

    def trace(self, microbatch: tuple) -> Any:
        """torch's ``Pipe`` for one microbatch of inputs (traced on meta)."""
        from torch.distributed.pipelining import SplitPoint, pipeline

        args = tuple(_to_meta(x) for x in microbatch)
        try:
            pipe = pipeline(self.meta, mb_args=args, split_spec={p: SplitPoint.BEGINNING for p in self.split_points})
        except Exception as err:
            self._unannotate()  # export's failure modes are many; its cause is attached
            cause = err.__cause__ or err
            raise TraceError(
                f"{self.owner}: torch.export could not trace {type(self.meta).__name__}.forward to split it into stages "
                f"({type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}). Make the forward "
                f"exportable (no Python branching on tensor values), or use the stage-view path: a forward that skips "
                f"modules set to None (frontend='views'), or stage_forward= (see docs/strategies/pipeline.md)"
            ) from err
        self._unannotate()
        if pipe.num_stages != self.num_stages:
            raise TraceError(
                f"{self.owner}: the traced forward of {type(self.meta).__name__} split into {pipe.num_stages} stages, not "
                f"{self.num_stages}: a split point {self.split_points} is not called on the forward's main path; give "
                f"split_points= naming blocks the forward calls in order"
            )
        return pipe

    def _unannotate(self) -> None:
        """Undo torch's in-place split-point annotation (it wraps each split module's forward), so
        the copy can be traced again for another input signature."""
        for path in self.split_points:
            module = self.meta.get_submodule(path)
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward", None)

    def placement(self, microbatch: tuple) -> dict[str, set[int]]:
        """Every parameter and buffer name of the network -> the stages whose graphs hold it.

        A name on several stages is one torch's tracer replicates (a parameter used by modules
        on two stages, e.g. a head computed with the embedding's weight); a name on none is used
        outside ``forward`` (a loss module's class weights, a parameter used in ``training_step``)."""
        pipe = self.trace(microbatch)
        where: dict[str, set[int]] = {n: set() for n, _ in self.meta.named_parameters(remove_duplicate=False)}
        where.update({n: set() for n, _ in self.meta.named_buffers(remove_duplicate=False)})
        for s in range(self.num_stages):
            gm = pipe.get_stage_module(s)
            for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
                where.setdefault(name, set()).add(s)
        return where

    def stage_modules(self, microbatch: tuple, stage_indices: Sequence[int], real: nn.Module,
                      device: torch.device) -> list[nn.Module]:
        """This rank's stages as modules for torch's manual ``PipelineStage`` (which infers the
        shapes and dtypes it exchanges at the first step, so mixed precision and autocast are
        seen as they run), running on ``real``'s modules and tensors.

        The stages must form a chain (stage s takes only what stage s - 1 returns), which is what
        cutting a forward between consecutive blocks gives; otherwise the error says which stage
        reads which earlier one."""
        pipe = self.trace(microbatch)
        reads = self._chain(pipe)
        modules: list[nn.Module] = []
        for s in stage_indices:
            gm = pipe.get_stage_module(s)
            self._swap_in_real_modules(gm, real)
            for name, _ in list(gm.named_parameters()):
                _set_tensor(gm, name, real.get_parameter(name))
            for name, _ in list(gm.named_buffers()):
                _set_tensor(gm, name, real.get_buffer(name))
            _fix_devices(gm, device)
            modules.append(gm if reads[s] is None else _Select(gm, reads[s]))
        return modules

    def _chain(self, pipe: Any) -> list[list[int] | None]:
        """For each stage, which outputs of the previous stage it takes, in order (None: all of
        them, as they are); raises when a stage reads a stage other than the previous one."""
        import operator

        calls = [n for n in pipe.split_gm.graph.nodes if n.op == "call_module"]
        reads: list[list[int] | None] = [None]
        for s, node in enumerate(calls[1:], start=1):
            previous, picks = calls[s - 1], []
            for arg in node.args:
                if arg is previous:
                    picks.append(None)
                elif (getattr(arg, "op", None) == "call_function" and arg.target is operator.getitem
                      and arg.args[0] is previous):
                    picks.append(arg.args[1])
                else:
                    raise TraceError(
                        f"{self.owner}: stage {s} of the traced {type(self.meta).__name__}.forward reads {arg} from "
                        f"before stage {s - 1} (a value that skips a stage); torch's pipeline stages exchange values "
                        f"between neighbours only. Cut at blocks whose inputs come from the block before (split_points=), "
                        f"or use frontend='views'"
                    )
            if picks == [None]:
                reads.append(None)  # the previous stage's output, as it is
            elif None not in picks:
                reads.append(picks)  # some of the previous stage's outputs (it returned a tuple)
            else:
                raise TraceError(f"{self.owner}: stage {s} reads stage {s - 1}'s whole output and parts of it; use "
                                 f"frontend='views'")
        return reads

    def _swap_in_real_modules(self, gm: Any, real: nn.Module) -> None:
        """Replace each module the stage graph calls whole (a block, the head; not one a split point
        cuts through) by the network's own module: its Python forward runs (so activation
        checkpointing, tensor parallelism and hooks applied to the network apply here, and shapes
        inside it are not fixed by the trace)."""
        for node in gm.graph.nodes:
            if node.op != "call_module" or any(p.startswith(node.target + ".") for p in self.split_points):
                continue
            try:
                module = real.get_submodule(node.target)
            except AttributeError:
                continue
            gm.set_submodule(node.target, module)


class _Select(nn.Module):
    """Runs a stage graph on the chosen outputs of the previous stage (which sends all of them)."""

    def __init__(self, stage: nn.Module, picks: list[int]) -> None:
        super().__init__()
        self.stage = stage
        self.picks = picks

    def forward(self, *previous: Any) -> Any:
        return self.stage(*(previous[i] for i in self.picks))


def prune_to(network: nn.Module, keep: set[str]) -> int:
    """Remove every parameter and buffer of ``network`` whose name is not in ``keep``, in place:
    a module left with none of its tensors is set to None in its parent (as a stage view drops
    what it does not own, so plans and block finders skip it); a module that keeps some has the
    others set to None. Kept names do not change. Returns the elements freed."""
    held = {name for name, _ in list(network.named_parameters()) + list(network.named_buffers())}
    removed: list[str] = []
    for name, module in list(network.named_modules()):
        if not name or any(name.startswith(r + ".") for r in removed):
            continue
        if not any(h.startswith(name + ".") for h in held) or any(k.startswith(name + ".") for k in keep):
            continue  # no tensors (activations, dropout), or some kept: stays
        parent, _, leaf = name.rpartition(".")
        owner = network.get_submodule(parent) if parent else network
        owner._modules[leaf] = None
        removed.append(name)
    freed = 0
    for name, t in list(network.named_parameters()) + list(network.named_buffers()):
        if name in keep:
            continue
        *path, leaf = name.split(".")
        owner = network.get_submodule(".".join(path)) if path else network
        if leaf in owner._parameters:
            owner._parameters[leaf] = None
        elif leaf in owner._buffers:
            owner._buffers[leaf] = None
        freed += t.numel()
    return freed
