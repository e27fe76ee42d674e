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
