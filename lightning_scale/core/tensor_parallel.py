"""Tensor and sequence parallelism on ``torch.distributed.tensor.parallel``: plans, checks, apply.

Torch only. Shapes use B = batch, T = sequence length, D = hidden size (``n_embd``),
H = attention heads, Dh = D / H, F = MLP hidden size, V = vocabulary, t = TP degree.

What this module adds on top of torch's ``parallelize_module``:

* **Plans are data.** A plan is a ``dict`` of module-path pattern -> ``ParallelStyle``. A
  pattern is matched one dot-separated component at a time with :func:`fnmatch.fnmatchcase`
  (``"blocks.*.attn.q_proj"``: ``*`` never crosses a dot), the same rule as torch's
  ``parallelize_module``. :func:`gpt_tp_plan` and :func:`vit_tp_plan` are the built-in plans
  for the suite's models; users pass their own dicts.
* **Errors before collectives.** :func:`validate_tp` checks a config (heads, hidden, MLP,
  vocabulary, sequence length against t) with messages that name the fix, and
  :func:`apply_tp` resolves every pattern and checks every sharded dimension before the first
  ``distribute_tensor`` (which broadcasts / scatters from rank 0).
* **Pipeline stage views.** :func:`apply_tp` walks ``named_modules()`` of whatever it is given,
  so a stage view (``core.pipeline.view_of``: top-level modules set to ``None``, container
  entries dropped) is parallelized like a full model. A pattern that only reaches a ``None``
  slot is skipped; a module already parallelized by an earlier call (a parameter-free module
  such as ``drop`` is shared by every stage view) is not hooked twice.
* **Tied parameters** (GPT head / token embedding) stay one ``Parameter``: either both owners
  keep the tensor replicated, or both shard it with the same placement and :func:`apply_tp`
  re-ties the two ``DTensor`` parameters; any other combination is rejected up front.

The layouts (ideas from Megatron-LM, Shoeybi et al. 2019 arXiv 1909.08053 and Korthikanti et al.
2022 arXiv 2205.05198, and from torchtitan's Llama plan; no code copied):

Plain TP (``sequence_parallel=False``)::

    x (B, T, D) replicated -> q/k/v Colwise -> (B, T, D/t) = H/t whole heads per rank
        -> attention on local heads -> out_proj Rowwise (all-reduce) -> (B, T, D) replicated
    x -> mlp.up_proj Colwise (B, T, F/t) -> GELU -> down_proj Rowwise (all-reduce) -> (B, T, D)

Sequence parallel (``sequence_parallel=True``): the residual stream between the sharded layers
is a *local* sequence shard (B, T/t, D); LayerNorms and dropouts run on it::

    drop:        (B, T, D) replicated -> slice -> (B, T/t, D)            (backward: all-gather)
    ln_1/ln_2:   SequenceParallel, (B, T/t, D), weights Replicate DTensors
    attn / mlp:  PrepareModuleInput Shard(1) -> Replicate: all-gather (B, T, D)
    out_proj / down_proj: Rowwise, output Shard(1): reduce-scatter -> (B, T/t, D)
    ln_f:        SequenceParallel; the head gathers the sequence back (Shard(1) -> Replicate)

Embeddings and head. Default: **replicated** (plain tensors, identical on every TP rank). This is
correct with and without a tied head, costs V x D memory per rank and no communication, and
keeps the GPT tie a single plain ``Parameter`` (pipeline tied-gradient sync keeps working).
With ``shard_vocab=True`` the GPT token embedding is ``RowwiseParallel`` (vocab-sharded table,
masked lookup, all-reduce) and the head ``ColwiseParallel`` with a replicated (all-gathered)
output: both weights are (V, D) sharded on dim 0 (``Shard(0)``), so a tied pair shares one
``DTensor`` parameter. The loss then still sees full (B, T, V) logits on every rank (no
``loss_parallel``, so the training step needs no change). The position embedding (T_max x D)
and ViT's patch embedding and class head are small and always replicated.

Parameters the plan leaves alone: their inputs and output gradients are replicated, so every TP
rank computes the same gradient and they need no communication. ``apply_tp`` keeps them plain
tensors by default; ``apply_tp(..., replicate_rest=True)`` makes them ``Replicate`` DTensors, so
that *every* parameter is a DTensor: ``foreach`` / ``fused`` optimizers (``foreach`` is torch's
default on CUDA) raise on a parameter list that mixes DTensors and plain tensors. The strategies
(``strategies.tensor_parallel.parallelize_network``) always pass ``replicate_rest=True``, on
every device: the layout tested on CPU is the layout a GPU runs. How the rest is replicated:

* a module that owns plain parameters and holds no tensor-parallel ones (embeddings, head,
  LayerNorms without sequence parallelism) is wrapped whole (``distribute_module``): its
  parameters and buffers become ``Replicate`` DTensors, its inputs are made ``Replicate``
  DTensors and its outputs local tensors again, so its neighbours see plain tensors;
* a module that cannot be wrapped whole, because it is the root model or it also holds
  tensor-parallel parameters (e.g. a Hugging Face model with a parameter on the root, a block
  with its own scale next to sharded linears), gets only its *own* plain parameters turned into
  ``Replicate`` DTensor parameters; for its forward (a pre-hook, undone by an always-called
  post-hook) each of them is shadowed by its local tensor (``to_local()``, a differentiable
  view: the gradient lands on the DTensor parameter as a ``Replicate`` DTensor). Its children
  are handled on their own. Parameter names, and so checkpoints, do not change. Outside a
  forward call of that module the attribute is the DTensor parameter.

Gradients: the DTensor-aware norm and collectives are in :mod:`lightning_scale.core.grads`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_scale.core.blocks import tied_parameter_groups
from lightning_scale.core.conv1d_parallel import (
    Conv1DColwiseParallel,
    Conv1DRowwiseParallel,
    is_transposed_linear,
    split_placement,
)

__all__ = [
    "TPPlan",
    "apply_tp",
    "block_tp_plan",
    "check_plan",
    "gather_sequence",
    "gpt_tp_plan",
    "local_heads",
    "resolve_plan",
    "shard_sequence",
    "validate_tp",
    "vit_tp_plan",
]

#: A tensor-parallel plan: module-path pattern -> how to parallelize the matched modules.
TPPlan = dict[str, ParallelStyle]

# The sequence dimension of the (B, T, D) activations of the suite's models.
_SEQ_DIM = 1


# --------------------------------------------------------------------------------------------
# Built-in plans
# --------------------------------------------------------------------------------------------


def block_tp_plan(sequence_parallel: bool = False, prefix: str = "blocks.*") -> TPPlan:
    """Plan of the pre-LN transformer :class:`~lightning_scale.models.transformer.Block`.

    Attention q/k/v column-wise (each rank gets H/t whole heads: (B, T, D) -> (B, T, D/t)),
    ``out_proj`` row-wise ((B, T, D/t) -> (B, T, D), summed over ranks); MLP ``up_proj``
    column-wise ((B, T, D) -> (B, T, F/t)), ``down_proj`` row-wise. With ``sequence_parallel``
    the LayerNorms run on sequence shards and the row-wise outputs are reduce-scattered to
    (B, T/t, D) instead of all-reduced to (B, T, D).
    """
    p = prefix
    if not sequence_parallel:
        return {
            f"{p}.attn.q_proj": ColwiseParallel(),
            f"{p}.attn.k_proj": ColwiseParallel(),
            f"{p}.attn.v_proj": ColwiseParallel(),
            f"{p}.attn.out_proj": RowwiseParallel(),
            f"{p}.mlp.up_proj": ColwiseParallel(),
            f"{p}.mlp.down_proj": RowwiseParallel(),
        }
    # (B, T/t, D) local shard -> Shard(1) DTensor -> all-gathered (B, T, D) Replicate DTensor, kept
    # as a DTensor so q, k and v share one gather (and one reduce-scatter of its gradient).
    gather_sequence = PrepareModuleInput(
        input_layouts=(Shard(_SEQ_DIM),), desired_input_layouts=(Replicate(),), use_local_output=False
    )
    return {
        f"{p}.ln_1": SequenceParallel(sequence_dim=_SEQ_DIM),  # (B, T/t, D) -> Shard(1) DTensor
        f"{p}.attn": gather_sequence,
        f"{p}.attn.q_proj": ColwiseParallel(),  # Replicate (B, T, D) -> local (B, T, D/t)
        f"{p}.attn.k_proj": ColwiseParallel(),
        f"{p}.attn.v_proj": ColwiseParallel(),
        f"{p}.attn.out_proj": RowwiseParallel(output_layouts=Shard(_SEQ_DIM)),  # -> local (B, T/t, D)
        f"{p}.ln_2": SequenceParallel(sequence_dim=_SEQ_DIM),
        f"{p}.mlp": gather_sequence,
        f"{p}.mlp.up_proj": ColwiseParallel(),  # -> local (B, T, F/t)
        f"{p}.mlp.down_proj": RowwiseParallel(output_layouts=Shard(_SEQ_DIM)),  # -> local (B, T/t, D)
    }


def shard_sequence() -> PrepareModuleInput:
    """Replicated (B, T, D) input -> this rank's (B, T/t, D) slice (no communication forward)."""
    return PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(_SEQ_DIM),), use_local_output=True
    )


