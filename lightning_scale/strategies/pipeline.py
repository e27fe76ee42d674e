"""``PipelineStrategy``: pipeline parallelism for Lightning on ``torch.distributed.pipelining``.

The user's side (see docs/strategies/pipeline.md): nothing changes. The network is
``self.model`` (``module_name``) or the LightningModule itself; ``frontend="trace"`` cuts its
unchanged forward with torch's tracer (:mod:`lightning_scale.core.pipeline_trace`). A loss
computed inline in ``training_step`` is replayed per microbatch on the last stage
(:mod:`lightning_scale.strategies.inline_loss`); a loss method (``loss_name``, default
``"loss_fn"``), ``loss = self.loss_fn(self.model(x), y)``, runs inside the schedule directly.

How a step runs (:mod:`lightning_scale.strategies.pipeline_step`, the step in one place): inside
``training_step`` the strategy stands in for the network and the loss method. ``self.model(x)`` records the inputs and returns a :class:`PipelineOutput`;
``self.loss_fn(output, y)`` runs the schedule (forward and backward of every microbatch on every
stage) and returns the mean microbatch loss, broadcast from the last stage so every rank logs
the real loss. Lightning's own ``backward`` becomes a no-op. In eval steps the schedule runs
forward only, and the outputs exist on the last stage (``outputs_here(output)``). In
``predict_step`` the outputs are broadcast to every stage so prediction code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_scale.core.grads import allreduce_gradients
from lightning_scale.core.mesh import ParallelDims
from lightning_scale.core.pipeline import (
    NEEDS_M_GE_P,
    SPLIT_BACKWARD_SCHEDULES,
    V_SCHEDULES,
    PipelineConfig,
    PipelineRuntime,
    ScheduleName,
    plan_pipeline,
    tied_parameter_groups,
)
from lightning_scale.core.pipeline_trace import meta_copy
from lightning_scale.strategies.base import MeshStrategy
from lightning_scale.strategies.options import check_attribute_name, check_module_path, renamed_option
from lightning_scale.strategies.pipeline_step import PipelinedStep, no_loss_method



def _resolve_callable(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(spec):
        return spec
    module_name, _, attr = spec.rpartition(".")
    try:
        import importlib

        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"stage_forward={spec!r} is not an importable function 'package.module.function'") from err
    if not callable(fn):
        raise ValueError(f"stage_forward={spec!r} is not callable")
    return fn


def _check_pipeline_options(owner: str, balance: Any, split_points: Any, container: Any, loss_name: Any, timeline_step: Any, timeline_path: Any) -> None:
    """Options PipelineConfig does not check, with errors naming the fix (before any collective)."""
    if balance not in ("params", "time"):
        raise ValueError(f"{owner}(balance={balance!r}): balance must be 'params' (split blocks by parameter count) or "
                         f"'time' (by measured forward+backward time; needs example_input_array)")
    if split_points is not None and (isinstance(split_points, str) or not isinstance(split_points, (list, tuple))
                                     or not all(isinstance(p, str) and p for p in split_points)):
        raise ValueError(f"{owner}(split_points={split_points!r}): split_points must be a list of block names where a new "
                         f"stage starts, e.g. ['blocks.2'] for 2 stages (one name fewer than stages), or None")
    check_module_path(owner, "block_container", container)
    check_attribute_name(owner, "loss_name", loss_name)  # module_name: checked by MeshStrategy
    if timeline_step is not None and (isinstance(timeline_step, bool) or not isinstance(timeline_step, int) or timeline_step < 0):
        raise ValueError(f"{owner}(timeline_step={timeline_step!r}): timeline_step must be a global step >= 0 to record "
                         f"(e.g. 5), or None for no timeline")
    if timeline_path is not None and (not isinstance(timeline_path, (str, Path)) or not str(timeline_path)):
        raise ValueError(f"{owner}(timeline_path={timeline_path!r}): timeline_path must be a file path for the PNG "
                         f"(e.g. 'runs/timeline.png'), or None for <log_dir>/pipeline_timeline.png")


class PipelineStrategy(MeshStrategy):
    """Pipeline parallelism (GPipe, 1F1B, interleaved 1F1B, zero-bubble schedules), with data
    parallelism over the remaining ranks.

    Args:
        stages: pipeline ranks per replica; the world size must be a multiple (the rest is data parallel).
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"looped_bfs"``,
            ``"interleaved_zero_bubble"`` or ``"zbv_zero_bubble"``.
        microbatches: microbatches per batch (default 2 x the number of stages); the per-device
            batch size must be a multiple of it.
        virtual_stages: stages per rank for the multi-stage schedules (default 2).
        balance: split blocks by ``"params"`` (default) or by measured ``"time"`` (needs
            ``example_input_array`` on the LightningModule).
        split_points: explicit stage boundaries, e.g. ``["blocks.2"]`` (overrides ``balance``).
        block_container: path of the block container in the network (default: found
            automatically); ``container=`` is its deprecated spelling.
        block_class: or the blocks' class (they must be the children of one container).
        module_name: attribute of the LightningModule that holds the network to pipeline
            (default: ``model`` if present, else the LightningModule itself).
        loss_name: method of the LightningModule that computes the loss from (output, target).
        stage_forward: ``fn(stage_module, *inputs)`` run as each stage's forward, for models whose
            own forward cannot skip missing parts (a callable or its import path, e.g.
            ``"lightning_scale.adapters.huggingface.decoder_stage_forward"``).
        timeline_step: if set, record this global step's schedule and save a PNG timeline.
        timeline_path: where the PNG goes (default ``<trainer.log_dir>/pipeline_timeline.png``).
        zero_stage: 0 (default: gradients all-reduced over the data-parallel replicas) or 3 (FSDP2
            ``fully_shard`` of each stage's blocks and stage modules over the dp sub-mesh).
        frontend: how stages are cut. ``"trace"``: torch's tracing frontend splits the unchanged
            ``forward`` (``torch.distributed.pipelining.pipeline`` on ``torch.export``; example
            inputs from ``example_input_array``, else the first batch's). ``"views"``: each stage is a view of the model without the
            parts it does not own, run by the model's own forward, which must skip ``None``
            modules (the suite's models do), or by ``stage_forward``. ``"auto"`` (default):
            ``"views"`` for models that declare ``pipeline_stage_views = True`` or with
            ``stage_forward``, else ``"trace"``.
    """

    strategy_name = "pipeline"

    def __init__(
        self,
        stages: int = 2,
        schedule: ScheduleName = "1f1b",
        microbatches: int | None = None,
        virtual_stages: int | None = None,
        balance: Literal["params", "time"] = "params",
        split_points: list[str] | None = None,
        block_container: str | None = None,
        block_class: Any = None,
        module_name: str = "model",
        loss_name: str = "loss_fn",
        stage_forward: str | Callable[..., Any] | None = None,
        timeline_step: int | None = None,
        timeline_path: str | None = None,
        zero_stage: int = 0,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        trust_checkpoint: bool = False,
        container: str | None = None,
        frontend: Literal["auto", "trace", "views"] = "auto",
        **kwargs: Any,
    ) -> None:
        # Validated here, on every rank, before any process group exists.
        block_container = renamed_option(type(self).__name__, "container", "block_container", container, block_container)
        if frontend not in ("auto", "trace", "views"):
            raise ValueError(f"{type(self).__name__}(frontend={frontend!r}): frontend must be 'auto', 'trace' (torch's "
                             f"tracer splits your unchanged forward) or 'views' (your forward skips None modules)")
        self.frontend = frontend
        _check_pipeline_options(type(self).__name__, balance, split_points, block_container, loss_name,
                                timeline_step, timeline_path)
        self.pipeline_config = PipelineConfig(
            stages=stages,
            schedule=schedule,
            microbatches=microbatches,
            virtual_stages=virtual_stages,
            balance=balance,
            split_points=split_points,
            block_container=block_container,
            block_class=block_class,
        )
        super().__init__(
            dims=ParallelDims(pp=stages, dp=-1, tp=1),
            process_group_backend=process_group_backend,
            timeout=timeout,
            trust_checkpoint=trust_checkpoint,
            module_name=module_name,
            block_container=block_container,
            block_class=block_class,
            **kwargs,
        )
        if zero_stage not in (0, 3):
            raise ValueError(
                f"zero_stage={zero_stage!r}: with pipeline parallelism the data-parallel dimension supports 0 (gradients "
                f"all-reduced, every replica holds its stage's model states) or 3 (FSDP2 on the dp sub-mesh: parameters, "
                f"gradients and optimizer state of each stage sharded over the replicas); stages 1 and 2 are not offered "
                f"with pipelining (see docs/strategies/zero.md, 'ZeRO with pipeline parallelism')"
            )
        self.zero_stage = zero_stage
        ac = self.activation_checkpointing
        if ac is not None and ac.policy == "selective" and schedule in SPLIT_BACKWARD_SCHEDULES:
            # torch's selective checkpointing allows one backward through a region; these
            # schedules run two (input gradients, then weight gradients).
            raise ValueError(
                f"activation_checkpointing='selective' cannot run under schedule={schedule!r}, whose backward runs in "
                f"two passes; use activation_checkpointing='full' (or 'every_<k>') with it, or schedule='1f1b' / "
                f"'interleaved_1f1b'"
            )
        if ac is not None and ac.compile and schedule in SPLIT_BACKWARD_SCHEDULES:
            # A compiled block's backward donates its saved buffers: it runs once, and these
            # schedules run it in two passes (autograd.grad with retain_graph, then weights).
            raise ValueError(
                f"activation_checkpointing with compile=True cannot run under schedule={schedule!r}, whose backward "
                f"runs in two passes through each block; drop compile (eager checkpointing works with it) or use "
                f"schedule='1f1b' / 'interleaved_1f1b'"
            )
        self.loss_name = loss_name
        self.stage_forward = _resolve_callable(stage_forward) if stage_forward is not None else None
        self.timeline_step = timeline_step
        self.record_timeline_requested = False  # set by ScaleProfiler on sampled steps
        self.last_busy_s: float | None = None
        self.timeline_path = timeline_path
        self.runtime: PipelineRuntime | None = None
        self._tied_groups: list[tuple[Any, nn.Parameter]] = []  # (group over the holders, this rank's copy)
        self._maybe_without_grad: set[int] = set()  # ids of synchronised parameters no stage graph uses
        self.last_timeline_png: Path | None = None
        self.step = PipelinedStep(self)  # how a Lightning step drives the schedule (pipeline_step.py)
        self._first_batch_inputs: tuple | None = None  # example inputs taken from the first batch (once)

    # -- validation ------------------------------------------------------------------------------
    def _network_and_loss(self) -> tuple[nn.Module, Any]:
        """The network (``module_name``, or the LightningModule itself) and the loss method, checked
        at setup on every rank with errors that name the fix."""
        lm = self.lightning_module
        network = self.network()
        self.network_is_module = network is lm
        if not lm.automatic_optimization:
            raise ValueError(
                f"PipelineStrategy runs forward and backward inside the loss method, so it needs automatic "
                f"optimization; {type(lm).__name__} sets automatic_optimization = False: use another strategy"
            )
        loss = getattr(lm, self.loss_name, None)
        # No loss method: the loss is computed inline in training_step, which then runs per
        # microbatch on the last stage (lightning_scale/strategies/inline_loss.py).
        self.inline_loss = not callable(loss)
        if self.inline_loss:
            loss = no_loss_method
        return network, loss

    def _adopt_hugging_face_family(self, network: nn.Module) -> None:
        """A ``transformers`` model with no ``stage_forward``: the family's shipped stage forward
        and block container (:func:`lightning_scale.adapters.huggingface.stage_family`); an
        unknown family is refused with the two ways out, on every rank, before any collective."""
        from lightning_scale.adapters.huggingface import is_hugging_face, stage_family

        if self.frontend != "auto" or self.stage_forward is not None or not is_hugging_face(network):
            return
        family = stage_family(network)
        if family is None:
            raise ValueError(
                f"PipelineStrategy: no pipeline stage forward ships for {type(network).__name__} (Hugging Face model_type "
                f"{network.config.model_type!r}; shipped: Llama-style decoders, GPT-2, GPT-NeoX, GPT-J, ViT, BERT/RoBERTa classifiers, masked and causal LMs). "
                f"Give stage_forward=fn(stage, *inputs) that runs the parts a stage holds (the others are None) and "
                f"block_container='<path of the layer list>', or try frontend='trace' (torch's tracer on your forward)"
            )
        self.stage_forward = family.stage_forward
        cfg = self.pipeline_config
        if cfg.block_container is None and cfg.block_class is None and cfg.split_points is None:
            cfg.block_container = family.block_container
            from lightning_scale.core.blocks import BlockFinder

            self.block_finder = BlockFinder(container=family.block_container)
        rank_zero_info(f"PipelineStrategy: {type(network).__name__} runs the shipped {family.name!r} stage forward "
                       f"(blocks: {family.block_container})")

    def _choose_frontend(self, network: nn.Module) -> str:
        self._adopt_hugging_face_family(network)
        if self.frontend != "auto":
            chosen = self.frontend
        elif self.stage_forward is not None or getattr(network, "pipeline_stage_views", False):
            chosen = "views"
        else:
            chosen = "trace"
        if chosen == "views" and self.network_is_module:
            raise ValueError(
                f"PipelineStrategy(frontend='views') replaces the network attribute by a stage view, and "
                f"{type(self.lightning_module).__name__} keeps its layers on itself; use frontend='trace' (default), "
                f"or put the network in an attribute and set module_name="
            )
        if chosen == "trace" and self.zero_stage == 3:
            raise ValueError(
                "PipelineStrategy(zero_stage=3) runs on stage views; with frontend='trace' use zero_stage=0, or a model "
                "whose forward skips None modules with frontend='views'"
            )
        return chosen

    def _example_inputs(self, why: str) -> tuple:
        """One batch of the network's inputs: ``example_input_array``, else the inputs the step
        passes to the network for the first batch of this stage's dataloader (fetched with the
        random state saved and restored, so the run's data order does not change)."""
        lm = self.lightning_module
        example = getattr(lm, "example_input_array", None)
        if example is None:
            example = self._inputs_of_first_batch()
        if example is None:
            raise ValueError(
                f"PipelineStrategy {why}, which needs one batch of example inputs, and there is no dataloader to take "
                f"one from: set self.example_input_array in {type(lm).__name__}.__init__ (what you pass to forward, "
                f"e.g. torch.zeros(2, 16, dtype=torch.long)); its batch size does not matter"
            )
        example = example if isinstance(example, tuple) else (example,)
        return tuple(e.to(self.root_device) if isinstance(e, Tensor) else e for e in example)

    def _inputs_of_first_batch(self) -> tuple | None:
        from lightning.pytorch.trainer.states import TrainerFn

        from lightning_scale.strategies.inline_loss import capture_network_inputs, forked_rng

        if self._first_batch_inputs is not None:  # balance='time' and the trace ask for it: fetched once
            return self._first_batch_inputs
        lm = self.lightning_module
        trainer = lm._trainer
        if trainer is None:
            return None
        loop, step_name = {
            TrainerFn.FITTING: (trainer.fit_loop, "training_step"),
            TrainerFn.VALIDATING: (trainer.validate_loop, "validation_step"),
            TrainerFn.TESTING: (trainer.test_loop, "test_step"),
            TrainerFn.PREDICTING: (trainer.predict_loop, "predict_step"),
        }[trainer.state.fn]
        source = getattr(loop, "_data_source", None)
        if source is None or not source.is_defined():
            return None
        loaders = source.dataloader()
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        attr = "forward" if self.network_is_module else self.module_name
        call = "self(...)" if self.network_is_module else f"self.{self.module_name}(...)"
        step = getattr(type(lm), step_name).__get__(lm)
        # Fetching a batch and running the step up to the network call must not move the run's
        # random streams: the data order and dropout stay those of a run without this.
        with forked_rng(self.root_device):
            batch = lm._apply_batch_transfer_handler(next(iter(loader)), device=self.root_device)
            inputs = capture_network_inputs(lm, attr, call, step, (batch, 0), {})
        rank_zero_info(f"PipelineStrategy: no example_input_array; the inputs {call} gets for the first batch of the "
                       f"{step_name.split('_')[0]} dataloader stand in for it (tracing, balance='time')")
        self._first_batch_inputs = inputs
        return inputs

    @property
    def pipelined(self) -> bool:
        return self.runtime is not None

    # -- setup -------------------------------------------------------------------------------------
    def parallelize(self) -> None:
        """MeshStrategy's order (split, TP, AC, FSDP2: :meth:`split_pipeline` builds the runtime),
        then the groups that keep tied and outside-the-network parameters in step."""
        super().parallelize()
        if self.runtime is not None:
            self._create_tied_groups()
            rank_zero_info(f"PipelineStrategy ({self._frontend}): {self.pipeline_config.schedule}, "
                           f"m={self.runtime.microbatches}\n{self.runtime.plan.describe()}\n{self._stage_param_counts}")

    def split_pipeline(self, network: nn.Module) -> nn.Module:
        """Step 1: plan the split (params or measured time; traced or views), build this rank's
        stages and schedule (:class:`~lightning_scale.core.pipeline.PipelineRuntime`); returns
        this rank's part of the network. With one stage: the whole network, no runtime."""
        network, loss = self._network_and_loss()
        dims = self.resolved_dims
        assert dims is not None
        if dims.pp == 1:
            return network  # one stage: no pipeline
        if getattr(network, "_lightning_scale_pipeline_part", False) or getattr(self.lightning_module,
                                                                                "_lightning_scale_pruned", False):
            raise RuntimeError(
                f"{type(self.lightning_module).__name__} holds only one pipeline stage's part of the model (it was split "
                f"by another PipelineStrategy); reuse the same Trainer for fit/validate/test/predict, or load a fresh "
                f"model from a checkpoint"
            )
        frontend = self._choose_frontend(network)
        traced, example = None, None
        if frontend == "trace":
            from lightning_scale.core.pipeline_trace import TracedSplit

            example = self._example_inputs(f"traces {type(network).__name__}.forward to cut it into stages")
            tied = tied_parameter_groups(network)
            if tied:
                raise ValueError(
                    f"PipelineStrategy(frontend='trace'): {type(network).__name__} shares parameters between modules "
                    f"({', '.join(' = '.join(g) for g in tied[:2])}); the traced path cannot keep copies on two stages in "
                    f"step. Use frontend='views' with a forward that skips None modules, or untie them"
                )
        if self.pipeline_config.balance == "time" and self.deferring:
            raise ValueError(
                f"{type(self).__name__}(balance='time') times each block by running it, and this model is deferred "
                f"(on the meta device until each rank materializes its part): use balance='params' (the default), or "
                f"split_points=[...], or build the model eagerly"
            )
        costs = self._measure_block_costs(network) if self.pipeline_config.balance == "time" else None
        plan = plan_pipeline(network, self.pipeline_config, costs, traced=frontend == "trace")
        if frontend == "trace":
            # Traced (once) when the runtime places the tensors below: an export failure is raised
            # there, at setup, on every rank.
            traced = TracedSplit(network, [f"{plan.container}.{keys[0]}" for keys in plan.stage_keys[1:]])
        self._full_module_meta = meta_copy(self.lightning_module)  # runs forward outside steps (shapes only)
        self._summarize_whole_model()
        self._frontend = frontend
        self._stage_param_counts = self._describe_stage_sizes(network, plan)
        rank = self.global_rank
        self.runtime = PipelineRuntime(
            network=network,
            plan=plan,
            cfg=self.pipeline_config,
            pp_rank=self.coordinate("pp"),
            pp_group=self.group("pp"),
            pp_global_ranks=dims.ranks_along("pp", rank),
            device=self.root_device,
            loss_fn=loss,
            stage_forward=self.stage_forward,
            traced=traced,
            example=example,
        )
        if traced is None:
            self.runtime.local_module._lightning_scale_pipeline_part = True
            setattr(self.lightning_module, self.module_name, self.runtime.local_module)
        self.lightning_module._lightning_scale_pruned = True
        # Outside a step (Lightning's model summary with example_input_array, a user's call) the
        # LightningModule's forward runs on a meta copy of the whole model: shapes, no numbers, no
        # collective, no crash on the parts this rank does not hold.
        self.lightning_module.__dict__["forward"] = self._outside_step_forward
        return self.runtime.local_module

    def split_block_container(self) -> str | None:
        return self.runtime.plan.container if self.runtime is not None else self.pipeline_config.block_container

    def _create_tied_groups(self) -> None:
        dims = self.resolved_dims
        assert dims is not None and self.runtime is not None
        rank = self.global_rank
        # Groups that sum the gradients of tied parameters held on several stages; new_group is
        # collective over the world, so every rank creates every group in the same order.
        # Parameters of the LightningModule outside the network (a temperature used in the loss)
        # are on every pipeline rank; only the stage that runs the loss gives them a gradient,
        # so they are synchronised like tied copies held by every rank. Same order on every rank.
        local = self.runtime.local_module
        in_network = {id(p) for p in local.parameters()}
        outside = [(list(range(dims.pp)), name) for name, p in self.lightning_module.named_parameters()
                   if id(p) not in in_network and p.requires_grad]
        # Parameters no stage graph uses (outside the network, or used only in training_step) may get
        # no gradient in a step; finalize_gradients asks their holders before summing.
        self._maybe_without_grad = {id(self.lightning_module.get_parameter(name)) for _, name in outside}
        self._maybe_without_grad |= {id(local.get_parameter(name)) for name in self.runtime.unplaced_parameters
                                     if name in dict(local.named_parameters())}
        self._tied_groups = []
        for holders, local_name, owner in [*((h, n, local) for h, n in self.runtime.tied),
                                           *((h, n, self.lightning_module) for h, n in outside)]:
            for dp in range(dims.dp):
                for tp in range(dims.tp):
                    ranks = [pp * dims.dp * dims.tp + dp * dims.tp + tp for pp in holders]
                    group = dist.new_group(ranks, timeout=self._timeout)
                    if rank in ranks and local_name:
                        self._tied_groups.append((group, owner.get_parameter(local_name)))

    def _summarize_whole_model(self) -> None:
        """Lightning's ModelSummary (``on_fit_start``, every rank, after the split) summarizes the
        meta copy of the whole LightningModule: every layer and parameter count, and the in/out
        shapes of ``example_input_array`` (on meta: no numbers, no collective)."""
        from lightning.pytorch.callbacks import ModelSummary
        from lightning.pytorch.utilities.model_summary import summarize
        from torch.utils._pytree import tree_map

        from lightning_scale.core.pipeline_trace import _to_meta

        meta = self._full_module_meta
        example = getattr(self.lightning_module, "example_input_array", None)
        if example is not None:
            meta.example_input_array = tree_map(_to_meta, example)
        meta._device = torch.device("meta")
        trainer = self.lightning_module._trainer
        for callback in (trainer.callbacks if trainer is not None else []):
            if isinstance(callback, ModelSummary):
                callback._summary = lambda trainer, pl_module, cb=callback: summarize(meta, max_depth=cb._max_depth)

    def _describe_stage_sizes(self, network: nn.Module, plan: Any) -> str:
        """Parameter counts of the whole model and of each stage, for the setup log (Lightning's
        summary shows the whole model; see :meth:`_summarize_whole_model`)."""
        from lightning_scale.core.pipeline import module_costs

        blocks, first, last = module_costs(network, plan.container, allow_direct_params=True)
        keys = list(network.get_submodule(plan.container)._modules.keys())
        sizes = []
        for s, stage_keys in enumerate(plan.stage_keys):
            n = sum(blocks[keys.index(k)] for k in stage_keys)
            n += first if s == 0 else 0
            n += last if s == plan.num_stages - 1 else 0
            sizes.append(n)
        total = sum(p.numel() for p in network.parameters())
        per_stage = ", ".join(f"stage {s}: {int(n):,}" for s, n in enumerate(sizes))
        return f"parameters: {total:,} in the whole model; {per_stage}"

    def _outside_step_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The LightningModule's forward outside a pipelined step: on the meta copy of the whole model."""
        from lightning_scale.core.pipeline_trace import _to_meta

        if not getattr(self, "_warned_meta_forward", False):
            self._warned_meta_forward = True
            rank_zero_info(
                f"PipelineStrategy: {type(self.lightning_module).__name__}.forward called outside a training/eval step "
                f"runs on the meta device (output shapes, no values): each rank holds only its pipeline stages. For real "
                f"outputs call trainer.strategy.pipelined_forward(x) on every rank"
            )
        meta = self._full_module_meta
        return type(meta).forward(meta, *(_to_meta(a) for a in args), **{k: _to_meta(v) for k, v in kwargs.items()})

    def communication_groups(self) -> list[tuple[str, dist.ProcessGroup]]:
        """The mesh's groups, plus the tied-parameter groups, which join pipeline stages: ``pp``."""
        return [*super().communication_groups(), *(("pp", group) for group, _ in self._tied_groups)]

    def optimizer_state_aliases(self) -> dict[str, str]:
        """A tied parameter (GPT head = token embedding) split over stages: every copy reads its
        optimizer state under the group's first name, which every layout saves (an unsplit
        model saves a tied parameter's state once, under its first name)."""
        if self.runtime is None:
            return {}
        prefix = self.module_name + "."
        held = {n for n, _ in self.runtime.local_module.named_parameters()}
        aliases = {}
        for names in self.runtime.tied_groups:
            canonical = names[0]
            for name in names[1:]:
                if name in held and canonical not in held:
                    aliases[prefix + name] = prefix + canonical
        return aliases

    def shard_data_parallel(self, local: nn.Module) -> None:
        """Step 4, ``zero_stage=3``: FSDP2 ``fully_shard`` on the dp sub-mesh, per block and per stage module.

        The last step of the design guide's order (after split, TP and AC). Each block is its own
        FSDP2 unit (all-gathered for its forward and backward); each stage module is the root
        unit, holding the stage's other parameters (embeddings, final norm, head). torch's
        pipeline schedules recognise FSDP2 stage modules and reduce gradients once per step."""
        if self.zero_stage != 3:
            return
        from lightning_scale.core.fsdp import fully_shard_blocks, mixed_precision_policy

        # The root units are what each PipelineStage calls: the stage module, or with stage_forward
        # its adapter, whose forward calls the stage's parts directly (not the stage module's own
        # forward): FSDP's root hooks must run on the module the schedule calls.
        network = local
        stage_modules = [stage.submod for stage in self.runtime.stages] if self.runtime is not None else [local]
        mesh = self.device_mesh["dp"]
        blocks = [b for _, b in self.block_finder.find(network, type(self).__name__)]
        mp_policy = mixed_precision_policy(self.precision_plugin.precision)
        # Pipelined: several microbatches' forwards run before their backwards; resharding after
        # each forward would all-gather every block again per microbatch (torchtitan does the same).
        fully_shard_blocks(blocks, stage_modules, mesh, mp_policy=mp_policy,
                           reshard_after_forward=self.runtime is None)
        rank_zero_info(f"{type(self).__name__}: ZeRO-3 (FSDP2) over dp={mesh.size()} for each stage's blocks and stage "
                       f"modules" + (", parameters kept gathered from forward to backward" if self.runtime else "")
                       + (f", all-gathers in {mp_policy.param_dtype}" if mp_policy else ""))

    def _measure_block_costs(self, network: nn.Module) -> tuple[list[float], float, float]:
        """``balance='time'``: each block's forward+backward seconds on ``example_input_array``
        (:func:`~lightning_scale.core.pipeline.measure_block_seconds`), averaged over all ranks so
        that every rank computes the same split."""
        from lightning_scale.core.pipeline import find_block_container, measure_block_seconds

        example = self._example_inputs("with balance='time' measures each block (or use balance='params')")
        cfg = self.pipeline_config
        container = find_block_container(network, cfg.block_container, cfg.block_class)
        blocks, first, last = measure_block_seconds(network, container, example, self.root_device)
        # On the root device: NCCL takes device tensors only.
        seconds = torch.tensor([*blocks, first, last], dtype=torch.float64, device=self.root_device)
        dist.all_reduce(seconds, op=dist.ReduceOp.SUM)
        values = (seconds / dist.get_world_size()).tolist()
        return values[:-2], values[-2], values[-1]

    # -- gradients ---------------------------------------------------------------------------------
    def finalize_gradients(self) -> None:
        if self.runtime is not None:
            for group, param in self._tied_groups:
                if id(param) in self._maybe_without_grad:
                    # A parameter kept on every rank because no stage graph holds it may get no
                    # gradient anywhere (unused this step): it must stay without one (an optimizer
                    # would apply weight decay and momentum to a zero gradient).
                    used = torch.tensor([float(param.grad is not None)], device=self.root_device)
                    dist.all_reduce(used, group=group)
                    if used.item() == 0:
                        continue
                allreduce_gradients([param], group, average=False)
        super().finalize_gradients()

    def model_parallel_groups(self) -> list[Any]:
        return [self.group("pp")] if self.pipelined else []

    def norm_parameters(self) -> list[nn.Parameter]:
        if self.runtime is None:
            return super().norm_parameters()
        primary = {id(p) for p in self.runtime.primary_parameters()}
        network = {id(p) for p in self.runtime.local_module.parameters()}
        assert self.lightning_module is not None
        # Parameters outside the network are on every pipeline rank, in step: counted on pp rank 0.
        outside = self.coordinate("pp") == 0
        return [p for p in self.lightning_module.parameters() if id(p) in primary or (id(p) not in network and outside)]

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self.pipelined:
            from lightning.pytorch.trainer import call

            # The schedule already ran backward for every microbatch: restore its gradients.
            # The backward hooks still fire (callbacks and LightningModules rely on
            # on_after_backward, e.g. to log gradient norms), around the restore.
            trainer = self.lightning_module.trainer
            call._call_callback_hooks(trainer, "on_before_backward", closure_loss)
            call._call_lightning_module_hook(trainer, "on_before_backward", closure_loss)
            self.step.restore_gradients()
            call._call_callback_hooks(trainer, "on_after_backward")
            call._call_lightning_module_hook(trainer, "on_after_backward")
            return closure_loss.detach()
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.step.end_accumulation_window()
        return out

    # -- steps -------------------------------------------------------------------------------------
    @property
    def supports_forward_only(self) -> bool:
        """False for torch's V-shaped zero-bubble schedule, whose runtime has no forward-only mode
        (its eval asserts on the backward it does not run): no validation, test, predict or sample."""
        return self.pipeline_config.schedule not in V_SCHEDULES

    def _check_forward_only(self) -> None:
        if not self.supports_forward_only:
            raise ValueError(
                f"schedule={self.pipeline_config.schedule!r} cannot run forward-only passes (validation, test, predict): "
                f"torch's ZBV schedule has no eval mode. Set limit_val_batches=0 for training with it, or use "
                f"schedule='interleaved_zero_bubble' (also zero-bubble, with forward-only support)"
            )

    def pipelined_forward(self, *inputs: Any) -> Any:
        """The whole network's forward (no loss, no gradients) through the pipeline, returned on every
        rank of this pipeline. A collective of the pipeline group: each of its ranks must call it
        with the same inputs (e.g. token-by-token sampling after training, with the same seed).

        A batch too small to cut into the schedule's microbatches (one prompt under 1F1B needs at
        least ``stages`` rows) is padded by repeating its rows; the output is cut back to the batch.
        """
        runtime = self.runtime
        assert runtime is not None, "pipelined_forward needs a set-up strategy (inside or after fit)"
        b = self.step.batch_size(inputs, None)
        floor = self.pipeline_config.stages if self.pipeline_config.schedule in NEEDS_M_GE_P else 1
        if b >= floor:
            return self.step.predict(inputs)
        reps = -(-floor // b)  # ceil
        padded = tuple(torch.cat([t] * reps)[:floor] if isinstance(t, Tensor) else t for t in inputs)
        out = self.step.predict(padded)
        return out[:b] if isinstance(out, Tensor) else out

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipelined and self.inline_loss:
            args, kwargs = self.precision_plugin.convert_input((args, kwargs))
            with self.precision_plugin.train_step_context():
                return self.step.inline_training_step(args, kwargs)
        with self.step.intercept("train"):
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.step.intercept("eval"):
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.step.intercept("eval"):
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.step.intercept("predict"):
            return super().predict_step(*args, **kwargs)

    def share_from_output_ranks(self, value: Tensor) -> Tensor:
        """Broadcast a tensor from the last stage to every stage of this pipeline."""
        if self.runtime is None:
            return value
        value = value.detach().clone().to(self.root_device)
        src = self.runtime.pp_global_ranks[self.runtime.last_stage_rank]
        dist.broadcast(value, src=src, group=self.group("pp"))
        return value

    # -- timeline ----------------------------------------------------------------------------------
    def _save_timeline(self) -> None:
        from lightning_scale.core.timeline import plot_timeline

        runtime = self.runtime
        assert runtime is not None
        gathered: list[Any] = [None] * dist.get_world_size(self.group("pp"))
        dist.all_gather_object(gathered, list(runtime.timeline), group=self.group("pp"))
        if self.coordinate("pp") == 0 and self.coordinate("dp") == 0:
            events = [e for rank_events in gathered for e in rank_events]
            trainer = self.lightning_module.trainer
            path = Path(self.timeline_path or Path(trainer.log_dir or trainer.default_root_dir) / "pipeline_timeline.png")
            cfg = self.pipeline_config
            title = f"{cfg.schedule}: p={cfg.stages}, v={cfg.num_virtual}, m={cfg.resolved_microbatches} (global step {self.timeline_step})"
            self.last_timeline_png = plot_timeline(events, path, title=title, num_ranks=cfg.stages)
            rank_zero_info(f"PipelineStrategy: schedule timeline saved to {self.last_timeline_png}")
