"""Hugging Face ``transformers`` models under the suite's strategies, without glue code.

**Pipeline stage forwards.** A ``transformers`` model's ``forward`` does not skip the parts a
pipeline stage does not hold, so each stage runs a stage forward instead: a function
``fn(stage, *inputs)`` that runs what the stage holds (the modules of other stages are ``None``
in a stage view). One ships per family, and :func:`stage_family` picks it from the model's
structure (``PipelineStrategy`` does so when no ``stage_forward=`` is given):

================  =======================================  ==========================================
family            structure                                stage 0 takes -> last stage returns
================  =======================================  ==========================================
decoder           ``model.embed_tokens`` -> ``model.layers``  token ids (B, T) -> logits (B, T, V)
                  -> ``model.norm`` -> ``lm_head``, rotary  (Llama, Mistral, Qwen2, ...)
gpt_neox          ``gpt_neox.embed_in`` -> ``.layers`` ->    token ids (B, T) -> logits (B, T, V)
                  ``.final_layer_norm`` -> ``lm_head``, rotary  (GPT-NeoX, Pythia)
gptj              ``transformer.wte`` -> ``transformer.h`` ->  token ids (B, T) -> logits (B, T, V)
                  ``transformer.ln_f`` -> ``lm_head``, rotary
gpt2              ``transformer.wte/wpe`` -> ``transformer.h``  token ids (B, T) -> logits (B, T, V)
                  -> ``transformer.ln_f`` -> ``lm_head``
vit               ``vit.embeddings`` -> ``vit.layers`` ->    images (B, C, H, W) -> logits (B, classes)
                  ``vit.layernorm`` -> ``classifier`` (CLS)
bert              ``<base>.embeddings`` -> ``<base>.encoder.layer``  token ids (B, T) -> logits (B, labels)
                  -> ``<base>.pooler`` -> ``classifier``  (BERT, RoBERTa sequence classification),
                  or -> ``cls`` / ``lm_head``             or token logits (B, T, V) (masked LM)
================  =======================================  ==========================================

Decoders build the causal mask the model's own forward builds (``create_causal_mask``: ``None``
for SDPA without padding, a 4-D mask for eager attention); encoders attend to every token (no
padding masks: a batch of equal-length sequences). Hidden states between stages are (B, T, D).

Imports ``transformers`` only for the mask helpers, inside the decoder forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle


def _causal_mask(config, hidden: torch.Tensor, positions: torch.Tensor):  # noqa: ANN001, ANN202
    """The mask a decoder's forward builds for an unpadded batch (None under SDPA: is_causal)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=positions)


@dataclass(frozen=True)
class _DecoderParts:
    """Where a rotary decoder keeps its parts (attribute names; ``dropout`` None: none)."""

    body: str
    embed: str
    dropout: str | None
    layers: str
    norm: str


_LLAMA = _DecoderParts("model", "embed_tokens", None, "layers", "norm")
_GPT_NEOX = _DecoderParts("gpt_neox", "embed_in", "emb_dropout", "layers", "final_layer_norm")
_GPTJ = _DecoderParts("transformer", "wte", "drop", "h", "ln_f")


def _rotary_decoder_stage(stage: nn.Module, x: torch.Tensor, parts: _DecoderParts) -> torch.Tensor:
    """One stage of a rotary ``*ForCausalLM`` (embeddings -> dropout -> layers with the model's
    rotary table and causal mask -> final norm -> ``lm_head``): token ids (B, T) or hidden states
    (B, T, D) in; hidden states (B, T, D) or logits (B, T, V) out."""
    body = getattr(stage, parts.body)
    embed = getattr(body, parts.embed)
    hidden = embed(x) if embed is not None else x  # (B, T, D)
    if embed is not None and parts.dropout is not None:
        hidden = getattr(body, parts.dropout)(hidden)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    rotary = body.rotary_emb(hidden, position_ids=positions)  # (cos, sin), each (1, T, rotary dim)
    mask = _causal_mask(stage.config, hidden, positions)
    for layer in getattr(body, parts.layers):
        out = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    norm = getattr(body, parts.norm)
    if norm is not None:
        hidden = norm(hidden)
    if getattr(stage, "lm_head", None) is not None:
        hidden = stage.lm_head(hidden)  # (B, T, V)
    return hidden


def decoder_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a Llama-style ``*ForCausalLM`` (Llama, Mistral, Qwen2, ...): token ids (B, T)
    or hidden states (B, T, D) in; hidden states (B, T, D) or logits (B, T, V) out."""
    return _rotary_decoder_stage(stage, x, _LLAMA)


def gpt_neox_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a ``GPTNeoXForCausalLM`` (Pythia, GPT-NeoX): as :func:`decoder_stage_forward`."""
    return _rotary_decoder_stage(stage, x, _GPT_NEOX)