def gather_sequence() -> PrepareModuleInput:
    """Sequence-sharded input -> full (B, T, D) plain tensor (all-gather forward, slice backward)."""
    return PrepareModuleInput(
        input_layouts=(Shard(_SEQ_DIM),), desired_input_layouts=(Replicate(),), use_local_output=True
    )


def gpt_tp_plan(sequence_parallel: bool = False, *, shard_vocab: bool = False) -> TPPlan:
    """Plan for :class:`lightning_scale.models.GPT` (see the module docstring for the layouts).

    Args:
        sequence_parallel: shard LayerNorms and dropouts along the sequence (needs T % t == 0).
        shard_vocab: shard the token embedding (``RowwiseParallel``, V/t rows per rank) and the
            head (``ColwiseParallel``, logits all-gathered to (B, T, V)). Needs V % t == 0. A
            tied head and embedding then share one ``Shard(0)`` DTensor parameter.
    """
    plan: TPPlan = {}
    if shard_vocab:
        # (B, T) ids, replicated -> masked lookup in the local V/t rows -> all-reduce -> (B, T, D).
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        plan["drop"] = shard_sequence()  # embedding sum (B, T, D) -> (B, T/t, D)
    plan.update(block_tp_plan(sequence_parallel))
    if sequence_parallel:
        plan["ln_f"] = SequenceParallel(sequence_dim=_SEQ_DIM)
    if shard_vocab:
        # (B, T, D) [or (B, T/t, D) with SP] -> local (B, T, V/t) -> all-gather -> (B, T, V).
        seq_layout: Placement = Shard(_SEQ_DIM) if sequence_parallel else Replicate()
        plan["head"] = ColwiseParallel(input_layouts=seq_layout, output_layouts=Replicate())
    elif sequence_parallel:
        plan["head"] = gather_sequence()  # replicated head on the full (B, T, D)
    return plan


