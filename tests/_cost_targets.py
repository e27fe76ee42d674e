"""Rank functions and helpers for the CostReporter tests."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader

import _pipeline_targets as targets


def make_logger():
    from lightning.pytorch.loggers import Logger

    class _L(Logger):
        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self):
            return "list"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    return _L()


def fit_cost(run_dir: str, steps: int, *, cost_kwargs: dict | None = None, ckpt_path: str | None = None,
             save_to: str | None = None, devices: int | None = None, strategy: Any = "auto") -> dict:
    """Fit the tiny GPT with CostReporter; return its report, logged rows and segments."""
    import lightning as L

    from lightning_scale.callbacks import CostReporter

    os.environ["PL_GLOBAL_SEED"] = "0"
    cost = CostReporter(log_every_n_steps=1, **(cost_kwargs or {}))
    logger = make_logger()
    trainer = L.Trainer(accelerator="cpu", devices=devices or int(os.environ.get("WORLD_SIZE", 1)), strategy=strategy,
                        max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[cost], default_root_dir=run_dir)
    trainer.fit(targets._task(), DataLoader(targets.make_data(64), batch_size=4, drop_last=True), ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return {"report": cost.report, "rows": logger.rows, "segments": cost.segments, "rank": trainer.global_rank,
            "projections": [p.gpu for p in cost.projections], "png": str(cost.png_path) if cost.png_path else None}
