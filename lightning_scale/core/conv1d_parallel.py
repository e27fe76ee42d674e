"""Tensor-parallel styles for transposed linear layers: ``transformers``' ``Conv1D`` (GPT-2, OpenAI
GPT, ...). Torch only: a layer qualifies by its shape, not its class.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` of shape (in, out) = (``nx``, ``nf``), the
transpose of ``nn.Linear``'s (out, in), so torch's ``ColwiseParallel`` / ``RowwiseParallel`` would
cut the wrong dimension (they refuse anything but ``nn.Linear`` / ``nn.Embedding``):

* :class:`Conv1DColwiseParallel` splits the outputs: ``W`` sharded on dim 1, ``b`` on dim 0.
  Input (B, T, nx) replicated (or a sequence shard, gathered first); output the local
  (B, T, nf/t) columns.
* :class:`Conv1DRowwiseParallel` splits the inputs: ``W`` sharded on dim 0, ``b`` replicated.
  Input the local (B, T, nx/t) columns; each rank's product is a partial sum, reduced to the full
  (B, T, nf) (all-reduce) or to a sequence shard (B, T/t, nf) (reduce-scatter). DTensor adds the
  bias once.

**Fused projections.** GPT-2's ``c_attn`` computes q, k and v with one matrix,
``W = [Wq | Wk | Wv]`` of shape (D, 3 D). A plain column split over t = 2 ranks would give rank 0
``[Wq | first half of Wk]``: every head of k on rank 0 would be paired with the wrong q. With
``fused=3`` each of the three blocks is split instead, and rank r holds
``[Wq_r | Wk_r | Wv_r]`` (D, 3 D/t): its q, k and v for the same D/t columns, that is the same
H/t whole heads. That layout is DTensor's ``_StridedShard(dim, split_factor=fused)`` (the
dimension cut into ``fused`` pieces first, each piece cut into t), so the parameter still *is* the
model's own tensor: ``full_tensor()`` returns the unchanged ``[Wq | Wk | Wv]``, the gradient
clipping norm and optimizers see ordinary DTensors, and checkpoints hold the model's own layout
(:mod:`lightning_scale.core.checkpoint` gathers strided tensors for DCP, which stores only
contiguous shards). The module that splits the fused output (GPT-2's attention: ``split_size``)
must split the local width D/t instead: see ``adapters.huggingface.GPT2AttentionHeads``. The
fused bias (3 D,) stays a replicated parameter, used in each forward through its strided view
(``_StridedView``: a local slice forward, an all-gather of its gradient backward), so that its
gradient has its parameter's layout and ZeRO-3 can shard it on dim 0 like any replicated tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["Conv1DColwiseParallel", "Conv1DRowwiseParallel", "is_strided", "is_transposed_linear", "split_placement"]


def is_transposed_linear(module: nn.Module) -> bool:
    """A ``Conv1D``-style layer: ``nf`` outputs, ``nx`` inputs, ``weight`` (nx, nf), ``bias`` (nf,)."""
    weight = getattr(module, "weight", None)
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return (isinstance(weight, torch.Tensor) and isinstance(nf, int) and isinstance(nx, int)
            and tuple(weight.shape) == (nx, nf))


def split_placement(dim: int, fused: int) -> Placement:
    """``Shard(dim)``, or for ``fused`` > 1 blocks along ``dim`` each split alike, the strided shard."""
    return Shard(dim) if fused == 1 else _StridedShard(dim, split_factor=fused)


def is_strided(placement: Placement) -> bool:
    """A strided (fused-blocks) shard: not one contiguous block of the global tensor per rank."""
    return isinstance(placement, _StridedShard)


def _require_transposed_linear(module: nn.Module, style: str) -> None:
    if not is_transposed_linear(module):
        raise ValueError(
            f"{style} applies to a transposed linear layer (transformers' Conv1D: weight (nx, nf), attributes nx and "
            f"nf), not {type(module).__name__}; use torch's ColwiseParallel / RowwiseParallel for nn.Linear"
        )


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement: Placement, src_data_rank: int | None) -> None:
    param = module._parameters.get(name)
    if param is None or isinstance(param, DTensor):
        return
    sharded = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank)
    module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


class _StridedView(torch.autograd.Function):
    """A replicated 1-D DTensor (nf,) -> its strided shard (``fused`` blocks, this rank's nf/t
    entries of each), no communication; backward: the strided gradient all-gathered back to the
    replicated layout. What ``redistribute`` does, written with functional collectives on local
    tensors so that it also runs on fake tensors (the traced planner): torch's strided-shard
    gather builds index lists with ``.tolist()``, which fake tensors cannot answer."""

    @staticmethod
    def forward(ctx: Any, full: DTensor, fused: int) -> DTensor:  # noqa: ANN401
        mesh = full.device_mesh
        n, rank = mesh.size(), mesh.get_local_rank()
        ctx.mesh, ctx.fused, ctx.shape, ctx.stride = mesh, fused, full.shape, full.stride()
        local = full.to_local().view(fused, n, -1)[:, rank].reshape(-1)  # (fused * nf/(fused t),) = (nf/t,)
        return DTensor.from_local(local, mesh, [split_placement(0, fused)], run_check=False,
                                  shape=full.shape, stride=full.stride())

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[DTensor, None]:  # noqa: ANN401
        from torch.distributed._functional_collectives import all_gather_single

        local = grad.to_local().contiguous().reshape(1, ctx.fused, -1)  # (1, fused, nf/(fused t))
        gathered = all_gather_single(local, gather_dim=0, group=ctx.mesh)  # (t, fused, nf/(fused t)), rank order
        full = gathered.transpose(0, 1).reshape(-1)  # block by block: (nf,)
        return DTensor.from_local(full, ctx.mesh, [Replicate()], run_check=False, shape=ctx.shape,
                                  stride=ctx.stride), None


def _bind_bias_view(module: nn.Module, args: Any) -> None:
    """For this forward, ``module.bias`` is the replicated fused bias's strided view (this rank's
    nf/t entries, no communication; :class:`_StridedView`), an instance attribute shadowing the
    parameter until :func:`_unbind_bias`. Left to DTensor's own dispatch, the bias gradient kept
    the output's strided layout, unlike its parameter, and every foreach optimizer step gathered
    it again."""
    bias = module._parameters.get("bias")
    if isinstance(bias, DTensor):
        fused = next(p for p in module.weight.placements if is_strided(p)).split_factor
        module.__dict__["bias"] = _StridedView.apply(bias, fused)


def _unbind_bias(module: nn.Module, args: Any, output: Any) -> None:
    module.__dict__.pop("bias", None)  # the parameter is ``module.bias`` again (returns None: output kept)


class Conv1DColwiseParallel(ParallelStyle):
    """Column (output) split of a ``Conv1D``: ``weight`` (nx, nf) -> (nx, nf/t) per rank.

    Args:
        fused: the output is ``fused`` equal blocks (3 for q|k|v) split alike, so each rank holds
            the same columns of every block (see the module docstring). ``nf`` must divide by
            ``fused * t``.
        input_layouts: the input's layout: ``Replicate()`` (default) or ``Shard(1)`` for a
            sequence-parallel residual stream (all-gathered to the full sequence first).
        use_local_output: return the local (B, T, nf/t) tensor (default) instead of the DTensor.
    """

    def __init__(self, *, fused: int = 1, input_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        super().__init__()
        if not isinstance(fused, int) or isinstance(fused, bool) or fused < 1:
            raise ValueError(f"Conv1DColwiseParallel(fused={fused!r}): fused must be an int >= 1 (3 for a q|k|v projection)")
        self.fused = fused
        self.input_layouts = input_layouts or Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _require_transposed_linear(module, type(self).__name__)
        distribute_module(module, device_mesh, self._partition, self._prepare_input, self._prepare_output)
        if self.fused > 1:
            module.register_forward_pre_hook(_bind_bias_view)
            module.register_forward_hook(_unbind_bias, always_call=True)
        return module

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if not is_transposed_linear(module):
            return
        _distribute(module, "weight", mesh, split_placement(1, self.fused), self.src_data_rank)  # (nx, nf/t)
        # A fused bias (nf,) stays a replicated parameter (nf floats per rank), used through a
        # strided view (see _bind_bias_view): a strided dim-0 shard could not be sharded again on dim 0
        # by ZeRO-3 (FSDP2 describes TP x FSDP on one dimension only for contiguous TP shards).
        bias = split_placement(0, 1) if self.fused == 1 else Replicate()
        _distribute(module, "bias", mesh, bias, self.src_data_rank)  # (nf/t,) or (nf,)

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [self.input_layouts], run_check=False)
        if not x.placements[0].is_replicate():
            x = x.redistribute(mesh, [Replicate()])  # sequence shard -> full sequence (all-gather)
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        wanted = split_placement(output.ndim - 1, self.fused)  # the weight's column split, on the last dim
        if output.placements != (wanted,):
            output = output.redistribute(mesh, [wanted])
        return output.to_local() if self.use_local_output else output

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(fused={self.fused}, input_layouts={self.input_layouts}, "
                f"use_local_output={self.use_local_output})")


class Conv1DRowwiseParallel(ParallelStyle):
    """Row (input) split of a ``Conv1D``: ``weight`` (nx, nf) -> (nx/t, nf) per rank, ``bias`` replicated.

    Args:
        output_layouts: ``Replicate()`` (default: all-reduce to the full (B, T, nf)) or
            ``Shard(1)`` (reduce-scatter to this rank's (B, T/t, nf) sequence shard).
        use_local_output: return the local tensor (default) instead of the DTensor.
    """

    def __init__(self, *, output_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        super().__init__()
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _require_transposed_linear(module, type(self).__name__)
        return distribute_module(module, device_mesh, self._partition, self._prepare_input, self._prepare_output)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if not is_transposed_linear(module):
            return
        _distribute(module, "weight", mesh, Shard(0), self.src_data_rank)  # (nx/t, nf)
        _distribute(module, "bias", mesh, Replicate(), self.src_data_rank)  # (nf,), added once by DTensor

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):  # the local (..., nx/t) columns of a column-split layer
            x = DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False)
        elif x.placements != (Shard(x.ndim - 1),):
            x = x.redistribute(mesh, [Shard(x.ndim - 1)])
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        if output.placements != (self.output_layouts,):
            output = output.redistribute(mesh, [self.output_layouts])  # partial sums -> all-reduce / reduce-scatter
        return output.to_local() if self.use_local_output else output

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_layouts={self.output_layouts}, use_local_output={self.use_local_output})"