def vit_tp_plan(sequence_parallel: bool = False) -> TPPlan:
    """Plan for :class:`lightning_scale.models.ViT`: the blocks as in :func:`block_tp_plan`.

    The patch embedding and the class head stay replicated (tiny next to the blocks). With
    ``sequence_parallel`` the T = (S/P)^2 + 1 tokens (patches and [CLS]) must divide by t; the
    final LayerNorm gathers the sequence (Shard(1) -> Replicate) and runs replicated, because the
    head reads only the [CLS] token (position 0, which lives on one rank).
    """
    plan: TPPlan = {}
    if sequence_parallel:
        plan["embed.drop"] = shard_sequence()  # (B, T, D) -> (B, T/t, D)
    plan.update(block_tp_plan(sequence_parallel))
    if sequence_parallel:
        plan["ln_f"] = gather_sequence()  # (B, T/t, D) -> (B, T, D), ln_f replicated
    return plan


# --------------------------------------------------------------------------------------------
# Validation (pure: runs on every rank before any collective)
# --------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _model_dims(config_or_model: Any) -> dict[str, int | None]:
    """heads / hidden / mlp / vocab / seq_len of a config, of a model with ``.config``, or found by
    inspecting a model's attention and MLP modules (``q_proj`` + ``head_dim``, ``up_proj``)."""
    cfg = getattr(config_or_model, "config", config_or_model)
    if hasattr(cfg, "n_head") and hasattr(cfg, "n_embd"):
        mlp = getattr(cfg, "mlp_hidden", None)
        if mlp is None and hasattr(cfg, "mlp_ratio"):
            mlp = cfg.mlp_ratio * cfg.n_embd
        seq = getattr(cfg, "seq_len", None)  # fixed by the image for a ViT
        return {"heads": cfg.n_head, "hidden": cfg.n_embd, "mlp": mlp, "vocab": getattr(cfg, "vocab_size", None), "seq_len": seq}
    if isinstance(config_or_model, nn.Module):
        dims: dict[str, int | None] = {"heads": None, "hidden": None, "mlp": None, "vocab": None, "seq_len": None}
        for module in config_or_model.modules():
            q = getattr(module, "q_proj", None)
            if isinstance(q, nn.Linear) and isinstance(getattr(module, "head_dim", None), int):
                dims["heads"], dims["hidden"] = q.out_features // module.head_dim, q.in_features
            up = getattr(module, "up_proj", None)
            if isinstance(up, nn.Linear):
                dims["mlp"] = up.out_features
        emb = getattr(config_or_model, "tok_emb", None)
        if isinstance(emb, nn.Embedding):
            dims["vocab"] = emb.num_embeddings
        return dims
    raise TypeError(
        f"validate_tp needs a model config (with n_head and n_embd) or an nn.Module, got {type(config_or_model).__name__}"
    )


def validate_tp(
    config_or_model: Any,
    tp: int,
    seq_len: int | None = None,
    sequence_parallel: bool = False,
    *,
    shard_vocab: bool = False,
) -> None:
    """Raise a ``ValueError`` naming the fix if ``tp`` cannot split this model. Pure arithmetic.

    Checks: t divides the heads (each rank must hold whole heads), the hidden size D and the MLP
    size F; the vocabulary V when ``shard_vocab``; and with ``sequence_parallel`` the sequence
    length T (``seq_len``; a ViT's is read from its config; for a GPT pass the training sequence
    length, ``None`` skips that check). All problems are reported at once.
    Call it on every rank before building the device mesh.
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel degree tp must be a positive integer, got {tp!r}")
    dims = _model_dims(config_or_model)
    problems: list[str] = []
    heads, hidden, mlp, vocab = dims["heads"], dims["hidden"], dims["mlp"], dims["vocab"]
    if hidden is not None and hidden % tp:
        problems.append(
            f"hidden size n_embd={hidden} is not divisible by tp={tp}: choose n_embd as a multiple of "
            f"{tp} or tp among the divisors of {hidden} ({_divisors(hidden)})"
        )
    if heads is not None and heads % tp:
        problems.append(
            f"n_head={heads} is not divisible by tp={tp}: every rank must hold whole attention heads; "
            f"use tp in {_divisors(heads)} or an n_head that is a multiple of {tp}"
        )
    if mlp is not None and mlp % tp:
        problems.append(
            f"MLP hidden size {mlp} is not divisible by tp={tp}: change mlp_ratio / n_embd so that it is "
            f"a multiple of {tp}, or use tp in {_divisors(mlp)}"
        )
    if shard_vocab:
        if vocab is None:
            problems.append("shard_vocab=True but the model has no token embedding (tok_emb / vocab_size); set shard_vocab=False")
        elif vocab % tp:
            padded = -(-vocab // tp) * tp
            problems.append(
                f"vocab_size={vocab} is not divisible by tp={tp} with shard_vocab=True: pad the vocabulary to "
                f"{padded} (a multiple of {tp}) or set shard_vocab=False (replicated embedding and head)"
            )
    if sequence_parallel:
        seq = seq_len if seq_len is not None else dims["seq_len"]
        if seq is not None and seq % tp:
            up = -(-seq // tp) * tp
            problems.append(
                f"sequence length {seq} is not divisible by tp={tp} with sequence_parallel=True: use a sequence "
                f"length that is a multiple of {tp} (e.g. {up}; for a ViT, (image_size/patch_size)^2 + 1 tokens), "
                f"or set sequence_parallel=False"
            )
    if problems:
        raise ValueError(f"tensor parallelism tp={tp} does not fit this model:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------
# Resolving patterns (pure)
# --------------------------------------------------------------------------------------------


def _module_slots(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module | None]]:
    """Every registered submodule path, including ``None`` slots (a pipeline stage's missing parts)."""
    for name, child in root._modules.items():
        path = f"{prefix}{name}"
        yield path, child
        if child is not None:
            yield from _module_slots(child, path + ".")


def _matches(pattern: list[str], path: str) -> bool:
    parts = path.split(".")
    return len(parts) == len(pattern) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pattern))


def _reaches_none_slot(pattern: list[str], none_slots: list[str]) -> bool:
    """True if a ``None`` slot matches a prefix of the pattern (e.g. ``head`` is None for ``head``)."""
    for slot in none_slots:
        n = len(slot.split("."))
        if n <= len(pattern) and _matches(pattern[:n], slot):
            return True
    return False


