"""A Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929) classifier, torch only.

Layout (stable parameter names)::

    embed    PatchEmbedding: Conv2d(C, D, P, stride=P) patches + [CLS] token + learned positions
    blocks   ModuleDict{"0".."L-1"} of the same pre-LN Block as GPT (bidirectional attention)
    ln_f     LayerNorm(D)
    head     Linear(D, num_classes) on the [CLS] token

As in :mod:`lightning_scale.models.gpt`, any top-level module may be ``None`` on a pipeline
stage that does not own it, and ``blocks`` keeps its names when entries are deleted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_scale.models.transformer import Block, block_param_count, init_weights


@dataclass
class ViTConfig:
    """Shape of a ViT. Defaults fit scikit-learn's 8x8 digits (``"digits"`` preset)."""

    image_size: int = 8  # input height = width, pixels
    patch_size: int = 2  # P: patch side, pixels; must divide image_size
    in_channels: int = 1  # C: 1 for grayscale digits, 3 for RGB
    num_classes: int = 10
    n_layer: int = 4  # L
    n_head: int = 4  # H
    n_embd: int = 64  # D; must be divisible by n_head
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"ViTConfig: image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size}); pick a patch_size that divides the image size"
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"ViTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"choose n_head from the divisors of {self.n_embd}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens per image: patches plus the [CLS] token."""
        return self.num_patches + 1

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViTConfig:
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
        return replace(VIT_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Named shapes. ViT-B/16 and ViT-L/16 follow the ViT paper (86M / 304M parameters at 224 px).
VIT_PRESETS: dict[str, ViTConfig] = {
    "digits": ViTConfig(),
    "cifar-small": ViTConfig(image_size=32, patch_size=4, in_channels=3, n_layer=6, n_head=8, n_embd=256),
    "vit-b16": ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, n_layer=12, n_head=12, n_embd=768),
    "vit-l16": ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, n_layer=24, n_head=16, n_embd=1024),
}


def vit_param_count(cfg: ViTConfig) -> int:
    """Closed-form parameter count of :class:`ViT`."""
    d, p, c = cfg.n_embd, cfg.patch_size, cfg.in_channels
    embed = d * c * p * p + d + d + cfg.seq_len * d  # conv weight + conv bias + [CLS] + positions
    blocks = cfg.n_layer * block_param_count(d, cfg.mlp_hidden, cfg.bias)
    final_norm = d + (d if cfg.bias else 0)
    head = d * cfg.num_classes + cfg.num_classes
    return embed + blocks + final_norm + head


class PatchEmbedding(nn.Module):
    """(B, C, S, S) images -> (B, 1 + (S/P)^2, D) tokens: patches, [CLS] first, plus positions."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images)  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_emb  # (B, N + 1, D)
        return self.drop(x)


class ViT(nn.Module):
    """``forward(images (B, C, S, S)) -> logits (B, num_classes)``."""

    #: The forward skips modules set to None, so PipelineStrategy can run it on stage views.
    pipeline_stage_views = True

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed: PatchEmbedding | None = PatchEmbedding(c)
        self.blocks = nn.ModuleDict(
            {
                str(i): Block(c.n_embd, c.n_head, c.mlp_hidden, bias=c.bias, dropout=c.dropout, causal=False)
                for i in range(c.n_layer)
            }
        )
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.head: nn.Linear | None = nn.Linear(c.n_embd, c.num_classes)
        for name, module in self.named_modules():
            if name != "embed" and not name.startswith("embed."):
                init_weights(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (B, C, S, S) -> (B, N + 1, D)
        for block in self.blocks.values():
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.head is not None:
            x = self.head(x[:, 0])  # [CLS] token (B, D) -> (B, num_classes)
        return x
