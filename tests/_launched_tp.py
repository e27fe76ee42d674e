"""Launched as a user launches a script (``python _launched_tp.py``; Lightning starts the second
rank): GPT-2 at TP = 2 for 4 steps, then each rank's intra-op thread count and the largest
difference between the TP ranks' replicated parameters, printed by rank 0."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import _hf_targets as targets
from lightning_scale.strategies import TensorParallelStrategy


class Task(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = targets._family_model("gpt2")

    def training_step(self, batch, batch_idx):
        return targets._loss(self.model(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TensorParallelStrategy(tensor_parallel_size=2),
                        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    task = Task()
    trainer.fit(task, DataLoader(targets._family_data("gpt2"), batch_size=8))
    threads = [0, 0]
    dist.all_gather_object(threads, torch.get_num_threads())
    worst = 0.0
    for _, p in task.named_parameters():
        if all(pl.is_replicate() for pl in p.placements):
            both = [torch.empty_like(p.to_local()) for _ in range(2)]
            dist.all_gather(both, p.to_local().detach().contiguous())
            worst = max(worst, (both[0] - both[1]).abs().max().item())
    if trainer.is_global_zero:
        print(f"launched tp: threads {threads} replicated difference {worst}")


if __name__ == "__main__":
    main()
