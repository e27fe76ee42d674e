"""Rank targets for tests/test_zoo.py: fit a zoo module under a strategy given by its registered
name (as a user passes it to ``Trainer(strategy=...)``), and the single-process reference."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import zoo


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items() if torch.is_floating_point(v)}


def fit(shape: str, strategy: Any, steps: int, batch_size: int, strategy_kwargs: dict | None = None,
        loss_method: bool = False, summary: bool = False, validate: bool = False, ckpt_dir: str | None = None,
        ckpt_every: int | None = None, resume: str | None = None, samples: int | None = None,
        precision: str = "32-true", deferred: bool = False) -> dict:
    """Fit zoo ``shape`` for ``steps`` on this rank with ``strategy`` (a registered name, or a
    strategy class path with ``strategy_kwargs``); returns per-step losses and the weights."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    import lightning_scale  # noqa: F401  (registers the strategies by name)

    if strategy_kwargs is not None:
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry[strategy]
        strategy = entry["strategy"](**{**entry["init_params"], **strategy_kwargs})
    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    os.environ["PL_GLOBAL_SEED"] = "0"
    cls = zoo.with_loss_method(shape) if loss_method else zoo.ALL[shape]
    if deferred:  # built on the meta device; the strategy materializes this rank's part at setup
        from lightning_scale import deferred as build_deferred

        model = build_deferred(cls)
    else:
        model = cls()
    world = int(os.environ["WORLD_SIZE"])
    data = TensorDataset(*zoo.batches(shape, samples or steps * batch_size * world))
    callbacks: list = [Record()]
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=ckpt_every,
                                         save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
                        precision=precision,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=summary, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True),
                ckpt_path=resume)
    from lightning.pytorch.callbacks import ModelSummary

    summaries = [cb._summary(trainer, model) for cb in trainer.callbacks if isinstance(cb, ModelSummary)]
    out = {"losses": losses, "state": _state(model),
           "summary": [(s.total_parameters, s.in_sizes[:1], s.out_sizes[:1]) for s in summaries],
           "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
           "deferring": bool(getattr(trainer.strategy, "deferring", False))}
    if validate:
        val = TensorDataset(*zoo.batches(shape, VAL_SAMPLES, seed=2))
        out["val"] = {k: float(v) for k, v in trainer.validate(model, DataLoader(val, batch_size=batch_size), verbose=False)[0].items()}
    return out


VAL_SAMPLES = 16


def reference_validation(shape: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """val_acc and val_loss of ``state`` on the validation samples, plain PyTorch."""
    import torch.nn.functional as F

    model = zoo.SHAPES[shape]()
    if hasattr(model, "configure_model"):
        model.configure_model()
    model.load_state_dict(state, strict=False)
    x, y = zoo.batches(shape, VAL_SAMPLES, seed=2)
    with torch.no_grad():
        logits = model.model(x)
    return {"val_acc": float((logits.argmax(-1) == y).float().mean()), "val_loss": float(F.cross_entropy(logits, y))}


def reference(shape: str, steps: int, per_replica_batch: int, replicas: int, samples: int | None = None) -> dict:
    """One process, the same global batches (the replicas' shards together), plain PyTorch.

    Lightning gives each data-parallel replica ``DistributedSampler(shuffle=True, seed=0)`` for
    training (``PL_GLOBAL_SEED=0``), whatever the loader's own ``shuffle``: step k of the
    reference is the union of every replica's k-th batch. Each replica's loss is a mean over its
    batch of equal size, so the mean over the union is the mean of the replicas' losses."""
    from torch.utils.data import DistributedSampler

    model = zoo.ALL[shape]()
    if hasattr(model, "configure_model"):
        model.configure_model()
    optimizer = model.configure_optimizers()
    # The dataset ``fit`` builds: steps x batch x world samples (world = replicas x model-parallel ranks).
    x, y = zoo.batches(shape, samples or steps * per_replica_batch * replicas)
    order = [list(DistributedSampler(x, num_replicas=replicas, rank=r, shuffle=True, seed=0)) for r in range(replicas)]
    losses = []
    for step in range(steps):
        idx = torch.tensor([i for r in range(replicas) for i in order[r][step * per_replica_batch:(step + 1) * per_replica_batch]])
        batch = (x[idx], y[idx])
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "state": _state(model)}


def refusals(cases: list[tuple[str, str, dict | None]]) -> list[str]:
    """Fit each (shape, strategy, strategy_kwargs) in turn on this rank; returns each one's error
    message ("" if it trained). One process pair for every refusal case (each fails at setup)."""
    messages = []
    environ = dict(os.environ)
    for shape, strategy, kwargs in cases:
        os.environ.clear()
        os.environ.update(environ)  # a failed setup's teardown may have removed the launcher's variables
        try:
            fit(shape, strategy, 2, 4, kwargs)
            messages.append("")
        except Exception as err:  # the test asserts on the message
            messages.append(f"{type(err).__name__}: {err}")
    return messages
