"""Pipeline stages of Hugging Face ``transformers`` decoder LMs (Llama, Mistral, Qwen2, ...).

Their ``forward`` does not skip missing modules, so a pipeline stage runs this function
instead (``PipelineStrategy(stage_forward=decoder_stage_forward, block_container="model.layers")``).
It follows the structure those models declare in their ``_pp_plan``: ``model.embed_tokens``
(first stage) -> ``model.layers`` (split) -> ``model.norm`` -> ``lm_head`` (last stage), with
``model.rotary_emb`` (buffers only) on every stage. Causal attention without padding masks.

Imports nothing from ``transformers`` itself: it only uses the module attributes.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_stage_forward(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of a ``*ForCausalLM``: token ids (B, T) or hidden states (B, T, D) in;
    hidden states (B, T, D) or logits (B, T, V) out."""
    body = stage.model
    hidden = body.embed_tokens(x) if body.embed_tokens is not None else x  # (B, T, D)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    rotary = body.rotary_emb(hidden, position_ids=positions)  # (cos, sin), each (1, T, head_dim)
    for layer in body.layers:
        out = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    if body.norm is not None:
        hidden = body.norm(hidden)
    if getattr(stage, "lm_head", None) is not None:
        hidden = stage.lm_head(hidden)  # (B, T, V)
    return hidden


def hf_tp_plan(model: nn.Module, prefix: str = "") -> dict:
    """The model's own tensor-parallel plan as torch ``ParallelStyle`` objects, for
    ``TensorParallelStrategy(tp_plan=...)``: Hugging Face configs declare one
    (``config.base_model_tp_plan``, e.g. Llama's ``{"layers.*.self_attn.q_proj": "colwise", ...,
    "layers.*.mlp.down_proj": "rowwise"}``), keyed by paths in the base model
    (``model.base_model_prefix``, ``"model"`` for a ``...ForCausalLM``). ``prefix``: the model's
    path in the LightningModule (``"model."`` when it is ``self.model``). Raises ``ValueError``
    naming the fix when there is no plan or a style other than colwise / rowwise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__}'s config declares no tensor-parallel plan (base_model_tp_plan): give "
                         f"TensorParallelStrategy(tp_plan={{'module path pattern': ColwiseParallel() | RowwiseParallel()}})")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    unknown = sorted({kind for kind in plan.values() if kind not in styles})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s tensor-parallel plan uses {unknown}, which the suite does not "
                         f"translate (colwise and rowwise only): give tp_plan= yourself")
    base = getattr(model, "base_model_prefix", "")
    inner = f"{base}." if base and isinstance(getattr(model, base, None), nn.Module) else ""
    return {f"{prefix}{inner}{path}": styles[kind]() for path, kind in plan.items()}
