"""Exact mid-epoch resume of stateful training loaders under Lightning 2.5/2.6.

Lightning saves the state of training loaders that implement ``state_dict``/``load_state_dict``
(torchdata's ``StatefulDataLoader``, used by the suite's data modules) with the fit loop, and loads
it in ``FitLoop.setup_data`` just before creating the epoch's iterator. Two things go wrong there,
both measured here (tests/test_pipeline.py::test_mid_epoch_resume_is_exact):

1. When ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every warmup-cosine
   schedule does), ``setup_data`` runs before the checkpoint is restored, so the state is never
   loaded and the resumed run replays the epoch's first batches
   (https://github.com/Lightning-AI/pytorch-lightning/issues/20550, open at Lightning 2.6).
2. The iterator is created before the fit loop calls ``sampler.set_epoch(epoch)``; a stateful
   loader fast-forwards its sampler when the iterator is created, so in any epoch after the first
   it skips ahead in epoch 0's permutation instead of the resumed epoch's.

``resume_loaders_mid_epoch`` runs at ``on_train_start`` (after restore, before the first batch of
the resumed epoch): it sets the sampler epoch, loads the states saved in the checkpoint and
re-creates the fetcher's iterator. It acts only when the checkpoint was taken mid-epoch; at an
epoch boundary Lightning starts the next epoch with a fresh iterator, which is already right.
"""

from __future__ import annotations

from typing import Any


def saved_loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The training-loader states Lightning stored in a checkpoint's fit-loop state, if any."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    return (fit_loop.get("state_dict") or {}).get("combined_loader") or None


def resume_loaders_mid_epoch(trainer: Any, states: list[dict[str, Any]]) -> bool:
    """Position the training loaders at the checkpoint's batch of the checkpoint's epoch.

    Returns True if it did (the checkpoint was taken mid-epoch), False otherwise.
    """
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop
    loader = getattr(fit_loop, "_combined_loader", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    fetched = fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch already drawn
    if loader is None or fetcher is None or not 0 < fetched < trainer.num_training_batches:
        return False
    for dataloader in loader.flattened:
        _set_sampler_epoch(dataloader, fit_loop.epoch_progress.current.processed)
    loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []
    iter(fetcher)  # a fresh iterator starting from the loaded position
    return True
