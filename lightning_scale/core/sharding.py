"""ZeRO stages 1 and 2 on torch primitives, with optional optimizer offload to CPU. Torch only.

ZeRO (Rajbhandari et al., arXiv 1910.02054) removes the copies of model states that data
parallelism keeps on every rank. With Psi parameters, N data-parallel ranks and fp32 Adam
(4 bytes of parameter, 4 of gradient and 8 of Adam moments per parameter, design guide section 6):

=========  ====================  ======================  ===========================
stage      parameters (bytes)    gradients (bytes)       optimizer state (bytes)
=========  ====================  ======================  ===========================
DDP        4 Psi                 4 Psi                   8 Psi
1          4 Psi                 4 Psi                   8 Psi / N
2          4 Psi                 4 Psi / N               8 Psi / N
3          4 Psi / N             4 Psi / N               8 Psi / N   (FSDP2, in the strategy)
=========  ====================  ======================  ===========================

How :class:`ZeroOptimizer` does stages 1 and 2 for an optimizer the user already built:

* **Layout** (:func:`plan_buckets`, pure): the optimizer's parameters, in reverse registration
  order (roughly the order backward produces their gradients), are packed into buckets of about
  ``bucket_mb`` MiB; a bucket never mixes parameter groups, dtypes or devices. Each bucket is one
  flat buffer of ``padded`` elements (its parameters' total, rounded up to a multiple of N) and
  rank r owns the contiguous chunk ``[r * padded / N, (r + 1) * padded / N)`` of every bucket.
  Psi' = sum of ``padded`` is Psi plus less than N elements per bucket.
* **Parameters** become views into their bucket's buffer (``p.data = flat[o:o + n].view(shape)``),
  so the model itself is unchanged and every rank still holds all of them (4 Psi').
* **The optimizer** is re-pointed, in place, at one flat parameter per bucket: rank r's chunk.
  Its param-group options, its class and any LR scheduler built on it keep working; its state is
  created for the chunks only (8 Psi' / N for Adam). Without offload (fp32 parameters) the chunk
  *is* a view of the bucket, so the step updates the model's memory directly.
* **Stage 1** keeps full gradients: every parameter's ``.grad`` is a view into a flat gradient
  buffer per bucket (autograd accumulates into it in place); after the last backward of the step
  one ``reduce_scatter`` per bucket sums the gradients and leaves each rank its chunk.
* **Stage 2** keeps only the chunk: a post-accumulate-grad hook copies each parameter's gradient
  into a transient bucket buffer and drops ``.grad``; when a bucket's last gradient arrives it is
  reduce-scattered (asynchronously) and added to the rank's chunk gradient. Only one transient
  bucket per in-flight reduction exists at a time; the persistent gradient memory is 4 Psi' / N.
  With gradient accumulation every micro-step reduces (as DeepSpeed's stage 2 does).
* **After the step** each rank all-gathers its updated chunk into every bucket (in place), so
  all ranks hold the new parameters: reduce-scatter + all-gather is the same traffic as DDP's
  all-reduce.
* **Offload** (``offload_optimizer=True``; ZeRO-Offload, Ren et al., arXiv 2101.06840): the
  chunk parameters are fp32 copies on CPU (pinned when the parameters are on CUDA), the reduced
  gradient chunk is copied to a CPU buffer, the optimizer steps on CPU (``fused=True`` for
  Adam/AdamW, torch's fast CPU kernel, unless the user chose otherwise) and the updated chunk is
  copied back before the all-gather. Every host<->device copy goes through
  :mod:`lightning_scale.core.device`'s transfer helper and is waited on before its destination is
  read: on CUDA the copies are ``non_blocking`` (pinned memory) and a handle waits on a CUDA event;
  on CPU they are plain copies, and the tests run them under the helper's deferred-copy double
  (the destination holds garbage until waited on). The host buffers are registered as
  host-resident, so the collective audit fails a test that sends one to an NCCL-only group; the
  strategy runs offload on the mixed backend ``"cuda:nccl,cpu:gloo"`` (the optimizer state
  all-gather of a checkpoint carries host tensors).

Gradients are averaged (sum / N) over the data-parallel group, like DDP. The norm for clipping is
over the chunks (each element of the model lives in exactly one rank's chunk), summed over the
group: see :meth:`ZeroOptimizer.norm_groups`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_scale.core import device as dev
from lightning_scale.core.comm_timer import section as comm_section


# torch 2.13 renamed the flat-tensor collectives (the old names warn); same arguments.
def _reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``reduce_scatter_single`` (torch 2.13's name) or its older name ``reduce_scatter_tensor``,
    looked up at call time (so :class:`~lightning_scale.core.comm_timer.CommTimer`'s patch is seen)."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input, **kwargs)


def _all_gather_flat(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> Any:
    """``all_gather_single`` or its older name ``all_gather_into_tensor``, looked up at call time."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, **kwargs)


