"""``ZeroStrategy``: ZeRO stages 1, 2 (torch primitives) and 3 (FSDP2), optional CPU offload.

The Lightning side of :mod:`lightning_scale.core.sharding`. Every rank is a data-parallel rank
(the mesh is ``dp = world size``). Per optimizer step, inside Lightning's closure:

* stages 1/2: the backward(s) run as usual (stage 2 reduce-scatters buckets as gradients arrive);
  after the last one :meth:`ZeroOptimizer.reduce_gradients` leaves each rank the averaged chunk
  of every bucket; clipping uses the norm over all chunks (summed over the dp group); the user's
  optimizer, re-pointed at the chunks, steps; then :meth:`ZeroOptimizer.after_step` all-gathers
  the updated parameters.
* stage 3: the network's blocks and the network are wrapped with FSDP2 ``fully_shard`` on the
  dp mesh (``CPUOffloadPolicy`` with ``offload_params``); FSDP2 all-gathers parameters for each
  block's forward/backward and reduce-scatters gradients; the optimizer steps the shards.

Checkpoints are the suite's DCP directories with optimizer state keyed by parameter name (the
format every strategy of the suite writes), so a ZeRO checkpoint resumes on another number of
processes, under another stage, or under another strategy, and consolidates to a plain file.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_scale.core import checkpoint as ckpt
from lightning_scale.core import device as dev
from lightning_scale.core.grads import allreduce_gradients
from lightning_scale.core.mesh import ParallelDims
from lightning_scale.core.fsdp import fully_shard_blocks, mixed_precision_policy
from lightning_scale.core.sharding import ZeroConfig, ZeroOptimizer
from lightning_scale.strategies.base import MeshStrategy
from lightning_scale.strategies.optimizers import unwrap_optimizer
from lightning_scale.strategies.options import check_bool, renamed_option


class ZeroStrategy(MeshStrategy):
    """ZeRO data parallelism: shard optimizer state (1), + gradients (2), + parameters (3).

    Args:
        stage: 1, 2 or 3.
        offload_optimizer: optimizer state, fp32 master weights and the optimizer step on CPU.
        offload_params: stage 3: sharded parameters (and gradients, and the step) on CPU.
        implementation: ``"native"`` (default: torch primitives, FSDP2 for stage 3) or
            ``"fairscale"`` (stages 1 and 2); ``backend=`` is its deprecated name.
        bucket_mb: bucket size in MiB of the stage 1/2 reductions and all-gathers.
        module_name: the LightningModule attribute holding the network (default: ``model`` if
            present, else the LightningModule itself).
        block_container: stage 3 and activation checkpointing: path (in the network) of the
            Sequential/ModuleList/ModuleDict whose children are sharded one by one; default: the
            container with most parameters.
        block_class: or the blocks' class (a class, name, list, or predicate ``fn(module) -> bool``).
    """

    strategy_name = "zero"

    def __init__(
        self,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        implementation: str = "native",
        bucket_mb: float = 25.0,
        module_name: str = "model",
        block_container: str | None = None,
        block_class: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        trust_checkpoint: bool = False,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Validated here, on every rank, before any process group exists.
        owner = type(self).__name__
        implementation = renamed_option(owner, "backend", "implementation", backend, implementation, default="native")
        check_bool(owner, "offload_optimizer", offload_optimizer)
        check_bool(owner, "offload_params", offload_params)
        self.zero = ZeroConfig(stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
                               implementation=implementation, bucket_mb=bucket_mb)
        super().__init__(dims=ParallelDims(pp=1, dp=-1, tp=1), process_group_backend=process_group_backend,
                         timeout=timeout, trust_checkpoint=trust_checkpoint, module_name=module_name,
                         block_container=block_container, block_class=block_class, **kwargs)
        self._engines: dict[int, ZeroOptimizer] = {}
        self._oss: list[Any] = []  # implementation="fairscale": the OSS optimizers

    def materialize_device(self) -> torch.device:
        # FSDP2's CPUOffloadPolicy expects the sharded parameters on the host.
        return torch.device("cpu") if self.zero.offload_params else self.root_device

    def _owner_for_errors(self) -> str:
        return f"ZeroStrategy(stage={self.zero.stage})"

    def communicates_host_tensors(self) -> bool:
        # Offload: the optimizer-state all-gather of a checkpoint carries host tensors, so a CUDA run
        # uses "cuda:nccl,cpu:gloo" (as torchtitan does when offloading).
        return self.zero.offload_optimizer or self.zero.offload_params

    def declare_host_gradients(self, params: list[nn.Parameter]) -> None:
        if self.zero.stage == 3 and self.zero.offload_params:  # FSDP2 CPUOffloadPolicy: gradients on the host
            dev.register_host(*(p.grad for p in params if p.grad is not None))

    # -- model ----------------------------------------------------------------------------------
    def model_to_device(self) -> None:
        # A second setup (validate/test after fit) must not move FSDP2's offloaded shards back to
        # the GPU: the sharded network and the rest of the module were placed by the first one.
        if self.is_parallelized():
            return
        super().model_to_device()

    def shard_data_parallel(self, local: nn.Module) -> None:
        """Stage 3: FSDP2 on each block, then the network (after activation checkpointing). Stages
        1 and 2 shard the optimizer and gradients in :meth:`setup`, once the optimizers exist."""
        if self.zero.stage == 3:
            self._fully_shard(local)

    def _fully_shard(self, network: nn.Module) -> None:
        mesh = self.device_mesh["dp"]
        blocks = [b for _, b in self.block_finder.find(network, self._owner_for_errors())]
        mp_policy = mixed_precision_policy(self.precision_plugin.precision)
        n_blocks = fully_shard_blocks(blocks, [network], mesh, self.zero.offload_params, mp_policy=mp_policy)
        rank_zero_info(f"ZeroStrategy: stage 3 (FSDP2) over {mesh.size()} ranks, {n_blocks} blocks sharded one by one"
                       + (", parameters offloaded to CPU" if self.zero.offload_params else "")
                       + (f", all-gathers in {mp_policy.param_dtype} (gradients reduced in fp32)" if mp_policy else ""))

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.zero.implementation == "fairscale" and trainer.state.fn == TrainerFn.FITTING:
            self._setup_fairscale()
        elif self.zero.stage in (1, 2) and trainer.state.fn == TrainerFn.FITTING:
            assert self.lightning_module is not None
            self._engines = {}
            for optimizer in self.optimizers:
                raw = unwrap_optimizer(optimizer)
                self._engines[id(raw)] = ZeroOptimizer(self.lightning_module, raw, self.group("dp"), self.zero)
            rank_zero_info(
                f"ZeroStrategy: stage {self.zero.stage} over {self.resolved_dims.dp if self.resolved_dims else 1} ranks"
                + (", optimizer state and step on CPU" if self.zero.offload_optimizer else "")
                + f"; {sum(len(e.specs) for e in self._engines.values())} buckets"
            )

    def _setup_fairscale(self) -> None:
        """Replace each optimizer by an equivalent ``OSS``; at stage 2 wrap the module in
        ``ShardedDataParallel`` (Lightning then calls the training step through it)."""
        from fairscale.nn.data_parallel import ShardedDataParallel

        from lightning_scale.core.sharding_fairscale import make_oss

        raw = [unwrap_optimizer(o) for o in self.optimizers]
        self._oss = [make_oss(o, self.group("dp")) for o in raw]
        self.optimizers = self._oss
        if self.zero.stage == 2:
            self.model = ShardedDataParallel(self.lightning_module, sharded_optimizer=self._oss,
                                             process_group=self.group("dp"))
        rank_zero_info(f"ZeroStrategy: stage {self.zero.stage} with fairscale OSS"
                       + (" + ShardedDataParallel" if self.zero.stage == 2 else ""))

    def _patch_gradient_clipping(self) -> None:
        super()._patch_gradient_clipping()
        if self.zero.implementation != "fairscale":
            return
        strategy = self

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float | int) -> None:
            # OSS: norm over each rank's own parameters, summed over the group.
            strategy.last_grad_norm = optimizer.clip_grad_norm(float(clip_val))

        self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    @contextmanager
    def block_backward_sync(self):
        """Accumulation micro-steps: ShardedDataParallel keeps gradients local until the last one."""
        from fairscale.nn.data_parallel import ShardedDataParallel

        if isinstance(self.model, ShardedDataParallel):
            with self.model.no_sync():
                yield
        else:
            yield

    def teardown(self) -> None:
        # Stage 2's gradient hooks live on the module's parameters: remove them so the module can
        # be trained again with another strategy in the same process.
        for engine in self._engines.values():
            engine.remove_hooks()
        super().teardown()

    # -- the step -------------------------------------------------------------------------------
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        raw = unwrap_optimizer(optimizer)
        engine = self._engines.get(id(raw))

        def closure_then_reduce() -> Any:
            result = closure()
            if engine is not None:
                engine.reduce_gradients()
            else:
                self.finalize_gradients()
            return result

        # ParallelStrategy's step (precision plugin -> closure -> clip -> optimizer.step), without
        # MeshStrategy's dp all-reduce: the reduction is the engine's (or FSDP2's).
        out = ParallelStrategy.optimizer_step(self, optimizer, closure_then_reduce, model, **kwargs)
        if engine is not None:
            engine.after_step()
        return out

    def finalize_gradients(self) -> None:
        """Stage 3: FSDP2 reduced the sharded gradients; average any plain (unsharded) ones.
        fairscale: stage 1 all-reduces the full gradients; stage 2's ShardedDataParallel did it."""
        assert self.lightning_module is not None
        if self.zero.implementation == "fairscale" and self.zero.stage == 2:
            return
        plain = [p for p in self.lightning_module.parameters() if not isinstance(p, DTensor)]
        if plain:
            allreduce_gradients(plain, self.group("dp"))

    def norm_parameters(self) -> list[nn.Parameter]:
        if self._engines:
            return [p for e in self._engines.values() for p in e.chunk_parameters]
        return super().norm_parameters()

    def model_parallel_groups(self) -> list[dist.ProcessGroup | None]:
        # Stage 1/2 chunks partition the model over dp: their norm is summed over dp. Stage 3's
        # DTensor shards are summed over their own mesh by global_grad_norm.
        return [self.group("dp")] if self._engines else []

    def engine(self, optimizer: Optimizer | None = None) -> ZeroOptimizer | None:
        """The stage 1/2 engine of ``optimizer`` (default: the first optimizer)."""
        if not self._engines:
            return None
        if optimizer is None:
            return next(iter(self._engines.values()))
        raw = unwrap_optimizer(optimizer)
        return self._engines.get(id(raw))

    # -- checkpoints ------------------------------------------------------------------------------
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self._oss:
            from lightning_scale.core.sharding_fairscale import oss_state_by_name

            raw = unwrap_optimizer(optimizer)
            assert self.lightning_module is not None
            return oss_state_by_name(raw, self.lightning_module, self.global_rank)
        engine = self.engine(optimizer)
        if engine is None:
            return super().optimizer_state(optimizer)
        return engine.state_dict_by_name()

    def _load_optimizer_states(self, path: Path) -> None:
        if self._oss:
            return self._load_oss_states(path)
        if not self._engines:
            return super()._load_optimizer_states(path)
        metadata = ckpt.read_metadata(path)
        for i, optimizer in enumerate(self.optimizers):
            engine = self.engine(optimizer)
            assert engine is not None
            prefix = f"optimizer_{i}."
            saved = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
            if not saved:
                raise ckpt.CheckpointError(f"checkpoint {path} has no optimizer_{i} state to resume from")
            need = engine.keys_to_load(saved)
            # Tensors this rank needs, plus the param-group options (small objects, every rank).
            target: dict[str, Any] = {k: torch.empty(saved[k]) for k in need if saved[k] is not None}
            target.update({k: 0 for k in need if saved[k] is None})
            target.update({k: 0 for k in saved if k.startswith("param_groups.")})
            state = {f"optimizer_{i}": target}
            ckpt.load_sharded(path, state)
            engine.load_state_dict_by_name(state[f"optimizer_{i}"])

    def _load_oss_states(self, path: Path) -> None:
        """fairscale: every rank reads every parameter's state; OSS keeps its partition."""
        from lightning_scale.core.sharding_fairscale import load_oss_state_by_name

        metadata = ckpt.read_metadata(path)
        for i, oss in enumerate(self._oss):
            prefix = f"optimizer_{i}."
            saved = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
            if not saved:
                raise ckpt.CheckpointError(f"checkpoint {path} has no optimizer_{i} state to resume from")
            target: dict[str, Any] = {k: (torch.empty(v) if v is not None else 0) for k, v in saved.items()}
            state = {f"optimizer_{i}": target}
            ckpt.load_sharded(path, state)
            assert self.lightning_module is not None
            load_oss_state_by_name(oss, self.lightning_module, state[f"optimizer_{i}"])
