"""A strategy's own ``parallelize`` applied outside a Trainer, for the traced planner: one rank of
the target world, under the fake process group of :mod:`lightning_scale.core.traced_memory`.

The suite's strategies transform the network in :meth:`MeshStrategy.parallelize` (pipeline split,
tensor parallelism, activation checkpointing, FSDP2, in that order). The planner must predict
what THAT code does to the user's module, not what a model of it does, so it calls the same
method: :func:`parallelize_offline` gives a strategy object the few things ``setup`` would
(the mesh, the LightningModule, the precision) and runs it. No process is launched and no
collective carries data (the process group is fake; TP takes each rank's local slice).

The pipeline is traced on stage views (a model with ``pipeline_stage_views`` or a
``stage_forward``): its stages are cut by the strategy's own plan and views, and torch's schedule
gives each rank's order of forwards and backwards (:func:`trace_pipeline_layout`). The traced
frontend (torch's tracer cutting an unchanged forward) and ZeRO-1/2 (sharded after setup, inside
the run) are refused with a :class:`~lightning_scale.core.traced_memory.TraceError`.
"""

from __future__ import annotations

import contextlib
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
    if isinstance(strategy, PipelineStrategy) and strategy.dims.pp > 1:
        _check_traceable_pipeline(strategy, _holder(network))
    zero = getattr(strategy, "zero", None)
    if zero is not None and (zero.offload_optimizer or zero.offload_params or zero.implementation != "native"):
        raise TraceError("CPU offload (host memory is not told apart from the device's here) and the fairscale "
                         "engine are not traced: the closed form plans them")
    module = _holder(network)
    strategy.resolved_dims = strategy.dims.resolve(world_size)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh holds real rank lists
        strategy.device_mesh = build_device_mesh(strategy.resolved_dims, "cpu")
    strategy._lightning_module = module
    strategy._cluster_environment = _played_rank(torch.distributed.get_rank(), world_size)
    strategy.parallel_devices = [torch.device("cpu")]  # the root device: CPU plays the GPU (fake tensors)
    strategy._precision_plugin = (MixedPrecision(precision, "cpu") if str(precision).endswith("-mixed")
                                  else Precision())
    strategy.deferring = True  # TP takes each rank's local slice: no broadcast of values
    try:
        with _real_device_meshes():
            strategy.parallelize()
    except TraceError:
        raise
    except Exception as err:  # noqa: BLE001 - named, with the fallback
        raise TraceError(f"{type(strategy).__name__}.parallelize failed on {type(network).__name__} under the fake "
                         f"process group: {type(err).__name__}: {err}") from err
    return module


def _played_rank(rank: int, world_size: int) -> Any:
    """A cluster environment saying which rank this process plays (``split_pipeline`` asks),
    without Lightning's ``set_global_rank``, which would also set ``rank_zero_only.rank`` for the
    whole process (silencing rank-zero output and loggers afterwards)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    class Played(LightningEnvironment):
        def global_rank(self) -> int:
            return rank

        def world_size(self) -> int:
            return world_size

    return Played()


@contextlib.contextmanager
def _real_device_meshes() -> Any:
    """Device meshes made while parallelizing (FSDP2 over TP joins the dp and tp meshes) hold
    real rank tensors, not fake ones: their coordinates are computed from values (``nonzero``),
    which fake tensors do not have. Patches ``DeviceMesh.__init__`` for the duration."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        with unset_fake_temporarily():
            original(self, *args, **kwargs)

    DeviceMesh.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh.__init__ = original  # type: ignore[method-assign]


def _check_traceable_pipeline(strategy: Any, module: Any) -> None:
    if strategy.pipeline_config.balance == "time":
        raise TraceError("PipelineStrategy(balance='time') times each block by running it: a traced plan uses "
                         "balance='params' or split_points (the closed form plans the rest)")
    network = getattr(module, strategy.module_name, module)
    if strategy.frontend == "trace" or (strategy.frontend == "auto" and strategy.stage_forward is None
                                        and not getattr(network, "pipeline_stage_views", False)):
        raise TraceError(f"the pipeline of {type(network).__name__} is cut by torch's tracer in a run, which is not "
                         f"traced offline: give PipelineStrategy a stage_forward (the Hugging Face families in "
                         f"lightning_scale.adapters.huggingface get theirs) or plan it with the closed form")


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


