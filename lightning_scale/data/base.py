"""What the suite's offline data modules share: argument checks, the loader, the replica count."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader


def check_loader_args(batch_size: int, val_fraction: float, num_workers: int, val_example: str) -> None:
    """Errors naming the fix for the arguments every data module takes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (examples per batch, per device); got {batch_size!r}.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1 ({val_example}); got {val_fraction!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 (0 loads in the main process); got {num_workers!r}.")


class OfflineDataModule(L.LightningDataModule):
    """Base of the text and image modules. Subclasses set ``batch_size``, ``num_workers``,
    ``pin_memory``, ``seed``, ``train_dataset`` and ``val_dataset`` (in ``setup``)."""

    batch_size: int
    num_workers: int
    pin_memory: bool
    seed: int
    train_dataset: Any = None
    val_dataset: Any = None

    def _require_setup(self) -> tuple[Any, Any]:
        if self.train_dataset is None or self.val_dataset is None:
            self.setup()
        assert self.train_dataset is not None and self.val_dataset is not None
        return self.train_dataset, self.val_dataset

    def _data_replicas(self) -> int:
        """How many ways the training data is split: the data-parallel size, which under pipeline
        or tensor parallelism is smaller than the world size."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas") or getattr(trainer, "world_size", 1) or 1)

    def _loader(self, dataset: Dataset[Any], shuffle: bool, drop_last: bool) -> DataLoader[Any]:
        # torchdata's StatefulDataLoader (a DataLoader subclass) has state_dict/load_state_dict, which
        # Lightning saves with the fit loop: a run resumed from a mid-epoch checkpoint continues with
        # the next unseen batch of the same epoch instead of restarting the epoch.
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )
