"""Model FLOPs of a training step: analytic for the suite's transformers, measured otherwise. Torch only.

Analytic (PaLM, Chowdhery et al. 2022, appendix B; design guide section 6): a training step
(forward + backward) of a transformer costs, per token,

    6 N + 12 L H Q T  FLOPs

with N the parameters that take part in matrix multiplies (every block's linear layers and the
output head, counted even when it shares its weight with the token embedding; embedding lookups
and norms are left out), L blocks, H heads of size Q, T tokens per sequence (the attention
score and value products; causal masking is not subtracted, as in the paper). "Model FLOPs"
are these; with full activation recomputation the hardware also runs one more forward (2 N +
4 L H Q T per token, so x 4/3): :func:`hardware_flops_per_token` counts that separately, MFU
uses model FLOPs.

Measured: :func:`measure_training_flops` runs one forward + backward under
``torch.utils.flop_counter.FlopCounterMode`` with formulas added for CPU scaled-dot-product
attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward are not in
torch's registry, so they count 0; the design guide notes this), and with the backward of
every fused SDPA kernel counted as model FLOPs (torch's formulas include the flash kernels'
recomputation of the scores). The formulas are passed as ``custom_mapping``, so torch's global
registry is not changed; a fused SDPA op is one op, so it is counted once (the unfused math
path decomposes into ``bmm`` ops that torch's own formulas count instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def transformer_matmul_params(n_layer: int, n_embd: int, mlp_hidden: int, vocab_size: int | None) -> int:
    """Weights of the matrix multiplies: per block q, k, v, out (4 D^2) and MLP (2 D F); the head (D V)."""
    per_block = 4 * n_embd * n_embd + 2 * n_embd * mlp_hidden
    return n_layer * per_block + (n_embd * vocab_size if vocab_size else 0)


def transformer_flops_per_token(n_matmul_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token: 6 N + 12 L H Q T."""
    return 6.0 * n_matmul_params + 12.0 * n_layer * n_head * head_dim * seq_len


def gpt_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Model FLOPs per trained token of :class:`lightning_scale.models.GPT` for ``GPTConfig`` ``cfg``."""
    n = transformer_matmul_params(cfg.n_layer, cfg.n_embd, cfg.mlp_hidden, cfg.vocab_size)
    return transformer_flops_per_token(n, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len)


def vit_flops_per_image(cfg: Any) -> float:
    """Model FLOPs per trained image of :class:`lightning_scale.models.ViT` (tokens = patches + 1 class token).

    The patch projection is a matmul of (C P^2) x D per patch; the classifier head D x classes per image."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + 1
    blocks = transformer_matmul_params(cfg.n_layer, cfg.n_embd, cfg.mlp_hidden, None)
    per_token = transformer_flops_per_token(blocks, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, tokens)
    patch_proj = 6.0 * cfg.in_channels * cfg.patch_size**2 * cfg.n_embd * patches
    head = 6.0 * cfg.n_embd * cfg.num_classes
    return per_token * tokens + patch_proj + head


def gpt_recompute_flops_per_token(cfg: Any, seq_len: int, checkpointed_blocks: int) -> float:
    """Extra forward FLOPs per token when ``checkpointed_blocks`` blocks recompute their forward
    in backward (full activation checkpointing of those blocks): per block 2 x its matmul
    weights + 4 H Q T for the attention products."""
    block_weights = transformer_matmul_params(1, cfg.n_embd, cfg.mlp_hidden, None)
    per_block = 2.0 * block_weights + 4.0 * cfg.n_embd * seq_len  # H Q = n_embd
    return checkpointed_blocks * per_block


def hardware_flops_per_token(model_flops_per_token: float, recompute_fraction: float = 0.0) -> float:
    """FLOPs the device runs per token when ``recompute_fraction`` of the forward is run again
    (1.0 = full activation recomputation: forward is a third of 6N + 12LHQT, so x 4/3)."""
    if not 0.0 <= recompute_fraction <= 1.0:
        raise ValueError(f"recompute_fraction must be in [0, 1]; got {recompute_fraction}")
    return model_flops_per_token * (1.0 + recompute_fraction / 3.0)


# -- measured -------------------------------------------------------------------------------------
def _sdpa_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for fused scaled-dot-product attention, in model FLOPs.

    Forward: CPU flash SDPA is missing from torch's registry; it gets torch's own SDPA formula
    (2 matmuls: 4 B H T S Q). Backward (every fused kernel): 2 x forward (dQ, dK, dV and the
    score gradient: 4 matmuls). torch's backward formulas also count the recomputation of the
    scores that flash kernels do (5 matmuls): hardware FLOPs, not model FLOPs, and 2 L H Q T
    per token more than PaLM's 12 L H Q T. FlopCounterMode passes shapes, not tensors."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return fc.sdpa_flop_count(query, key, value)

    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
        return 2 * fc.sdpa_flop_count(query, key, value)

    mapping: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = forward_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = backward_flops
    return mapping


def measure_training_flops(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor]) -> int:
    """FLOPs of one forward + backward of ``model`` on ``batch``, counted by FlopCounterMode.

    ``loss_fn(model_output) -> scalar``. The model's gradients are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = {p: p.grad for p in model.parameters()}
    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_mapping())
    # Compiled modules run eagerly under the counter; asked for explicitly, so that torch 2.13
    # does not keep them eager afterwards (see activation_memory.HeldActivationMeter).
    with torch.compiler.set_stance("force_eager"), counter:
        out = model(batch) if not isinstance(batch, (tuple, list)) else model(*batch)
        loss_fn(out).backward()
    for p, grad in saved.items():
        p.grad = grad
    return int(counter.get_total_flops())
