"""Pipeline parallelism on ``torch.distributed.pipelining``: split, place, build, run. Torch only.

What this module adds on top of torch's stages and schedules:

* **Splitting a model that was not written for pipelining**, given its ordered block container
  (``nn.ModuleDict`` / ``nn.ModuleList`` / ``nn.Sequential``), found automatically or named:
  blocks are partitioned into contiguous stages balanced by parameter count or by measured
  time, or cut at explicit split points. Top-level modules registered before the container
  (embeddings) go to the first stage, those after it (final norm, head) to the last stage.
* **A stage is a shallow view of the model** (no copy of any tensor): modules a stage does not
  own are set to ``None`` and container entries it does not own are dropped, so parameter
  names stay the same as in the unsplit model (checkpoints load across layouts). The model's
  forward must iterate over the container and skip ``None`` modules (documented contract).
* **Tied parameters** (e.g. a GPT head tied to the token embedding) that land on different
  stages are kept identical: their gradients are summed over the ranks that hold a copy.
* Loss scaling for gradient accumulation, loss broadcast from the last stage, per-action timing
  for the schedule timeline, and validation with fix-naming errors before any collective.

Shapes: a batch of B samples is cut into m microbatches of B/m along dim 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lightning_scale.core.blocks import BlockFinder, tied_parameter_groups
from lightning_scale.core.device import DeviceClock

ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble"]

# Our names -> torch's schedule names (torch.distributed.pipelining.schedules.get_schedule_class).
_TORCH_SCHEDULES: dict[str, str] = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "looped_bfs": "LoopedBFS",
    "interleaved_zero_bubble": "InterleavedZeroBubble",
    "zbv_zero_bubble": "ZBVZeroBubble",
}
#: Schedules that run several (virtual) stages per rank.
MULTI_STAGE_SCHEDULES = {"interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble"}
#: Schedules whose stages sit on ranks in a "V": rank r holds stages r and 2p-1-r.
V_SCHEDULES = {"zbv_zero_bubble"}
# Schedules that run each stage's backward in two passes (input gradients, then weight gradients).
SPLIT_BACKWARD_SCHEDULES = {"interleaved_zero_bubble", "zbv_zero_bubble"}
#: Schedules that need at least as many microbatches as pipeline ranks.
#: Schedules that need at least as many microbatches as pipeline stages.
NEEDS_M_GE_P = {"1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble"}


@dataclass
class PipelineConfig:
    """How to pipeline a model.

    ``stages`` is the number of pipeline ranks p; each holds ``virtual_stages`` v stages
    (v > 1 only for multi-stage schedules), so the model is cut into p x v stages.
    """

    stages: int = 2  # p: pipeline ranks (the "pp" mesh dimension)
    schedule: ScheduleName = "1f1b"
    microbatches: int | None = None  # m per optimizer step's batch; default max(2 p v, 4)... see resolved_microbatches
    virtual_stages: int | None = None  # v per rank; default 2 for multi-stage schedules, else 1
    balance: Literal["params", "time"] = "params"  # how to balance blocks when split_points is None
    split_points: list[str] | None = None  # explicit cuts: module paths where stages 1.. begin, e.g. ["blocks.4"]
    block_container: str | None = None  # path of the block container in the network; None = find the largest one
    block_class: Any = None  # or: the blocks' class (lightning_scale.core.blocks), all children of one container

    def __post_init__(self) -> None:
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"pipeline stages must be a positive integer, got {self.stages!r}")
        if self.schedule not in _TORCH_SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {self.schedule!r}; choose one of {sorted(_TORCH_SCHEDULES)}")
        v = self.num_virtual
        if self.schedule in MULTI_STAGE_SCHEDULES:
            if v < 2 and self.schedule != "looped_bfs":
                raise ValueError(
                    f"schedule {self.schedule!r} runs several stages per rank: set virtual_stages >= 2 "
                    f"(got {v}), or use schedule='1f1b' / 'gpipe'"
                )
            if self.schedule in V_SCHEDULES and v != 2:
                raise ValueError(f"schedule {self.schedule!r} places exactly 2 stages per rank; set virtual_stages=2")
        elif v != 1:
            raise ValueError(
                f"schedule {self.schedule!r} runs one stage per rank but virtual_stages={v}; use "
                f"schedule='interleaved_1f1b' for several stages per rank, or virtual_stages=1"
            )
        m = self.resolved_microbatches
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"microbatches must be a positive integer, got {self.microbatches!r}")
        if self.schedule in NEEDS_M_GE_P and m < self.stages:
            raise ValueError(
                f"schedule {self.schedule!r} needs at least as many microbatches as pipeline stages: "
                f"microbatches={m} < stages={self.stages}; set microbatches >= {self.stages} "
                f"(2 x stages or more keeps the bubble small)"
            )
        if self.split_points is not None:
            if len(self.split_points) != self.stages * v - 1:
                raise ValueError(
                    f"{len(self.split_points)} split points give {len(self.split_points) + 1} stages, but "
                    f"stages x virtual_stages = {self.stages} x {v} = {self.stages * v}; give "
                    f"{self.stages * v - 1} split points"
                )

    @property
    def num_virtual(self) -> int:
        if self.virtual_stages is not None:
            return self.virtual_stages
        return 2 if self.schedule in MULTI_STAGE_SCHEDULES else 1

    @property
    def num_stages_total(self) -> int:
        return self.stages * self.num_virtual

    @property
    def resolved_microbatches(self) -> int:
        """m: the configured value, else 2 x (p x v) (the bubble (p-1)/(m+p-1) stays below ~1/3)."""
        return self.microbatches if self.microbatches is not None else 2 * self.num_stages_total

    def stage_ranks(self) -> list[int]:
        """Pipeline rank (0..p-1) of each stage 0..p*v-1."""
        p, v = self.stages, self.num_virtual
        if self.schedule in V_SCHEDULES:
            return [s if s < p else 2 * p - 1 - s for s in range(p * v)]
        return [s % p for s in range(p * v)]


def theoretical_bubble(p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a step for GPipe/1F1B, (p-1)/(m+p-1); interleaving divides the bubble by v.

    Narayanan et al. 2021 (arXiv 2104.04473), section 2.2: bubble time / ideal time = (p-1)/(v m),
    so the idle fraction of the whole step is (p-1)/(v m + p - 1).
    """
    return (p - 1) / (v * m + p - 1)


