"""Rank functions and helpers for tests/test_memory_callback.py (module level: the harness pickles
them by reference)."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from _pipeline_targets import _task, make_data


class ListLogger(Logger):
    """Keeps every ``log_metrics`` call (no files; ``save_dir`` None, so ``trainer.log_dir`` is the root dir)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def memory_rows(logger: ListLogger) -> list[tuple[int | None, dict[str, float]]]:
    return [(s, m) for s, m in logger.rows if any(k.startswith("memory/") for k in m)]


def fit_memory(kind: str, run_dir: str, steps: int = 3, batch: int = 4, sample_step: int = 1) -> dict:
    """Fit the suite's tiny GPT with MemoryAccountant on this rank; return its figures and the counts
    the test needs to compute the exact expectation independently."""
    import lightning as L

    from lightning_scale.callbacks import MemoryAccountant
    from lightning_scale.strategies import PipelineStrategy, ZeroStrategy

    os.environ["PL_GLOBAL_SEED"] = "0"
    strategy = {"ddp": lambda: "ddp", "zero2": lambda: ZeroStrategy(stage=2, bucket_mb=0.02),
                "pipeline": lambda: PipelineStrategy(stages=2, microbatches=2)}[kind]()
    accountant = MemoryAccountant(sample_step=sample_step)
    logger = ListLogger()
    task = _task()
    out: dict[str, Any] = {"psi": sum(p.numel() for p in task.parameters()), "n_params": len(list(task.parameters()))}
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=steps,
                        logger=logger, default_root_dir=run_dir, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[accountant])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, train_dataloaders=DataLoader(make_data(64), batch_size=batch, drop_last=True))
    if kind != "pipeline":  # the test's own measurement: forward + loss of a batch of the same shape
        from lightning_scale.core.activation_memory import HeldActivationMeter

        x, y = next(iter(DataLoader(make_data(64), batch_size=batch)))
        meter = HeldActivationMeter(exclude=[*task.parameters(), *task.buffers(), x, y])
        with meter:
            loss = task.loss_fn(task.model(x), y)
        out["expected_activations"] = meter.held(exclude=[loss])
    engine = getattr(trainer.strategy, "engine", lambda: None)()
    if engine is not None:
        out["psi_padded"] = engine.padded_numel()
        out["buckets"] = len(engine.specs)
    out.update(record=accountant.record, records=accountant.records, rows=memory_rows(logger),
               png=str(accountant.png_path) if accountant.png_path else None,
               warnings=[str(w.message) for w in caught if "MemoryAccountant" in str(w.message)],
               local_psi=sum(math.prod(p.shape) for p in task.parameters()))
    return out
