"""``lightning-scale plan``: the memory planner from the command line.

Examples::

    lightning-scale plan --model gpt2-xl --batch-size 64 --seq-len 1024 --gpus 8 --gpu A10G
    lightning-scale plan --recipe recipes/gpt/nano-cpu.yaml --gpus 2 --gpu-memory-gb 0.05
    lightning-scale plan --layers 32 --hidden 4096 --heads 32 --vocab 50304 --params 8e9 \\
        --batch-size 1 --seq-len 2048 --precision mixed --gpus 1 --gpu H100 --strategy ddp
    lightning-scale plan --recipe recipes/vision/vit-b-cifar10-8gpu.yaml --gpu A10G
    lightning-scale plan --model resnet56 --image-size 32 --batch-size 1024 --gpus 4 --gpu L4

It prints the asked layout's per-device memory and, below it, the fastest layouts that fit
(:func:`lightning_scale.core.planner.recommend`). ``--json FILE`` writes both.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lightning_scale.core.planner import GB, Hardware, Layout, ModelSpec, Workload, plan_memory, plan_table, recommend

def _zero_presets() -> dict[str, tuple[int, bool]]:
    """``--strategy`` choices: "ddp" and the registered ZeRO presets, as (stage, offload)."""
    from lightning_scale.strategies import PRESETS, ZeroStrategy

    out = {"ddp": (0, False)}
    for name, (cls, _, params) in PRESETS.items():
        if cls is ZeroStrategy:
            out[name] = (params["stage"], bool(params.get("offload_optimizer") or params.get("offload_params")))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-scale plan", description="Predict per-GPU memory of a training layout.")
    m = p.add_argument_group("model (one of --model, --recipe, or the dimensions)")
    m.add_argument("--model", help="a preset: GPT (tiny, nano, micro, gpt2, gpt2-medium, gpt2-large, gpt2-xl), ViT "
                                    "(digits, cifar-small, vit-b16, vit-l16) or ResNet (resnet8-digits, resnet20, resnet56)")
    m.add_argument("--recipe", help="a LightningCLI recipe YAML with the suite's GPT, ViT or ResNet (model, batch, "
                                     "devices, strategy, precision)")
    for name in ("layers", "hidden", "heads", "vocab", "mlp-hidden"):
        m.add_argument(f"--{name}", type=int)
    m.add_argument("--params", type=float, help="parameter count Psi (with the dimensions; e.g. 7.5e9)")
    t = p.add_argument_group("the user's own model, traced on fake tensors (lightning_scale/plan_trace.py)")
    t.add_argument("--hf-config", help="a Hugging Face config.json (or its folder): causal LM or image classifier; "
                                       "nothing is downloaded")
    t.add_argument("--config", help="a LightningCLI YAML with your own LightningModule and datamodule: the model, one "
                                    "batch, trainer.strategy / devices / precision and configure_optimizers are "
                                    "those of the run (--gpus and --precision override)")
    t.add_argument("--model-class", help="package.module:Class of a module taking (batch, seq) token ids")
    t.add_argument("--init-args", default="{}", help="JSON keyword arguments of --model-class")
    t.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                   help="Hugging Face attention (default: the model's; eager materializes the (seq x seq) scores)")
    w = p.add_argument_group("workload")
    w.add_argument("--batch-size", type=int, help="global sequences (images) per optimizer step")
    w.add_argument("--seq-len", type=int, help="tokens per sequence (a ViT's: patches + 1, read from its config)")
    w.add_argument("--image-size", type=int, help="side of the square input images in pixels (needed for a ResNet)")
    w.add_argument("--precision", default=None, help="32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, mixed")
    w.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "sgd_momentum"])
    w.add_argument("--optimizer-impl", default="foreach", choices=["foreach", "fused", "for-loop"],
                   help="torch's optimizer implementation (default foreach, torch's default on CUDA: Adam's step then "
                        "holds a temporary of one moment's bytes per parameter; fused holds none)")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=int)
    h.add_argument("--gpu", help="A100-80GB, A100-40GB, H100, H100 NVL, H200, GH200-96GB, GH200-144GB, "
                   "B200-180GB, B200-192GB, L4, L40S, A10G, T4, V100-32GB, MI300X")
    h.add_argument("--gpu-memory-gb", type=float, help="device memory in GB (1e9 bytes) instead of --gpu")
    h.add_argument("--gpus-per-node", type=int, default=8)
    h.add_argument("--reserve", type=float, default=0.10,
                   help="fraction of device memory kept free for allocator fragmentation and communication buffers "
                        "(an assumption; default 0.10)")
    h.add_argument("--context-gb", type=float, default=None,
                   help="GB the CUDA context takes per device (default 0.287, measured in PyTorch PR #86509 with lazy "
                        "module loading)")
    s = p.add_argument_group("layout")
    s.add_argument("--strategy", default=None, choices=sorted(_zero_presets()),
                   help="with --recipe: replaces the recipe's strategy (so do --tp / --pp)")
    s.add_argument("--tp", type=int, default=None)
    s.add_argument("--pp", type=int, default=None)
    s.add_argument("--sp", action="store_true", help="sequence parallel (with --tp)")
    s.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved_1f1b"])
    s.add_argument("--microbatches", type=int)
    s.add_argument("--virtual-stages", type=int, default=None)
    s.add_argument("--ac", default="none", choices=["none", "full", "selective", "every_k", "offload"])
    s.add_argument("--ac-every", type=int, default=2)
    p.add_argument("--top", type=int, default=5, help="layouts to recommend")
    p.add_argument("--json", help="also write the plans to this JSON file")
    return p


def _strategy_from(spec: Any) -> Any:
    """The recipe's ``trainer.strategy`` (a registered name or ``{class_path, init_args}``), built."""
    import importlib

    from lightning.pytorch.strategies import StrategyRegistry


    if isinstance(spec, str):
        if spec not in StrategyRegistry:
            raise SystemExit(f"unknown strategy {spec!r} in the recipe; registered: {sorted(StrategyRegistry)}")
        return StrategyRegistry.get(spec)
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**(spec.get("init_args") or {}))
    raise SystemExit(f"the recipe's trainer.strategy {spec!r} is neither a registered name nor a class_path")


#: ``model.init_args.model`` config classes the planner knows, by the task that takes them.
_TASK_DEFAULT_CONFIG = {
    "lightning_scale.tasks.LanguageModelingTask": "lightning_scale.models.GPTConfig",
    "lightning_scale.tasks.language_modeling.LanguageModelingTask": "lightning_scale.models.GPTConfig",
    "lightning_scale.tasks.ImageClassificationTask": "lightning_scale.models.ViTConfig",
    "lightning_scale.tasks.image_classification.ImageClassificationTask": "lightning_scale.models.ViTConfig",
}


def _model_config(path: str, cfg: dict[str, Any]) -> Any:
    """The recipe's ``model.init_args.model``, built as a GPTConfig, ViTConfig or ResNetConfig."""
    import importlib

    from lightning_scale.models import GPTConfig, ResNetConfig, ViTConfig

    model = cfg.get("model") or {}
    args = (model.get("init_args") or {}).get("model")
    class_path = _TASK_DEFAULT_CONFIG.get(model.get("class_path", ""))
    if isinstance(args, dict) and "class_path" in args:
        class_path, args = args["class_path"], args.get("init_args") or {}
    if not isinstance(args, dict) or class_path is None:
        raise SystemExit(f"{path}: no model.init_args.model config of the suite's GPT, ViT or ResNet found; "
                         f"give --model or the dimensions instead")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "lightning_scale.models"), name)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"{path}: cannot import the model config {class_path!r} ({err})") from None
    if cls not in (GPTConfig, ViTConfig, ResNetConfig):
        raise SystemExit(f"{path}: the planner models GPTConfig, ViTConfig and ResNetConfig, not {class_path}")
    return cls(**args)