STAGES = (1, 2, 3)
SCALAR_STATE_KEYS = frozenset({"step"})  # optimizer state entries that are one value per parameter
IMPLEMENTATIONS = ("native", "fairscale")


@dataclass(frozen=True)
class ZeroConfig:
    """What to shard across the data-parallel ranks and what to offload.

    Args:
        stage: 1 = optimizer state, 2 = + gradients, 3 = + parameters (FSDP2).
        offload_optimizer: keep optimizer state (and fp32 master weights) on CPU and step there.
        offload_params: stage 3 only: keep sharded parameters on CPU between uses (FSDP2
            ``CPUOffloadPolicy``, which also moves gradients and the optimizer step to CPU).
        implementation: ``"native"`` (this module, FSDP2 for stage 3) or ``"fairscale"`` (stages
            1, 2: ``fairscale.optim.OSS`` + ``ShardedDataParallel``). Formerly ``backend`` (a word
            that also names the process group's gloo or nccl); reading ``.backend`` still works,
            with a DeprecationWarning.
        bucket_mb: target bucket size in MiB for the gradient reductions and all-gathers.
    """

    stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    implementation: str = "native"
    bucket_mb: float = 25.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"ZeRO stage must be 1, 2 or 3; got {self.stage!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"ZeRO implementation must be one of {IMPLEMENTATIONS}; got {self.implementation!r}")
        if self.offload_params and self.stage != 3:
            raise ValueError(
                f"offload_params=True needs stage=3 (only stage 3 shards parameters); got stage={self.stage}. "
                f"Use offload_optimizer=True to offload optimizer state at stage {self.stage}."
            )
        if self.stage == 3 and self.offload_optimizer and not self.offload_params:
            raise ValueError(
                "stage 3 offloads the optimizer together with the sharded parameters (FSDP2 CPUOffloadPolicy): "
                "set offload_params=True (and offload_optimizer=True or False)"
            )
        if self.implementation == "fairscale" and self.stage == 3:
            raise ValueError(
                "implementation='fairscale' supports stages 1 and 2 here: fairscale's FullyShardedDataParallel needs "
                "CUDA. Use implementation='native' for stage 3 (FSDP2)."
            )
        if self.implementation == "fairscale" and self.offload_optimizer:
            raise ValueError("implementation='fairscale' has no optimizer offload; use implementation='native' with "
                             "offload_optimizer=True")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0; got {self.bucket_mb}")

    def __getattr__(self, name: str) -> Any:  # only for names the instance lacks
        if name == "backend":
            import warnings

            warnings.warn("ZeroConfig.backend is deprecated; read .implementation", DeprecationWarning, stacklevel=2)
            return self.implementation
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Layout (pure)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One parameter's place in a bucket: elements ``[offset, offset + numel)`` of the flat buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BucketSpec:
    """A flat buffer of ``padded`` elements shared by the parameters in ``slots`` (one param group)."""

    index: int
    group: int
    dtype: torch.dtype
    slots: tuple[Slot, ...]
    numel: int  # sum of the slots' numel
    padded: int  # numel rounded up to a multiple of the world size

    def chunk(self, world: int) -> int:
        return self.padded // world

    def chunk_range(self, rank: int, world: int) -> tuple[int, int]:
        c = self.chunk(world)
        return rank * c, (rank + 1) * c

    def overlap(self, slot: Slot, rank: int, world: int) -> tuple[int, int] | None:
        """Elements of ``slot`` (relative to the slot) in ``rank``'s chunk, or None."""
        lo, hi = self.chunk_range(rank, world)
        a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        return (a - slot.offset, b - slot.offset) if a < b else None


