"""Framework-independent models (torch only) with typed configs and presets."""

from lightning_scale.models.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_param_count
from lightning_scale.models.resnet import RESNET_PRESETS, ResNet, ResNetConfig, resnet_param_count
from lightning_scale.models.transformer import Block, block_param_count
from lightning_scale.models.vit import VIT_PRESETS, ViT, ViTConfig, vit_param_count

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "gpt_param_count",
    "ViT", "ViTConfig", "VIT_PRESETS", "vit_param_count",
    "ResNet", "ResNetConfig", "RESNET_PRESETS", "resnet_param_count",
    "Block", "block_param_count",
]
