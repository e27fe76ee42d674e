"""Rank functions for the ZeroStrategy tests (run by lightning_scale.testing)."""

from __future__ import annotations

import math
import os

import torch

import _pipeline_targets as targets


def memory(zero: dict, steps: int = 2) -> dict:
    """Train a few steps; after the last optimizer step count this rank's model-state bytes."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from lightning_scale.core.memory import model_state_bytes
    from lightning_scale.strategies import ZeroStrategy

    out: dict = {}

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != steps:
                return
            engine = trainer.strategy.engine()
            extra = engine.held_tensors() if engine is not None else None
            # fairscale's OSS keeps the state in its partition's optimizer (``.optim``).
            optimizers = [getattr(o, "optim", o) for o in trainer.optimizers]
            out["counts"] = model_state_bytes(pl_module, optimizers, extra)
            from lightning_scale.callbacks._run_layout import predict_run

            out["predicted"] = predict_run(trainer, pl_module, batch)  # the memory planner, for this rank
            if engine is not None:
                out["psi_padded"] = engine.padded_numel()
                out["buckets"] = len(engine.specs)
            out["optimizer_devices"] = sorted({str(t.device) for o in optimizers for s in o.state.values()
                                               for t in s.values() if torch.is_tensor(t)})

    os.environ["PL_GLOBAL_SEED"] = "0"
    strategy = ZeroStrategy(**zero)
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Count()], limit_val_batches=0)
    task = targets._task()
    world = int(os.environ["WORLD_SIZE"])
    shapes = {id(p): tuple(p.shape) for p in task.parameters()}  # unique (tied once), before sharding
    out["psi"] = sum(math.prod(s) for s in shapes.values())
    # FSDP2 pads each parameter's dim 0 to a multiple of the world size.
    out["psi_fsdp"] = sum(math.ceil(s[0] / world) * world * math.prod(s[1:]) for s in shapes.values())
    out["n_params"] = len(shapes)
    trainer.fit(task, DataLoader(targets.make_data(64), batch_size=4, drop_last=True))
    return out


def zero_over_dtensor() -> None:
    """ZeroOptimizer on a tensor-parallel model: must raise before any collective."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_scale.core.sharding import ZeroConfig, ZeroOptimizer
    from lightning_scale.core.tensor_parallel import apply_tp, gpt_tp_plan
    from lightning_scale.models import GPT

    model = GPT(targets.CFG)
    apply_tp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))["tp"], gpt_tp_plan())
    ZeroOptimizer(model, torch.optim.AdamW(model.parameters()), dist.group.WORLD, ZeroConfig(stage=2))
