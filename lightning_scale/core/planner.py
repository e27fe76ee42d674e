"""The memory planner: per-device memory of a training layout, whether it fits, and the fastest
layout that does. Torch only (no Lightning); the CLI is ``lightning-scale plan``.

A prediction is the sum, per pipeline rank (tensor- and data-parallel ranks of one pipeline
rank hold the same amounts), of

* model states (:mod:`lightning_scale.core.model_states`): exact for the suite's GPT, ViT and
  ResNet (built on the ``meta`` device and split / sharded / padded as the strategies do), the
  ZeRO paper's closed forms for a model given only by its parameter count;
* activations (:mod:`lightning_scale.core.activation_model`): Korthikanti et al.'s per-layer
  inventory for the suite's transformer kernels (GPT; ViT with s = patches + 1 tokens), times
  the microbatches the pipeline schedule keeps in flight, under the activation-checkpointing
  policy; for the ResNet, which has no closed form, a forward on the ``meta`` device counting
  the bytes it leaves for the backward (:mod:`lightning_scale.core.meta_activations`);
* transient buffers: one recomputed layer (full / selective checkpointing), ZeRO-3's gathered
  parameters, ZeRO-2's staging bucket, torch DDP's gradient buckets, the logits; and the model's
  buffers (BatchNorm running statistics), which live all step but are none of the model states.

**Units**: bytes; tables print GB = 1e9 bytes (the ZeRO paper's unit). A device "fits" when the
peak is at most ``memory_gb * 1e9 * (1 - reserve_fraction) - context_gb * 1e9``: the CUDA
context (0.287 GB, measured in PyTorch PR #86509 with lazy module loading) and a reserve
(default 10%) for communication buffers and allocator fragmentation, which no tensor count sees;
the reserve is an assumption, not a measurement (see :class:`Hardware`).

**Recommendation** (:func:`recommend`): candidate layouts in a fixed order of expected speed,
first the one that fits: plain data parallelism; ZeRO-1, -2, -3; each again with selective then
full activation checkpointing; then tensor parallelism inside a node (with sequence
parallelism), then pipeline stages; CPU offload last (its optimizer step runs on the host, over
PCIe). That order is the usual practice (DeepSpeed's and Megatron's guides), not a measurement
of this machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_scale.core.activation_model import (
    AC_POLICIES,
    SCHEDULES,
    ActivationEstimate,
    ActivationModel,
    in_flight_microbatches,
    model_activation_bytes,
    vit_outer_items,
)
from lightning_scale.core.model_states import (
    OPTIMIZERS,
    StateBytes,
    psi_model_states,
    rank_model_states,
    rank_parameters,
)

GB = 1e9
OPTIMIZER_IMPLS = ("foreach", "fused", "for-loop")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _as_config(config_cls: Any, config: Any) -> Any:
    """A model config from itself, a preset name (``config_cls.from_preset``) or a dict of its fields."""
    if isinstance(config, str):
        return config_cls.from_preset(config)
    if isinstance(config, dict):
        return config_cls(**config)
    return config


@dataclass(frozen=True)
class ModelSpec:
    """The model: the shapes activations depend on, and the parameter count.

    Build it with :meth:`from_gpt`, :meth:`from_vit` or :meth:`from_resnet` (exact model states:
    the suite's model on the meta device; :meth:`from_config` picks one) or directly from the
    dimensions and ``params`` of a GPT-style decoder (the ZeRO paper's closed forms).

    For a ViT the fields are its transformer's (``vocab`` = classes); for a ResNet, which has no
    attention, ``n_layer`` = residual blocks, ``hidden`` = ``mlp_hidden`` = the last stage's
    channels, ``heads`` = 1, ``vocab`` = classes (its activations come from a meta forward).
    """

    n_layer: int
    hidden: int
    heads: int
    vocab: int
    mlp_hidden: int
    params: int
    dropout: bool = False
    gpt: Any = None  # a lightning_scale.models.GPTConfig: enables the exact per-rank parameter count
    vision: Any = None  # a lightning_scale.models.ViTConfig or ResNetConfig (exact, as ``gpt``)

    def __post_init__(self) -> None:
        for name in ("n_layer", "hidden", "heads", "vocab", "mlp_hidden", "params"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec.{name} must be a positive integer; got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.gpt is not None and self.vision is not None:
            raise ValueError("ModelSpec takes one model config: gpt= or vision=, not both")

    @property
    def config(self) -> Any:
        """The suite model's config (GPT, ViT or ResNet), or None for a dimensions-only model."""
        return self.gpt if self.gpt is not None else self.vision

    @property
    def kind(self) -> str:
        """``"gpt"``, ``"vit"``, ``"resnet"`` or ``"dims"`` (dimensions and a parameter count)."""
        if self.gpt is not None:
            return "gpt"
        if self.vision is None:
            return "dims"
        from lightning_scale.models.vit import ViTConfig

        return "vit" if isinstance(self.vision, ViTConfig) else "resnet"

    @classmethod
    def from_gpt(cls, config: Any) -> ModelSpec:
        from lightning_scale.models.gpt import GPTConfig, gpt_param_count

        config = _as_config(GPTConfig, config)
        return cls(n_layer=config.n_layer, hidden=config.n_embd, heads=config.n_head, vocab=config.vocab_size,
                   mlp_hidden=config.mlp_hidden, params=gpt_param_count(config), dropout=config.dropout > 0,
                   gpt=config)

    @classmethod
    def from_vit(cls, config: Any) -> ModelSpec:
        """A :class:`~lightning_scale.models.ViTConfig` (or a preset name / dict of its fields)."""
        from lightning_scale.models.vit import ViTConfig, vit_param_count

        config = _as_config(ViTConfig, config)
        return cls(n_layer=config.n_layer, hidden=config.n_embd, heads=config.n_head, vocab=config.num_classes,
                   mlp_hidden=config.mlp_hidden, params=vit_param_count(config), dropout=config.dropout > 0,
                   vision=config)

    @classmethod
    def from_resnet(cls, config: Any) -> ModelSpec:
        """A :class:`~lightning_scale.models.ResNetConfig` (or a preset name / dict of its fields)."""
        from lightning_scale.models.resnet import ResNetConfig, resnet_param_count

        config = _as_config(ResNetConfig, config)
        last = 4 * config.width  # channels of the last stage
        return cls(n_layer=3 * config.blocks_per_stage, hidden=last, heads=1, vocab=config.num_classes,
                   mlp_hidden=last, params=resnet_param_count(config), vision=config)

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """A GPT, ViT or ResNet config object, or a preset name of any of them."""
        from lightning_scale.models import GPT_PRESETS, RESNET_PRESETS, VIT_PRESETS, GPTConfig, ResNetConfig, ViTConfig

        if isinstance(config, GPTConfig) or (isinstance(config, str) and config in GPT_PRESETS):
            return cls.from_gpt(config)
        if isinstance(config, ViTConfig) or (isinstance(config, str) and config in VIT_PRESETS):
            return cls.from_vit(config)
        if isinstance(config, ResNetConfig) or (isinstance(config, str) and config in RESNET_PRESETS):
            return cls.from_resnet(config)
        known = sorted([*GPT_PRESETS, *VIT_PRESETS, *RESNET_PRESETS])
        raise ValueError(f"{config!r} is not a GPTConfig, ViTConfig or ResNetConfig, nor a preset name; "
                         f"presets: {known}")


@dataclass(frozen=True)
class Workload:
    """``batch_size``: sequences (images) per optimizer step over all data-parallel replicas (global).

    ``seq_len``: tokens per sequence; a ViT's is fixed by its config (patches + 1), a ResNet has
    none (give 1). ``image_size``: side in pixels of the square input images, needed for a ResNet
    (a ViT's is its config's; when given it must agree).
    """

    batch_size: int
    seq_len: int
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    image_size: int | None = None
    #: torch's optimizer implementation: "foreach" (its default on CUDA), "fused" or "for-loop"
    #: (its default on CPU); decides the optimizer step's temporary (see :func:`step_temporary`)
    optimizer_impl: str = "foreach"

    def __post_init__(self) -> None:
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer_impl must be one of {OPTIMIZER_IMPLS}; got {self.optimizer_impl!r}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1; got {self.batch_size}, {self.seq_len}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size must be a positive integer (pixels) or None; got {self.image_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        ActivationModel.for_precision(self.precision)  # validates the precision string


#: GB one process's CUDA context takes on the device with lazy module loading (torch's default
#: since 1.13, CUDA's since 12.2): 287,047,680 bytes measured in PyTorch PR #86509
#: (https://github.com/pytorch/pytorch/pull/86509; 666,632,192 bytes with eager loading). Kernels
#: loaded later (cuBLAS, NCCL) add to it: the fragmentation allowance below is kept on top.
CUDA_CONTEXT_GB = 0.287


@dataclass(frozen=True)
class Hardware:
    """``gpus`` devices of ``memory_gb`` GB each (GB = 1e9 bytes), ``gpus_per_node`` per node.

    Usable per device: ``memory_gb`` less ``context_gb`` for the CUDA context (sourced:
    :data:`CUDA_CONTEXT_GB`) and less ``reserve_fraction`` of the memory for what tensors do not
    account for: the caching allocator's rounding and fragmentation, NCCL's buffers, library
    workspaces (an assumption, 10% by default: no published figure holds across models)."""

    gpus: int
    memory_gb: float
    name: str = "custom"
    gpus_per_node: int = 8
    reserve_fraction: float = 0.10
    context_gb: float = CUDA_CONTEXT_GB

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.memory_gb <= 0 or self.gpus_per_node < 1:
            raise ValueError(f"gpus, memory_gb and gpus_per_node must be positive; got {self.gpus}, {self.memory_gb}, {self.gpus_per_node}")
        if not 0 <= self.reserve_fraction < 1:
            raise ValueError(f"reserve_fraction must be in [0, 1); got {self.reserve_fraction}")
        if self.context_gb < 0:
            raise ValueError(f"context_gb must be >= 0; got {self.context_gb}")

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * GB * (1 - self.reserve_fraction) - self.context_gb * GB

    def describe_reserve(self) -> str:
        """How usable memory was derived, for the verdict line."""
        return (f"{self.memory_gb:g} GB less {self.context_gb:g} GB for the CUDA context (PyTorch PR #86509) and "
                f"{self.reserve_fraction:.0%} for allocator fragmentation and communication buffers (an assumption; "
                f"--reserve, --context-gb)")

    @classmethod
    def named(cls, gpu: str, gpus: int, **kwargs: Any) -> Hardware:
        """``gpu`` as ``"A100-80GB"``, ``"H100"`` (one memory size) or a row of the peak-FLOPs table."""
        from lightning_scale.core.peak_flops import PEAKS

        name, _, mem = gpu.partition("-")
        mem = mem.upper().removesuffix("GB")
        want = name.lower().replace(" ", "")  # "H100 PCIe" -> "h100pcie"; "H100" takes the first H100 row (SXM)
        for row in PEAKS:
            if want in (row.device.lower().replace(" ", ""), row.device.split()[0].lower()):
                if mem:
                    if float(mem) not in row.memory_gb:
                        raise ValueError(f"{row.device} comes with {row.memory_gb} GB, not {mem}; write e.g. {row.device.split()[0]}-{int(row.memory_gb[-1])}GB")
                    return cls(gpus=gpus, memory_gb=float(mem), name=f"{row.device} {mem}GB", **kwargs)
                if len(row.memory_gb) > 1:
                    raise ValueError(f"{row.device} comes with {row.memory_gb} GB: write e.g. {row.device.split()[0]}-{int(row.memory_gb[-1])}GB")
                return cls(gpus=gpus, memory_gb=float(row.memory_gb[0]), name=row.device, **kwargs)
        known = ", ".join(r.device for r in PEAKS)
        raise ValueError(f"unknown GPU {gpu!r}; known: {known}; or give the memory size (memory_gb / --gpu-memory-gb)")


@dataclass(frozen=True)
class Layout:
    """A parallel layout. ``dp`` is derived: gpus / (tp x pp)."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    offload: bool = False
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    microbatches: int | None = None  # default 2 x pp x v (the strategy's default)
    virtual_stages: int = 1
    ac: str = "none"
    ac_every: int = 2
    bucket_mb: float = 25.0
    ddp_buckets: bool = True  # stage 0 as Lightning's "ddp" (torch DDP keeps a gradient copy in its buckets)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1; got tp={self.tp}, pp={self.pp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {self.zero_stage!r}")
        if self.zero_stage in (1, 2) and (self.tp > 1 or self.pp > 1):
            raise ValueError(
                "ZeRO-1/2 runs on plain data parallelism here (ZeroStrategy); with tp or pp > 1 use zero_stage=3 "
                "(FSDP2 on the dp dimension) or 0"
            )
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs ZeRO (zero_stage 1, 2 or 3)")
        if self.offload and self.pp > 1:
            raise ValueError("offload is not available inside the pipeline strategy; use pp=1")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        if self.pp > 1 and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} for planning; got {self.schedule!r}")
        if self.schedule == "interleaved_1f1b" and self.virtual_stages < 2:
            raise ValueError("interleaved_1f1b needs virtual_stages >= 2")
        if self.schedule != "interleaved_1f1b" and self.virtual_stages != 1:
            raise ValueError(f"schedule {self.schedule!r} has one stage per rank: virtual_stages must be 1")
        if self.ac not in AC_POLICIES:
            raise ValueError(f"ac must be one of {AC_POLICIES}; got {self.ac!r}")

    @property
    def m(self) -> int:
        if self.pp == 1:
            return 1
        return self.microbatches if self.microbatches is not None else 2 * self.pp * self.virtual_stages

    def describe(self, dp: int) -> str:
        parts = [f"dp{dp}"]
        if self.zero_stage:
            parts.append(f"zero{self.zero_stage}" + ("+offload" if self.offload else ""))
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.pp > 1:
            v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
            parts.append(f"pp{self.pp} {self.schedule}{v} m{self.m}")
        if self.ac != "none":
            parts.append(f"ac={self.ac}" + (f"({self.ac_every})" if self.ac == "every_k" else ""))
        return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    """One pipeline rank's bytes (every tp x dp rank of it holds the same)."""

    pp_rank: int
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    host: int  # offloaded optimizer state / parameters / activations (CPU memory)
    layers: list[int] = field(default_factory=list)
    in_flight: int = 1
    detail: dict[str, int] = field(default_factory=dict)  # transient buffers by name
    host_by: dict[str, int] = field(default_factory=dict)  # host bytes by category (params, grads, optimizer, activations)
    step_temporary: int = 0  # the optimizer step's own temporary (foreach Adam: sqrt(v) of every stepped element)
    persistent: int = 0  # the part of ``transient`` alive at the optimizer step too (buffers, DDP buckets)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def step_peak(self) -> int:
        """At the optimizer step: model states, the step's temporary, what lives all step."""
        return self.model_states + self.step_temporary + self.persistent

    @property
    def peak(self) -> int:
        """The larger of forward/backward (states, activations, transients) and the optimizer step."""
        return max(self.model_states + self.activations + self.transient, self.step_peak)


@dataclass
class MemoryPlan:
    model: ModelSpec
    workload: Workload
    layout: Layout
    hardware: Hardware
    dp: int
    microbatch_size: int
    ranks: list[RankMemory]
    exact_states: bool  # True: model states counted from the model's own parameters

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.hardware.usable_bytes

    def summary(self) -> str:
        w = self.worst
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"{self.layout.describe(self.dp)}: peak {w.peak / GB:.2f} GB per device (pp rank {w.pp_rank}) "
                f"vs {self.hardware.usable_bytes / GB:.1f} GB usable on {self.hardware.name} -> {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.describe(self.dp), "dp": self.dp, "fits": self.fits,
            "usable_bytes": self.hardware.usable_bytes, "microbatch_size": self.microbatch_size,
            "exact_states": self.exact_states, "layout_fields": asdict(self.layout),
            "ranks": [{**{k: v for k, v in asdict(r).items()}, "peak": r.peak, "step_peak": r.step_peak}
                      for r in self.ranks],
        }


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
def _check_vision(model: ModelSpec, workload: Workload, layout: Layout) -> None:
    """What the vision models need from the workload and the layout (errors name the fix)."""
    kind = model.kind
    if kind == "vit":
        cfg = model.vision
        if workload.seq_len != cfg.seq_len:
            raise ValueError(
                f"this ViT sees (image_size/patch_size)^2 + 1 = ({cfg.image_size}/{cfg.patch_size})^2 + 1 = "
                f"{cfg.seq_len} tokens per image, not seq_len={workload.seq_len}: give seq_len={cfg.seq_len} "
                f"(or leave --seq-len out)"
            )
        if workload.image_size is not None and workload.image_size != cfg.image_size:
            raise ValueError(
                f"the images are {workload.image_size} px but this ViT takes image_size={cfg.image_size}: set the "
                f"model's image_size to {workload.image_size} (or resize the data to {cfg.image_size})"
            )
    elif kind == "resnet":
        if workload.image_size is None:
            raise ValueError(
                "planning a ResNet needs the side of its square input images: Workload(image_size=...), "
                "--image-size, or data.init_args.image_size in the recipe"
            )
        if layout.tp > 1:
            raise ValueError(
                "the ResNet has no tensor-parallel plan (only the suite's transformers do): use tp=1, with data "
                "parallelism or ZeRO"
            )
        if layout.pp > 1:
            raise ValueError(
                "the planner models ResNet activations on one pipeline stage only: use pp=1 (ZeRO-3 shards a "
                "model too large for one GPU)"
            )


def _divisible(model: ModelSpec, workload: Workload, layout: Layout, hardware: Hardware) -> tuple[int, int]:
    """(dp, microbatch size); raises on sizes that do not divide."""
    _check_vision(model, workload, layout)
    tp, pp = layout.tp, layout.pp
    if hardware.gpus % (tp * pp):
        raise ValueError(f"{hardware.gpus} GPUs are not divisible by tp x pp = {tp} x {pp}")
    dp = hardware.gpus // (tp * pp)
    if layout.zero_stage and dp == 1 and not layout.offload:
        raise ValueError(
            "ZeRO shards over data-parallel ranks and dp = gpus / (tp x pp) is 1: use zero_stage=0, more GPUs, "
            "or offload=True (ZeRO-Offload also helps one GPU)"
        )
    for name, size in (("heads", model.heads), ("hidden", model.hidden), ("mlp_hidden", model.mlp_hidden)):
        if size % tp:
            raise ValueError(f"{name}={size} is not divisible by tp={tp}")
    if layout.sequence_parallel and workload.seq_len % tp:
        raise ValueError(f"sequence parallel needs seq_len ({workload.seq_len}) divisible by tp={tp}")
    if workload.batch_size % dp:
        raise ValueError(f"global batch {workload.batch_size} is not divisible by dp={dp}")
    per_replica = workload.batch_size // dp
    if pp > 1:
        if layout.pp * layout.virtual_stages > model.n_layer:
            raise ValueError(f"pp x v = {layout.pp * layout.virtual_stages} stages but only {model.n_layer} layers")
        if per_replica % layout.m:
            raise ValueError(f"per-replica batch {per_replica} is not divisible by {layout.m} microbatches")
        return dp, per_replica // layout.m
    return dp, per_replica


def _stage_layers(model: ModelSpec, layout: Layout) -> list[tuple[list[int], bool, bool]]:
    """Per pipeline rank: (layer indices, holds the embeddings, holds the head)."""
    if layout.pp == 1:
        return [(list(range(model.n_layer)), True, True)]
    if model.config is not None:
        from lightning_scale.core.pipeline import PipelineConfig, plan_pipeline

        net = _meta_network(model.config)
        plan = plan_pipeline(net, PipelineConfig(stages=layout.pp, schedule=layout.schedule, microbatches=layout.m,
                                                 virtual_stages=layout.virtual_stages))
        out = []
        for r in range(layout.pp):
            stages = [s for s, owner in enumerate(plan.stage_ranks) if owner == r]
            layers = [int(k) for s in stages for k in plan.stage_keys[s]]
            out.append((layers, 0 in stages, plan.num_stages - 1 in stages))
        return out
    # Dimensions only: an even split (the first ranks take one extra layer when L % (p v) != 0).
    total = layout.pp * layout.virtual_stages
    bounds = [round(i * model.n_layer / total) for i in range(total + 1)]
    stage_ranks = [s % layout.pp for s in range(total)]
    return [([i for s in range(total) if stage_ranks[s] == r for i in range(bounds[s], bounds[s + 1])], r == 0,
             r == stage_ranks[-1]) for r in range(layout.pp)]


_META_CACHE: dict[Any, Any] = {}  # repr(config) (or a tuple) -> a meta-device network


def _build_network(config: Any) -> Any:
    """The suite's model of ``config`` (a GPT, ViT or ResNet config), built on the current device."""
    from lightning_scale.models import GPT, ResNet, ResNetConfig, ViT, ViTConfig

    if isinstance(config, ViTConfig):
        return ViT(config)
    if isinstance(config, ResNetConfig):
        return ResNet(config)
    return GPT(config)


def _meta_network(config: Any) -> Any:
    """The model of ``config`` on the ``meta`` device (shapes only), built once per config."""
    import torch

    key = repr(config)
    if key not in _META_CACHE:
        with torch.device("meta"):
            _META_CACHE[key] = _build_network(config)
    return _META_CACHE[key]


def _buffer_bytes(model: ModelSpec, precision: str) -> int:
    """Bytes of the model's buffers on every rank (BatchNorm running mean / var in the parameter
    dtype, its int64 batch counter). Not sharded by ZeRO-3 (FSDP2 leaves buffers replicated)."""
    if model.config is None:
        return 0
    from lightning_scale.core.meta_activations import compute_dtype

    dtype = compute_dtype(precision)[0]
    total = 0
    for b in _meta_network(model.config).buffers():
        size = dtype.itemsize if b.is_floating_point() else b.element_size()
        total += b.numel() * size
    return total


_ACT_CACHE: dict[tuple, Any] = {}


def _meta_activation_bytes(model: ModelSpec, b: int, image_size: int, precision: str, policy: str,
                           every: int) -> Any:
    """:func:`lightning_scale.core.meta_activations.measure_activations` of the model on a batch of
    ``b`` images of ``image_size`` px, cached (the ``none`` measurement is the others' baseline)."""
    from lightning_scale.core.meta_activations import compute_dtype, measure_activations

    cfg = model.config
    shape = (b, cfg.in_channels, image_size, image_size)
    base_key = (repr(cfg), shape, str(precision))
    key = (*base_key, policy, every if policy == "every_k" else None)
    if key in _ACT_CACHE:
        return _ACT_CACHE[key]
    dtype = compute_dtype(precision)[0]  # *-true: Lightning converts the model to 16-bit
    net_key = ("activations", repr(cfg), str(dtype))
    if net_key not in _META_CACHE:
        import torch

        with torch.device("meta"):
            _META_CACHE[net_key] = _build_network(cfg).to(dtype)
    net = _META_CACHE[net_key]
    none_key = (*base_key, "none", None)
    if none_key not in _ACT_CACHE:
        _ACT_CACHE[none_key] = measure_activations(net, shape, precision=precision, policy="none")
    if policy in ("none", "offload"):
        return _ACT_CACHE[none_key]
    _ACT_CACHE[key] = measure_activations(net, shape, precision=precision, policy=policy, every=every,
                                          baseline=_ACT_CACHE[none_key])
    return _ACT_CACHE[key]


def _states(model: ModelSpec, workload: Workload, layout: Layout, dp: int, pp_rank: int,
            dp_rank: int = 0) -> StateBytes:
    if model.config is None:
        # Closed form; the pipeline and TP split are taken as even (embeddings make them uneven).
        psi = math.ceil(model.params / (layout.tp * layout.pp))
        out = psi_model_states(psi, dp, layout.zero_stage, precision=workload.precision, optimizer=workload.optimizer,
                               offload=layout.offload)
        if ddp_buckets(layout, dp):  # the same rule as the exact path: torch DDP's flat gradient copy
            from lightning_scale.core.model_states import StateDtypes

            out.transient["DDP gradient buckets"] = StateDtypes.for_precision(workload.precision).grad * psi
        if layout.zero_stage == 3 and dp > 1:
            out.transient.update(_fsdp_unsharded(model, workload, layout))
        return out
    from lightning_scale.core.tensor_parallel import gpt_tp_plan, vit_tp_plan

    tp_plan = None
    if layout.tp > 1:
        tp_plan = (vit_tp_plan if model.kind == "vit" else gpt_tp_plan)(layout.sequence_parallel)
    params = rank_parameters(_meta_network(model.config), pp=layout.pp, pp_rank=pp_rank, schedule=layout.schedule,
                             virtual_stages=layout.virtual_stages if layout.pp > 1 else None,
                             microbatches=layout.m if layout.pp > 1 else None, tp=layout.tp, tp_plan=tp_plan)
    return rank_model_states(params, dp, layout.zero_stage, precision=workload.precision, optimizer=workload.optimizer,
                             offload=layout.offload, bucket_mb=layout.bucket_mb,
                             ddp_buckets=ddp_buckets(layout, dp), dp_rank=dp_rank)


def _fsdp_unsharded(model: ModelSpec, workload: Workload, layout: Layout) -> dict[str, int]:
    """ZeRO-3 (FSDP2, one unit per block plus the root) from dimensions: what is unsharded at the
    backward's peak (measured with torch's MemTracker on fake tensors, ``benchmarks/planner_accuracy.py``):
    the block being computed and the next one prefetched, gathered in the compute dtype, the
    block's unsharded fp32 gradients, and the root's embeddings and head (their parameters stay
    gathered from forward to backward) with their gradients. The root is taken as an untied
    embedding and head (2 V h; an upper bound for tied ones)."""
    root = 2 * model.vocab * model.hidden
    if root >= model.params:
        root = model.vocab * model.hidden
    block = max(model.params - root, 0) // model.n_layer
    gathered = 2 if str(workload.precision) in ("bf16-mixed", "16-mixed", "bf16-true", "16-true") else 4
    grad = 2 if str(workload.precision) in ("bf16-true", "16-true") else 4  # *-mixed: reduced in fp32
    return {
        "FSDP2 gathered parameters (2 blocks and the root)": gathered * (2 * block + root) // layout.tp,
        "FSDP2 unsharded gradients (a block and the root)": grad * (block + root) // layout.tp,
    }


def ddp_buckets(layout: Layout, dp: int) -> bool:
    """The one rule for torch DDP's gradient buckets: Lightning wraps the model in DDP for plain
    data parallelism over more than one rank (``strategy="ddp"``, stage 0, no tp / pp). One
    device runs without DDP (SingleDeviceStrategy), so no bucket copy, however it was asked for."""
    return layout.ddp_buckets and layout.zero_stage == 0 and layout.tp == 1 and layout.pp == 1 and dp > 1


def step_temporary(states: StateBytes, params: list[int] | None, workload: Workload, zero_stage: int) -> int:
    """Device bytes the optimizer step allocates for itself (measured on fake tensors with torch's
    MemTracker, ``tests/test_traced_memory.py``): Adam / AdamW ``foreach`` compute ``sqrt(v)`` for
    every element the rank steps at once (one moment's bytes per element: 4 B in fp32, 20 B per
    parameter at the step with the 16 of the model states); ``for-loop``, one tensor at a time
    (up to three times the largest stepped tensor, ``params``: element counts, when known);
    ``fused``: none. SGD
    (without weight decay) updates in place: none."""
    if workload.optimizer not in ("adam", "adamw") or workload.optimizer_impl == "fused":
        return 0
    from lightning_scale.core.model_states import StateDtypes

    d = StateDtypes.for_precision(workload.precision, zero_stage)
    stepped = states.stepped  # elements the rank's optimizer updates on the device
    if workload.optimizer_impl == "foreach" or not params:
        return stepped * d.moment  # (for-loop without tensor sizes: the foreach bound)
    # for-loop: the previous tensor's denominator is still held while the next one's sqrt and
    # division are computed: up to 3 tensors' worth (measured with MemTracker: 2x for one
    # tensor, 3x for two equal ones)
    return min(stepped, 3 * max(params)) * d.moment


def _activations(model: ModelSpec, workload: Workload, layout: Layout, am: ActivationModel, b: int,
                 layers: list[int], first: bool, last: bool) -> ActivationEstimate:
    """One microbatch's activations on a pipeline rank holding ``layers`` (see the module docstring)."""
    common = dict(b=b, s=workload.seq_len, h=model.hidden, a=model.heads, f=model.mlp_hidden, vocab=model.vocab,
                  layers=layers, n_layer=model.n_layer, t=layout.tp, sp=layout.sequence_parallel, policy=layout.ac,
                  every=layout.ac_every, model=am, first=first, last=last, in_flight=1)
    kind = model.kind
    if kind == "vit":
        cfg = model.vision
        outer = vit_outer_items(b=b, s=workload.seq_len, h=model.hidden, num_classes=cfg.num_classes,
                                image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
                                patch_weight=cfg.n_embd * cfg.in_channels * cfg.patch_size ** 2, t=layout.tp,
                                sp=layout.sequence_parallel, first=first, last=last, model=am)
        return model_activation_bytes(**common, outer=outer)
    if kind == "resnet":
        measured = _meta_activation_bytes(model, b, workload.image_size, workload.precision, layout.ac,
                                          layout.ac_every)
        if layout.ac == "offload":  # save_on_cpu: what the forward saves waits on the host
            return ActivationEstimate(device=0.0, host=float(measured.held))
        return ActivationEstimate(device=float(measured.held), recompute_peak=float(measured.recompute_peak))
    return model_activation_bytes(**common)


def plan_memory(model: ModelSpec, workload: Workload, layout: Layout, hardware: Hardware,
                dp_rank: int = 0) -> MemoryPlan:
    """Per-device memory of ``layout`` (see the module docstring).

    ``dp_rank``: the data-parallel rank to report. The ranks hold the same bytes except under
    ZeRO-3, where FSDP2 gives the last ranks a smaller optimizer shard of parameters whose dim 0
    does not divide by dp (:func:`~lightning_scale.core.model_states.rank_model_states`); rank 0,
    the default, holds the most.
    """
    dp, b = _divisible(model, workload, layout, hardware)
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank must be in 0..{dp - 1} (dp = {dp}); got {dp_rank}")
    am = ActivationModel.for_precision(workload.precision, dropout=model.dropout)
    buffers = _buffer_bytes(model, workload.precision)
    ranks = []
    for r, (layers, first, last) in enumerate(_stage_layers(model, layout)):
        if layout.pp > 1:
            in_flight = in_flight_microbatches(layout.schedule, layout.pp, layout.m, r, layout.virtual_stages)
            per_chunk = 1 / layout.virtual_stages  # interleaved: in-flight counts chunk-microbatches
        else:
            in_flight, per_chunk = 1, 1.0
        act = _activations(model, workload, layout, am, b, layers, first, last)
        device_act = act.device * in_flight * per_chunk
        host_act = act.host * in_flight * per_chunk
        states = _states(model, workload, layout, dp, r, dp_rank)
        transient = dict(states.transient)
        if act.recompute_peak:
            transient["one recomputed layer"] = int(act.recompute_peak)
        # The logits (b s V in the compute dtype; a classifier's b x classes) live until the loss is computed.
        if last:
            per_sample = model.vocab * (workload.seq_len if model.kind in ("gpt", "dims") else 1)
            transient["logits"] = b * per_sample * am.act_bytes
        if buffers:
            transient["model buffers (BatchNorm running statistics, all step)"] = buffers
        largest = ([max(math.prod(p.shape) for p in _meta_network(model.config).parameters())]
                   if model.config is not None else None)  # the for-loop step's temporary: an upper bound
        persistent = buffers + transient.get("DDP gradient buckets", 0)
        ranks.append(RankMemory(
            pp_rank=r,
            params=states.total("params", "device"), grads=states.total("grads", "device"),
            optimizer=states.total("optimizer", "device"), activations=int(device_act),
            transient=int(sum(transient.values())), host=int(states.total(where="host") + host_act),
            layers=layers, in_flight=in_flight, detail={k: int(v) for k, v in transient.items()},
            host_by={**{c: states.total(c, "host") for c in ("params", "grads", "optimizer")}, "activations": int(host_act)},
            step_temporary=step_temporary(states, largest, workload, layout.zero_stage), persistent=int(persistent),
        ))
    return MemoryPlan(model, workload, layout, hardware, dp, b, ranks, exact_states=model.config is not None)


def candidate_layouts(model: ModelSpec, workload: Workload, hardware: Hardware) -> list[Layout]:
    """Layouts in the order :func:`recommend` tries them (fastest expected first)."""
    g = hardware.gpus
    out: list[tuple[tuple, Layout]] = []
    tps = [t for t in (1, 2, 4, 8) if t <= min(g, hardware.gpus_per_node) and g % t == 0]
    for tp in tps:
        for pp in [p for p in range(1, model.n_layer + 1) if g % (tp * p) == 0]:
            dp = g // (tp * pp)
            per_replica = workload.batch_size // dp if workload.batch_size % dp == 0 else 0
            if not per_replica:
                continue
            stages = (0, 1, 2, 3) if (tp == 1 and pp == 1) else (0, 3)
            for zero in stages:
                for offload in ((False, True) if zero and pp == 1 else (False,)):
                    if zero and dp == 1 and not offload:
                        continue
                    for rank_ac, ac in enumerate(("none", "selective", "full")):
                        m = per_replica if pp > 1 else None  # microbatch size 1: the least activation memory
                        if pp > 1 and (m is None or m < pp):
                            continue
                        layout = Layout(tp=tp, pp=pp, zero_stage=zero, offload=offload, sequence_parallel=tp > 1,
                                        schedule="1f1b", microbatches=m, ac=ac)
                        key = (offload, tp * pp, pp, zero, rank_ac)
                        out.append((key, layout))
    return [layout for _, layout in sorted(out, key=lambda kv: kv[0])]


def recommend(model: ModelSpec, workload: Workload, hardware: Hardware, limit: int = 5) -> list[MemoryPlan]:
    """Up to ``limit`` layouts that fit, fastest expected first (empty: nothing fits)."""
    found = []
    for layout in candidate_layouts(model, workload, hardware):
        try:
            plan = plan_memory(model, workload, layout, hardware)
        except ValueError:
            continue  # sizes that do not divide for this layout
        if plan.fits:
            found.append(plan)
            if len(found) == limit:
                break
    return found


# ----------------------------------------------------------------------------------------------
# Presentation
# ----------------------------------------------------------------------------------------------
def plan_table(plans: list[MemoryPlan], title: str) -> Any:
    """A rich table: one row per (layout, pipeline rank), GB per device."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("layout", "pp rank", "params", "grads", "optimizer", "activations", "transient", "step temp", "peak",
                "host", "fits"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for plan in plans:
        for r in plan.ranks:
            table.add_row(
                plan.layout.describe(plan.dp), str(r.pp_rank),
                *(f"{x / GB:.3f}" for x in (r.params, r.grads, r.optimizer, r.activations, r.transient,
                                            r.step_temporary, r.peak, r.host)),
                ("yes" if r.peak <= plan.hardware.usable_bytes else "NO"),
            )
    return table


__all__ = [
    "GB",
    "Hardware",
    "Layout",
    "MemoryPlan",
    "ModelSpec",
    "RankMemory",
    "Workload",
    "candidate_layouts",
    "plan_memory",
    "plan_table",
    "recommend",
]
