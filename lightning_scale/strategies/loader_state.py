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


def saved_data_parallel_degree(checkpoint: dict[str, Any]) -> int | None:
    """The data-parallel degree of the run that wrote a suite checkpoint (None if not recorded)."""
    dims = (checkpoint.get("lightning_scale_layout") or {}).get("dims") or {}
    return dims.get("dp")


def resume_loaders_mid_epoch(
    trainer: Any, states: list[dict[str, Any]], saved_dp: int | None = None, dp: int | None = None
) -> bool:
    """Position the training loaders at the checkpoint's batch of the checkpoint's epoch.

    Returns True if it did (the checkpoint was taken mid-epoch), False otherwise. Raises
    ``ValueError`` when the checkpoint was taken mid-epoch with ``saved_dp`` data-parallel
    replicas and this run has another number, ``dp``: a loader's saved position is within its
    replica's shard of the data, and the shards change with the number of replicas.
    """
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop
    loader = getattr(fit_loop, "_combined_loader", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    fetched = fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch already drawn
    if loader is None or fetcher is None or not 0 < fetched < trainer.num_training_batches:
        return False
    if saved_dp is not None and dp is not None and saved_dp != dp:
        raise ValueError(
            f"this checkpoint was taken mid-epoch (after batch {fetched} of epoch "
            f"{fit_loop.epoch_progress.current.processed}) with {saved_dp} data-parallel replicas; this run has {dp}. "
            "Each replica's data-loader position is within its own shard of the data, and the shards change with "
            f"the number of replicas, so the epoch cannot be continued exactly. Resume with {saved_dp} data-parallel "
            "replicas, or from a checkpoint taken at the end of an epoch (those load into any layout)."
        )
    for dataloader in loader.flattened:
        _set_sampler_epoch(dataloader, fit_loop.epoch_progress.current.processed)
    loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []
    iter(fetcher)  # a fresh iterator starting from the loaded position
    return True
