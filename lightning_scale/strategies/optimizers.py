"""Lightning's optimizer wrapper, unwrapped in one place."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.optim import Optimizer


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside a ``LightningOptimizer`` (what ``self.optimizers()``
    returns in a LightningModule), or ``optimizer`` itself."""
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