def gptj_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a ``GPTJForCausalLM``: as :func:`decoder_stage_forward`."""
    return _rotary_decoder_stage(stage, x, _GPTJ)


def gpt2_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a ``GPT2LMHeadModel``: token ids (B, T) or hidden states (B, T, D) in; hidden
    states or logits (B, T, V) out. The tied head keeps its own copy on the last stage (the
    strategy sums the two copies' gradients)."""
    body = stage.transformer
    if body.wte is not None:
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
        hidden = body.drop(body.wte(x) + body.wpe(positions))  # (B, T, D)
    else:
        hidden = x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = _causal_mask(stage.config, hidden, positions)
    for block in body.h:
        out = block(hidden, None, mask, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    if body.ln_f is not None:
        hidden = body.ln_f(hidden)
    if getattr(stage, "lm_head", None) is not None:
        hidden = stage.lm_head(hidden)  # (B, T, V)
    return hidden


def vit_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a ``ViTForImageClassification``: images (B, C, H, W) or hidden states
    (B, 1 + patches, D) in; hidden states or logits (B, classes) from the CLS token out."""
    body = stage.vit
    hidden = body.embeddings(x.to(body.embeddings.patch_embeddings.projection.weight.dtype)) \
        if body.embeddings is not None else x
    for layer in body.layers:
        out = layer(hidden)
        hidden = out[0] if isinstance(out, tuple) else out
    if body.layernorm is not None:
        hidden = body.layernorm(hidden)
    if getattr(stage, "classifier", None) is not None:
        hidden = stage.classifier(hidden[:, 0, :])  # (B, classes)
    return hidden


def bert_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a BERT-style encoder (BERT, RoBERTa): ``*ForSequenceClassification``,
    ``*ForMaskedLM``, or the causal LMs (``BertLMHeadModel``, ``RobertaForCausalLM``:
    ``config.is_decoder``, causal mask). Token ids (B, T) or hidden states (B, T, D) in; hidden states, logits
    (B, labels) or token logits (B, T, V) out (the masked-LM head's decoder is tied to the word
    embeddings: the last stage keeps its own copy)."""
    body = getattr(stage, stage.base_model_prefix)
    hidden = body.embeddings(input_ids=x) if body.embeddings is not None else x  # (B, T, D)
    mask = None  # an encoder: every token attends to every token (no padding)
    if getattr(stage.config, "is_decoder", False):  # BertLMHeadModel, RobertaForCausalLM: causal, as the model's forward
        mask = _causal_mask(stage.config, hidden, torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0))
    for layer in body.encoder.layer:
        out = layer(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out
    lm_head = getattr(stage, "cls", None)  # BERT's masked-LM head
    if lm_head is None:
        lm_head = getattr(stage, "lm_head", None)  # RoBERTa's
    if lm_head is not None:
        return lm_head(hidden)  # (B, T, V)
    head = getattr(stage, "classifier", None)
    if head is None:
        return hidden
    if getattr(body, "pooler", None) is not None:  # BERT: the pooled CLS token; RoBERTa's head pools itself
        return head(stage.dropout(body.pooler(hidden)))
    return head(hidden)


@dataclass(frozen=True)
class StageFamily:
    """A model family's pipeline stage forward and where its blocks are."""

    name: str
    block_container: str
    stage_forward: Callable[..., torch.Tensor]


def _has(module: nn.Module | None, *names: str) -> bool:
    return module is not None and all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def stage_family(model: nn.Module) -> StageFamily | None:
    """The family of a ``transformers`` model by its structure (see the module docstring), or
    None when no stage forward ships for it."""
    if _has(getattr(model, "model", None), "embed_tokens", "layers", "norm", "rotary_emb") and _has(model, "lm_head"):
        return StageFamily("decoder", "model.layers", decoder_stage_forward)
    if _has(getattr(model, "transformer", None), "wte", "wpe", "h", "ln_f") and _has(model, "lm_head"):
        return StageFamily("gpt2", "transformer.h", gpt2_stage_forward)
    if _has(getattr(model, "gpt_neox", None), "embed_in", "layers", "final_layer_norm", "rotary_emb") \
            and _has(model, "lm_head"):
        return StageFamily("gpt_neox", "gpt_neox.layers", gpt_neox_stage_forward)
    if _has(getattr(model, "transformer", None), "wte", "h", "ln_f", "rotary_emb") and _has(model, "lm_head"):
        return StageFamily("gptj", "transformer.h", gptj_stage_forward)
    if _has(getattr(model, "vit", None), "embeddings", "layers", "layernorm") and _has(model, "classifier"):
        return StageFamily("vit", "vit.layers", vit_stage_forward)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    heads = ("classifier", "cls") if prefix == "bert" else ("classifier", "lm_head")
    if (_has(base, "embeddings", "encoder") and _has(getattr(base, "encoder", None), "layer")
            and any(_has(model, h) for h in heads)):
        return StageFamily("bert", f"{prefix}.encoder.layer", bert_stage_forward)
    return None


def is_hugging_face(model: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (by its config and base-model prefix; no import)."""
    return hasattr(model, "config") and hasattr(model, "base_model_prefix") and hasattr(model.config, "model_type")


def hf_tp_plan(model: nn.Module, prefix: str = "") -> dict:
    """The model's own tensor-parallel plan as torch ``ParallelStyle`` objects, for
    ``TensorParallelStrategy(tp_plan=...)``: Hugging Face configs declare one
    (``config.base_model_tp_plan``, e.g. Llama's ``{"layers.*.self_attn.q_proj": "colwise", ...,
    "layers.*.mlp.down_proj": "rowwise"}``), keyed by paths in the base model
    (``model.base_model_prefix``, ``"model"`` for a ``...ForCausalLM``). ``prefix``: the model's
    path in the LightningModule (``"model."`` when it is ``self.model``). Raises ``ValueError``
    naming the fix when there is no plan or a style without a torch equivalent here (``colwise``,
    ``rowwise``, ``embedding_rowwise`` (vocabulary-parallel), ``embedding_colwise``,
    ``colwise_gather_output`` are translated)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__}'s config declares no tensor-parallel plan (base_model_tp_plan): give "
                         f"TensorParallelStrategy(tp_plan={{'module path pattern': ColwiseParallel() | RowwiseParallel()}})")
    from torch.distributed.tensor import Replicate

    # transformers' names -> torch styles with the same layouts (transformers/distributed/tensor_parallel.py)
    styles = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        # vocabulary-parallel embedding: V/t rows per rank, masked lookup, partial sums all-reduced
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # hidden-parallel embedding: D/t columns per rank, gathered
        "embedding_colwise": lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    unknown = sorted({kind for kind in plan.values() if kind not in styles})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s tensor-parallel plan uses {unknown}, which the suite does not "
                         f"translate ({', '.join(styles)} only): give tp_plan= yourself")
    base = getattr(model, "base_model_prefix", "")
    inner = f"{base}." if base and isinstance(getattr(model, base, None), nn.Module) else ""
    return {f"{prefix}{inner}{path}": styles[kind]() for path, kind in plan.items()}