def _from_recipe(path: str) -> dict[str, Any]:
    """Model, batch, devices, precision and layout from a recipe (only what the planner needs)."""
    import yaml

    from lightning_scale.callbacks._run_layout import layout_of
    from lightning_scale.models import GPTConfig, ViTConfig

    with open(path) as f:
        cfg = yaml.safe_load(f)
    config = _model_config(path, cfg)
    trainer = cfg.get("trainer") or {}
    data = (cfg.get("data") or {}).get("init_args", {})
    devices = trainer.get("devices", 1)
    devices = (devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes", 1))
    layout = layout_of(_strategy_from(trainer.get("strategy", "ddp")), devices)
    if layout is None:
        raise SystemExit(f"{path}: the planner does not model this strategy's options")
    fields, dp = layout
    out = {"config": config, "gpus": devices,
           # Global sequences (images) per optimizer step; accumulation does not add activation memory.
           "batch_size": data.get("batch_size", 1) * dp,
           "precision": str(trainer.get("precision", "32-true")), "layout": fields}
    if isinstance(config, GPTConfig):
        out["seq_len"] = data.get("block_size", config.block_size)
    elif isinstance(config, ViTConfig):
        out["seq_len"] = config.seq_len
        out["image_size"] = data.get("image_size") or config.image_size
    else:
        out["seq_len"] = 1
        out["image_size"] = data.get("image_size")  # None (native size): --image-size must say it
    return out


def _inputs(a: argparse.Namespace) -> tuple[ModelSpec, Workload, Layout, Hardware]:
    recipe = _from_recipe(a.recipe) if a.recipe else {}
    if recipe:
        model = ModelSpec.from_config(recipe["config"])
    elif a.model:
        model = ModelSpec.from_config(a.model)
    elif all(getattr(a, k) for k in ("layers", "hidden", "heads", "vocab", "params")):
        model = ModelSpec(n_layer=a.layers, hidden=a.hidden, heads=a.heads, vocab=a.vocab,
                          mlp_hidden=a.mlp_hidden or 4 * a.hidden, params=int(a.params))
    else:
        raise SystemExit("give --model PRESET, --recipe YAML, or --layers --hidden --heads --vocab --params")
    kind = model.kind
    image_size = a.image_size or recipe.get("image_size")
    if kind == "vit":
        seq = a.seq_len or model.vision.seq_len
        image_size = image_size or model.vision.image_size
    elif kind == "resnet":
        seq = a.seq_len or 1
        if not image_size:
            raise SystemExit("a ResNet's activations depend on the image size: give --image-size PIXELS (or set "
                             "data.init_args.image_size in the recipe)")
    else:
        seq = a.seq_len or recipe.get("seq_len") or (model.gpt.block_size if model.gpt is not None else None)
    batch = a.batch_size or recipe.get("batch_size")
    if not seq or not batch:
        raise SystemExit("give --batch-size (global sequences per step) and --seq-len")
    workload = Workload(batch_size=batch, seq_len=seq, precision=a.precision or recipe.get("precision", "bf16-mixed"),
                        optimizer=a.optimizer, image_size=image_size if kind in ("vit", "resnet") else None,
                        optimizer_impl=a.optimizer_impl)
    gpus = a.gpus or recipe.get("gpus")
    if not gpus:
        raise SystemExit("give --gpus")
    if a.gpu_memory_gb:
        hardware = Hardware(gpus=gpus, memory_gb=a.gpu_memory_gb, name=f"{a.gpu_memory_gb:g} GB device",
                            gpus_per_node=a.gpus_per_node, reserve_fraction=a.reserve,
                        **_context(a))
    elif a.gpu:
        hardware = Hardware.named(a.gpu, gpus, gpus_per_node=a.gpus_per_node, reserve_fraction=a.reserve,
                        **_context(a))
    else:
        raise SystemExit("give --gpu NAME or --gpu-memory-gb")
    if recipe and not (a.strategy or a.tp or a.pp):
        layout = Layout(**recipe["layout"])  # the recipe's own strategy
    else:
        stage, offload = _zero_presets()[a.strategy or "ddp"]
        v = a.virtual_stages or (2 if a.schedule == "interleaved_1f1b" else 1)
        layout = Layout(tp=a.tp or 1, pp=a.pp or 1, zero_stage=stage, offload=offload, sequence_parallel=a.sp,
                        schedule=a.schedule, microbatches=a.microbatches, virtual_stages=v, ac=a.ac,
                        ac_every=a.ac_every)
    return model, workload, layout, hardware


def _describe(model: ModelSpec, workload: Workload, hardware: Hardware) -> str:
    psi = f"{model.params / 1e9:.3f}B parameters" if model.params >= 1e8 else f"{model.params:,} parameters"
    tail = f"{workload.precision}, {workload.optimizer}; {hardware.gpus} x {hardware.name}"
    if model.kind == "vit":
        cfg = model.vision
        return (f"model: ViT, {psi}, {model.n_layer} layers, hidden {model.hidden}, {cfg.num_classes} classes; batch "
                f"{workload.batch_size} images of {cfg.image_size} px = {workload.seq_len} tokens each; {tail}")
    if model.kind == "resnet":
        cfg = model.vision
        return (f"model: ResNet-{cfg.depth} (width {cfg.width}), {psi}, {cfg.num_classes} classes; batch "
                f"{workload.batch_size} images of {workload.image_size} x {workload.image_size} px; {tail}")
    return (f"model: {psi}, {model.n_layer} layers, hidden {model.hidden}; batch {workload.batch_size} x "
            f"{workload.seq_len} tokens, {tail}")


def main(args: Sequence[str] | None = None) -> int:
    from rich.console import Console

    a = _parser().parse_args(args)
    if a.config:
        return _recipe_main(a)
    if a.hf_config or a.model_class:
        return _traced_main(a)
    try:
        model, workload, layout, hardware = _inputs(a)
        asked = plan_memory(model, workload, layout, hardware)
    except ValueError as err:
        raise SystemExit(f"lightning-scale plan: {err}") from None
    console = Console(width=160)
    console.print(_describe(model, workload, hardware))
    console.print(plan_table([asked], "asked layout (GB = 1e9 bytes, per device)"))
    console.print(asked.summary())
    warnings = precision_warnings(hardware.name, workload.precision) + model_warnings(model)
    console.print(f"source: {source_of(model)}")
    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {line}")
    found = recommend(model, workload, hardware, limit=a.top)
    minimum = None
    if found:
        console.print(plan_table(found, "fastest layouts that fit (expected speed order)"))
        console.print(f"recommended: {found[0].layout.describe(found[0].dp)}")
    else:
        minimum = minimum_gpus(model, workload, hardware)
        more = (f"at least {minimum} x {hardware.name} (the smallest count tried, doubling from {hardware.gpus}, where "
                f"a layout fits)" if minimum else f"more than {MAX_GPUS_TRIED} x {hardware.name}, or larger GPUs")
        console.print(f"[bold red]no layout fits on {hardware.gpus} x {hardware.name}[/]: this run needs {more}; or "
                      f"shorten the sequence / batch")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"asked": asked.to_dict(), "recommended": [p.to_dict() for p in found], "fits": bool(found),
                       "minimum_gpus": minimum, "warnings": warnings}, f, indent=1)
    return 0 if found else 1