def resolve_plan(model: nn.Module, plan: Mapping[str, ParallelStyle], *, strict: bool = True) -> dict[str, ParallelStyle]:
    """Expand the plan's patterns into concrete module paths of ``model`` (in plan order). Pure.

    A pattern that matches nothing raises a ``ValueError`` unless it only runs into ``None``
    modules (parts a pipeline stage does not own) or ``strict=False``. A module matched by two
    patterns is an error (the order of the two styles' hooks would matter).
    """
    slots = list(_module_slots(model))
    seen: set[int] = set()
    present = []  # each module once, under its first path (as named_modules() does)
    for path, mod in slots:
        if mod is not None and id(mod) not in seen:
            seen.add(id(mod))
            present.append(path)
    none_slots = [path for path, mod in slots if mod is None]
    resolved: dict[str, ParallelStyle] = {}
    owner: dict[str, str] = {}
    for pattern, style in plan.items():
        if not isinstance(style, ParallelStyle):
            raise TypeError(f"TP plan entry {pattern!r} maps to {type(style).__name__}, not a ParallelStyle")
        parts = pattern.split(".")
        hits = [path for path in present if _matches(parts, path)]
        if not hits:
            if strict and not _reaches_none_slot(parts, none_slots):
                example = [p for p in present if p.count(".") == len(parts) - 1][:6] or present[:6]
                raise ValueError(
                    f"TP plan pattern {pattern!r} matches no module of {type(model).__name__}; fix the pattern "
                    f"(components are matched one by one with fnmatch, '*' never crosses a dot; module paths "
                    f"at that depth look like {example}) or remove it from the plan"
                )
            continue
        for path in hits:
            if path in resolved:
                raise ValueError(
                    f"module {path!r} is matched by TP plan patterns {owner[path]!r} and {pattern!r}; make the "
                    f"patterns disjoint (one ParallelStyle per module)"
                )
            resolved[path], owner[path] = style, pattern
    return resolved


# --------------------------------------------------------------------------------------------
# Structural checks on resolved styles (pure)
# --------------------------------------------------------------------------------------------


def _predicted_placements(module: nn.Module, style: ParallelStyle) -> dict[str, tuple[Placement, ...]]:
    """Parameter name -> placements it will have after ``style`` (``()`` = stays a plain tensor)."""
    if isinstance(style, Conv1DColwiseParallel):  # weight (in, out): shard out (per fused block); bias (out,)
        return {"weight": (split_placement(1, style.fused),), "bias": (Shard(0) if style.fused == 1 else Replicate(),)}
    if isinstance(style, Conv1DRowwiseParallel):  # weight (in, out): shard in; bias replicated
        return {"weight": (Shard(0),), "bias": (Replicate(),)}
    if isinstance(style, ColwiseParallel):
        if isinstance(module, nn.Linear):  # weight (out, in): shard out; bias (out,)
            return {"weight": (Shard(0),), "bias": (Shard(0),)}
        if isinstance(module, nn.Embedding):  # weight (V, D): shard D
            return {"weight": (Shard(1),)}
    elif isinstance(style, RowwiseParallel):
        if isinstance(module, nn.Linear):  # weight (out, in): shard in; bias replicated
            return {"weight": (Shard(1),), "bias": (Replicate(),)}
        if isinstance(module, nn.Embedding):  # weight (V, D): shard V
            return {"weight": (Shard(0),)}
    elif isinstance(style, SequenceParallel):
        return {name: (Replicate(),) for name, _ in module.named_parameters()}
    return {}


def _check_shardable(model: nn.Module, resolved: Mapping[str, ParallelStyle], tp: int) -> None:
    """Module types and sharded sizes against ``tp``, before any collective."""
    problems: list[str] = []
    for path, style in resolved.items():
        module = model.get_submodule(path)
        if isinstance(style, (Conv1DColwiseParallel, Conv1DRowwiseParallel)):
            problems.extend(_transposed_linear_problems(model, path, module, style, tp))
        elif isinstance(style, (ColwiseParallel, RowwiseParallel)):
            kind = "ColwiseParallel" if isinstance(style, ColwiseParallel) else "RowwiseParallel"
            if isinstance(module, nn.Linear):
                size, what = (module.out_features, "out_features") if kind == "ColwiseParallel" else (module.in_features, "in_features")
            elif isinstance(module, nn.Embedding):
                size, what = (module.embedding_dim, "embedding_dim") if kind == "ColwiseParallel" else (module.num_embeddings, "num_embeddings")
            else:
                problems.append(f"{path}: {kind} supports nn.Linear and nn.Embedding, not {type(module).__name__}; change the plan")
                continue
            if size % tp:
                problems.append(f"{path}: {kind} splits {what}={size} into tp={tp} parts; use tp in {_divisors(size)} or resize the layer")
    # Whole heads per rank: a column-wise q/k/v of an attention module with a ``head_dim``.
    for path, style in resolved.items():
        if not isinstance(style, ColwiseParallel) or "." not in path:
            continue
        parent_path, leaf = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        head_dim = getattr(parent, "head_dim", None)
        linear = getattr(parent, leaf)
        if leaf in ("q_proj", "k_proj", "v_proj") and isinstance(head_dim, int) and isinstance(linear, nn.Linear):
            heads = linear.out_features // head_dim
            if heads % tp:
                problems.append(
                    f"{path}: {heads} attention heads cannot be split over tp={tp} ranks (each rank needs whole "
                    f"heads); use tp in {_divisors(heads)} or a head count that is a multiple of {tp}"
                )
    if problems:
        raise ValueError("cannot apply the TP plan:\n  - " + "\n  - ".join(dict.fromkeys(problems)))