def _build_fake(build: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``build()`` on fake tensors, its floating tensors in ``dtype`` (``*-true``: Lightning
    converts the model to 16 bits; fake parameters cannot be converted in place, torch swaps
    them, so the model is built in that dtype instead). A construction that reads values (an init
    computing a statistic, e.g. Hugging Face ViT's truncated-normal init) is built on the meta
    device instead (where such inits are skipped or shape-only) and given fake storage: values do
    not matter here."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _build_fake_now(build)
    finally:
        torch.set_default_dtype(default)


def _build_fake_now(build: Any) -> nn.Module:
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
                 optimizer: Any = "adamw", implementation: str = "foreach", rank: int = 0) -> Any:
    """One rank's :class:`~lightning_scale.core.traced_memory.TracedMemory` for ``strategy`` on
    ``world_size`` ranks: ``build()`` makes the network (called under fake tensors), the strategy
    parallelizes it in place (:func:`parallelize_offline`), ``loss(network, batch())`` is one
    step's loss. ``optimizer``: a name for :func:`make_optimizer` (with ``implementation``), or
    ``optimizer(module)`` building it from the parallelized module."""
    from lightning_scale.core.meta_activations import compute_dtype
    from lightning_scale.core.traced_memory import fake_process_group, fake_tensors, trace_step

    with fake_process_group(world_size, rank), fake_tensors():
        network = _build_fake(build, compute_dtype(precision)[0])
        module = parallelize_offline(strategy, network, world_size, precision)  # in place
        # the optimizer by name, or a callable building it from the parallelized module (a
        # LightningModule's configure_optimizers)
        opt = (optimizer(module) if callable(optimizer)
               else make_optimizer(network.parameters(), optimizer, implementation))
        hooks: dict[str, Any] = {}
        zero = getattr(strategy, "zero", None)
        if zero is not None and zero.stage in (1, 2):
            # ZeRO-1/2: the strategy's engine (built at setup in a run) re-points the optimizer
            # at this rank's chunks and reduces / gathers around the step
            from lightning_scale.core.sharding import ZeroOptimizer

            engine = ZeroOptimizer(module, opt, strategy.group("dp"), zero)
            hooks = {"before_step": engine.reduce_gradients, "after_step": engine.after_step}
        try:
            return trace_step(network, opt, batch, loss, precision, rank=rank, world_size=world_size, **hooks)
        except TraceError:
            raise
        except Exception as err:  # noqa: BLE001
            raise TraceError(f"the training step of {type(network).__name__} failed on fake tensors: "
                             f"{type(err).__name__}: {err}") from err


def stage_input_shapes(build: Any, inputs: tuple, strategy: Any, precision: str = "32-true") -> dict[int, list]:
    """Stage index -> the (shape, dtype) of each tensor stage ``s`` receives from stage ``s - 1``,
    for one microbatch ``inputs``: the stages cut by the strategy's own plan and views
    (:func:`~lightning_scale.core.pipeline.plan_pipeline`, :func:`~lightning_scale.core.pipeline.view_of`)
    run in order on fake tensors (call inside :func:`~lightning_scale.core.traced_memory.fake_tensors`)."""
    from lightning_scale.core.meta_activations import compute_dtype
    from lightning_scale.core.pipeline import plan_pipeline, view_of
    from lightning_scale.core.traced_memory import _precision_contexts

    module = _holder(_build_fake(build, compute_dtype(precision)[0]))
    network = getattr(module, strategy.module_name, module)
    plan = plan_pipeline(network, strategy.pipeline_config)
    autocast, cast_batch = _precision_contexts(precision)
    shapes: dict[int, list] = {}
    x = cast_batch(inputs)
    with torch.no_grad(), autocast():
        for s in range(plan.num_stages):
            if s:
                shapes[s] = [(tuple(t.shape), t.dtype) for t in x]
            view = view_of(network, plan, [s])
            out = strategy.stage_forward(view, *x) if strategy.stage_forward is not None else view(*x)
            x = out if isinstance(out, tuple) else (out,)
    return shapes


def trace_pipeline_layout(build: Any, batch: Any, output_loss: Any, make_strategy: Any, world_size: int,
                          precision: str = "32-true", optimizer: str = "adamw", implementation: str = "foreach",
                          steps: int = 2) -> list[Any]:
    """Each pipeline rank's :class:`~lightning_scale.core.traced_memory.TracedMemory` (index:
    the pipeline coordinate; data- and tensor-parallel coordinate 0) for the pipeline strategy
    ``make_strategy()`` builds (a fresh one per rank: strategies keep state), on ``world_size``
    ranks. ``batch()``: ``(inputs, target)`` of one rank's batch; ``output_loss(network, output,
    target)``: the loss of the last stage's output for one microbatch."""
    from lightning_scale.core.meta_activations import compute_dtype
    from lightning_scale.core.traced_memory import (PipelineRank, fake_process_group, fake_tensors,
                                                    trace_pipeline_step)

    probe = make_strategy()
    dims = probe.dims.resolve(world_size)
    m = probe.pipeline_config.resolved_microbatches
    dtype = compute_dtype(precision)[0]
    results = []
    with fake_tensors():
        inputs, _ = batch()
        rows = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor))
        if rows % m:
            raise ValueError(f"{rows} rows per device do not split into {m} pipeline microbatches")
        one = tuple(x[: rows // m] if isinstance(x, torch.Tensor) else x for x in inputs)
        shapes = stage_input_shapes(build, one, probe, precision)
    for pp_rank in range(dims.pp):
        strategy = make_strategy()
        global_rank = pp_rank * dims.dp * dims.tp
        with fake_process_group(world_size, global_rank), fake_tensors():
            network = _build_fake(build, dtype)
            module = parallelize_offline(strategy, network, world_size, precision)
            runtime = strategy.runtime
            order = runtime.schedule.pipeline_order
            if order is None:
                raise TraceError(f"torch's {type(runtime.schedule).__name__} gives no action order to trace")
            from torch.distributed.fsdp import FSDPModule

            rank_plan = PipelineRank(stages={st.stage_index: st.submod for st in runtime.stages},
                                     actions=list(order[pp_rank]), num_stages=runtime.plan.num_stages,
                                     microbatches=m, inputs=shapes,
                                     reduce_grad={st.stage_index: (lambda st=st: st.perform_reduce_grad(1))
                                                  for st in runtime.stages if isinstance(st.submod, FSDPModule)})
            opt = make_optimizer(module.parameters(), optimizer, implementation)
            local = getattr(module, strategy.module_name, module)
            try:
                traced = trace_pipeline_step(rank_plan, opt, batch,
                                             lambda out, target: output_loss(local, out, target), precision,
                                             steps=steps, rank=global_rank, world_size=world_size)
            except Exception as err:  # noqa: BLE001
                raise TraceError(f"pipeline rank {pp_rank}'s schedule failed on fake tensors: "
                                 f"{type(err).__name__}: {err}") from err
            results.append(traced)
    return results


__all__ = ["make_optimizer", "parallelize_offline", "stage_input_shapes", "trace_layout", "trace_pipeline_layout"]