# --------------------------------------------------------------------------------------------
# Finding the container and partitioning it
# --------------------------------------------------------------------------------------------

_OWNER = "PipelineStrategy"
_FIX = "pass block_container= (its path) or block_class= (the blocks' class), or split_points="


def find_block_container(network: nn.Module, path: str | None = None, block_class: Any = None) -> str:
    """Path of the ordered block container to split: the named one, the one holding every
    ``block_class`` block, or the one with most parameters (:mod:`lightning_scale.core.blocks`)."""
    return BlockFinder(container=path, block_class=block_class).container_path(network, _OWNER, _FIX)


def measure_block_seconds(network: nn.Module, container: str, example: Sequence[Any], device: torch.device,
                          repeats: int = 3) -> tuple[list[float], float, float]:
    """Estimated forward+backward seconds of each block of ``container``, and of the modules before
    (embeddings) and after it (norm, head), on this rank: the mean of ``repeats`` timed forwards of
    ``network(*example)`` (after one warm-up) times 3, since a backward costs about two forwards
    (two matmuls per forward matmul). Timed with marks on the device's stream
    (:class:`~lightning_scale.core.device.DeviceClock`: CUDA events on a GPU, so kernels and not
    launches), read after the runs. Returns ``(per block, first, last)``, for ``balance='time'``."""
    blocks = list(network.get_submodule(container)._modules.values())
    first, last = _outer_modules(network, container, allow_direct_params=True)
    slot = {id(b): i for i, b in enumerate(blocks)}
    slot |= {id(network.get_submodule(p)): len(blocks) for p in first}
    slot |= {id(network.get_submodule(p)): len(blocks) + 1 for p in last}
    clock = DeviceClock(device)
    marks: list[tuple[int, Any, Any]] = []  # (slot, start mark, end mark)
    starts: dict[int, Any] = {}
    recording = False

    def pre(mod: nn.Module, *_: Any) -> None:
        if recording:
            starts[id(mod)] = clock.mark()

    def post(mod: nn.Module, *_: Any) -> None:
        if recording:
            marks.append((slot[id(mod)], starts[id(mod)], clock.mark()))

    timed = [*blocks, *(network.get_submodule(p) for p in first + last)]
    handles = [h for m in timed for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            network(*example)  # warm-up
            recording = True
            for _ in range(repeats):
                network(*example)
    finally:
        for h in handles:
            h.remove()
    seconds = [0.0] * (len(blocks) + 2)
    for i, start, end in marks:
        seconds[i] += 3 * clock.seconds(start, end) / repeats
    return seconds[: len(blocks)], seconds[-2], seconds[-1]


def partition(costs: Sequence[float], parts: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Contiguous partition of ``costs`` into ``parts`` non-empty runs minimising the largest run cost.

    ``first_extra`` / ``last_extra`` are added to the first / last run (embeddings, head).
    Returns the start index of each run. Dynamic programming, O(n^2 parts).
    """
    n = len(costs)
    if parts > n:
        raise ValueError(
            f"cannot split {n} blocks into {parts} pipeline stages (each stage needs at least one block); "
            f"use at most {n} stages x virtual stages, or a model with more blocks"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def run_cost(i: int, j: int, k: int) -> float:  # blocks i..j-1 as run number k
        c = prefix[j] - prefix[i]
        if k == 0:
            c += first_extra
        if k == parts - 1:
            c += last_extra
        return c

    inf = float("inf")
    # best[k][j]: minimal max-cost splitting the first j blocks into k+1 runs; cut[k][j]: start of run k.
    best = [[inf] * (n + 1) for _ in range(parts)]
    cut = [[0] * (n + 1) for _ in range(parts)]
    for j in range(1, n + 1):
        best[0][j] = run_cost(0, j, 0)
    for k in range(1, parts):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], run_cost(i, j, k))
                if value < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = value, i
    starts, j = [], n
    for k in range(parts - 1, 0, -1):
        i = cut[k][j]
        starts.append(i)
        j = i
    return [0] + starts[::-1]


@dataclass
class PipelinePlan:
    """Which blocks (container keys) each stage owns, and which outer modules go first / last."""

    container: str  # e.g. "blocks" or "model.layers"
    stage_keys: list[list[str]]  # container keys per stage, in order
    first_modules: list[str]  # module paths owned by stage 0 (embeddings ...)
    last_modules: list[str]  # module paths owned by the last stage (final norm, head ...)
    stage_ranks: list[int]  # pipeline rank of each stage

    @property
    def num_stages(self) -> int:
        return len(self.stage_keys)

    def describe(self) -> str:
        lines = []
        for s, keys in enumerate(self.stage_keys):
            extra = []
            if s == 0 and self.first_modules:
                extra.append("+ " + ", ".join(self.first_modules))
            if s == self.num_stages - 1 and self.last_modules:
                extra.append("+ " + ", ".join(self.last_modules))
            lines.append(f"stage {s} (pp rank {self.stage_ranks[s]}): {self.container}[{keys[0]}..{keys[-1]}] " + " ".join(extra))
        return "\n".join(lines)


def _outer_modules(network: nn.Module, container: str, allow_direct_params: bool = False) -> tuple[list[str], list[str]]:
    """Modules with parameters before / after the container along its path.

    Modules without parameters (dropout, activations, buffer-only modules such as rotary
    position tables) stay on every stage: they are cheap and any stage may need them.
    """
    first, last = [], []
    parts = container.split(".")
    module = network
    prefix = ""
    for part in parts:
        seen = False
        for name, child in module.named_children():
            if name == part:
                seen = True
                continue
            if child is None or not any(True for _ in child.parameters()):
                continue  # parameter-free modules stay on every stage
            (last if seen else first).append(prefix + name)
        if module._parameters and not allow_direct_params:
            raise ValueError(
                f"{type(module).__name__} has parameters directly on it ({sorted(module._parameters)}) next to the "
                f"pipeline container; move them into a submodule so a stage can own them"
            )
        module = getattr(module, part)
        prefix += part + "."
    return first, last


def module_costs(network: nn.Module, container: str, allow_direct_params: bool = False) -> tuple[list[float], float, float]:
    """Parameter counts of each block, of the first-stage modules and of the last-stage modules."""
    blocks = network.get_submodule(container)
    first, last = _outer_modules(network, container, allow_direct_params)

    def count(paths: list[str]) -> float:
        seen: set[int] = set()
        total = 0
        for path in paths:
            for p in network.get_submodule(path).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return float(total)

    return [float(sum(p.numel() for p in b.parameters())) for b in _children(blocks)], count(first), count(last)


def _children(container: nn.Module) -> list[nn.Module]:
    return list(container._modules.values())


def plan_pipeline(network: nn.Module, cfg: PipelineConfig, costs: tuple[list[float], float, float] | None = None,
                  traced: bool = False) -> PipelinePlan:
    """Split ``network`` into ``cfg.num_stages_total`` stages (pure: no communication).

    ``traced``: the stages will be cut by torch's tracer (:mod:`lightning_scale.core.pipeline_trace`),
    which places parameters held directly by a module where the forward uses them."""
    total = cfg.num_stages_total
    if cfg.split_points is not None:
        container = _container_of_split_points(network, cfg.split_points, cfg.block_container)
    else:
        container = find_block_container(network, cfg.block_container, cfg.block_class)
    keys = list(network.get_submodule(container)._modules.keys())
    if total > len(keys):
        raise ValueError(
            f"{total} pipeline stages (stages={cfg.stages} x virtual_stages={cfg.num_virtual}) but the container "
            f"{container!r} has only {len(keys)} blocks; use at most {len(keys)} stages in total"
        )
    if container == "":
        raise ValueError(
            f"{type(network).__name__} is itself the block container; pipeline stages are cut inside a network: give "
            f"module_name= the LightningModule attribute that holds it, so its blocks are '<attribute>.<i>'"
        )
    first, last = _outer_modules(network, container, allow_direct_params=traced)
    if cfg.split_points is not None:
        starts = []
        for point in cfg.split_points:
            key = point[len(container) + 1 :]
            starts.append(keys.index(key))
        if starts != sorted(starts) or len(set(starts)) != len(starts) or starts[0] == 0:
            raise ValueError(
                f"split points {cfg.split_points} must name distinct blocks of {container!r} in increasing order, "
                f"after its first block (each names the first block of a stage)"
            )
        starts = [0] + starts
    else:
        block_costs, first_cost, last_cost = costs if costs is not None else module_costs(network, container, traced)
        starts = partition(block_costs, total, first_cost, last_cost)
    bounds = starts + [len(keys)]
    stage_keys = [keys[bounds[s] : bounds[s + 1]] for s in range(total)]
    return PipelinePlan(container, stage_keys, first, last, cfg.stage_ranks())


def _container_of_split_points(network: nn.Module, points: list[str], container: str | None) -> str:
    parents = {p.rsplit(".", 1)[0] for p in points if "." in p}
    if len(parents) != 1 or any("." not in p for p in points):
        raise ValueError(
            f"split points {points} must all be blocks of one container, written as '<container>.<block>' "
            f"(e.g. ['blocks.2', 'blocks.4'] or ['model.layers.16'])"
        )
    parent = parents.pop()
    if container is not None and container != parent:
        raise ValueError(f"split points are in {parent!r} but block_container={container!r}; make them agree")
    find_block_container(network, parent)  # validates the type
    keys = set(network.get_submodule(parent)._modules.keys())
    missing = [p for p in points if p.rsplit(".", 1)[1] not in keys]
    if missing:
        raise ValueError(f"split points {missing} do not name blocks of {parent!r} (its blocks: {sorted(keys)})")
    return parent


# --------------------------------------------------------------------------------------------
# Building stage modules (shallow views, no tensor copies)
# --------------------------------------------------------------------------------------------


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def view_of(network: nn.Module, plan: PipelinePlan, stages: Sequence[int]) -> nn.Module:
    """A module that shares tensors with ``network`` and holds only what ``stages`` own.

    Outer modules not owned are set to ``None``; container entries not owned are dropped.
    Parameter names are those of ``network``.
    """
    stages = sorted(stages)
    keep = {k for s in stages for k in plan.stage_keys[s]}
    owns_first, owns_last = 0 in stages, plan.num_stages - 1 in stages
    root = _shallow(network)
    # Shallow-copy every module along the container path so edits do not touch ``network``.
    parts = plan.container.split(".")
    parent = root
    for part in parts[:-1]:
        child = _shallow(parent._modules[part])
        parent._modules[part] = child
        parent = child
    container = _shallow(parent._modules[parts[-1]])
    # ModuleDict/ModuleList/Sequential iterate over _modules.values(): the dropped entries are
    # skipped and the kept ones keep their original names (indices).
    container._modules = {k: v for k, v in container._modules.items() if k in keep}
    parent._modules[parts[-1]] = container
    for path, owned in [(p, owns_first) for p in plan.first_modules] + [(p, owns_last) for p in plan.last_modules]:
        if not owned:
            _set_none(root, path)
    return root


def _set_none(root: nn.Module, path: str) -> None:
    *parents, name = path.split(".")
    module = root
    for part in parents:  # copy the path down to the module so the source model is untouched
        child = _shallow(module._modules[part])
        module._modules[part] = child
        module = child
    module._modules[name] = None


# --------------------------------------------------------------------------------------------
# Tied parameters
# --------------------------------------------------------------------------------------------


def owner_stage(plan: PipelinePlan, param_name: str) -> int:
    """The stage that owns a parameter, from its name."""
    prefix = plan.container + "."
    if param_name.startswith(prefix):
        key = param_name[len(prefix) :].split(".", 1)[0]
        for s, keys in enumerate(plan.stage_keys):
            if key in keys:
                return s
    for path in plan.first_modules:
        if param_name == path or param_name.startswith(path + "."):
            return 0
    for path in plan.last_modules:
        if param_name == path or param_name.startswith(path + "."):
            return plan.num_stages - 1
    raise ValueError(f"parameter {param_name!r} belongs to no pipeline stage")


# --------------------------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------------------------


class _ForwardAdapter(nn.Module):
    """Runs ``fn(module, *inputs)`` as the forward of a stage (models whose own forward cannot
    run with parts missing, e.g. Hugging Face decoders). Holds ``module``; copies nothing."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *inputs: Any) -> Any:
        return self.fn(self.module, *inputs)


@dataclass
class TimelineEvent:
    """One compute action of a measured step (seconds since the step began)."""

    rank: int
    stage: int
    kind: str  # "F" forward, "B" backward (full or input), "W" weight gradient
    microbatch: int
    start: float
    end: float


@dataclass
class PipelineRuntime:
    """The stages and the schedule of one pipeline rank, built from a plan.

    Args:
        network: the full model, identical on every rank (same seed).
        plan: from :func:`plan_pipeline` (the same on every rank).
        cfg: the pipeline config.
        pp_rank: this rank's index along the pipeline dimension.
        pp_group: process group of this rank's pipeline (p ranks).
        pp_global_ranks: global rank of each pipeline rank 0..p-1 of this group.
        device: compute device.
        loss_fn: ``loss_fn(output, target) -> scalar`` mean over a microbatch.
    """

    network: nn.Module  # released (set to None) once the stages are built
    plan: PipelinePlan
    cfg: PipelineConfig
    pp_rank: int
    pp_group: Any
    pp_global_ranks: list[int]
    device: torch.device
    loss_fn: Callable[[Any, Any], torch.Tensor]
    local_module: nn.Module = field(init=False)
    stage_indices: list[int] = field(init=False)
    stage_forward: Callable[..., Any] | None = None  # stage_forward(stage_module, *inputs) replaces its forward
    traced: Any = None  # a pipeline_trace.TracedSplit: stages cut by torch's tracer instead of stage views
    example: tuple | None = None  # traced: example inputs (any batch size) that tell which tensors a stage holds
    record_timeline: bool = False
    timeline: list[TimelineEvent] = field(default_factory=list)
    unplaced_parameters: set[str] = field(init=False, default_factory=set)  # traced: parameters no stage graph holds

    def __post_init__(self) -> None:
        self.stage_indices = [s for s, r in enumerate(self.plan.stage_ranks) if r == self.pp_rank]
        self.tied_groups = tied_parameter_groups(self.network)
        if self.traced is not None:
            # The network itself, with what other ranks' stages hold removed (set to None, names
            # kept); stages are built per input signature from the trace (``_build``).
            from lightning_scale.core.pipeline_trace import prune_to

            assert self.example is not None
            # Where each tensor lives: on the ranks of the stages whose graphs hold it; a tensor no
            # stage graph holds (used in training_step or the loss) on every rank of the pipeline.
            where = self.traced.placement(self.example)
            everyone = set(range(self.cfg.stages))
            self._traced_holders = {name: ({self.plan.stage_ranks[s] for s in stages} if stages else everyone)
                                    for name, stages in where.items()}
            self._traced_params = {n for n, _ in self.network.named_parameters(remove_duplicate=False)}
            self.unplaced_parameters = {n for n, stages in where.items() if not stages and n in self._traced_params}
            prune_to(self.network, {n for n, ranks in self._traced_holders.items() if self.pp_rank in ranks})
            self.local_module = self.network
            self.stage_modules = [self.network]
        else:
            # What this rank keeps (the LightningModule's network after setup): all of its stages.
            self.local_module = view_of(self.network, self.plan, self.stage_indices)
            if len(self.stage_indices) == 1:
                self.stage_modules = [self.local_module]
            else:
                self.stage_modules = [view_of(self.local_module, self.plan, [s]) for s in self.stage_indices]
        self._loss_scale = 1.0  # 1 / (m x accumulation) while training, so grads match the full batch
        # Timeline marks on the device's stream (CUDA events on a GPU: kernels, not launches), read
        # into seconds once the step is over (one synchronisation per recorded step, none otherwise).
        self._clock = DeviceClock(self.device)
        self._t0 = self._clock.mark()
        self._raw_timeline: list[tuple[int, str, int, Any, Any]] = []  # (stage, kind, microbatch, start, end marks)
        self._predicting = False
        # torch's stages fix the tensor shapes they send at their first step, so one set of stages
        # and a schedule is kept per input-shape signature (e.g. training batches, a smaller last
        # eval batch, each length during generation). Every rank sees the same inputs, so every
        # rank switches at the same call.
        self._by_signature: dict[tuple, tuple[list, Any]] = {}
        # Traced stages need an input signature: the first step builds them.
        self.stages, self.schedule = ([], None) if self.traced is not None else self._build()
        self.last_stage_rank = self.plan.stage_ranks[-1]  # pp rank that holds the loss
        self.tied = self._tied_sync_plan()
        # Drop the full model: the blocks this rank does not own are freed once the caller
        # replaces its own reference with ``local_module``.
        self.network = None  # type: ignore[assignment]

    def _build(self, n_microbatches: int | None = None, microbatch: tuple | None = None) -> tuple[list, Any]:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        if self.traced is not None:
            assert microbatch is not None
            modules = self.traced.stage_modules(microbatch, self.stage_indices, self.local_module, self.device)
        else:
            modules = self.stage_modules
            if self.stage_forward is not None:
                modules = [_ForwardAdapter(mod, self.stage_forward) for mod in modules]
        stages = [
            PipelineStage(mod, s, self.plan.num_stages, self.device, group=self.pp_group)
            for mod, s in zip(modules, self.stage_indices)
        ]
        for stage in stages:
            self._instrument(stage)
        schedule_cls = get_schedule_class(_TORCH_SCHEDULES[self.cfg.schedule])
        m = n_microbatches or self.cfg.resolved_microbatches
        kwargs = dict(n_microbatches=m, loss_fn=self._scheduled_loss, scale_grads=False)
        if issubclass(schedule_cls, PipelineScheduleSingle):
            return stages, schedule_cls(stages[0], **kwargs)
        return stages, schedule_cls(stages, **kwargs)

    _MAX_SIGNATURES = 8  # cached stage sets; the oldest is dropped beyond this

    def _select(self, inputs: tuple, target: Any, n_microbatches: int | None = None) -> None:
        """Use the stages and schedule built for these input/target shapes (build on first use)."""

        def sig(x: Any) -> Any:
            return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__

        m = n_microbatches or self.cfg.resolved_microbatches
        key = (tuple(sig(x) for x in inputs), sig(target), m)
        if key not in self._by_signature:
            if self.traced is not None:
                # One microbatch of the inputs (B/m rows): the shapes the traced stages exchange.
                rows = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor)) // m
                built = self._build(m, tuple(x[:rows] if isinstance(x, torch.Tensor) else x for x in inputs))
            elif not self._by_signature and m == self.cfg.resolved_microbatches:
                built = (self.stages, self.schedule)  # the first signature takes the initial build
            else:
                built = self._build(m)
            if len(self._by_signature) >= self._MAX_SIGNATURES:
                self._by_signature.pop(next(iter(self._by_signature)))
            self._by_signature[key] = built
        self.stages, self.schedule = self._by_signature[key]

    # -- properties --------------------------------------------------------------------------
    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        return self.plan.num_stages - 1 in self.stage_indices

    @property
    def microbatches(self) -> int:
        return self.cfg.resolved_microbatches

    def eval_microbatches(self, batch_size: int) -> int:
        """Microbatches for a forward-only batch: the configured m, or the largest divisor of the
        batch below it (a smaller last eval batch), so every microbatch has the same shape."""
        floor = self.cfg.stages if self.cfg.schedule in NEEDS_M_GE_P else 1
        for m in range(min(self.microbatches, batch_size), floor - 1, -1):
            if batch_size % m == 0:
                return m
        raise ValueError(
            f"an eval/predict batch of {batch_size} samples cannot be cut into equal microbatches for schedule "
            f"{self.cfg.schedule!r} with {self.cfg.stages} stages (needs a divisor >= {floor}); use eval batch "
            f"sizes that are multiples of {self.microbatches} (e.g. drop_last=True on the eval DataLoader)"
        )

    # -- loss ---------------------------------------------------------------------------------
    def _scheduled_loss(self, output: Any, target: Any) -> torch.Tensor:
        if self._predicting:
            return output.new_zeros(()) if torch.is_tensor(output) else torch.zeros((), device=self.device)
        return self.loss_fn(output, target) * self._loss_scale

    def check_batch(self, batch_size: int) -> None:
        m = self.microbatches
        if batch_size % m != 0 or batch_size < m:
            raise ValueError(
                f"batch size {batch_size} is not divisible by pipeline microbatches={m}; make the per-device "
                f"batch size a multiple of {m} (or set microbatches to a divisor of {batch_size})"
            )

    # -- steps --------------------------------------------------------------------------------
    def train_step(self, inputs: tuple, target: Any, grad_divisor: float = 1.0) -> torch.Tensor:
        """Forward and backward of all microbatches; grads accumulate into ``.grad``.

        Gradients equal those of ``loss_fn(model(x), y) / grad_divisor`` over the whole batch
        (each microbatch loss is scaled by ``1 / (m * grad_divisor)``). Returns the mean
        microbatch loss on every rank of the pipeline (broadcast from the last stage).
        """
        self._loss_scale = 1.0 / (self.microbatches * grad_divisor)
        self.timeline.clear()
        self._raw_timeline.clear()
        self._select(inputs, target)
        args = inputs if self.has_first_stage else ()
        tgt = target if self.has_last_stage else None
        losses: list[torch.Tensor] = []  # filled by the schedule on the last stage, one per microbatch
        self._t0 = self._clock.mark()
        self.schedule.step(*args, target=tgt, losses=losses, return_outputs=False)
        if self._raw_timeline:
            self.timeline = [TimelineEvent(self.pp_rank, stage, kind, mb, self._clock.seconds(self._t0, start),
                                           self._clock.seconds(self._t0, end))
                             for stage, kind, mb, start, end in self._raw_timeline]
            self._raw_timeline.clear()
        return self._broadcast_mean_loss(losses)

    def eval_step(self, inputs: tuple, target: Any, batch_size: int) -> tuple[Any, torch.Tensor]:
        """Forward only; returns (merged outputs on the last stage or None, mean loss everywhere).

        Microbatches are equal (see :meth:`eval_microbatches`), so the mean of microbatch losses
        is the full-batch mean of a per-sample mean loss.
        """
        self._loss_scale = 1.0
        self._select(inputs, target, self.eval_microbatches(batch_size))
        args = inputs if self.has_first_stage else ()
        tgt = target if self.has_last_stage else None
        losses: list[torch.Tensor] = []
        with torch.no_grad():
            out = self.schedule.eval(*args, target=tgt, losses=losses)
        return (out if self.has_last_stage else None), self._broadcast_mean_loss(losses)

    def predict_step(self, inputs: tuple, batch_size: int) -> Any:
        """Forward only with no loss; returns merged outputs on the last stage, else None."""
        self._predicting = True
        try:
            self._select(inputs, None, self.eval_microbatches(batch_size))
            args = inputs if self.has_first_stage else ()
            dummy = torch.zeros(batch_size, device=self.device) if self.has_last_stage else None
            with torch.no_grad():
                out = self.schedule.eval(*args, target=dummy)
        finally:
            self._predicting = False
        return out if self.has_last_stage else None

    def _broadcast_mean_loss(self, scaled: list[torch.Tensor]) -> torch.Tensor:
        """Mean of the unscaled microbatch losses, sent from the last stage to the whole pipeline."""
        if self.has_last_stage:
            value = (torch.stack([loss.detach().float() for loss in scaled]) / self._loss_scale).mean()
        else:
            value = torch.zeros((), dtype=torch.float32, device=self.device)
        src = self.pp_global_ranks[self.last_stage_rank]
        dist.broadcast(value, src=src, group=self.pp_group)
        return value

    def broadcast_from_last_stage(self, obj: Any) -> Any:
        """Send a picklable object (e.g. predictions) from the last stage to the whole pipeline."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.pp_global_ranks[self.last_stage_rank], group=self.pp_group)
        return box[0]

    # -- tied parameters ---------------------------------------------------------------------
    def _tied_sync_plan(self) -> list[tuple[list[int], str]]:
        """(pipeline ranks holding a copy, local parameter name) of each tied group split over ranks."""
        if self.traced is not None:
            # Parameters on several pipeline ranks: one torch's tracer replicates to every stage that
            # uses it, or one used outside forward (kept on every rank, its gradient made on the
            # last stage). Same list, same order on every rank: the strategy creates a group for each.
            return [(sorted(ranks), name if self.pp_rank in ranks else "")
                    for name, ranks in sorted(self._traced_holders.items())
                    if name in self._traced_params and len(ranks) > 1]
        out = []
        for names in self.tied_groups:
            holders = sorted({self.plan.stage_ranks[owner_stage(self.plan, n)] for n in names})
            if len(holders) < 2:
                continue
            local = [n for n in names if self.plan.stage_ranks[owner_stage(self.plan, n)] == self.pp_rank]
            out.append((holders, local[0] if local else ""))
        return out

    def primary_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters, leaving out tied copies held by a lower pipeline rank.

        Summing a function of these over the pipeline counts every logical parameter once
        (used for the global gradient norm).
        """
        skip = set()
        for holders, local_name in self.tied:
            if local_name and self.pp_rank != holders[0]:
                skip.add(id(self.local_module.get_parameter(local_name)))
        return [p for p in self.local_module.parameters() if id(p) not in skip]

    # -- timing -------------------------------------------------------------------------------
    def _instrument(self, stage: Any) -> None:
        runtime = self

        def wrap(name: str, kind: str) -> None:
            original = getattr(stage, name)

            def timed(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
                if not runtime.record_timeline:
                    return original(chunk_id, *args, **kwargs)
                start = runtime._clock.mark()
                try:
                    return original(chunk_id, *args, **kwargs)
                finally:
                    runtime._raw_timeline.append((stage.stage_index, kind, chunk_id, start, runtime._clock.mark()))

            setattr(stage, name, timed)

        wrap("forward_one_chunk", "F")
        wrap("backward_one_chunk", "B")
        if hasattr(stage, "backward_weight_one_chunk"):
            wrap("backward_weight_one_chunk", "W")