def _transposed_linear_problems(model: nn.Module, path: str, module: nn.Module, style: ParallelStyle, tp: int) -> list[str]:
    """A Conv1D style on a layer it cannot split into tp parts (whole heads for a fused q|k|v)."""
    kind = type(style).__name__
    if not is_transposed_linear(module):
        return [f"{path}: {kind} applies to transformers' Conv1D (weight (nx, nf)), not {type(module).__name__}; "
                f"use ColwiseParallel / RowwiseParallel for nn.Linear"]
    if isinstance(style, Conv1DRowwiseParallel):
        return [] if module.nx % tp == 0 else [f"{path}: {kind} splits nx={module.nx} into tp={tp} parts; use tp in {_divisors(module.nx)}"]
    block = module.nf // style.fused
    if module.nf % style.fused or block % tp:
        what = f"nf={module.nf}" if style.fused == 1 else f"each of the {style.fused} fused blocks of nf={module.nf}"
        return [f"{path}: {kind} splits {what} into tp={tp} parts; use tp in "
                f"{_divisors(block) if module.nf % style.fused == 0 else [1]}"]
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
    heads = getattr(parent, "num_heads", None)
    if style.fused > 1 and isinstance(heads, int) and heads % tp:
        return [f"{path}: {heads} attention heads cannot be split over tp={tp} ranks (each rank needs whole heads); "
                f"use tp in {_divisors(heads)}"]
    return []


def _check_ties(
    model: nn.Module, resolved: Mapping[str, ParallelStyle], ties: list[list[str]], replicate_rest: bool = False
) -> None:
    """Tied parameters must end up with the same layout (both replicated or both sharded alike)."""
    plain_layout: tuple[Placement, ...] = (Replicate(),) if replicate_rest else ()
    for names in ties:
        layouts = {}
        for name in names:
            owner, _, leaf = name.rpartition(".")
            style = resolved.get(owner)
            current = model.get_parameter(name)
            layout = tuple(current.placements) if isinstance(current, DTensor) else plain_layout
            if style is not None:
                predicted = _predicted_placements(model.get_submodule(owner), style)
                layout = predicted.get(leaf, layout)
            layouts[name] = layout
        if len(set(layouts.values())) > 1:
            shown = ", ".join(f"{n}: {'/'.join(map(str, v)) or 'replicated (plain tensor)'}" for n, v in layouts.items())
            raise ValueError(
                f"tied parameters would get different tensor-parallel layouts ({shown}); shard all of them the "
                f"same way (for the suite's GPT: gpt_tp_plan(shard_vocab=True) shards tok_emb and head together) or "
                f"none of them (a Hugging Face model: a tp_plan that leaves the embedding replicated), or untie the "
                f"weights (tie_word_embeddings=False)"
            )


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------

_TP_STATE = "_lightning_scale_tp"  # attribute set on each module apply_tp changed: its _TPState


@dataclass
class _TPState:
    """What :func:`apply_tp` did to one module, kept on the module itself (so it travels with the
    module, e.g. into a deepcopy, along with the hooks that read it).

    Stage views share module objects (a parameter-free ``drop`` sits in every view), and hooking
    one twice would e.g. slice an already-sliced sequence: ``styles`` lets a later call skip it."""

    styles: set[str] = field(default_factory=set)  # _style_key of each style applied, and replication markers
    own_replicated: list[str] = field(default_factory=list)  # own parameters made Replicate DTensors
    hooked: bool = False  # the local-view hooks of _replicate_own_parameters are registered
    depth: int = 0  # forward calls of the module running (nested calls keep the views bound)


def _state(module: nn.Module) -> _TPState:
    """The module's :class:`_TPState`, created empty on first use."""
    state = module.__dict__.get(_TP_STATE)
    if state is None:
        state = module.__dict__[_TP_STATE] = _TPState()
    return state


def _styles_applied(module: nn.Module) -> set[str]:
    state = module.__dict__.get(_TP_STATE)
    return set(state.styles) if state is not None else set()


