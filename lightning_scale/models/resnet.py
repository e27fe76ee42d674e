"""A small ResNet (He et al. 2016, arXiv 1512.03385; the CIFAR variant of section 4.2), torch only.

Layout::

    stem     Conv3x3(C, w) + BatchNorm + ReLU
    blocks   ModuleDict{"0".."3n-1"}: n BasicBlocks per stage at widths w, 2w, 4w; the first
             block of stages 2 and 3 halves the resolution (stride 2, 1x1 projection shortcut)
    head     global average pool + Linear(4w, num_classes)

ResNet-20/32/56 of the paper are ``blocks_per_stage`` 3/5/9 with ``width`` 16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ResNetConfig:
    """Shape of a CIFAR-style ResNet. Defaults: ResNet-8 at width 16 for 8x8 digits."""

    in_channels: int = 1  # C
    num_classes: int = 10
    width: int = 16  # w: channels of the first stage; stages use w, 2w, 4w
    blocks_per_stage: int = 1  # n: depth = 6 n + 2

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "width", "blocks_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNetConfig.{name} must be a positive integer, got {value!r}")

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ResNetConfig:
        if name not in RESNET_PRESETS:
            raise ValueError(f"unknown ResNet preset {name!r}; choose one of {sorted(RESNET_PRESETS)}")
        return replace(RESNET_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet8-digits": ResNetConfig(),
    "resnet20": ResNetConfig(in_channels=3, blocks_per_stage=3),
    "resnet56": ResNetConfig(in_channels=3, blocks_per_stage=9),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ClassifierHead(nn.Module):
    """(B, C, H, W) -> global average pool -> (B, C) -> Linear -> (B, num_classes)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """``forward(images (B, C, H, W)) -> logits (B, num_classes)``."""

    #: The forward skips modules set to None, so PipelineStrategy can run it on stage views.
    pipeline_stage_views = True

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        w, n = config.width, config.blocks_per_stage
        self.stem: nn.Module | None = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        blocks: dict[str, nn.Module] = {}
        c_in = w
        for stage, c_out in enumerate((w, 2 * w, 4 * w)):
            for j in range(n):
                stride = 2 if (stage > 0 and j == 0) else 1
                blocks[str(len(blocks))] = BasicBlock(c_in, c_out, stride)
                c_in = c_out
        self.blocks = nn.ModuleDict(blocks)
        self.head: ClassifierHead | None = ClassifierHead(4 * w, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


def resnet_param_count(cfg: ResNetConfig) -> int:
    """Closed-form parameter count of :class:`ResNet` (BatchNorm: 2 parameters per channel)."""
    w, n, k = cfg.width, cfg.blocks_per_stage, 9  # k: 3x3 kernel
    total = cfg.in_channels * w * k + 2 * w  # stem conv + BN
    c_in = w
    for stage, c_out in enumerate((w, 2 * w, 4 * w)):
        for j in range(n):
            total += c_in * c_out * k + 2 * c_out + c_out * c_out * k + 2 * c_out
            if (stage > 0 and j == 0) or c_in != c_out:
                total += c_in * c_out + 2 * c_out  # 1x1 projection + BN
            c_in = c_out
    return total + 4 * w * cfg.num_classes + cfg.num_classes
