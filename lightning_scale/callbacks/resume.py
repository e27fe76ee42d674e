"""``ExactResume``: mid-epoch resume for strategies that are not the suite's own.

The suite's strategies (``MeshStrategy`` and subclasses) already re-position stateful training
loaders after a mid-epoch restore (see ``lightning_scale.strategies.loader_state`` for the two
Lightning defects this works around). With any other strategy (``"ddp"``, ``"fsdp"``, single
device) add this callback to get the same: a run resumed from a checkpoint taken at step k of an
epoch continues with batch k + 1 of that epoch, in the same order as the uninterrupted run.
Needs a training loader with ``state_dict``/``load_state_dict`` (the suite's data modules use
torchdata's ``StatefulDataLoader``); with a plain ``DataLoader`` it does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_scale.strategies.loader_state import resume_loaders_mid_epoch, saved_loader_states


class ExactResume(L.Callback):
    """Resume stateful training loaders at the checkpoint's batch (no effect on fresh runs)."""

    def __init__(self) -> None:
        self._states: list[dict[str, Any]] | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._states = saved_loader_states(checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_scale.strategies.base import MeshStrategy

        states, self._states = self._states, None
        if states and not isinstance(trainer.strategy, MeshStrategy):  # ours do it themselves
            resume_loaders_mid_epoch(trainer, states)
