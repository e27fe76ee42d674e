"""lightning_scale: large-model training strategies and callbacks for PyTorch Lightning.

Importing the package registers the suite's strategies with Lightning by name
(``Trainer(strategy="pipeline")``) and allows its config dataclasses in ``weights_only``
checkpoint loading.
"""

__version__ = "0.1.0"


def _allow_configs_in_checkpoints() -> None:
    import torch

    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.core.pipeline import PipelineConfig
    from lightning_scale.models import GPTConfig, ResNetConfig, ViTConfig

    torch.serialization.add_safe_globals([GPTConfig, ViTConfig, ResNetConfig, OptimConfig, PipelineConfig])


_allow_configs_in_checkpoints()

from lightning_scale import strategies  # noqa: E402,F401  (registers the strategies)
