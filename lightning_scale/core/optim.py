"""Optimizer and learning-rate schedule construction shared by the tasks (torch only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (the GPT-2/3 recipe)."""

    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr after cosine decay
    warmup_steps: int = 20  # optimizer steps of linear warm-up from 0
    weight_decay: float = 0.1  # decoupled, applied to matrices only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for tensors with >= 2 dims (weights), none for biases and norms.

    Tied parameters appear once (``named_parameters`` de-duplicates them). Parameters whose
    ``requires_grad`` is False are left out.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def warmup_cosine(cfg: OptimConfig, total_steps: int):
    """lr multiplier for step s: s / warmup during warm-up, then cosine from 1 to min_lr_ratio."""
    total = max(total_steps, cfg.warmup_steps + 1)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def adamw_warmup_cosine(model: nn.Module, cfg: OptimConfig, total_steps: int) -> dict:
    """AdamW plus its per-step LambdaLR schedule, in Lightning's ``configure_optimizers`` dict form."""
    optimizer = build_adamw(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
