"""Rank functions for the vision task's metric tests (run by lightning_scale.testing)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scale.core.optim import OptimConfig
from lightning_scale.models import ViTConfig
from lightning_scale.tasks import ImageClassificationTask

# 8x8 single-channel images, 4 patches of 4x4 + [CLS] = 5 tokens; 4 heads and MLP 128 divide by tp=2.
CFG = ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=10, n_layer=4, n_head=4, n_embd=32)
N, BATCH = 48, 8  # 6 batches, or 3 per data-parallel rank of 2 (no sampler padding)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g))


def _task() -> ImageClassificationTask:
    torch.manual_seed(0)
    return ImageClassificationTask(model=CFG, optim=OptimConfig(lr=1e-3, warmup_steps=0))


def validate(kind: str) -> dict:
    """``trainer.validate`` of the seeded, untrained ViT under a strategy; the logged metrics."""
    import lightning as L

    from lightning_scale.strategies import PipelineStrategy, TensorParallelStrategy

    os.environ["PL_GLOBAL_SEED"] = "0"
    strategy = {"pipeline": lambda: PipelineStrategy(stages=2, microbatches=2),
                "tensor_parallel": lambda: TensorParallelStrategy(tensor_parallel_size=2)}[kind]()
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(_task(), dataloaders=DataLoader(data(), batch_size=BATCH), verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}


def reference() -> dict:
    """One process: top-1 accuracy with torchmetrics and the mean batch loss."""
    from torchmetrics.classification import MulticlassAccuracy

    task = _task()
    model = task.model.eval()
    acc, losses = MulticlassAccuracy(num_classes=10, average="micro"), []
    with torch.no_grad():
        for x, y in DataLoader(data(), batch_size=BATCH):
            logits = model(x)
            losses.append(task.loss_fn(logits, y).item())
            acc.update(logits, y)
    return {"val/acc": acc.compute().item(), "val/loss": sum(losses) / len(losses)}