def plan_buckets(
    groups: Sequence[Sequence[tuple[str, tuple[int, ...], torch.dtype]]], world: int, bucket_bytes: int
) -> list[BucketSpec]:
    """Pack each group's (name, shape, dtype) parameters into buckets (pure, same on every rank).

    Parameters are taken in reverse order within each group (the order backward tends to produce
    gradients); a bucket closes when adding the next parameter would exceed ``bucket_bytes`` (a
    single larger parameter gets a bucket of its own) or the dtype changes.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1; got {world}")
    specs: list[BucketSpec] = []
    for gi, params in enumerate(groups):
        current: list[Slot] = []
        count = 0  # elements in the open bucket
        dtype: torch.dtype | None = None

        def close() -> None:
            nonlocal current, count
            if current:
                padded = math.ceil(count / world) * world
                specs.append(BucketSpec(len(specs), gi, dtype, tuple(current), count, padded))  # type: ignore[arg-type]
            current, count = [], 0

        for name, shape, dt in reversed(list(params)):
            numel = math.prod(shape)
            itemsize = torch.empty((), dtype=dt).element_size()
            if current and (dt != dtype or (count + numel) * itemsize > bucket_bytes):
                close()
            dtype = dt
            current.append(Slot(name, count, numel, tuple(shape)))
            count += numel
        close()
    return specs


# ----------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    spec: BucketSpec
    params: list[nn.Parameter]  # aligned with spec.slots
    flat: torch.Tensor  # (padded,) the parameters' storage on the compute device
    master: nn.Parameter  # (chunk,) what the optimizer steps: a view of ``flat`` or an fp32 / CPU copy
    grads: torch.Tensor | None = None  # stage 1: (padded,) full gradients, the params' .grad are views
    shard_grad: torch.Tensor | None = None  # (chunk,) reduced gradient chunk (stage 2, or offload CPU copy)
    staging: torch.Tensor | None = None  # stage 2: transient (padded,) gradients of this backward
    ready: int = 0
    pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list)  # (work, output chunk)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` start at the same element of the same storage (what comparing data
    pointers says for real tensors; fake tensors, which the traced planner steps through this
    engine, have storages but no data pointers)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata and a.storage_offset() == b.storage_offset()


class ZeroOptimizer:
    """Shards ``optimizer``'s state (stage 1) and the gradients (stage 2) of ``module`` over ``group``.

    Build it after the optimizer and before the first step, on every rank of ``group`` with the
    same module and optimizer. Then, per optimizer step: backward(s) as usual, then
    :meth:`reduce_gradients`, optional clipping of the chunk gradients (norm over
    :meth:`norm_groups`), ``optimizer.step()``, :meth:`after_step`.

    Args:
        module: the model whose parameters the optimizer holds (for parameter names).
        optimizer: any ``torch.optim.Optimizer`` over parameters of ``module``, not stepped yet.
        group: the data-parallel process group (None or one rank: no communication).
        config: the :class:`ZeroConfig` (stage 1 or 2).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None,
                 config: ZeroConfig) -> None:
        if config.stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer implements stages 1 and 2; stage {config.stage} is FSDP2 (ZeroStrategy)")
        if optimizer.state:
            raise ValueError("ZeroOptimizer must wrap an optimizer that has not stepped yet (its state is not empty)")
        self.module, self.optimizer, self.group, self.config = module, optimizer, group, config
        distributed = group is not None and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        names = {id(p): n for n, p in module.named_parameters()}  # first name of tied parameters
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        by_name: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for gi, g in enumerate(optimizer.param_groups):
            entries = []
            for p in g["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) not in names:
                    raise ValueError(f"optimizer param group {gi} holds a parameter that is not in the module")
                if _is_dtensor(p):
                    raise ValueError(
                        f"ZeRO stage {config.stage} shards plain parameters; {names[id(p)]!r} is a DTensor (tensor "
                        "parallel or FSDP). Use stage 3 (FSDP2) with tensor parallelism."
                    )
                entries.append((names[id(p)], tuple(p.shape), p.dtype))
                by_name[names[id(p)]] = p
            groups.append(entries)
        devices = {p.device for p in by_name.values()}
        if len(devices) > 1:
            raise ValueError(f"ZeroOptimizer needs all parameters on one device; found {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.specs = plan_buckets(groups, self.world, int(config.bucket_mb * 2**20))
        self.offload_device = dev.HOST
        self._state_on_host = False  # offload: optimizer state registered as host-resident
        self.buckets = [self._build(spec, [by_name[s.name] for s in spec.slots]) for spec in self.specs]
        self._hooks: list[Any] = []
        if config.stage == 2:
            self._owner = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
            for b in self.buckets:
                for p in b.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        # Re-point the optimizer at the chunks, group by group (options, class and schedulers stay).
        for gi, g in enumerate(optimizer.param_groups):
            g["params"] = [b.master for b in self.buckets if b.spec.group == gi]
            if config.offload_optimizer and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                if g.get("fused") is None and not g.get("differentiable") and not g.get("foreach"):
                    g["fused"] = True  # torch's fused CPU Adam(W) kernel

    # -- construction ---------------------------------------------------------------------------
    def _build(self, spec: BucketSpec, params: list[nn.Parameter]) -> _Bucket:
        flat = torch.zeros(spec.padded, dtype=spec.dtype, device=self.device)
        with torch.no_grad():
            for slot, p in zip(spec.slots, params):
                view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
                view.copy_(p.detach())
                p.data = view
                p.grad = None
        lo, hi = spec.chunk_range(self.rank, self.world)
        separate = self.config.offload_optimizer or spec.dtype != torch.float32
        if separate:
            if self.config.offload_optimizer:  # pinned when self.device is CUDA; host-resident
                master_data = dev.host_empty(hi - lo, torch.float32, self.device)
            else:
                master_data = torch.empty(hi - lo, dtype=torch.float32, device=self.device)
            dev.copy_(master_data, flat[lo:hi]).wait()
        else:
            master_data = flat[lo:hi]  # a view: the step writes the model's memory
        bucket = _Bucket(spec, params, flat, nn.Parameter(master_data, requires_grad=True))
        if self.config.stage == 1:
            bucket.grads = torch.zeros(spec.padded, dtype=spec.dtype, device=self.device)
            self._point_grads(bucket)
        if separate:
            # The reduced gradient chunk in the master's dtype / device (on CPU with offload).
            if self.config.offload_optimizer:
                bucket.shard_grad = dev.host_empty(hi - lo, torch.float32, self.device, zero=True)
            else:
                bucket.shard_grad = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        elif self.config.stage == 2:
            bucket.shard_grad = torch.zeros(hi - lo, dtype=spec.dtype, device=self.device)
        return bucket

    def _point_grads(self, bucket: _Bucket) -> None:
        assert bucket.grads is not None
        for slot, p in zip(bucket.spec.slots, bucket.params):
            p.grad = bucket.grads[slot.offset : slot.offset + slot.numel].view(slot.shape)

    # -- stage 2: reduce buckets as their gradients arrive ---------------------------------------
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        bucket, i = self._owner[id(p)]
        if p.grad is None:
            return
        if bucket.staging is None:
            bucket.staging = torch.zeros(bucket.spec.padded, dtype=bucket.spec.dtype, device=self.device)
        slot = bucket.spec.slots[i]
        bucket.staging[slot.offset : slot.offset + slot.numel].add_(p.grad.detach().reshape(-1))
        p.grad = None
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        """Reduce-scatter the bucket's staged gradients (async); the chunk is added on completion."""
        assert bucket.staging is not None
        out = torch.empty(bucket.spec.chunk(self.world), dtype=bucket.spec.dtype, device=self.device)
        if self.world > 1:
            work = _reduce_scatter_flat(out, bucket.staging, group=self.group, async_op=True)
        else:
            out.copy_(bucket.staging)
            work = None
        bucket.pending.append((work, out))
        bucket.staging = None  # freed once the reduction no longer needs it (the work holds it)
        bucket.ready = 0

    def _drain(self, bucket: _Bucket) -> list[tuple[torch.Tensor, dev.Transfer]]:
        """Wait for the bucket's reductions; start copying each reduced chunk to ``shard_grad``'s
        device and dtype. Returns (staged chunk, its transfer): wait on it before adding."""
        assert bucket.shard_grad is not None
        staged = []
        for work, out in bucket.pending:
            if work is not None:
                with comm_section("dp"):  # the asynchronous reduce-scatter's exposed tail
                    work.wait()
            if self.config.offload_optimizer:  # device -> pinned host copy
                staged.append(dev.to_host(out, bucket.shard_grad.dtype, like=self.device))
            elif out.dtype != bucket.shard_grad.dtype:
                staged.append((out.to(bucket.shard_grad.dtype), dev.DONE))
            else:
                staged.append((out, dev.DONE))
        bucket.pending.clear()
        return staged

    # -- the step -------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """After the last backward of a step: sum gradients over the group, keep this rank's chunk
        (divided by N), and hand it to the optimizer as the chunk parameters' ``.grad``."""
        chunks: list[torch.Tensor] = []
        transfers: list[dev.Transfer] = []  # host<->device copies to land before the chunks are read
        adds: list[tuple[torch.Tensor, list[tuple[torch.Tensor, dev.Transfer]]]] = []  # stage 2
        for b in self.buckets:
            if self.config.stage == 1:
                assert b.grads is not None
                # Lightning or the user may have replaced a .grad (set_to_none): fold it back in.
                for slot, p in zip(b.spec.slots, b.params):
                    g = p.grad
                    view = b.grads[slot.offset : slot.offset + slot.numel]
                    if g is not None and not _same_memory(g, view):
                        view.add_(g.detach().reshape(-1))
                lo, hi = b.spec.chunk_range(self.rank, self.world)
                if self.world > 1:
                    out = torch.empty(hi - lo, dtype=b.spec.dtype, device=self.device)
                    _reduce_scatter_flat(out, b.grads, group=self.group)
                    b.grads[lo:hi].copy_(out)
                chunk = b.grads[lo:hi]
                if b.shard_grad is not None:  # separate master (offload / low precision)
                    transfers.append(dev.copy_(b.shard_grad, chunk))
                    chunk = b.shard_grad
            else:
                if b.ready:  # parameters that got no gradient this backward: reduce what arrived
                    self._launch(b)
                adds.append((b.shard_grad, self._drain(b)))
                chunk = b.shard_grad
            assert chunk is not None
            chunks.append(chunk)
        dev.wait_all(transfers)
        for shard_grad, staged in adds:  # stage 2: add each reduced chunk once it has landed
            for data, transfer in staged:
                transfer.wait()
                shard_grad.add_(data)
        for b, chunk in zip(self.buckets, chunks):
            if self.world > 1:
                chunk.div_(self.world)
            b.master.grad = chunk.view_as(b.master) if chunk.dtype == b.master.dtype else chunk.to(b.master.dtype)

    def after_step(self) -> None:
        """After ``optimizer.step()``: every rank's updated chunk into every bucket; clear gradients."""
        with torch.no_grad():
            # Updated chunks back into the buckets (host -> device with offload), landed before
            # the all-gathers read them and before the next step writes the masters again.
            chunks = [b.flat[slice(*b.spec.chunk_range(self.rank, self.world))] for b in self.buckets]
            dev.wait_all([dev.copy_(chunk, b.master.detach()) for b, chunk in zip(self.buckets, chunks)
                          if not _same_memory(b.master, chunk)])
            if self.config.offload_optimizer and not self._state_on_host:  # created by the first step
                self._register_host_state()
            for b in self.buckets:
                lo, hi = b.spec.chunk_range(self.rank, self.world)
                if self.world > 1:
                    _all_gather_flat(b.flat, b.flat[lo:hi], group=self.group)
                if b.grads is not None:
                    b.grads.zero_()
                    self._point_grads(b)
                if b.shard_grad is not None:
                    b.shard_grad.zero_()
                b.master.grad = None

    def norm_groups(self) -> list[dist.ProcessGroup | None]:
        """Groups to sum the chunk gradients' norm over (each element lives in one rank's chunk)."""
        return [self.group] if self.world > 1 else []

    @property
    def chunk_parameters(self) -> list[nn.Parameter]:
        return [b.master for b in self.buckets]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- checkpoints: optimizer state keyed by parameter name -----------------------------------
    def state_dict_by_name(self) -> dict[str, Any]:
        """The optimizer state in the flat, name-keyed form of
        ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``:
        ``"state.<param>.<key>"`` -> tensor of the parameter's shape, ``"param_groups.<param>.<option>"``.

        Collective over the group (one all-gather per bucket and state tensor). Each parameter's
        full state is kept by one rank only (parameter i by rank i mod N), so the returned dict
        holds about 1/N of the state: DCP writes each key from the rank that has it.
        """
        out: dict[str, Any] = {}
        for b in self.buckets:
            state = self.optimizer.state.get(b.master, {})
            group = next(g for g in self.optimizer.param_groups if any(m is b.master for m in g["params"]))
            options = {k: v for k, v in group.items() if k != "params"}
            keys = sorted(state)  # same on every rank: every chunk steps together
            for key in keys:
                value = state[key]
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == b.master.numel():
                    full = torch.empty(b.spec.padded, dtype=value.dtype, device=value.device)
                    if self.world > 1:
                        _all_gather_flat(full, value.detach().contiguous(), group=self.group)
                    else:
                        full.copy_(value)
                    for i, slot in enumerate(b.spec.slots):
                        if self._writer(b, i):
                            out[f"state.{slot.name}.{key}"] = full[slot.offset : slot.offset + slot.numel].view(
                                slot.shape).clone()
                else:  # per-parameter scalars (Adam's "step"): the same for every element
                    for i, slot in enumerate(b.spec.slots):
                        if self._writer(b, i):
                            out[f"state.{slot.name}.{key}"] = value.clone() if torch.is_tensor(value) else value
            for slot in b.spec.slots:
                for k, v in options.items():
                    out[f"param_groups.{slot.name}.{k}"] = v
        return out

    def _writer(self, bucket: _Bucket, i: int) -> bool:
        return (bucket.spec.index + i) % self.world == self.rank

    def keys_to_load(self, saved: Mapping[str, Any]) -> list[str]:
        """The ``state.*`` keys of a checkpoint (``saved``: its keys) this rank needs: every state of
        the parameters overlapping its chunks, and the scalars of each bucket's first parameter."""
        need = []
        for b in self.buckets:
            for i, slot in enumerate(b.spec.slots):
                overlapping = b.spec.overlap(slot, self.rank, self.world) is not None
                prefix = f"state.{slot.name}."
                for key in saved:
                    if not key.startswith(prefix) or "." in key[len(prefix):]:
                        continue
                    if overlapping or (i == 0 and key[len(prefix):] in SCALAR_STATE_KEYS):
                        need.append(key)
        return need

    def load_state_dict_by_name(self, flat: Mapping[str, Any]) -> None:
        """Build this rank's chunk state from full per-parameter entries (``state.<param>.<key>``).

        ``flat`` needs the keys :meth:`keys_to_load` names. Entries in ``SCALAR_STATE_KEYS``
        (Adam's ``step``) are taken from each bucket's first parameter; every other entry must have
        its parameter's shape. ``param_groups.<param>.<option>`` entries, if present, are applied to
        the optimizer's groups (an LR scheduler then overwrites ``lr``, as usual).

        The chunk states go in through ``Optimizer.load_state_dict``, so torch places each value
        as the optimizer needs it (Adam's ``step`` on the host, or on the parameter's device for a
        fused/capturable optimizer; moments on the master's device and dtype).
        """
        chunk_states: dict[int, dict[str, Any]] = {}
        for b in self.buckets:
            first = b.spec.slots[0].name
            prefix = f"state.{first}."
            keys = sorted({
                k[len(f"state.{slot.name}."):]
                for slot in b.spec.slots
                for k in flat
                if k.startswith(f"state.{slot.name}.") and "." not in k[len(f"state.{slot.name}."):]
            })
            state: dict[str, Any] = {}
            lo, _ = b.spec.chunk_range(self.rank, self.world)
            for key in keys:
                if key in SCALAR_STATE_KEYS:
                    v = flat[prefix + key]
                    state[key] = v.detach().clone() if torch.is_tensor(v) else v
                    continue
                chunk = torch.zeros_like(b.master.detach())
                for slot in b.spec.slots:
                    ov = b.spec.overlap(slot, self.rank, self.world)
                    if ov is None:
                        continue
                    value = flat.get(f"state.{slot.name}.{key}")
                    if value is None or tuple(value.shape) != slot.shape:
                        raise ValueError(
                            f"optimizer state {slot.name}.{key}: expected a tensor of shape {slot.shape}, got "
                            f"{None if value is None else tuple(value.shape)}"
                        )
                    start = slot.offset + ov[0] - lo
                    chunk[start : start + ov[1] - ov[0]].copy_(value.reshape(-1)[ov[0] : ov[1]])
                state[key] = chunk
            if state:
                chunk_states[id(b.master)] = state
            for g in self.optimizer.param_groups:
                if any(m is b.master for m in g["params"]):
                    for k in list(g):
                        saved = flat.get(f"param_groups.{first}.{k}")
                        if k != "params" and saved is not None:
                            g[k] = saved
        if chunk_states:
            full = self.optimizer.state_dict()  # torch's indexing of the chunk parameters
            index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
            full["state"] = {index[k]: v for k, v in chunk_states.items()}
            self.optimizer.load_state_dict(full)
            if self.config.offload_optimizer:
                self._register_host_state()

    def _register_host_state(self) -> None:
        """Offload: the optimizer's state tensors live on the host by design (for the audit)."""
        dev.register_host(*(v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)))
        self._state_on_host = True

    # -- accounting -----------------------------------------------------------------------------
    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Buffers the engine keeps between steps that no parameter points to (for
        :func:`lightning_scale.core.memory.model_state_bytes`): the gradient buffers."""
        grads = [t for b in self.buckets for t in (b.grads, b.shard_grad) if t is not None]
        return {"grads": grads}

    def padded_numel(self) -> int:
        """Psi': the parameters' element count including bucket padding."""
        return sum(s.padded for s in self.specs)



def __getattr__(name: str) -> Any:
    if name == "fully_shard_blocks":  # its former home; ZeRO-3 (FSDP2) lives in core/fsdp.py
        import warnings

        from lightning_scale.core.fsdp import fully_shard_blocks

        warnings.warn("lightning_scale.core.sharding.fully_shard_blocks is deprecated; import it from "
                      "lightning_scale.core.fsdp", DeprecationWarning, stacklevel=2)
        return fully_shard_blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
