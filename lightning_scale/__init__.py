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


def _silence_third_party_noise() -> None:
    """Two deprecation warnings that third-party code raises on every run of the suite and that no
    user can act on (each matched by its exact message, nothing else is filtered):

    * torchdata's ``StatefulDataLoader`` (the suite's resumable loaders) calls
      ``torch.set_vital``, deprecated in torch: "'set_vital' is deprecated";
    * torch's pytree FutureWarning "isinstance(treespec, LeafSpec) is deprecated", raised from
      code paths inside torch's own export and pipelining while pickling tree specs."""
    import warnings

    warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


_silence_third_party_noise()

from lightning_scale import strategies  # noqa: E402,F401  (registers the strategies)
from lightning_scale.core.deferred_init import deferred  # noqa: E402,F401  (build a module on meta, materialize per rank)
