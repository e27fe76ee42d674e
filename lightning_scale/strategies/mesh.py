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
  so a checkpoint loads into another layout), metadata loaded with ``weights_only=True``.

Subclasses (:class:`~lightning_scale.strategies.PipelineStrategy`, ...) transform the model in
:meth:`parallelize` and may take over the step in the ``*_step`` hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _init_dist_connection
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.optim import Optimizer

from lightning_scale.core import checkpoint as ckpt
from lightning_scale.core import device as dev
from lightning_scale.core.activation_checkpointing import ACConfig, apply_activation_checkpointing, as_ac_config
from lightning_scale.core.blocks import BlockClass, BlockFinder, check_block_class
from lightning_scale.core.grads import allreduce_gradients, clip_grad_norm_, reduce_partial_gradients
from lightning_scale.core.mesh import MESH_DIM_NAMES, ParallelDims, build_device_mesh
from lightning_scale.strategies.loader_state import (
    resume_loaders_mid_epoch,
    saved_data_parallel_degree,
    saved_loader_states,
)


def _optim_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Flat, name-keyed optimizer state ("state.<param>.exp_avg", "param_groups.<param>.lr"): a
    # list-indexed param_groups entry would hold different parameters on different pipeline
    # stages under the same key, and DCP keeps one copy of each key.
    return StateDictOptions(flatten_optimizer_state_dict=True)


_OPTIM_OPTIONS = _optim_options()


