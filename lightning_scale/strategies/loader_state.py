"""Mid-epoch resume of stateful training loaders, working around Lightning issue #20550.

Lightning saves the state of training loaders that have ``state_dict``/``load_state_dict`` (such as
torchdata's ``StatefulDataLoader``, used by the suite's data modules) with the fit loop, and loads it
in ``FitLoop.setup_data``. But when ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (every warmup-cosine schedule does), ``setup_data`` runs
*before* the checkpoint is restored, the loaded state is never applied, and a run resumed from a
mid-epoch checkpoint silently replays the epoch's first batches
(https://github.com/Lightning-AI/pytorch-lightning/issues/20550, open at Lightning 2.6).

``apply_pending_loader_states`` runs at ``on_train_start`` (after restore, before the first batch):
if states are still pending it loads them and re-creates the fetcher's iterator, after setting the
sampler epoch the fit loop is about to set anyway (a stateful loader fast-forwards its sampler when
the iterator is created, so the permutation must already be the resumed epoch's).
"""

from __future__ import annotations

from typing import Any


def apply_pending_loader_states(trainer: Any) -> bool:
    """Load loader states the fit loop restored but did not apply; True if it did anything."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    loader = getattr(fit_loop, "_combined_loader", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if not states or loader is None or fetcher is None:
        return False
    epoch = fit_loop.epoch_progress.current.processed
    for dataloader in loader.flattened:
        _set_sampler_epoch(dataloader, epoch)
    loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []
    iter(fetcher)  # a fresh iterator that starts from the loaded position
    return True
