"""``lightning-scale plan`` for the user's own model: traced, not modelled.

The model comes from a Hugging Face config (``--hf-config path/to/config.json`` or a folder
holding one; nothing is downloaded) or a class (``--model-class package.module:Class`` with
``--init-args '{"n_layer": 12}'``). It is built on fake tensors, parallelized by the suite's
strategy for the asked layout under a fake process group of the asked GPU count, and one
training step (forward, backward, optimizer step) is measured per phase by torch's MemTracker
(:mod:`lightning_scale.core.traced_memory`, :mod:`lightning_scale.strategies.offline`).

Layouts traced (:func:`strategy_for`): data parallelism (the suite's ``MeshStrategy``;
Lightning's ``ddp`` also keeps torch DDP's gradient-bucket copy, one gradient's bytes, which is
added and named), ZeRO-1/2 (the strategy's engine) and ZeRO-3 (FSDP2), tensor parallelism (the
strategy's choice of plan, e.g. Hugging Face's ``base_model_tp_plan``) with sequence parallelism
or with ZeRO-3 over the replicas, and the pipeline (every schedule; stages cut by the strategy's
plan, each pipeline rank traced through its schedule's order, the worst rank reported; with data
parallelism or ZeRO-3 on the replicas), with activation checkpointing (``none``, ``full``,
``selective``) and any precision. CPU offload and a pipeline with TP are planned by the closed
forms, which say so. A LightningCLI recipe is traced by :func:`recipe` / :func:`trace_recipe`.

Inputs per model kind: a causal LM takes ``(batch, seq)`` token ids and is trained on its own
loss (``labels=input_ids``); an image classifier (``...ForImageClassification``) takes
``(batch, 3, size, size)`` images and labels; a class given by ``--model-class`` takes token
ids ``< --vocab`` and returns logits ``(batch, seq, vocab)`` (cross entropy) or an output with
``.loss``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_scale.core.traced_memory import TraceError, TracedMemory


@dataclass
class TracedModel:
    """How to build the model and a batch, and its loss: what :func:`trace_plan` runs."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Any]  # rows -> a batch of that many rows
    loss: Callable[[nn.Module, Any], torch.Tensor]
    block_class: Any = None  # the repeated block (ZeRO-3 units, activation checkpointing)
    takes_tokens: bool = True  # a batch of (rows, seq) token ids (False: images)
    tp_plan: Any = None  # {path in the network: ParallelStyle}; None: the strategy's choice (the model's own)
    # The pipeline (stage views): what a stage runs instead of the model's forward (None: the
    # model's own forward skips missing parts), the block container, one microbatch's loss of
    # the last stage's output, and the batch as (stage-0 inputs, target).
    stage_forward: Any = None
    block_container: str | None = None
    output_loss: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None
    split: Callable[[Any], tuple[tuple, Any]] | None = None