_REPLICATED = "ReplicateRest:replicated parameters (replicate_rest=True)"
_REPLICATED_OWN = "ReplicateRest:own parameters replicated, local views in forward (replicate_rest=True)"
_REPLICATION_KEYS = {_REPLICATED, _REPLICATED_OWN}


def _style_key(style: ParallelStyle) -> str:
    return f"{type(style).__name__}:{style!r}"


def check_plan(
    model: nn.Module,
    plan: Mapping[str, ParallelStyle],
    tp: int,
    *,
    strict: bool = True,
    replicate_rest: bool = False,
) -> dict[str, ParallelStyle]:
    """Resolve ``plan`` on ``model`` and check it for ``tp`` ranks; pure (no communication).

    Returns the module paths still to parallelize (modules parallelized by an earlier
    :func:`apply_tp` call with the same style are left out). Raises a ``ValueError`` naming the
    fix for: a pattern matching nothing, a module matched twice, a module parallelized before
    with another style, a style on an unsupported module type, a sharded size (features,
    vocabulary, attention heads) not divisible by ``tp``, tied parameters that would get
    different layouts.
    """
    resolved = resolve_plan(model, plan, strict=strict)
    todo: dict[str, ParallelStyle] = {}
    for path, style in resolved.items():
        done = _styles_applied(model.get_submodule(path)) - _REPLICATION_KEYS
        if not done:
            todo[path] = style
        elif _style_key(style) not in done:
            raise ValueError(
                f"module {path!r} was already parallelized with {sorted(done)[0].split(':', 1)[1]} and the plan now "
                f"asks for {style!r}; apply one plan per module"
            )
    _check_shardable(model, todo, tp)
    _check_ties(model, todo, tied_parameter_groups(model), replicate_rest)
    return todo


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    plan: Mapping[str, ParallelStyle],
    *,
    strict: bool = True,
    src_data_rank: int | None = 0,
    replicate_rest: bool = False,
) -> nn.Module:
    """Parallelize ``model`` in place over the 1-D ``tp_mesh`` following ``plan``; returns it.

    Patterns are resolved against ``model.named_modules()`` and every sharded dimension and tied
    parameter is checked first (pure, identical on every rank), so a bad plan raises a
    ``ValueError`` on every rank before any collective. Then each matched module is handed to
    ``parallelize_module`` with its style. The ranks must hold identical weights (same seed, or
    load a checkpoint afterwards): replicated modules and ``SequenceParallel`` norms are not
    broadcast. ``src_data_rank=0`` (torch's default) scatters / broadcasts the sharded weights
    from TP-rank 0 anyway; ``None`` takes each rank's local slice (no communication).

    Works on pipeline stage views (``None`` modules, dropped container entries): patterns match
    what exists. Modules parallelized by an earlier call are skipped when the style is the same
    and rejected when it differs.

    ``replicate_rest=True`` also turns every parameter the plan leaves alone (embeddings, head,
    LayerNorms without sequence parallelism) into a ``Replicate`` DTensor, wrapping its module
    so it takes and returns plain tensors; parameters owned directly by the root model or by a
    module that also holds tensor-parallel parameters become ``Replicate`` DTensor parameters
    that the module's forward sees as local tensors (see the module docstring). Then *all*
    parameters are DTensors, which ``foreach``/``fused`` optimizers need (they reject a list
    mixing DTensors and plain tensors; ``foreach`` is torch's default on CUDA). Costs a little
    DTensor dispatch per call. The TP strategies always use it, on CPU as on CUDA.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tp needs the 1-D tensor-parallel sub-mesh (e.g. mesh['tp']), got a {tp_mesh.ndim}-D mesh "
            f"with dims {tp_mesh.mesh_dim_names}"
        )
    todo = check_plan(model, plan, tp_mesh.size(), strict=strict, replicate_rest=replicate_rest)
    ties = tied_parameter_groups(model)
    for path, style in todo.items():
        module = model.get_submodule(path)
        parallelize_module(module, tp_mesh, style, src_data_rank=src_data_rank)
        _state(module).styles.add(_style_key(style))
    if replicate_rest:
        wrapped, own = _replication_plan(model, {})
        for path in wrapped:
            module = model.get_submodule(path)
            # Params -> Replicate DTensors (broadcast from TP-rank 0); inputs -> Replicate DTensors;
            # outputs -> local tensors, so the module looks unchanged to its neighbours.
            distribute_module(module, tp_mesh, None, _replicated_inputs, _local_outputs)
            _state(module).styles.add(_REPLICATED)
        for path in own:  # the root, or a module that also holds TP parameters: its own parameters only
            module = model.get_submodule(path)
            _replicate_own_parameters(module, tp_mesh, src_data_rank)
            _state(module).styles.add(_REPLICATED_OWN)
    _retie(model, ties)
    return model


def _replication_plan(model: nn.Module, planned: Mapping[str, ParallelStyle]) -> tuple[list[str], list[str]]:
    """Where the parameters that stay plain tensors after ``planned`` get replicated (pure).

    Returns ``(wrapped, own)``: ``wrapped`` are the topmost modules owning plain parameters
    directly and holding no tensor-parallel parameters (now or after ``planned``): each is
    wrapped whole, with its children. ``own`` are the modules owning plain parameters directly
    that cannot be wrapped whole (the root model, or a module holding tensor-parallel
    parameters): only their own parameters are replicated; their children are handled on their
    own (a child below a wrapped module is covered by it).
    """

    def sharded(name: str, p: nn.Parameter) -> bool:  # a DTensor now or after ``planned``
        owner, _, leaf = name.rpartition(".")
        style = planned.get(owner)
        return isinstance(p, DTensor) or (style is not None and leaf in _predicted_placements(model.get_submodule(owner), style))

    def below(path: str, ancestor: str) -> bool:
        return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))

    params = list(model.named_parameters(remove_duplicate=False))
    owners = {name.rpartition(".")[0] for name, p in params if not sharded(name, p)}
    wrapped: list[str] = []
    own: list[str] = []
    for owner in sorted(owners):  # an ancestor sorts before its descendants
        if any(below(owner, w) for w in wrapped):
            continue
        if owner == "" or any(below(name, owner) and sharded(name, p) for name, p in params):
            own.append(owner)
        else:
            wrapped.append(owner)
    return wrapped, own


def _replicate_own_parameters(module: nn.Module, mesh: DeviceMesh, src_data_rank: int | None) -> None:
    """Turn ``module``'s own plain parameters into ``Replicate`` DTensor parameters (same names),
    seen by its forward as local tensors (a pre-hook binds ``to_local()`` views as instance
    attributes, which take precedence over ``nn.Module.__getattr__``; an always-called post-hook
    removes them, also when the forward raises)."""
    names = [n for n, p in module._parameters.items() if p is not None and not isinstance(p, DTensor)]
    if not names:
        return
    for name in names:
        p = module._parameters[name]
        replicated = distribute_tensor(p.detach(), mesh, [Replicate()], src_data_rank=src_data_rank)
        module._parameters[name] = nn.Parameter(replicated, requires_grad=p.requires_grad)
    state = _state(module)
    if not state.hooked:
        module.register_forward_pre_hook(_bind_local_views)
        module.register_forward_hook(_unbind_local_views, always_call=True)
        state.hooked = True
    state.own_replicated.extend(n for n in names if n not in state.own_replicated)


def _bind_local_views(module: nn.Module, args: Any) -> None:
    state = _state(module)
    state.depth += 1
    if state.depth > 1:
        return  # a nested call: the outer call's views are bound
    for name in state.own_replicated:
        p = module._parameters.get(name)
        if isinstance(p, DTensor):
            module.__dict__[name] = p.to_local()  # differentiable: its gradient lands on p (Replicate)


def _unbind_local_views(module: nn.Module, args: Any, output: Any) -> None:
    state = _state(module)
    state.depth = max(state.depth - 1, 0)
    if state.depth == 0:
        for name in state.own_replicated:
            module.__dict__.pop(name, None)


def _replicated_inputs(module: nn.Module, inputs: Any, mesh: DeviceMesh) -> Any:
    """Plain tensor inputs -> Replicate DTensors (all TP ranks hold the same values)."""
    replicate = [Replicate()] * mesh.ndim

    def convert(x: Any) -> Any:
        if isinstance(x, DTensor):
            return x if all(p.is_replicate() for p in x.placements) else x.redistribute(mesh, replicate)
        if isinstance(x, torch.Tensor):
            return DTensor.from_local(x, mesh, replicate, run_check=False)
        return x

    return tuple(convert(x) for x in inputs)


def _local_outputs(module: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
    """Replicate DTensor outputs -> plain local tensors."""
    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple):
        return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
    return outputs


def _retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Point every name of a tied group at one parameter again (each owner got its own DTensor)."""
    for names in ties:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            if model.get_parameter(name) is first:
                continue
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, first)


def local_heads(attention: nn.Module) -> int:
    """Heads this rank computes in an attention module (``q_proj`` rows / ``head_dim``)."""
    weight = attention.q_proj.weight
    rows = weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0]
    return rows // attention.head_dim

