"""A GPT-style decoder-only language model (GPT-2 architecture), torch only.

Layout (stable parameter names, relied on by pipeline splits, TP plans and checkpoints)::

    tok_emb   Embedding(V, D)            token embeddings      (first pipeline stage)
    pos_emb   Embedding(T_max, D)        learned positions     (first pipeline stage)
    blocks    ModuleDict{"0".."L-1"}     pre-LN Blocks          (split across stages)
    ln_f      LayerNorm(D)               final norm            (last pipeline stage)
    head      Linear(D, V, bias=False)   LM head, optionally tied to tok_emb (last stage)

``blocks`` is a ``ModuleDict`` keyed by the block index, so deleting the blocks a pipeline stage
does not own keeps the names of the others (``blocks.7.attn.q_proj.weight`` stays the same on
every layout). The forward skips any top-level module that is ``None``, which is how a pipeline
stage holds only its part of the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_scale.models.transformer import Block, block_param_count, init_weights


@dataclass
class GPTConfig:
    """Shape of a GPT model. The defaults are the ``"nano"`` preset (~0.85M parameters)."""

    vocab_size: int = 256  # V: tokens in the vocabulary (256 = byte-level)
    block_size: int = 128  # T_max: longest sequence the position table covers
    n_layer: int = 4  # L: transformer blocks
    n_head: int = 4  # H: attention heads per block
    n_embd: int = 128  # D: hidden size; must be divisible by n_head
    mlp_ratio: int = 4  # MLP hidden size = mlp_ratio * D
    dropout: float = 0.0  # dropout probability (attention, residual and embedding)
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2: True)
    tie_weights: bool = True  # share the LM head weight with tok_emb (GPT-2: True)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"choose n_head from the divisors of {self.n_embd} or change n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset shape (see :data:`GPT_PRESETS`) with optional field overrides."""
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(GPT_PRESETS)}")
        return replace(GPT_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_GPT2 = dict(vocab_size=50257, block_size=1024, dropout=0.0, bias=True, tie_weights=True)

#: Named shapes. GPT-2 sizes follow the published GPT-2 family (Radford et al. 2019) with
#: learned positions and a tied head: "gpt2" has exactly 124,439,808 parameters.
GPT_PRESETS: dict[str, GPTConfig] = {
    # CPU test sizes (hidden 32-64) and the README's CPU job.
    "tiny": GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=2, n_embd=32),
    "nano": GPTConfig(),
    # A larger CPU-sized preset for benchmarks (~4.8M parameters).
    "micro": GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=8, n_embd=256),
    # The widest CPU preset (~12.7M parameters, hidden 512): per-op framework costs (Python
    # dispatch) are a smaller share of its step than of nano's or micro's, as on real models.
    "milli": GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=8, n_embd=512),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT2),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT2),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, **_GPT2),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, **_GPT2),
}


def gpt_param_count(cfg: GPTConfig, *, include_embeddings: bool = True) -> int:
    """Closed-form parameter count of :class:`GPT` for ``cfg``.

    ``V D + T D`` embeddings, ``L`` blocks, the final LayerNorm, and ``D V`` for the head
    unless it is tied to the token embedding. With ``include_embeddings=False`` the token and
    position tables (and a tied head) are left out: that is the N of the 6N FLOPs rule.
    """
    d = cfg.n_embd
    blocks = cfg.n_layer * block_param_count(d, cfg.mlp_hidden, cfg.bias)
    final_norm = d + (d if cfg.bias else 0)
    head = 0 if cfg.tie_weights else d * cfg.vocab_size
    if not include_embeddings:
        return blocks + final_norm + head
    return cfg.vocab_size * d + cfg.block_size * d + blocks + final_norm + head


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx (B, T) int64) -> logits (B, T, V) float``.

    A pipeline stage that lacks the embeddings takes hidden states (B, T, D) as input instead,
    and one that lacks ``head`` returns hidden states (B, T, D).
    """

    #: The forward skips modules set to None, so PipelineStrategy can run it on stage views.
    pipeline_stage_views = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok_emb: nn.Embedding | None = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb: nn.Embedding | None = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleDict(
            {
                str(i): Block(c.n_embd, c.n_head, c.mlp_hidden, bias=c.bias, dropout=c.dropout, causal=True)
                for i in range(c.n_layer)
            }
        )
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.head: nn.Linear | None = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.reset_parameters()
        if c.tie_weights:
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation; residual output projections scaled by 1/sqrt(2 L)."""
        self.apply(init_weights)
        residual_std = 0.02 / (2 * self.config.n_layer) ** 0.5
        for block in self.blocks.values():
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) input hidden states."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}; "
                f"use shorter sequences or a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            x = self.embed(x)  # (B, T) -> (B, T, D)
        for block in self.blocks.values():
            x = block(x)  # (B, T, D)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.head is not None:
            x = self.head(x)  # (B, T, D) -> (B, T, V)
        return x

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); returns (B, T + new)."""
        return sample_tokens(self, idx, max_new_tokens, block_size=self.config.block_size, **kwargs)


@torch.no_grad()
def sample_tokens(
    forward: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Autoregressive sampling with any ``forward(idx (B, T)) -> logits (B, T, V)``.

    Taking the forward as a callable lets a strategy stand in for the model (a pipelined
    network broadcasts its logits to every stage in predict steps).
    """
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits = forward(context)[:, -1, :] / max(temperature, 1e-6)  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
