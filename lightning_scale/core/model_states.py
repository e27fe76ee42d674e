"""Predicted model-state bytes (parameters, gradients, optimizer state) per rank. Torch only.

Two ways in:

* :func:`psi_model_states` - the ZeRO paper's closed forms from a parameter count Psi
  (Rajbhandari et al., arXiv 1910.02054, section 3 and Figure 1; design guide section 6):
  mixed-precision Adam keeps 2 Psi (16-bit params) + 2 Psi (16-bit grads) + K Psi with K = 12
  (fp32 master, m, v): baseline 16 Psi; ZeRO-1 4 Psi + 12 Psi / N; ZeRO-2 2 Psi + 14 Psi / N;
  ZeRO-3 16 Psi / N. Plain fp32 Adam: 4 + 4 + 8.
* :func:`rank_model_states` - exact bytes for this suite's engines from the parameters one rank
  holds (:func:`rank_parameters` builds that list from a model on the ``meta`` device with the
  same pipeline split and tensor-parallel placements the strategies use). The engines' padding
  is reproduced: ZeRO-1/2 (:mod:`lightning_scale.core.sharding`) pads each bucket to a multiple
  of N and Adam steps one tensor per bucket chunk; FSDP2 (ZeRO-3) pads each parameter's dim 0 to
  a multiple of N and steps one tensor per parameter, whose optimizer state follows the
  unpadded shard (smaller on the last ranks when dim 0 does not divide: ``dp_rank``). Tests
  compare these numbers with the tensors of real gloo runs, to the byte.

Bytes are split by where they live: ``device`` (the accelerator) or ``host`` (CPU offload).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd_momentum")
CATEGORIES = ("params", "grads", "optimizer")


@dataclass(frozen=True)
class StateDtypes:
    """Bytes per element: parameter, gradient, fp32 master copy (0 = none), each optimizer moment."""

    param: int
    grad: int
    master: int
    moment: int

    @classmethod
    def for_precision(cls, precision: str, zero_stage: int = 0) -> StateDtypes:
        """Lightning ``precision`` (plus ``"mixed"``: the ZeRO paper's fp16 params + fp32 master).

        ``bf16-true`` keeps an fp32 master chunk and fp32 moments only in the ZeRO-1/2 engine
        (:mod:`lightning_scale.core.sharding`); elsewhere torch's optimizers keep their moments in
        the parameter dtype and there is no master copy.
        """
        p = str(precision)
        if p in ("32-true", "32", "bf16-mixed", "16-mixed"):
            return cls(param=4, grad=4, master=0, moment=4)
        if p == "mixed":
            return cls(param=2, grad=2, master=4, moment=4)
        if p in ("bf16-true", "16-true"):
            return cls(param=2, grad=2, master=4, moment=4) if zero_stage in (1, 2) else cls(2, 2, 0, 2)
        raise ValueError(f"unknown precision {precision!r}; use 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true or mixed")


def moments(optimizer: str) -> int:
    """Optimizer tensors per parameter element (Adam: m and v; SGD with momentum: one buffer)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    return {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}[optimizer]


@dataclass
class StateBytes:
    """``{category: {"device": bytes, "host": bytes}}`` of one rank, plus transient buffers."""

    bytes: dict[str, dict[str, int]] = field(default_factory=lambda: {c: {"device": 0, "host": 0} for c in CATEGORIES})
    transient: dict[str, int] = field(default_factory=dict)  # name -> device bytes alive only part of a step
    stepped: int = 0  # elements the rank's optimizer updates on the device (0: offloaded to the host)

    def add(self, category: str, where: str, n: float) -> None:
        self.bytes[category][where] += int(n)

    def total(self, category: str | None = None, where: str | None = None) -> int:
        cats = [category] if category else list(CATEGORIES)
        places = [where] if where else ["device", "host"]
        return sum(self.bytes[c][p] for c in cats for p in places)


def psi_model_states(psi: int, dp: int, zero_stage: int, *, precision: str = "mixed", optimizer: str = "adamw",
                     offload: bool = False) -> StateBytes:
    """The ZeRO paper's per-rank model states for Psi parameters over ``dp`` data-parallel ranks.

    ``offload`` (ZeRO-Offload, arXiv 2101.06840): the optimizer state and the fp32 master live
    on the host, and from stage 2 the gradient partitions too; stage 3 offload (ZeRO-Infinity style, FSDP2 ``CPUOffloadPolicy``) moves the
    sharded 16-bit parameters and gradients there too.
    """
    _check_stage(zero_stage, dp)
    d = StateDtypes.for_precision(precision, zero_stage)
    k = d.master + moments(optimizer) * d.moment  # the paper's K
    out = StateBytes()
    n = dp
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[zero_stage]
    params, grads, opt = d.param * psi / shard[0], d.grad * psi / shard[1], k * psi / shard[2]
    out.add("params", "host" if (offload and zero_stage == 3) else "device", params)
    out.add("grads", "host" if (offload and zero_stage >= 2) else "device", grads)
    out.add("optimizer", "host" if offload else "device", opt)
    out.stepped = 0 if offload else math.ceil(psi / shard[2])
    return out


def _check_stage(zero_stage: int, dp: int) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0 (none), 1, 2 or 3; got {zero_stage!r}")
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1; got {dp}")


# ----------------------------------------------------------------------------------------------
# Exact: from the parameters a rank holds
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]  # local shape on this rank (after the pipeline split and TP sharding)
    group: int = 0  # optimizer param group


