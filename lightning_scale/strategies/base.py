"""``MeshStrategy``: the Lightning adapter every strategy of the suite builds on.

It owns what is common to pipeline, tensor and data parallelism:

* process-group start-up (gloo on CPU; nccl on CUDA, or the mixed ``"cuda:nccl,cpu:gloo"`` when
  the subclass communicates host tensors, see :meth:`MeshStrategy.communicates_host_tensors`;
  :func:`lightning_scale.core.device.default_backend`) and one DeviceMesh ``("pp", "dp", "tp")``
  whose product is validated against the world size before any collective;
* data sharding by the data-parallel rank only (``distributed_sampler_kwargs``);
* gradient averaging over the ``dp`` group at the optimizer step (after the last accumulation
  micro-step, before clipping), and clipping by the global norm over model-parallel ranks;
* ``reduce`` for ``self.log(..., sync_dist=True)`` over the ``dp`` group (model-parallel ranks
  hold identical values);
* sharded checkpoints with ``torch.distributed.checkpoint`` (tensors keyed by parameter name,
  so a checkpoint loads into another layout), metadata loaded with ``weights_only=True``: the
  :class:`~lightning_scale.strategies.checkpointing.DistributedCheckpointing` mixin.

Constructor options are validated by :mod:`lightning_scale.strategies.options`.

Subclasses (:class:`~lightning_scale.strategies.PipelineStrategy`, ...) transform the model in
:meth:`parallelize` and may take over the step in the ``*_step`` hooks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _init_dist_connection
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.optim import Optimizer

from lightning_scale.core import device as dev
from lightning_scale.core.activation_checkpointing import ACConfig, apply_activation_checkpointing, as_ac_config
from lightning_scale.core.blocks import BlockClass, BlockFinder, check_block_class
from lightning_scale.core.grads import allreduce_gradients, clip_grad_norm_, reduce_partial_gradients
from lightning_scale.core.mesh import MESH_DIM_NAMES, ParallelDims, build_device_mesh, sharded_over
from lightning_scale.strategies.checkpointing import DistributedCheckpointing
from lightning_scale.strategies.loader_state import resume_loaders_mid_epoch
from lightning_scale.strategies.options import check_bool, check_mesh_options, check_module_path


class MeshStrategy(DistributedCheckpointing, ParallelStrategy):
    """Data parallelism over a ``("pp", "dp", "tp")`` device mesh; the base of the suite's strategies.

    Args:
        dims: parallel degrees (subclasses set pp / tp; dp = -1 means "the rest").
        process_group_backend: ``"gloo"``, ``"nccl"``, ... (default: nccl on CUDA, gloo on CPU).
        timeout: collective timeout; a dead peer surfaces as an error after this long, not a hang.
        trust_checkpoint: load checkpoint metadata with full unpickling (only for files you trust).
        activation_checkpointing: recompute activations in backward: ``"full"``, ``"selective"``,
            ``"every_<k>"``, ``"offload"``, a dict of :class:`~lightning_scale.core.activation_checkpointing.ACConfig`
            fields, or an ACConfig (default: off). Applied after pipeline splitting and tensor
            parallelism, before data-parallel sharding.
        module_name: attribute of the LightningModule that holds the network; by default
            ``"model"`` when the LightningModule has one, else the LightningModule itself (layers
            written directly on it).
        block_container: path (in the network) of the ``nn.Sequential`` / ``ModuleList`` /
            ``ModuleDict`` whose children are the blocks (the units of activation checkpointing,
            ZeRO-3 sharding and pipeline splitting); default: the container with most parameters.
        block_class: or the blocks' class: a class, a class name, a list of those, or a predicate
            ``fn(module) -> bool`` (an FSDP-style wrap policy); see :mod:`lightning_scale.core.blocks`.
        deferred_init: build what ``configure_model`` creates on the meta device and materialize
            only this rank's part after splitting / sharding, with the eager values (a module
            built with :func:`lightning_scale.deferred` is materialized either way); see
            docs/deferred_init.md.
        weights_from: a state dict, Lightning checkpoint, ``.safetensors`` file or Hugging Face
            directory whose tensors fill the split / sharded model, each rank reading only its part
            (:func:`lightning_scale.core.pretrained.load_into`).
    """

    strategy_name = "mesh"

    def __init__(
        self,
        dims: ParallelDims | None = None,
        accelerator=None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin=None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        trust_checkpoint: bool = False,
        activation_checkpointing: ACConfig | dict[str, Any] | str | None = None,
        module_name: str = "model",
        block_container: str | None = None,
        block_class: BlockClass | None = None,
        deferred_init: bool = False,
        weights_from: str | None = None,
    ) -> None:
        # Validated here, on every rank, before any process group exists.
        owner = type(self).__name__
        check_bool(owner, "deferred_init", deferred_init)
        if weights_from is not None and not isinstance(weights_from, (str, os.PathLike)):
            raise ValueError(f"{owner}(weights_from={weights_from!r}): give the path of a state dict, a Lightning "
                             f"checkpoint, a .safetensors file or a Hugging Face model directory, or None")
        self.deferred_init = deferred_init
        self.weights_from = weights_from
        check_mesh_options(owner, process_group_backend, timeout, trust_checkpoint, module_name)
        check_module_path(owner, "block_container", block_container)
        check_block_class(owner, block_class)
        if block_container is not None and block_class is not None:
            raise ValueError(f"{owner}: give block_container= (where the blocks are) or block_class= (what they are), "
                             f"not both")
        self.activation_checkpointing = as_ac_config(activation_checkpointing)
        self.module_name = module_name
        self.block_finder = BlockFinder(container=block_container, block_class=block_class)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.dims = dims or ParallelDims()
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self.trust_checkpoint = trust_checkpoint
        self.num_nodes = 1
        self.resolved_dims: ParallelDims | None = None
        self.device_mesh = None
        self._parallelized: tuple[torch.nn.Module, ...] = ()  # the network before and after parallelize()
        self.deferring = False  # set in setup: this setup materializes a deferred model

    # -- environment ---------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        # The same intra-op thread count on every rank. Lightning's script launcher applies its
        # rule (CPUs // local processes, unless OMP_NUM_THREADS is set) in the launching process
        # only, after its children have started: on a 2-core machine rank 0 ran with 1 thread and
        # rank 1 with 2, reduced in another order, and the parameters TP keeps replicated drifted
        # apart by rounding (up to 1.2e-7 after 4 steps). Lightning's own rule, on every rank.
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        _set_num_threads_if_needed(num_processes=self.num_processes)
        self.set_world_ranks()
        # Validate the layout on every rank before the first collective.
        self.resolved_dims = self.dims.resolve(self.world_size)  # names the fix when the degrees do not fit
        host = self.communicates_host_tensors()
        self._process_group_backend = self._process_group_backend or dev.default_backend(self.root_device, host)
        # What these groups would be on a GPU (the CPU collective audit checks host tensors against it).
        explicit = self._process_group_backend if dev.backend_has_nccl(self._process_group_backend) else None
        dev.set_gpu_backend(explicit or dev.default_backend(dev.CUDA, host))
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        self.device_mesh = build_device_mesh(self.resolved_dims, self.root_device.type, self._timeout)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self.device_mesh
        from lightning_scale.strategies.peers import gather_processes

        self._rank_processes = gather_processes()  # to name a rank that dies later (peers.py)

    def on_exception(self, exception: BaseException) -> None:
        """A collective that failed because a peer's process is gone: name that rank in the error."""
        from lightning_scale.strategies.peers import annotate, explain_lost_peer

        sentence = explain_lost_peer(exception, getattr(self, "_rank_processes", []), self.global_rank)
        if sentence is not None:
            annotate(exception, sentence)
        super().on_exception(exception)

    def communicates_host_tensors(self) -> bool:
        """Subclass hook: whether some collectives carry host tensors (CPU offload). On CUDA the
        default backend is then ``"cuda:nccl,cpu:gloo"`` instead of ``"nccl"``."""
        return False

    def declare_host_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Subclass hook, before the gradient norm: register gradients that live on the host by
        design (:func:`lightning_scale.core.device.register_host`), e.g. FSDP2's offloaded ones."""

    # -- mesh helpers ------------------------------------------------------------------------------
    def group(self, dim: str) -> dist.ProcessGroup | None:
        """Process group of this rank along ``dim`` ("pp", "dp" or "tp"), or None if not distributed."""
        if self.device_mesh is None:
            return None
        return self.device_mesh[dim].get_group()

    def coordinate(self, dim: str) -> int:
        return 0 if self.device_mesh is None else self.device_mesh[dim].get_local_rank()

    def communication_groups(self) -> list[tuple[str, dist.ProcessGroup]]:
        """(mesh dimension, process group) of every group this rank communicates on: one per
        mesh dimension, plus any the subclass creates (ScaleProfiler names communication time by them)."""
        if self.device_mesh is None:
            return []
        return [(dim, self.group(dim)) for dim in MESH_DIM_NAMES]

    @property
    def is_distributed(self) -> bool:
        """Tells Lightning to insert a DistributedSampler (it checks this for custom strategies)."""
        return True

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dims = self.resolved_dims or self.dims.resolve(self.world_size)
        return {"num_replicas": dims.dp, "rank": self.coordinate("dp")}

    # -- model -------------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        deferred = self._deferred_parts()  # [(path in the LightningModule, the module built on meta)]
        self.deferring = bool(deferred)  # parallelize() then works on meta tensors: no collective on values
        if self.deferred_init and not deferred and not self.is_parallelized():
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{type(self).__name__}(deferred_init=True): {type(self.lightning_module).__name__} built no layers in "
                f"configure_model, so every rank holds the whole model at setup. Build the layers in configure_model, or "
                f"construct the module with lightning_scale.deferred({type(self.lightning_module).__name__}, ...)"
            )
        self.model_to_device()
        if not self.is_parallelized():
            before = self.network()
            self.parallelize()  # on meta tensors where the model is deferred: nothing is allocated yet
            self._parallelized = (before, self.network())
            if self.weights_from is not None:
                self._load_weights(deferred)
            else:
                self._materialize(deferred)
        self.model = self.precision_plugin.convert_module(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._patch_gradient_clipping()

    def is_parallelized(self) -> bool:
        """Whether an earlier fit/validate/test/predict of this strategy already transformed this
        LightningModule's network: :meth:`parallelize` runs once per network, so a second
        ``trainer.validate`` after ``trainer.fit`` reuses the split / sharded model."""
        return self.lightning_module is not None and any(self.network() is n for n in self._parallelized)

    def parallelize(self) -> None:
        """Transform the network in place, once per network (:meth:`setup` skips it when
        :meth:`is_parallelized`), in the design guide's order, one hook per parallelism:

        1. :meth:`split_pipeline`: this rank's part of the model (the whole network unless pipelined);
        2. :meth:`apply_tensor_parallel` on that part;
        3. :meth:`checkpoint_activations` (and ``compile``) on its blocks;
        4. :meth:`shard_data_parallel` (ZeRO-3 / FSDP2) last, over the transformed modules.

        Subclasses override the hooks, not this order. Here (plain data parallelism) only step 3
        does something, when ``activation_checkpointing`` is set."""
        local = self.split_pipeline(self.network())
        self.apply_tensor_parallel(local)
        self.checkpoint_activations(local, self.split_block_container())
        self.shard_data_parallel(local)

    def split_pipeline(self, network: torch.nn.Module) -> torch.nn.Module:
        """Step 1 of :meth:`parallelize`: this rank's part of ``network`` (no pipeline: all of it)."""
        return network

    def split_block_container(self) -> str | None:
        """The block container's path where step 1 determined it (pipeline plan), else None."""
        return None

    def apply_tensor_parallel(self, local: torch.nn.Module) -> None:
        """Step 2 of :meth:`parallelize` (no tensor parallelism: nothing)."""

    def shard_data_parallel(self, local: torch.nn.Module) -> None:
        """Step 4 of :meth:`parallelize` (plain data parallelism: nothing; gradients are
        all-reduced over ``dp`` at the optimizer step, :meth:`finalize_gradients`)."""

    def network(self) -> torch.nn.Module:
        """The nn.Module in LightningModule attribute ``module_name``; with the default name
        (``"model"``) and no such attribute, the LightningModule itself (layers written directly
        on it, the way most Lightning modules are)."""
        network = getattr(self.lightning_module, self.module_name, None)
        if network is None and self.module_name == "model":
            return self.lightning_module
        if not isinstance(network, torch.nn.Module):
            raise AttributeError(
                f"{type(self).__name__} works on the network in LightningModule attribute {self.module_name!r}, which "
                f"is {type(network).__name__}; set module_name= to the attribute that holds your nn.Module"
            )
        return network

    def checkpoint_activations(self, network: torch.nn.Module, container: str | None = None) -> None:
        """Apply ``activation_checkpointing`` to ``network`` (this rank's part of the model), on
        the blocks the strategy's ``block_container`` / ``block_class`` find.

        ``container`` is the block container's path when the strategy knows it (pipeline plan)."""
        config = self.activation_checkpointing
        if config is None:
            return
        finder = self.block_finder
        if container is not None and finder.block_class is None:
            finder = BlockFinder(container=container)
        applied = apply_activation_checkpointing(network, config, finder, owner=self._owner_for_errors())
        kinds = sorted(set(applied.values()))
        rank_zero_info(f"{type(self).__name__}: activation checkpointing {config.policy} on {len(applied)} modules ({', '.join(kinds)})")

    def _owner_for_errors(self) -> str:
        """How errors name this strategy (e.g. ``ZeroStrategy(stage=3)``)."""
        return type(self).__name__

    def model_to_device(self) -> None:
        assert self.model is not None
        device = self.root_device
        if not any(t.is_meta for t in [*self.model.parameters(), *self.model.buffers()]):
            self.model.to(device)  # (LightningModule.to also records the device: pl_module.device)
            return
        # Meta tensors (a deferred model) stay meta until parallelize() has split or sharded them;
        # .to() cannot copy them, so move the rest and record the device as .to() would have.
        from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

        self.model._apply(lambda t: t if t.is_meta else t.to(device))
        for module in self.model.modules():
            if isinstance(module, _DeviceDtypeModuleMixin):
                module._device = device

    # -- deferred initialization (core/deferred_init.py) -------------------------------------------
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        """Lightning's init context (``configure_model``, ``trainer.init_module()``). With
        ``deferred_init=True``, what it builds goes on the meta device and is recorded; setup
        materializes only this rank's part after splitting / sharding (:meth:`_materialize`)."""
        if not self.deferred_init or self.lightning_module is None:
            with super().tensor_init_context(empty_init):
                yield
            return
        from lightning_scale.core.deferred_init import attach, recording

        lm = self.lightning_module
        with recording(f"{type(lm).__name__} (built in configure_model)") as record, \
                self.precision_plugin.tensor_init_context():
            yield
        if record.ops:
            attach(lm, record)

    def materialize_device(self) -> torch.device:
        """Where a deferred model's local tensors are allocated: the root device (ZeRO-3 with
        parameter offload: the host, where FSDP2 keeps the offloaded shards)."""
        return self.root_device

    def _deferred_parts(self) -> list[tuple[str, torch.nn.Module]]:
        """The LightningModule (``configure_model`` under ``deferred_init=True``) or its submodules
        built with :func:`lightning_scale.deferred`, by path, before the model is transformed."""
        from lightning_scale.core.deferred_init import is_deferred

        lm = self.lightning_module
        if lm is None:
            return []
        if is_deferred(lm):
            return [("", lm)]
        return [(path, m) for path, m in lm.named_modules() if path and is_deferred(m)]

    def _load_weights(self, parts: list[tuple[str, torch.nn.Module]]) -> None:
        """``weights_from``: each rank reads only the slices it holds from the file, straight into
        the split / sharded model (meta tensors are allocated at their local size first); a
        deferred model's recorded construction is not replayed."""
        from lightning_scale.core.deferred_init import discard_record
        from lightning_scale.core.pretrained import load_into

        lm = self.lightning_module
        strip = None if self.network() is lm else f"{self.module_name}."
        stats = load_into(lm, self.weights_from, self.materialize_device(), strip_prefix=strip)
        if any(t.is_meta for t in lm.buffers()):  # buffers no checkpoint holds (rotary tables): replayed
            self._materialize(parts)
        for _, root in parts:
            discard_record(root)
        rank_zero_info(f"{type(self).__name__}: {stats.tensors} tensors loaded from {self.weights_from} "
                       f"({stats.elements_read:,} elements read on rank 0: its part only)")

    def _materialize(self, parts: list[tuple[str, torch.nn.Module]]) -> None:
        """Give this rank's part of each deferred module its eager values on the root device."""
        if not parts:
            return
        from lightning_scale.core.deferred_init import materialize

        from lightning_scale.core.deferred_init import discard_record

        lm = self.lightning_module
        count = 0
        for path, root in parts:
            try:
                local = lm.get_submodule(path) if path else lm  # after a pipeline split: this rank's view
            except AttributeError:  # a module another pipeline stage holds
                discard_record(root)
                continue
            count += materialize(local, self.materialize_device(), root=root).tensors
            discard_record(local)
        left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(
                f"{type(self).__name__}(deferred_init=True): {len(left)} tensors of {type(lm).__name__} are still on the "
                f"meta device after materialization (e.g. {left[0]!r}); build every layer inside configure_model (or "
                f"with lightning_scale.deferred), or use deferred_init=False"
            )
        rank_zero_info(f"{type(self).__name__}: deferred init: this rank's {count} tensors materialized on "
                       f"{self.root_device} (eager values, replayed on the host)")

    def model_parallel_groups(self) -> list[dist.ProcessGroup | None]:
        """Groups over which one logical model is split (for the global gradient norm)."""
        return []

    def norm_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that count towards the global gradient norm on this rank (no duplicates)."""
        assert self.lightning_module is not None
        return list(self.lightning_module.parameters())

    def finalize_gradients(self) -> None:
        """After the last backward of an optimizer step: average gradients over data parallel.

        Partial DTensor gradients (sequence-parallel LayerNorm weights: sums over the TP ranks'
        sequence shards) are reduced first, once, rather than by every optimizer op."""
        assert self.lightning_module is not None
        reduce_partial_gradients(self.lightning_module.parameters())
        # Parameters sharded over dp (FSDP2) had their gradients reduce-scattered by FSDP2.
        plain = [p for p in self.lightning_module.parameters() if not sharded_over(p, "dp")]
        allreduce_gradients(plain, self.group("dp"))

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            result = closure()
            self.finalize_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    def _patch_gradient_clipping(self) -> None:
        """Make norm clipping use the global norm over model-parallel ranks (Lightning clips locally)."""
        strategy = self

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float | int) -> None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            local = [p for group in optimizer.param_groups for p in group["params"]]
            norm_params = [p for p in strategy.norm_parameters() if id(p) in in_optimizer]
            strategy.declare_host_gradients(norm_params)
            strategy.last_grad_norm = clip_grad_norm_(local, norm_params, float(clip_val), strategy.model_parallel_groups(),
                                                      device=strategy.root_device)

        self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    # -- collectives ---------------------------------------------------------------------------
    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        if dev.is_cuda(self.root_device) and dev.backend_has_nccl(dist.get_backend()):
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: str | None = "mean") -> Tensor | Any:
        """Reduce a logged value over the data-parallel group (model-parallel ranks agree already)."""
        if not isinstance(tensor, Tensor) or not _distributed_is_initialized():
            return tensor
        group = group if group is not None else self.group("dp")
        op = (reduce_op or "mean").lower() if isinstance(reduce_op, str) else reduce_op
        out = tensor.detach().clone().float() if not torch.is_floating_point(tensor) else tensor.detach().clone()
        if op in ("mean", "avg"):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
            out /= dist.get_world_size(group)
        elif op == "sum":
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        elif op == "max":
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        elif op == "min":
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
        else:
            dist.all_reduce(out, op=op, group=group)
        return out

    def on_train_start(self) -> None:
        super().on_train_start()
        # Exact mid-epoch resume with stateful loaders (Lightning issue #20550; see loader_state.py).
        states, self._saved_loader_states = getattr(self, "_saved_loader_states", None), None
        if states:
            dp = self.resolved_dims.dp if self.resolved_dims else None
            resume_loaders_mid_epoch(self.lightning_module.trainer, states, getattr(self, "_saved_dp", None), dp)

    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @contextmanager
    def block_backward_sync(self):
        yield  # gradients are averaged once per optimizer step in finalize_gradients
