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


def load_sharded(path: str) -> dict:
    """A meta GPT, FSDP2-sharded over 2 ranks while meta, filled from ``path``: this rank reads
    only its shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lightning_scale.core.fsdp import fully_shard_blocks
    from lightning_scale.core.pretrained import load_into

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    with torch.device("meta"):
        model = GPT(CFG)
    fully_shard_blocks(list(model.blocks.values()), [model], mesh)
    stats = load_into(model, path, "cpu")
    saved = torch.load(path, weights_only=True) if not path.endswith(("safetensors", "hf")) else None
    if saved is None:
        from safetensors.torch import load_file

        saved = load_file(path if path.endswith("safetensors") else f"{path}/model.safetensors")
    saved = saved.get("state_dict", saved)
    mismatched = [n for n, p in model.named_parameters() if not torch.equal(p.full_tensor(), saved[n])]
    local = sum(t.to_local().numel() for t in {id(p): p for p in model.parameters()}.values())
    local += sum(b.numel() for b in model.buffers() if not isinstance(b, DTensor))
    return {"mismatched": mismatched, "elements_read": stats.elements_read, "local": local}


def fit_from_weights(strategy: str, path: str, shape: str) -> dict:
    """A deferred zoo module under ``strategy`` with ``weights_from=path``: after setup (no step),
    this rank's tensors equal the file's."""
    import lightning as L
    from lightning.pytorch.strategies import StrategyRegistry
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    import zoo
    from lightning_scale import deferred

    entry = StrategyRegistry[strategy]
    strat = entry["strategy"](**{**entry["init_params"], "weights_from": path})
    model = deferred(zoo.ALL[shape])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strat, max_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(*zoo.batches(shape, 16)), batch_size=4))
    saved = torch.load(path, weights_only=True)
    held = {n: (p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()}
    return {"mismatched": [n for n, p in held.items() if not torch.equal(p, saved[n])], "held": len(held),
            "meta": [n for n, p in model.named_parameters() if p.is_meta]}