def _context(a: argparse.Namespace) -> dict:
    return {} if a.context_gb is None else {"context_gb": a.context_gb}


def _hardware(a: argparse.Namespace, gpus: int) -> Hardware:
    if a.gpu_memory_gb:
        return Hardware(gpus=gpus, memory_gb=a.gpu_memory_gb, name=f"{a.gpu_memory_gb:g} GB device",
                        gpus_per_node=a.gpus_per_node, reserve_fraction=a.reserve,
                        **_context(a))
    if a.gpu:
        return Hardware.named(a.gpu, gpus, gpus_per_node=a.gpus_per_node, reserve_fraction=a.reserve,
                        **_context(a))
    raise SystemExit("give --gpu NAME or --gpu-memory-gb")


def _traced_main(a: argparse.Namespace) -> int:
    """The asked layout of the user's model, traced (see :mod:`lightning_scale.plan_trace`); the
    verdict says "fits" only when the traced peak is below the usable memory."""
    from rich.console import Console

    from lightning_scale.core.traced_memory import TraceError
    from lightning_scale.plan_trace import class_model, hf_model, trace_plan

    if not (a.batch_size and a.gpus):
        raise SystemExit("give --batch-size (global sequences or images per step) and --gpus")
    if a.hf_config:
        model = hf_model(a.hf_config, a.seq_len or 0, a.attn_implementation)
        if not a.seq_len and model.takes_tokens:
            raise SystemExit("give --seq-len (tokens per sequence) for a language model")
    else:
        if not (a.seq_len and a.vocab):
            raise SystemExit("--model-class needs --seq-len and --vocab (the token ids it takes)")
        model = class_model(a.model_class, json.loads(a.init_args), a.seq_len, a.vocab)
    hardware = _hardware(a, a.gpus)
    stage, offload = _zero_presets()[a.strategy or "ddp"]
    try:
        layout = Layout(tp=a.tp or 1, pp=a.pp or 1, zero_stage=stage, offload=offload, ac=a.ac,
                        sequence_parallel=a.sp, schedule=a.schedule, microbatches=a.microbatches,
                        virtual_stages=a.virtual_stages or (2 if a.schedule == "interleaved_1f1b" else 1))
        workload = Workload(batch_size=a.batch_size, seq_len=a.seq_len or 1, precision=a.precision or "bf16-mixed",
                            optimizer=a.optimizer, optimizer_impl=a.optimizer_impl)
        traced = trace_plan(model, workload, layout, hardware)
    except TraceError as err:
        raise SystemExit(f"lightning-scale plan: traced planning of {model.name} failed: {err}\n"
                         f"The closed form (--layers --hidden --heads --vocab --params) models the suite's GPT block "
                         f"(GELU MLP, LayerNorm, fused attention) only: use it as an estimate, not a verdict") from None
    except ValueError as err:
        raise SystemExit(f"lightning-scale plan: {err}") from None
    console = Console(width=160)
    console.print(f"model: {model.name}; batch {a.batch_size} over {a.gpus} x {hardware.name}, "
                  f"{workload.precision}, {workload.optimizer} ({workload.optimizer_impl}), layout "
                  f"{layout.describe(a.gpus // (layout.tp * layout.pp))}")
    return _report_traced(a, console, model.name, layout.describe(a.gpus // (layout.tp * layout.pp)), traced,
                          hardware, workload.precision)


def _report_traced(a: argparse.Namespace, console: Any, name: str, layout: str, traced: Any, hardware: Hardware,
                   precision: str) -> int:
    """The traced step's table (phases and parts), the verdict against usable memory, --json."""
    from rich.table import Table

    who = (f"pipeline rank {traced.stage_peaks.index(traced.peak)} of {len(traced.stage_peaks)}, the largest"
           if traced.stage_peaks else "rank 0")
    table = Table(title=f"traced on fake tensors, {who} (GB = 1e9 bytes of tensors)")
    for col in ("phase", "peak", "params", "grads", "optimizer", "activations", "temporaries", "other"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    known = ("params", "grads", "optimizer", "activations", "temporaries")
    for phase, value in traced.phase_peaks.items():
        parts = traced.parts if phase == traced.phase else {}
        cells = [f"{parts[k] / GB:.3f}" if k in parts else "" for k in known]
        other = sum(v for k, v in parts.items() if k not in known)
        table.add_row(phase + (" (peak)" if phase == traced.phase else ""), f"{value / GB:.3f}", *cells,
                      f"{other / GB:.3f}" if parts else "")
    console.print(table)
    if traced.stage_peaks:
        console.print("peak per pipeline rank: " + ", ".join(f"rank {i}: {v / GB:.2f} GB"
                                                            for i, v in enumerate(traced.stage_peaks)))
    usable = hardware.usable_bytes
    fits = traced.peak < usable
    console.print(f"traced peak {traced.peak / GB:.2f} GB ({traced.phase}) vs {usable / GB:.2f} GB usable on "
                  f"{hardware.name} ({hardware.describe_reserve()}): margin {(usable - traced.peak) / GB:+.2f} GB -> "
                  + ("fits" if fits else "does NOT fit"))
    for line in precision_warnings(hardware.name, precision):
        console.print(f"[bold yellow]warning:[/] {line}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"source": "traced", "model": name, "layout": layout, "peak": traced.peak,
                       "phase": traced.phase, "phase_peaks": traced.phase_peaks, "parts": traced.parts,
                       "stage_peaks": traced.stage_peaks, "after_step": traced.after_step, "usable_bytes": usable,
                       "fits": fits}, f, indent=1)
    return 0 if fits else 1


def _recipe_main(a: argparse.Namespace) -> int:
    """``--config``: the recipe's own run traced (see :func:`lightning_scale.plan_trace.recipe`)."""
    from rich.console import Console

    from lightning_scale.core.traced_memory import TraceError
    from lightning_scale.plan_trace import recipe, trace_recipe

    run = recipe(a.config, a.gpus, a.precision)
    hardware = _hardware(a, run.world_size)
    try:
        traced = trace_recipe(run, a.optimizer_impl)
    except TraceError as err:
        raise SystemExit(f"lightning-scale plan: traced planning of {run.name} failed: {err}") from None
    except ValueError as err:
        raise SystemExit(f"lightning-scale plan: {err}") from None
    console = Console(width=160)
    layout = f"{type(run.strategy).__name__} on {run.world_size} ranks"
    console.print(f"recipe: {a.config}; model {run.name}, the training loader's batch per rank, {layout}, "
                  f"{run.precision}, the optimizer of configure_optimizers (foreach left to torch: {a.optimizer_impl})")
    return _report_traced(a, console, run.name, layout, traced, hardware, run.precision)


#: GPUs without bf16 tensor cores (pre-Ampere): bf16 runs there emulated or not at all.
NO_BF16 = ("T4", "V100", "P100", "P4", "K80", "RTX4000", "RTX5000", "Quadro RTX 6000")
MAX_GPUS_TRIED = 4096


def precision_warnings(gpu_name: str, precision: str) -> list[str]:
    """What the planner cannot say about a precision on a GPU (printed, and in the JSON)."""
    if str(precision).startswith("bf16") and any(gpu_name.split()[0] == g.split()[0] for g in NO_BF16):
        return [f"{gpu_name} has no bf16 tensor cores (pre-Ampere): {precision} would run emulated and slowly, or fail; "
                f"use --precision 16-mixed (fp16 with loss scaling) on this GPU"]
    return []


def source_of(model: Any) -> str:
    """Which path produced the figures (printed with them)."""
    if model.kind == "dims":
        return ("closed form: model states from --params (the ZeRO paper's formulas), activations from the suite's "
                "GPT block inventory")
    return (f"closed form: model states exact (the suite's {model.kind.upper() if model.kind != 'resnet' else 'ResNet'} "
            f"built on the meta device), activations from its inventory"
            + (" (a meta-device forward)" if model.kind == "resnet" else ""))


def model_warnings(model: Any) -> list[str]:
    """What the closed form does not model for this input (printed, and in the JSON)."""
    if model.kind != "dims":
        return []
    return ["the dimensions-only closed form models the suite's GPT block (a GELU MLP of --mlp-hidden, LayerNorm, "
            "fused attention, tied embeddings); a SwiGLU MLP (three matrices), RMSNorm computed in fp32 or eager "
            "attention keep more activations than it counts: trace the real model with --hf-config or --model-class"]


def minimum_gpus(model: Any, workload: Any, hardware: Any) -> int | None:
    """The smallest GPU count, doubling from ``hardware.gpus``, where some layout fits (None: none
    up to :data:`MAX_GPUS_TRIED`)."""
    import dataclasses

    gpus = hardware.gpus * 2
    while gpus <= MAX_GPUS_TRIED:
        if recommend(model, workload, dataclasses.replace(hardware, gpus=gpus), limit=1):
            return gpus
        gpus *= 2
    return None
