"""Loggers for scripts, with the same safe defaults as the ``lightning-scale`` CLI.

``wandb_logger(...)`` is Lightning's ``WandbLogger`` after
:func:`lightning_scale.utils.configure_offline_if_needed`: with no W&B credentials on the
machine (no ``WANDB_API_KEY``, no netrc entry, no ``WANDB_MODE``) the run logs offline to
``<save_dir>/wandb`` (``wandb sync`` uploads it later) instead of failing with "No API key
configured" on rank 0, which leaves the other ranks to die in their next collective::

    from lightning_scale.loggers import wandb_logger

    trainer = L.Trainer(strategy="zero2", devices=2, logger=wandb_logger(project="my-project"))

An explicit ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) always wins.
"""

from __future__ import annotations

from typing import Any

from lightning_scale.utils.wandb_offline import configure_offline_if_needed


def wandb_logger(**kwargs: Any) -> Any:
    """``lightning.pytorch.loggers.WandbLogger(**kwargs)``, offline when no credentials exist.
    Call it the same way on every rank (before ``Trainer``), as Lightning scripts do."""
    from lightning.pytorch.loggers import WandbLogger

    configure_offline_if_needed()
    logger = WandbLogger(**kwargs)
    drop_unset_anonymous(logger)
    return logger


def drop_unset_anonymous(logger: Any) -> None:
    """Lightning's WandbLogger always passes ``anonymous`` to ``wandb.init`` (None unless you set
    it), and wandb >= 0.31 warns "The anonymous setting has no effect" for any value: the key is
    dropped when it was not set (before the run starts; a no-op for other loggers)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", "set") is None:
        del init["anonymous"]