def gpt2_attention_paths(model: nn.Module) -> list[str]:
    """Paths of GPT-2-style attention modules: a fused q|k|v ``c_attn`` and an output ``c_proj``,
    both ``Conv1D`` (transposed linear), split by ``split_size`` (GPT-2, and models built like it)."""
    from lightning_scale.core.conv1d_parallel import is_transposed_linear

    return [name for name, m in model.named_modules()
            if isinstance(getattr(m, "split_size", None), int) and isinstance(getattr(m, "num_heads", None), int)
            and all(is_transposed_linear(getattr(m, leaf, None) or nn.Identity()) for leaf in ("c_attn", "c_proj"))]


class GPT2AttentionHeads(ParallelStyle):
    """GPT-2's attention computes only its own heads: once ``c_attn`` is split per q/k/v block
    (``Conv1DColwiseParallel(fused=3)``, (B, T, 3 D) -> this rank's (B, T, 3 D/t)), the attention
    must split that output at D/t, not at its ``split_size`` D. Sets ``split_size``, ``num_heads``
    and ``embed_dim`` to this rank's share (H/t whole heads); no parameters, no communication.
    Idempotent (the global sizes are kept on the module)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:  # noqa: ANN001
        t = device_mesh.size()
        split, heads, dim = module.__dict__.setdefault(
            "_lightning_scale_global_heads", (module.split_size, module.num_heads, module.embed_dim))
        if heads % t or split % t:
            raise ValueError(f"{heads} attention heads cannot be split over tp={t} ranks (each rank needs whole heads); "
                             f"use a tensor_parallel_size that divides {heads}")
        if getattr(module, "is_cross_attention", False):
            raise ValueError("GPT2AttentionHeads: cross-attention (add_cross_attention=True) is not tensor-parallel; "
                             "train this model with ZeroStrategy(stage=3) or the pipeline")
        module.split_size, module.num_heads, module.embed_dim = split // t, heads // t, dim // t
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def gpt2_tp_plan(model: nn.Module, sequence_parallel: bool = False, prefix: str = "") -> dict:
    """Megatron-style plan for GPT-2 (``transformers``' ``GPT2LMHeadModel`` / ``GPT2Model``, whose
    config declares no plan), keyed from the model (``prefix``: its path in the LightningModule).

    Per block: ``c_attn`` column-split per q/k/v block (``fused=3``: H/t whole heads per rank), the
    attention told to split at D/t (:class:`GPT2AttentionHeads`), ``attn.c_proj`` row-split
    (all-reduce); the MLP's ``c_fc`` column-split and ``c_proj`` row-split. With
    ``sequence_parallel`` the residual stream between them is a sequence shard (B, T/t, D):
    ``drop`` slices the embedding sum, ``ln_1``/``ln_2`` are ``SequenceParallel``, ``c_attn``/``c_fc``
    all-gather their input, the ``c_proj``s reduce-scatter, and ``ln_f`` gathers the sequence back
    (it then runs replicated, as do the embeddings and the tied head)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import SequenceParallel

    from lightning_scale.core.conv1d_parallel import Conv1DColwiseParallel, Conv1DRowwiseParallel
    from lightning_scale.core.tensor_parallel import gather_sequence, shard_sequence

    config = getattr(model, "config", None)
    if getattr(config, "add_cross_attention", False) or any(
            getattr(model.get_submodule(p), "is_cross_attention", False) for p in gpt2_attention_paths(model)):
        raise ValueError(f"{type(model).__name__} has cross-attention (add_cross_attention=True), which GPT-2's "
                         f"tensor-parallel plan does not split; train it with ZeroStrategy(stage=3) or the pipeline")
    inner = "transformer." if isinstance(getattr(model, "transformer", None), nn.Module) else ""
    base = f"{prefix}{inner}"
    seq = Shard(1) if sequence_parallel else None
    plan: dict = {}
    if sequence_parallel:
        plan[f"{base}drop"] = shard_sequence()  # (B, T, D) embedding sum -> (B, T/t, D)
        plan[f"{base}h.*.ln_1"] = SequenceParallel()
        plan[f"{base}h.*.ln_2"] = SequenceParallel()
    plan[f"{base}h.*.attn"] = GPT2AttentionHeads()
    plan[f"{base}h.*.attn.c_attn"] = Conv1DColwiseParallel(fused=3, input_layouts=seq)  # (B, T, 3 D/t)
    plan[f"{base}h.*.attn.c_proj"] = Conv1DRowwiseParallel(output_layouts=seq)
    plan[f"{base}h.*.mlp.c_fc"] = Conv1DColwiseParallel(input_layouts=seq)  # (B, T, F/t)
    plan[f"{base}h.*.mlp.c_proj"] = Conv1DRowwiseParallel(output_layouts=seq)
    if sequence_parallel:
        plan[f"{base}ln_f"] = gather_sequence()  # (B, T/t, D) -> (B, T, D)
    return plan


