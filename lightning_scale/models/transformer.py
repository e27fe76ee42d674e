"""The transformer block shared by the GPT and ViT models.

Torch only. Shapes use B = batch, T = sequence length, D = hidden size (``n_embd``),
H = attention heads, Dh = D / H head size.

Design points that later strategies rely on:

* q, k and v are three separate ``nn.Linear`` layers (not one fused ``3D`` projection) so that a
  column-wise tensor-parallel split of each gives every rank whole heads.
* Attention reshapes with ``view(B, T, -1, Dh)``: the number of heads is read from the tensor,
  never from the config, so a rank that holds ``H / tp`` heads after tensor parallelism works
  unchanged.
* Parameter names are stable and documented: ``ln_1, attn.{q,k,v,out}_proj, ln_2,
  mlp.{up,down}_proj``. Tensor-parallel plans and checkpoints refer to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head scaled-dot-product self-attention (causal for GPT, bidirectional for ViT)."""

    def __init__(self, n_embd: int, n_head: int, *, bias: bool, dropout: float, causal: bool) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(
                f"n_embd ({n_embd}) must be divisible by n_head ({n_head}); "
                f"pick n_head among the divisors of n_embd"
            )
        self.head_dim = n_embd // n_head  # Dh
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, D) -> (B, H_local, T, Dh); H_local = H / tp under tensor parallelism.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        # (B, H_local, T, Dh) -> (B, T, H_local * Dh)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: D -> mlp_hidden -> D with GELU."""

    def __init__(self, n_embd: int, mlp_hidden: int, *, bias: bool, dropout: float) -> None:
        super().__init__()
        self.up_proj = nn.Linear(n_embd, mlp_hidden, bias=bias)
        self.down_proj = nn.Linear(mlp_hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Input and output are (B, T, D). Parameters: ``12 D^2 + 13 D`` when ``mlp_hidden = 4 D``
    and ``bias=True`` (see :func:`block_param_count`).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        mlp_hidden: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, bias=bias, dropout=dropout, causal=causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_hidden, bias=bias, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def block_param_count(n_embd: int, mlp_hidden: int, bias: bool) -> int:
    """Closed-form parameter count of one :class:`Block`.

    Two LayerNorms (weight, and bias if ``bias``), four D x D attention projections and the
    two MLP projections, each with an optional bias.
    """
    d, f, b = n_embd, mlp_hidden, int(bias)
    layer_norms = 2 * (d + b * d)
    attention = 4 * (d * d + b * d)
    mlp = d * f + b * f + f * d + b * d
    return layer_norms + attention + mlp


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