def _rename_params(flat_optim_state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Rename parameters in a flattened optimizer state dict ("state.<param>.<key>",
    "param_groups.<param>.<key>")."""
    if not names:
        return flat_optim_state
    out = {}
    for key, value in flat_optim_state.items():
        section, _, rest = key.partition(".")
        for old, new in names.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        out[f"{section}.{rest}"] = value
    return out


def _sharded_over(p: torch.Tensor, dim: str) -> bool:
    """Whether ``p`` is a DTensor on a mesh with dimension ``dim`` (e.g. FSDP2 on "dp")."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and dim in (p.device_mesh.mesh_dim_names or ())


def check_bool(owner: str, name: str, value: Any) -> None:
    """A clear error for a non-bool flag (``"yes"``, ``1``): raised in ``__init__``, before any collective."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be True or False")


def check_attribute_name(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"{owner}({name}={value!r}): {name} must be the name of an attribute of your LightningModule, "
                         f"e.g. 'model'")


def check_module_path(owner: str, name: str, value: Any) -> None:
    """None or a dotted module path inside the network, e.g. ``"blocks"`` or ``"transformer.h"``."""
    if value is not None and (not isinstance(value, str) or not all(part.isidentifier() or part.isdigit()
                                                                   for part in value.split("."))):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be None (found automatically) or a dotted path of a "
                         f"module inside the network, e.g. 'blocks' or 'transformer.h'")


def renamed_option(owner: str, old: str, new: str, old_value: Any, new_value: Any, default: Any = None) -> Any:
    """The value of option ``new``, accepting its old spelling ``old`` with a DeprecationWarning."""
    if old_value is None:
        return new_value
    import warnings

    if new_value is not default:
        raise ValueError(f"{owner}: {old}= is the old name of {new}=; pass only {new}=")
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}= (the same option under its one name across strategies)",
                  DeprecationWarning, stacklevel=3)
    return old_value


def check_plan(owner: str, name: str, plan: Any) -> None:
    """None or ``{module-path pattern: ParallelStyle}``."""
    if plan is None:
        return
    from torch.distributed.tensor.parallel import ParallelStyle

    if not isinstance(plan, Mapping) or not all(isinstance(k, str) and isinstance(v, ParallelStyle) for k, v in plan.items()):
        raise ValueError(f"{owner}({name}=...): {name} must be a dict {{'module pattern': ParallelStyle}}, e.g. "
                         f"{{'blocks.*.attn.q_proj': ColwiseParallel()}}, or None for the built-in plan; got "
                         f"{type(plan).__name__} {plan!r:.120}")


def _check_mesh_options(owner: str, process_group_backend: Any, timeout: Any, trust_checkpoint: Any, module_name: Any) -> None:
    if process_group_backend is not None:
        known = sorted(b for b in dist.Backend.backend_list if b not in ("undefined", "fake")) if dist.is_available() else []
        parts = [p.split(":")[-1] for p in process_group_backend.split(",")] if isinstance(process_group_backend, str) else None
        if not parts or any(p.strip().lower() not in known for p in parts):
            raise ValueError(f"{owner}(process_group_backend={process_group_backend!r}): not a torch.distributed backend; "
                             f"use one of {known} (or 'cpu:gloo,cuda:nccl'), or None for nccl on CUDA and gloo on CPU")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise ValueError(f"{owner}(timeout={timeout!r}): timeout must be a datetime.timedelta, e.g. "
                         f"timedelta(minutes=10), or None for torch's default")
    if isinstance(timeout, timedelta) and timeout.total_seconds() <= 0:
        raise ValueError(f"{owner}(timeout={timeout!r}): timeout must be positive, e.g. timedelta(minutes=10)")
    check_bool(owner, "trust_checkpoint", trust_checkpoint)
    check_attribute_name(owner, "module_name", module_name)


class MeshStrategy(ParallelStrategy):
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
    ) -> None:
        # Validated here, on every rank, before any process group exists.
        owner = type(self).__name__
        _check_mesh_options(owner, process_group_backend, timeout, trust_checkpoint, module_name)
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
        self.set_world_ranks()
        # Validate the layout on every rank before the first collective.
        self.resolved_dims = self.dims.resolve(self.world_size)
        self.validate_layout(self.resolved_dims)
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

    def validate_layout(self, dims: ParallelDims) -> None:
        """Subclass hook: raise a clear error for an impossible layout (no collectives here)."""

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
        self.model_to_device()
        self.parallelize()
        self.model = self.precision_plugin.convert_module(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._patch_gradient_clipping()

    def parallelize(self) -> None:
        """Transform ``self.lightning_module`` in place (subclasses: split, TP, AC, shard).

        Here (data parallelism only): activation checkpointing, if asked for."""
        if self.activation_checkpointing is not None:
            self.checkpoint_activations(self.network())

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
        self.model.to(self.root_device)

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
        plain = [p for p in self.lightning_module.parameters() if not _sharded_over(p, "dp")]
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

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the split/sharded model, after the optimizers exist

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores optimizer states itself, by parameter name

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.lightning_module is not None
        return get_optimizer_state_dict(self.lightning_module, optimizer, options=_OPTIM_OPTIONS)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            tensors[f"optimizer_{i}"] = state
        checkpoint["lightning_scale_layout"] = {"dims": vars(self.resolved_dims) if self.resolved_dims else None}
        ckpt.save_sharded(path, tensors, checkpoint, self.is_global_zero, barrier=self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = self._load_checkpoint_files(checkpoint_path)
        # Kept to re-apply at on_train_start (Lightning issue #20550; see loader_state.py).
        self._saved_loader_states = saved_loader_states(checkpoint)
        self._saved_dp = saved_data_parallel_degree(checkpoint)  # a mid-epoch resume needs the same dp
        return checkpoint

    def _load_checkpoint_files(self, checkpoint_path) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        assert self.lightning_module is not None
        module = self.lightning_module
        if not path.exists():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist; check ckpt_path")
        if path.is_file():
            return self._load_full_checkpoint(path)
        ckpt.read_dcp_metadata(path)  # a directory: DCP's index first (names a missing or corrupt .metadata)
        meta = ckpt.load_meta(path, trust=self.trust_checkpoint)
        model_state = {"state_dict": get_model_state_dict(module)}
        ckpt.load_sharded(path, model_state)
        set_model_state_dict(module, model_state["state_dict"], options=StateDictOptions(strict=module.strict_loading))
        self._load_optimizer_states(path)
        return meta

    def _load_optimizer_states(self, path: Path) -> None:
        """Restore every optimizer's state from the name-keyed entries of a DCP checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        module = self.lightning_module
        assert module is not None
        aliases = self.optimizer_state_aliases()
        for i, optimizer in enumerate(self.optimizers):
            flat = _rename_params(get_optimizer_state_dict(module, optimizer, options=_OPTIM_OPTIONS), aliases)
            state = {f"optimizer_{i}": flat}
            ckpt.load_sharded(path, state)
            restored = _rename_params(state[f"optimizer_{i}"], {v: k for k, v in aliases.items()})
            set_optimizer_state_dict(module, optimizer, optim_state_dict=restored, options=_OPTIM_OPTIONS)

    def optimizer_state_aliases(self) -> dict[str, str]:
        """Parameter names whose optimizer state is read under another name (tied copies)."""
        return {}

    def _load_full_checkpoint(self, path: Path) -> dict[str, Any]:
        """A single-file (consolidated) checkpoint: each rank takes the names its modules hold.

        Read with ``weights_only=True`` (unless ``trust_checkpoint``); a file that cannot be read,
        or that lacks (or has other shapes for) a tensor some rank holds, raises the same
        :class:`~lightning_scale.core.checkpoint.CheckpointError` on every rank."""
        assert self.lightning_module is not None
        checkpoint = ckpt.load_file(path, trust=self.trust_checkpoint)  # the same file, the same outcome on every rank
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ckpt.CheckpointError(
                f"checkpoint {path} has no 'state_dict' entry ({type(checkpoint).__name__}"
                + (f" with keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else "")
                + "): it is not a Lightning checkpoint; save one with trainer.save_checkpoint or ModelCheckpoint"
            )
        own = self.lightning_module.state_dict()
        self._raise_on_any_rank(ckpt.state_dict_mismatch(path, own, checkpoint["state_dict"]))
        full = {k: checkpoint["state_dict"][k] for k in own}
        if any(_sharded_over(v, "dp") or _sharded_over(v, "tp") for v in own.values()):
            # DTensor parameters (ZeRO-3 / FSDP2, TP) take full tensors through DCP's state-dict API.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.lightning_module, full, options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            self.lightning_module.load_state_dict(full, strict=True)
        if checkpoint.pop("optimizer_states", None):  # index-keyed states cannot be mapped to a new layout
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{type(self).__name__}: {path} is a single-file checkpoint; its optimizer state is keyed by "
                f"parameter index and is NOT restored (the optimizer restarts from zero state, so the resumed "
                f"losses differ from an uninterrupted run). For an exact resume, resume from a checkpoint this "
                f"strategy saved (a DCP directory)."
            )
        return checkpoint

    def _raise_on_any_rank(self, problem: str | None) -> None:
        """Raise ``problem`` (a rank's own finding, or None) on every rank if any rank has one: the
        ranks of a split model check different tensors, and a rank that raised alone would leave
        the others waiting in their next collective."""
        problems = [problem]
        if _distributed_is_initialized() and dist.get_world_size() > 1:
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
        found = [(rank, p) for rank, p in enumerate(problems) if p]
        if found:
            ranks = [rank for rank, _ in found]
            where = "" if len(problems) == 1 else f" (found on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            raise ckpt.CheckpointError(found[0][1] + where)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # done in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # done in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            import shutil

            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    @contextmanager
    def block_backward_sync(self):
        yield  # gradients are averaged once per optimizer step in finalize_gradients
