"""Rank functions of ``tests/test_deferred_init.py`` (run by ``lightning_scale.testing``)."""

from __future__ import annotations

import torch

from lightning_scale.core.deferred_init import materialize, record_init
from lightning_scale.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def sharded_materialize(layout: str) -> dict:
    """Build the GPT on meta, shard it (FSDP2 over 2 ranks, or TP over 2 ranks) while meta, then
    materialize: every rank holds only its shards, and the full tensors equal eager construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    torch.manual_seed(0)
    eager = GPT(CFG)
    torch.manual_seed(0)
    model = record_init(GPT, CFG)
    if layout == "fsdp2":
        from lightning_scale.core.fsdp import fully_shard_blocks

        fully_shard_blocks(list(model.blocks.values()), [model], mesh)
    else:
        from lightning_scale.core.tensor_parallel import apply_tp, gpt_tp_plan

        apply_tp(model, mesh, gpt_tp_plan(), src_data_rank=None, replicate_rest=True)
    stats = materialize(model, "cpu")
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    mismatched = [name for name, p in model.named_parameters()
                  if not torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, eager.get_parameter(name))]
    return {"mismatched": mismatched, "local_numel": local, "tensors": stats.tensors,
            "all_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
            "total_numel": sum(p.numel() for p in eager.parameters())}


def fit_unbuildable(strategy: str) -> None:
    """configure_model whose construction reads a value: refused under deferred_init=True."""
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_scale  # noqa: F401  (registers the strategies by name)
    from lightning.pytorch.strategies import StrategyRegistry

    class Unbuildable(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:
            self.model = nn.Linear(4, 4)
            self.scale = float(self.model.weight.norm())  # reads a value: meta tensors have none

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    entry = StrategyRegistry[strategy]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=entry["strategy"](**{**entry["init_params"], "deferred_init": True}),
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Unbuildable(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2))
