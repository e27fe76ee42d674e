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
            else:
                memo.setdefault(id(value), value)
    return copy.deepcopy(network, memo)


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


def _fix_devices(gm: nn.Module, device: torch.device) -> None:
    """Rewrite ``device=meta`` recorded during the meta trace to ``device`` (a GraphModule)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    changed = False
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        dev_kw = node.kwargs.get("device")
        if isinstance(dev_kw, torch.device) and dev_kw.type == "meta":
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()


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

    def owned_names(self, microbatch: tuple, stage_indices: Sequence[int]) -> set[str]:
        """Names of the parameters and buffers the given stages hold (in the network's names)."""
        pipe = self.trace(microbatch)
        names: set[str] = set()
        for s in stage_indices:
            gm = pipe.get_stage_module(s)
            names.update(n for n, _ in gm.named_parameters())
            names.update(n for n, _ in gm.named_buffers())
        return names

    def build_stages(self, microbatch: tuple, stage_indices: Sequence[int], real: nn.Module, device: torch.device,
                     group: Any) -> list[Any]:
        """torch ``_PipelineStage`` objects for ``stage_indices``, running on ``real``'s tensors."""
        pipe = self.trace(microbatch)
        stages = []
        for s in stage_indices:
            gm = pipe.get_stage_module(s)
            self._swap_in_real_modules(gm, real)
            for name, _ in list(gm.named_parameters()):
                _set_tensor(gm, name, real.get_parameter(name))
            for name, _ in list(gm.named_buffers()):
                _set_tensor(gm, name, real.get_buffer(name))
            _fix_devices(gm, device)
            stages.append(pipe.build_stage(s, device, group))
        return stages


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