def save_pretrained(checkpoint: str, out_dir: str, like: nn.Module, prefix: str = "model.",
                    trust: bool = False) -> dict[str, torch.Tensor]:
    """A Hugging Face ``save_pretrained`` directory from a checkpoint the suite's strategies wrote
    (sharded by pipeline stage, tensor or ZeRO-3 rank, or a plain single file): the full state
    dict is gathered in this one process (:func:`lightning_scale.core.checkpoint.consolidate`),
    the LightningModule's ``prefix`` (the attribute holding the model) is stripped, and
    ``like.save_pretrained(out_dir, state_dict=...)`` writes the config and safetensors, so that
    ``AutoModel*.from_pretrained(out_dir)`` loads the trained weights. ``like``: a model of the
    same class and config (its own values are not written; it can live on the meta device).
    A tied weight held once per pipeline stage is written once. Returns the state dict written."""
    from pathlib import Path

    from lightning_scale.core.checkpoint import consolidate

    path = Path(checkpoint)
    if path.is_dir():
        state = consolidate(path, trust=trust)["state_dict"]
    else:
        from lightning_scale.core.checkpoint import load_file

        state = load_file(path, trust=trust)["state_dict"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(like.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"{checkpoint} holds no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} under "
                         f"prefix {prefix!r} for {type(like).__name__}: is the model at LightningModule.{prefix[:-1]}?")
    weights = {k: v.contiguous() for k, v in weights.items() if k in expected}
    like.save_pretrained(out_dir, state_dict=dict(weights))  # (transformers empties the dict it is given)
    return weights