def decay_groups(named: Sequence[tuple[str, tuple[int, ...]]]) -> list[ParamSpec]:
    """The suite's AdamW grouping (:func:`lightning_scale.core.optim.param_groups`): tensors with
    >= 2 dims decay (group 0), the rest do not (group 1); empty groups are dropped."""
    decay = [ParamSpec(n, s, 0) for n, s in named if len(s) >= 2]
    rest = [ParamSpec(n, s, 1 if decay else 0) for n, s in named if len(s) < 2]
    return decay + rest


def fsdp_shard_rows(rows: int, dp: int, dp_rank: int) -> int:
    """Rows of a dim-0 size ``rows`` that FSDP2 gives data-parallel rank ``dp_rank`` of ``dp``
    (``torch.chunk``: ceil(rows / dp) each from rank 0 on, the last ranks get fewer or none)."""
    chunk = math.ceil(rows / dp)
    return max(0, min(chunk, rows - dp_rank * chunk))


def rank_model_states(params: Sequence[ParamSpec], dp: int, zero_stage: int, *, precision: str = "32-true",
                      optimizer: str = "adamw", offload: bool = False, bucket_mb: float = 25.0,
                      ddp_buckets: bool = False, dp_rank: int = 0) -> StateBytes:
    """Exact model-state bytes of one rank of this suite's engines.

    Args:
        params: what the rank holds before data-parallel sharding (:func:`rank_parameters`).
        dp: data-parallel ranks sharing those parameters.
        zero_stage: 0 (replicated), 1/2 (:class:`~lightning_scale.core.sharding.ZeroOptimizer`), 3 (FSDP2).
        offload: stages 1/2: optimizer state, fp32 master chunk and a gradient chunk on the host;
            stage 3: FSDP2 ``CPUOffloadPolicy`` (parameters, gradients and optimizer on the host).
        ddp_buckets: stage 0 under torch DDP (Lightning's ``ddp``): its reducer keeps a flat copy
            of the gradients (``gradient_as_bucket_view=False``), reported as a transient buffer.
        dp_rank: which data-parallel rank. Only FSDP2 (stage 3) differs between them: its
            parameter and gradient shards are padded to ceil(dim 0 / N) rows on every rank, but the
            optimizer state is sized like the unpadded shard, which is smaller (or empty) on the
            last ranks when dim 0 does not divide (e.g. a ViT's (1, 1, D) [CLS] token). Rank 0
            holds the most (the default, the planner's worst case).
    """
    _check_stage(zero_stage, dp)
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank must be in 0..{dp - 1}; got {dp_rank}")
    d = StateDtypes.for_precision(precision, zero_stage)
    k_moments = moments(optimizer)
    steps = optimizer in ("adam", "adamw")  # Adam keeps a 4-byte fp32 "step" tensor per stepped tensor
    out = StateBytes()
    numel = [math.prod(p.shape) for p in params]
    psi = sum(numel)
    if zero_stage == 0:
        out.add("params", "device", d.param * psi)
        out.add("grads", "device", d.grad * psi)
        out.add("optimizer", "device", (k_moments * d.moment + d.master) * psi + (4 * len(params) if steps else 0))
        if ddp_buckets:
            out.transient["DDP gradient buckets"] = d.grad * psi
        out.stepped = psi
        return out
    if zero_stage == 3:
        # FSDP2: dim 0 of every parameter padded to a multiple of dp, one shard per rank.
        padded = sum(math.ceil(p.shape[0] / dp) * dp * math.prod(p.shape[1:]) if p.shape else dp for p in params)
        local = sum(fsdp_shard_rows(p.shape[0], dp, dp_rank) * math.prod(p.shape[1:]) if p.shape else 1 for p in params)
        where = "host" if offload else "device"
        out.add("params", where, d.param * padded // dp)
        out.add("grads", where, d.grad * padded // dp)
        out.add("optimizer", where, (k_moments * d.moment + d.master) * local + (4 * len(params) if steps else 0))
        largest = sorted((d.param * math.prod(p.shape) for p in params), reverse=True)
        out.transient["all-gathered parameters (upper bound: 2 largest tensors)"] = sum(largest[:2])
        out.stepped = 0 if offload else local
        return out
    # ZeRO-1/2: the engine's buckets (same packing function), one Adam step tensor per bucket.
    from lightning_scale.core.sharding import plan_buckets

    dtype = {4: torch.float32, 2: torch.bfloat16}[d.param]
    groups: dict[int, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}
    for p in params:
        groups.setdefault(p.group, []).append((p.name, tuple(p.shape), dtype))
    specs = plan_buckets([groups[g] for g in sorted(groups)], dp, int(bucket_mb * 2**20))
    padded = sum(s.padded for s in specs)
    chunk = padded // dp
    master = 4 if (offload or d.master) else 0  # offload steps an fp32 master chunk on the host
    out.add("params", "device", d.param * padded)
    if zero_stage == 1:
        out.add("grads", "device", d.grad * padded)
    else:
        out.add("grads", "host" if offload else "device", d.grad * chunk)
    if zero_stage == 1 and offload:
        out.add("grads", "host", d.grad * chunk)
    opt_where = "host" if offload else "device"
    out.add("optimizer", opt_where, (k_moments * 4 if (offload or d.master) else k_moments * d.moment) * chunk
            + master * chunk + (4 * len(specs) if steps else 0))
    if zero_stage == 2:
        out.transient["reduce-scatter staging bucket"] = d.grad * max(s.padded for s in specs)
    out.stepped = 0 if offload else chunk
    return out


def rank_parameters(
    network: nn.Module,
    *,
    pp: int = 1,
    pp_rank: int = 0,
    schedule: str = "1f1b",
    virtual_stages: int | None = None,
    microbatches: int | None = None,
    tp: int = 1,
    tp_plan: dict | None = None,
    grouping: Callable[[Sequence[tuple[str, tuple[int, ...]]]], list[ParamSpec]] = decay_groups,
) -> list[ParamSpec]:
    """The parameters pipeline rank ``pp_rank`` / any TP rank holds, with their local shapes.

    ``network`` is best built on the ``meta`` device (no memory). The split is
    :func:`lightning_scale.core.pipeline.plan_pipeline` (balanced by parameter count) and the
    TP shapes follow the placements the plan's ParallelStyles give (exact division: the TP
    strategies refuse sizes that do not divide).
    """
    from lightning_scale.core.pipeline import PipelineConfig, plan_pipeline, view_of
    from lightning_scale.core.tensor_parallel import _predicted_placements, resolve_plan
    from torch.distributed.tensor import Shard

    module = network
    if pp > 1:
        cfg = PipelineConfig(stages=pp, schedule=schedule, virtual_stages=virtual_stages, microbatches=microbatches)
        plan = plan_pipeline(network, cfg)
        module = view_of(network, plan, [s for s, r in enumerate(plan.stage_ranks) if r == pp_rank])
    shards: dict[int, int] = {}  # id(param) -> sharded dim
    if tp > 1:
        if tp_plan is None:
            raise ValueError("tp > 1 needs the TP plan (e.g. lightning_scale.core.tensor_parallel.gpt_tp_plan())")
        for path, style in resolve_plan(module, tp_plan).items():
            sub = module.get_submodule(path)
            for pname, placements in _predicted_placements(sub, style).items():
                param = getattr(sub, pname, None)
                if isinstance(param, nn.Parameter) and placements and isinstance(placements[0], Shard):
                    shards[id(param)] = placements[0].dim
    named = []
    for name, p in module.named_parameters():  # tied parameters once, as the optimizer sees them
        shape = list(p.shape)
        if id(p) in shards:
            dim = shards[id(p)]
            if shape[dim] % tp:
                raise ValueError(f"{name}: dim {dim} of size {shape[dim]} is not divisible by tp={tp}")
            shape[dim] //= tp
        named.append((name, tuple(shape)))
    return grouping(named)