def _hf_config(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    from transformers import AutoConfig

    p = Path(path)
    if p.is_dir():
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    if not p.is_file():
        raise SystemExit(f"--hf-config {path}: no such file or folder")
    fields = json.loads(p.read_text())
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise SystemExit(f"--hf-config {path}: the config has no model_type")
    return AutoConfig.for_model(model_type, **fields)


def hf_model(path: str, seq_len: int, attn_implementation: str | None = None) -> TracedModel:
    """A Hugging Face model from its config file or folder (causal LM or image classifier), built
    from the config: no weights read."""
    return hf_model_from_config(_hf_config(path), seq_len, attn_implementation, name=path)


def hf_model_from_config(config: Any, seq_len: int, attn_implementation: str | None = None,
                         name: str | None = None) -> TracedModel:
    """:func:`hf_model` from a ``transformers`` config object."""
    architectures = list(getattr(config, "architectures", None) or [])
    image = any(a.endswith("ForImageClassification") for a in architectures) or config.model_type in ("vit",)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if image:
        from transformers import AutoModelForImageClassification as Auto

        size, channels = int(config.image_size), int(getattr(config, "num_channels", 3))
        labels = max(int(getattr(config, "num_labels", 2)), 1)

        def batch(rows: int) -> Any:
            return torch.randn(rows, channels, size, size), torch.randint(0, labels, (rows,))

        def loss(module: nn.Module, b: Any) -> torch.Tensor:
            return module(pixel_values=b[0], labels=b[1]).loss
    else:
        from transformers import AutoModelForCausalLM as Auto

        vocab = int(config.vocab_size)

        def batch(rows: int) -> Any:
            return torch.randint(0, vocab, (rows, seq_len))

        def loss(module: nn.Module, b: Any) -> torch.Tensor:
            return module(input_ids=b, labels=b).loss

    def build() -> nn.Module:
        return Auto.from_config(config, **kwargs)

    no_split = _no_split_class(Auto, config)
    label = architectures[0] if architectures else config.model_type
    traced = TracedModel(name=f"{label} ({name})" if name else label, build=build,
                         batch=batch, loss=loss, block_class=no_split, takes_tokens=not image)
    with torch.device("meta"):
        from lightning_scale.adapters.huggingface import stage_family

        family = stage_family(build())
    if family is not None:  # the pipeline: the family's shipped stage forward (as PipelineStrategy picks it)
        traced.stage_forward, traced.block_container = family.stage_forward, family.block_container
        if image:
            traced.split = lambda b: ((b[0],), b[1])
            traced.output_loss = lambda network, logits, labels: nn.functional.cross_entropy(logits.float(), labels)
        else:
            traced.split = lambda b: ((b,), b)
            traced.output_loss = lambda network, logits, labels: network.loss_function(
                logits=logits, labels=labels, vocab_size=vocab)
    return traced


def _no_split_class(auto: Any, config: Any) -> Any:
    """The model's repeated block class names (Hugging Face's ``_no_split_modules``)."""
    try:
        cls = auto._model_mapping[type(config)]
    except Exception:  # noqa: BLE001
        return None
    names = list(getattr(cls, "_no_split_modules", None) or [])
    return names or None


def class_model(spec: str, init_args: dict[str, Any], seq_len: int, vocab: int) -> TracedModel:
    """``package.module:Class`` built with ``init_args``; token ids in, logits or ``.loss`` out."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model-class {spec!r}: write package.module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"--model-class {spec!r}: cannot import it ({err})") from None

    def batch(rows: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, seq_len))

    def loss(module: nn.Module, b: torch.Tensor) -> torch.Tensor:
        out = module(b)
        if hasattr(out, "loss") and out.loss is not None:
            return out.loss
        logits = out.logits if hasattr(out, "logits") else out
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.flatten())

    def output_loss(network: nn.Module, out: Any, target: torch.Tensor) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    # the pipeline runs the class's own forward on stage views (it must skip missing parts:
    # pipeline_stage_views = True, as the suite's models declare)
    return TracedModel(name=spec, build=lambda: cls(**init_args), batch=batch, loss=loss,
                       split=lambda b: ((b,), b), output_loss=output_loss)


@dataclass
class TracedRecipe:
    """A LightningCLI config's run, as :func:`trace_recipe` traces it: the user's LightningModule
    (its ``training_step`` is the loss, its ``configure_optimizers`` the optimizer), one batch
    of its datamodule's training loader, and the trainer's strategy, devices and precision."""

    name: str
    build: Callable[[], nn.Module]
    batch: Any  # one real batch of the training loader (the per-device batch)
    strategy: Any  # a strategy object built from trainer.strategy
    world_size: int
    precision: str


def recipe(path: str, gpus: int | None = None, precision: str | None = None) -> TracedRecipe:
    """Read a LightningCLI YAML (``model``, ``data``, ``trainer``): classes are built from their
    ``class_path`` / ``init_args`` by Lightning's ``instantiate_class``, the datamodule for real
    (one batch of ``train_dataloader``), the model later, on fake tensors. ``gpus`` and
    ``precision`` override ``trainer.devices x trainer.num_nodes`` and ``trainer.precision``."""
    import yaml
    from lightning.pytorch.cli import instantiate_class

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"--config {path}: cannot read it ({err})") from None
    model_cfg, data_cfg = config.get("model"), config.get("data")
    trainer = config.get("trainer") or {}
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        raise SystemExit(f"--config {path}: needs model: {{class_path: ..., init_args: ...}} (the LightningModule)")
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise SystemExit(f"--config {path}: needs data: {{class_path: ..., init_args: ...}} (one batch of its training "
                         f"loader is the per-device batch)")
    for section in (model_cfg, data_cfg):
        nested = [k for k, v in (section.get("init_args") or {}).items() if isinstance(v, dict) and "class_path" in v]
        if nested:
            raise SystemExit(f"--config {path}: {section['class_path']} takes nested classes ({', '.join(nested)}), "
                             f"which the planner does not build; give --model-class with --init-args instead")
    data = instantiate_class((), data_cfg)
    if hasattr(data, "prepare_data"):
        data.prepare_data()
    if hasattr(data, "setup"):
        data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    devices = trainer.get("devices", 1)
    if not isinstance(devices, int):
        devices = len(devices) if isinstance(devices, list) else 1
    world = gpus or devices * int(trainer.get("num_nodes", 1))
    return TracedRecipe(name=model_cfg["class_path"], build=lambda: instantiate_class((), model_cfg), batch=batch,
                        strategy=_strategy(trainer.get("strategy", "ddp")), world_size=world,
                        precision=precision or str(trainer.get("precision", "32-true")))


def _strategy(spec: Any) -> Any:
    """A strategy object from ``trainer.strategy``: a class_path dict, a preset name of the suite
    or ``"ddp"`` (the suite's data parallel MeshStrategy, which holds the same tensors; Lightning's
    ddp also keeps torch DDP's gradient buckets: see :func:`trace_plan`)."""
    from lightning.pytorch.cli import instantiate_class

    from lightning_scale.strategies import MeshStrategy, PRESETS

    if isinstance(spec, dict):
        return instantiate_class((), spec)
    if spec in PRESETS:
        cls, _, params = PRESETS[spec]
        return cls(**params)
    if spec in ("ddp", "auto", None):
        return MeshStrategy()
    raise TraceError(f"trainer.strategy {spec!r} is none of the suite's strategies: only those are traced")


def trace_recipe(run: TracedRecipe, implementation: str = "foreach") -> TracedMemory:
    """Rank 0's traced step of a :func:`recipe` run: the LightningModule built on fake tensors,
    parallelized by the recipe's strategy, ``training_step`` as the loss, the optimizer its
    ``configure_optimizers`` returns (with ``foreach`` left to torch, the GPU default
    ``implementation`` is used; an explicit ``foreach=``/``fused=`` is kept)."""
    from torch.utils._pytree import tree_map

    from lightning_scale.strategies import PipelineStrategy
    from lightning_scale.strategies.offline import trace_layout

    if isinstance(run.strategy, PipelineStrategy):
        raise TraceError("a recipe's pipeline is not traced from --config yet (its loss runs on the last stage): plan it "
                         "with --model-class / --hf-config and --pp")

    def batch() -> Any:  # a fresh copy each step (made under the fake mode: fake tensors, counted)
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, run.batch)

    def loss(module: nn.Module, b: Any) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():  # self.log without a Trainer: nothing to log here
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
            out = module.training_step(b, 0)
        return out["loss"] if isinstance(out, dict) else out

    def optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return _first_optimizer(module.configure_optimizers(), implementation)

    return trace_layout(run.build, batch, loss, run.strategy, run.world_size, precision=run.precision,
                        optimizer=optimizer)


def _first_optimizer(configured: Any, implementation: str) -> torch.optim.Optimizer:
    """The first optimizer of what ``configure_optimizers`` returned, with torch's GPU choice
    of implementation where the user left it to torch (``foreach=None`` picks the for-loop on
    the CPU tensors traced here, and foreach on CUDA)."""
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    while isinstance(configured, (list, tuple)):
        configured = configured[0]
        if isinstance(configured, dict):
            configured = configured["optimizer"]
    if not isinstance(configured, torch.optim.Optimizer):
        raise TraceError(f"configure_optimizers returned {type(configured).__name__}, not an optimizer")
    for group in configured.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = implementation == "foreach"
            if implementation == "fused" and "fused" in group:
                group["fused"] = True
    return configured


def _traced_options(layout: Any) -> dict[str, Any]:
    """The strategy options every traced layout shares (activation checkpointing); raises
    :class:`TraceError` for what is not traced (offload, checkpointing policies other than these)."""
    if layout.offload:
        raise TraceError("CPU offload is not traced (host memory is not told apart from the device's here): the "
                         "closed form plans it")
    if layout.ac not in ("none", "full", "selective"):
        raise TraceError(f"activation checkpointing {layout.ac!r} is not traced (none, full, selective are)")
    return {"activation_checkpointing": None if layout.ac == "none" else layout.ac}


def strategy_for(layout: Any, block_class: Any = None, tp_plan: Any = None) -> Any:
    """The suite's strategy that runs ``layout`` (a planner ``Layout`` without a pipeline): data
    parallel (``MeshStrategy``), ZeRO-1/2/3 (``ZeroStrategy``), tensor parallel (with sequence
    parallelism) or TP x ZeRO-3 (``Parallel3DStrategy`` with one stage); raises
    :class:`TraceError` for what is not traced."""
    from lightning_scale.strategies import MeshStrategy, TensorParallelStrategy, ZeroStrategy

    if layout.tp > 1 and layout.zero_stage in (1, 2):
        raise ValueError("ZeRO-1/2 shard plain parameters; with tensor parallelism use ZeRO-3")
    options = _traced_options(layout)
    if block_class:
        options["block_class"] = block_class
    if layout.tp > 1 and layout.zero_stage == 3:
        # TP inside each replica, FSDP2 over the replicas: the 3D strategy with one stage
        from lightning_scale.strategies import Parallel3DStrategy

        return Parallel3DStrategy(pipeline_parallel_size=1, tensor_parallel_size=layout.tp, zero_stage=3,
                                  sequence_parallel=layout.sequence_parallel, tp_plan=tp_plan, microbatches=1,
                                  **options)
    if layout.tp > 1:
        # tp_plan None: the strategy's own choice, as in a run (the suite's models' plans, a
        # Hugging Face model's base_model_tp_plan; a model without one is refused, named)
        return TensorParallelStrategy(tensor_parallel_size=layout.tp, tp_plan=tp_plan,
                                      sequence_parallel=layout.sequence_parallel, **options)
    if layout.zero_stage:
        return ZeroStrategy(stage=layout.zero_stage, bucket_mb=layout.bucket_mb, **options)
    return MeshStrategy(**options)


def trace_plan(model: TracedModel, workload: Any, layout: Any, hardware: Any) -> TracedMemory:
    """Rank 0's traced step for the asked layout (see the module docstring). Raises
    :class:`TraceError` for what is not traced (the caller falls back to the closed form)."""
    from lightning_scale.strategies.offline import trace_layout

    if layout.pp > 1:
        return _trace_pipeline(model, workload, layout, hardware)
    strategy = strategy_for(layout, model.block_class, model.tp_plan)
    gpus = hardware.gpus
    dp = gpus // layout.tp
    if gpus % layout.tp or workload.batch_size % dp:
        raise ValueError(f"{gpus} GPUs and a global batch of {workload.batch_size} do not divide into tp={layout.tp} x "
                         f"dp={gpus / layout.tp:g} ranks")
    rows = workload.batch_size // dp
    traced = trace_layout(model.build, lambda: model.batch(rows), model.loss, strategy, gpus, precision=workload.precision, optimizer=workload.optimizer,
                          implementation=workload.optimizer_impl)
    if layout.zero_stage == 0 and layout.tp == 1 and layout.ddp_buckets and gpus > 1:
        # torch DDP (Lightning's "ddp") keeps a flat copy of the gradients in buckets its C++
        # reducer allocates when DDP is built (not seen by the tracer): one gradient's bytes,
        # alive through every phase
        grads = sum(p.numel() for p in {id(p): p for p in _meta(model).parameters()}.values())
        extra = grads * (2 if workload.precision in ("bf16-true", "16-true") else 4)
        traced.parts["DDP gradient buckets (closed form)"] = extra
        traced.phase_peaks = {phase: value + extra for phase, value in traced.phase_peaks.items()}
        traced.after_step += extra
        traced.peak += extra
    return traced


def _trace_pipeline(model: TracedModel, workload: Any, layout: Any, hardware: Any) -> TracedMemory:
    """The pipeline's worst rank (each pipeline rank is traced: the first holds the most
    microbatches in flight, the last the logits)."""
    from lightning_scale.strategies import PipelineStrategy
    from lightning_scale.strategies.offline import trace_pipeline_layout

    if model.split is None or model.output_loss is None:
        raise TraceError(f"{model.name}: no pipeline stage forward for this model kind (traced: the Hugging Face "
                         f"families with a shipped stage forward: Llama-style decoders, GPT-2, GPT-NeoX, GPT-J, ViT, "
                         f"BERT/RoBERTa classifiers and masked / causal LMs; and classes with pipeline_stage_views): the closed form plans it")
    if layout.tp > 1 or layout.zero_stage not in (0, 3):
        raise TraceError("the pipeline is traced with data parallelism or ZeRO-3 on the replicas (no TP yet): the "
                         "closed form plans the rest")
    gpus = hardware.gpus
    if gpus % layout.pp:
        raise ValueError(f"{gpus} GPUs do not divide into pp={layout.pp} stages")
    dp = gpus // layout.pp
    if workload.batch_size % dp:
        raise ValueError(f"a global batch of {workload.batch_size} does not divide into dp={dp} replicas")
    rows = workload.batch_size // dp
    options = _traced_options(layout)
    if model.block_container:
        options["block_container"] = model.block_container
    if model.stage_forward is not None:
        options["stage_forward"] = model.stage_forward

    def make() -> Any:
        return PipelineStrategy(stages=layout.pp, schedule=layout.schedule, microbatches=layout.m,
                                virtual_stages=layout.virtual_stages if layout.virtual_stages > 1 else None,
                                zero_stage=layout.zero_stage, **options)

    ranks = trace_pipeline_layout(model.build, lambda: model.split(model.batch(rows)), model.output_loss, make, gpus,
                                  precision=workload.precision, optimizer=workload.optimizer,
                                  implementation=workload.optimizer_impl)
    worst = max(ranks, key=lambda r: r.peak)
    worst.stage_peaks = [r.peak for r in ranks]
    return worst


def _meta(model: TracedModel) -> nn.Module:
    with torch.device("meta"):
        return model.build()
