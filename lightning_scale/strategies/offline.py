"""A strategy's own ``parallelize`` applied outside a Trainer, for the traced planner: one rank of
the target world, under the fake process group of :mod:`lightning_scale.core.traced_memory`.

The suite's strategies transform the network in :meth:`MeshStrategy.parallelize` (pipeline split,
tensor parallelism, activation checkpointing, FSDP2, in that order). The planner must predict
what THAT code does to the user's module, not what a model of it does, so it calls the same
method: :func:`parallelize_offline` gives a strategy object the few things ``setup`` would
(the mesh, the LightningModule, the precision) and runs it. No process is launched and no
collective carries data (the process group is fake; TP takes each rank's local slice).

Strategies that need a Trainer's run to transform the model (the pipeline: its schedule is built
from the first batch) are refused here with a :class:`~lightning_scale.core.traced_memory.TraceError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_scale.core.traced_memory import TraceError


def _holder(network: nn.Module) -> Any:
    """A LightningModule holding ``network`` as ``model`` (the strategies' default ``module_name``),
    or ``network`` itself when it is one."""
    import lightning as L

    if isinstance(network, L.LightningModule):
        return network

    class _Network(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.model(*args, **kwargs)

    return _Network(network)


def parallelize_offline(strategy: Any, network: nn.Module, world_size: int, precision: str = "32-true") -> nn.Module:
    """Run ``strategy.parallelize()`` on ``network`` (its tensors fake or meta) as this process's
    rank of ``world_size`` (the default process group, fake). Returns the module to train: the
    LightningModule holding the parallelized network (``network`` itself when it is one).

    ``strategy``: a :class:`~lightning_scale.strategies.base.MeshStrategy` (MeshStrategy,
    ZeroStrategy, TensorParallelStrategy) built with the options of the run to plan."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from lightning_scale.core.mesh import build_device_mesh
    from lightning_scale.strategies.base import MeshStrategy
    from lightning_scale.strategies.pipeline import PipelineStrategy

    if not isinstance(strategy, MeshStrategy):
        raise TraceError(f"{type(strategy).__name__} is not one of the suite's strategies: only those are traced "
                         f"(Lightning's own are planned by the closed forms)")
    if isinstance(strategy, PipelineStrategy):
        raise TraceError("the pipeline is not traced yet (its stages are built from the first batch inside a run): "
                         "the closed form plans it")
    zero = getattr(strategy, "zero", None)
    if zero is not None and zero.stage in (1, 2):
        raise TraceError("ZeRO-1/2 shard the optimizer after setup, inside the run: the closed form plans them")
    module = _holder(network)
    strategy.resolved_dims = strategy.dims.resolve(world_size)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh holds real rank lists
        strategy.device_mesh = build_device_mesh(strategy.resolved_dims, "cpu")
    strategy._lightning_module = module
    strategy._precision_plugin = (MixedPrecision(precision, "cpu") if str(precision).endswith("-mixed")
                                  else Precision())
    strategy.deferring = True  # TP takes each rank's local slice: no broadcast of values
    try:
        strategy.parallelize()
    except TraceError:
        raise
    except Exception as err:  # noqa: BLE001 - named, with the fallback
        raise TraceError(f"{type(strategy).__name__}.parallelize failed on {type(network).__name__} under the fake "
                         f"process group: {type(err).__name__}: {err}") from err
    return module


def make_optimizer(params: Any, optimizer: str = "adamw", implementation: str = "foreach",
                   lr: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer of the run to plan: ``optimizer`` (adamw, adam, sgd, sgd_momentum) with
    torch's ``implementation``: ``"foreach"`` (torch's default on CUDA: each update allocates a
    temporary as large as all the parameters of a group), ``"fused"`` (one kernel, no such
    temporary) or ``"for-loop"`` (one parameter at a time)."""
    if implementation not in ("foreach", "fused", "for-loop"):
        raise ValueError(f"implementation must be foreach, fused or for-loop; got {implementation!r}")
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[implementation]
    params = list(params)
    if optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, **flags)
    if optimizer in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if optimizer == "sgd_momentum" else 0.0, **flags)
    raise ValueError(f"optimizer must be adamw, adam, sgd or sgd_momentum; got {optimizer!r}")


def _build_fake(build: Any) -> nn.Module:
    """``build()`` on fake tensors; a construction that reads values (an init computing a
    statistic, e.g. Hugging Face ViT's truncated-normal init) is built on the meta device instead
    (where such inits are skipped or shape-only) and given fake storage: values do not matter here."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        return build()
    except Exception as fake_error:  # noqa: BLE001
        try:
            with unset_fake_temporarily(), torch.device("meta"):
                network = build()
        except Exception as err:  # noqa: BLE001 - named, with the fallback
            raise TraceError(f"the model could not be built on fake tensors ({type(fake_error).__name__}: {fake_error}) "
                             f"nor on the meta device ({type(err).__name__}: {err})") from err
        return network.to_empty(device="cpu")  # under the fake mode: fake tensors


def trace_layout(build: Any, batch: Any, loss: Any, strategy: Any, world_size: int, precision: str = "32-true",
                 optimizer: str = "adamw", implementation: str = "foreach", rank: int = 0) -> Any:
    """One rank's :class:`~lightning_scale.core.traced_memory.TracedMemory` for ``strategy`` on
    ``world_size`` ranks: ``build()`` makes the network (called under fake tensors), the strategy
    parallelizes it in place (:func:`parallelize_offline`), ``loss(network, batch())`` is one
    step's loss."""
    from lightning_scale.core.meta_activations import compute_dtype
    from lightning_scale.core.traced_memory import fake_process_group, fake_tensors, trace_step

    with fake_process_group(world_size, rank), fake_tensors():
        dtype = compute_dtype(precision)[0]
        # *-true: Lightning converts the model to 16 bits; fake parameters cannot be converted in
        # place (torch swaps them), so the model is built in that dtype instead
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            network = _build_fake(build)
        finally:
            torch.set_default_dtype(default)
        parallelize_offline(strategy, network, world_size, precision)  # in place
        opt = make_optimizer(network.parameters(), optimizer, implementation)
        try:
            return trace_step(network, opt, batch, loss, precision, rank=rank, world_size=world_size)
        except TraceError:
            raise
        except Exception as err:  # noqa: BLE001
            raise TraceError(f"the training step of {type(network).__name__} failed on fake tensors: "
                             f"{type(err).__name__}: {err}") from err


__all__ = ["make_optimizer", "parallelize_offline", "trace_layout"]
