"""Rank functions for Lightning-level PipelineStrategy tests (run by lightning_scale.testing)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scale.core.optim import OptimConfig, build_adamw, warmup_cosine
from lightning_scale.models import GPTConfig
from lightning_scale.tasks import LanguageModelingTask

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1)


def make_data(n: int = 256, seq: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(42)
    x = torch.randint(0, CFG.vocab_size, (n, seq), generator=g)
    y = torch.roll(x, -1, dims=1)
    return TensorDataset(x, y)


class _Recorder:
    def __init__(self):
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.adam: list[float | None] = []


# Constant learning rate: a run stopped early has the same schedule as the full run.
OPTIM_CONSTANT = OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1)


def _task(seed: int = 0, constant_lr: bool = False, sample_tokens: int = 0) -> LanguageModelingTask:
    torch.manual_seed(seed)
    return LanguageModelingTask(model=CFG, optim=OPTIM_CONSTANT if constant_lr else OPTIM, sample_tokens=sample_tokens,
                                sample_prompt="12")  # bytes 49, 50: inside the tiny vocabulary of 64


def fit(strategy_kwargs: dict, steps: int, batch_size: int, accumulate: int = 1, clip: float | None = None,
        precision: str = "32-true", ckpt_dir: str | None = None, resume: str | None = None,
        n_samples: int = 256, save_to: str | None = None, constant_lr: bool = False,
        max_epochs: int | None = None, every_n_train_steps: int | None = None,
        stateful_loader: bool = False, exact_resume_callback: bool = False, sample_tokens: int = 0,
        validate: bool = False) -> dict:
    """Train with PipelineStrategy on this rank; returns per-step losses and this rank's weights.
    ``validate``: then run ``trainer.validate`` on :func:`val_data` (metrics under ``"val"``)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_scale.strategies import PipelineStrategy

    rec = _Recorder()

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec.losses.append(float(outputs["loss"]) * accumulate)
            opt = trainer.optimizers[0]
            rec.lrs.append(opt.param_groups[0]["lr"])
            first = next(iter(opt.state.values()), {})
            rec.adam.append(float(first["exp_avg"].norm()) if "exp_avg" in first else None)

    # Lightning seeds the training DistributedSampler with PL_GLOBAL_SEED; the reference uses 0.
    os.environ["PL_GLOBAL_SEED"] = "0"
    if strategy_kwargs.pop("three_d", False):
        from lightning_scale.strategies import Parallel3DStrategy

        strategy = Parallel3DStrategy(**strategy_kwargs)
    elif strategy_kwargs.pop("tensor", False):
        from lightning_scale.strategies import TensorParallelStrategy

        strategy = TensorParallelStrategy(**strategy_kwargs)
    elif strategy_kwargs.pop("ddp", False):
        strategy = "ddp"
    elif strategy_kwargs.pop("mesh", False):
        from lightning_scale.strategies import MeshStrategy

        strategy = MeshStrategy(**strategy_kwargs)
    elif strategy_kwargs.pop("zero", False):
        from lightning_scale.strategies import ZeroStrategy

        strategy = ZeroStrategy(**strategy_kwargs)
    else:
        strategy = PipelineStrategy(**strategy_kwargs)
    callbacks = [Record()]
    if exact_resume_callback:
        from lightning_scale.callbacks import ExactResume

        callbacks.append(ExactResume())
    if ckpt_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint

        if every_n_train_steps:
            # Mid-epoch checkpoints: exact resume needs a loader with state_dict (stateful_loader=True).
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every_n_train_steps,
                                             save_top_k=-1))
        else:
            # One checkpoint at the end of every epoch (resume then starts a fresh epoch).
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy=strategy,
        max_steps=-1 if max_epochs else steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        precision=precision,
        logger=False,
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    task = _task(constant_lr=constant_lr, sample_tokens=sample_tokens)
    if stateful_loader:
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(make_data(n_samples), batch_size=batch_size, shuffle=False, drop_last=True)
    else:
        loader = DataLoader(make_data(n_samples), batch_size=batch_size, shuffle=False, drop_last=True)
    trainer.fit(task, train_dataloaders=loader, ckpt_path=resume)
    if save_to:
        trainer.save_checkpoint(save_to)
    from torch.distributed.tensor import DTensor

    # DTensor (tensor-parallel) weights are gathered to full tensors: a collective, same order on every rank.
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in task.state_dict().items()}
    # Elements of parameters and optimizer state this rank holds (DTensors: their local shards).
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    held = {"params": sum(local(p).numel() for p in task.parameters()), "params_full": sum(p.numel() for p in task.parameters()),
            "optim": sum(local(v).numel() for st in trainer.optimizers[0].state.values() for v in st.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)}
    from lightning_scale.callbacks._run_layout import predict_run
    from lightning_scale.core.activation_checkpointing import checkpointed_modules
    from lightning_scale.callbacks.memory import model_state_sources
    from lightning_scale.core.memory import model_state_bytes

    # Model-state bytes this rank holds after the last step (grads of that step still present),
    # counted as MemoryAccountant counts them, and the memory planner's prediction for this rank.
    counts = model_state_bytes(task, *model_state_sources(trainer))
    state_bytes = {c: sum(v.values()) for c, v in counts.items()}
    predicted = predict_run(trainer, task, (torch.zeros(batch_size, 16, dtype=torch.long),))
    val_metrics = None
    if validate:  # after the counts above: validate() drops the last step's gradients
        trainer.limit_val_batches = 1.0  # fit ran without validation (limit 0)
        val_metrics = trainer.validate(task, dataloaders=DataLoader(val_data(), batch_size=VAL_BATCH), verbose=False)[0]

    from torch._dynamo.utils import counters

    return {"losses": rec.losses, "lrs": rec.lrs, "adam": rec.adam, "state": state, "global_step": trainer.global_step,
            "held": held, "checkpointed": checkpointed_modules(task.model), "state_bytes": state_bytes,
            "compiled_graphs": counters["stats"]["unique_graphs"],  # graphs torch.compile built on this rank
            "predicted": predicted, "sample": getattr(task, "last_sample", None),
            "sample_losses": getattr(strategy, "_test_probe", None), "val": val_metrics}


VAL_BATCH = 8


def val_data() -> TensorDataset:
    """48 sequences: 6 batches of 8, or 3 per data-parallel rank of 2 (no sampler padding)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, CFG.vocab_size, (48, 16), generator=g)
    return TensorDataset(x, torch.roll(x, -1, dims=1))


def reference_val_metrics(state: dict) -> dict:
    """One process, the trained weights ``state``: the same metrics computed by torchmetrics."""
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.text import Perplexity

    task = _task()
    task.load_state_dict(state)
    model = task.model.eval()
    acc, ppl = MulticlassAccuracy(num_classes=CFG.vocab_size, average="micro"), Perplexity()
    losses = []
    with torch.no_grad():
        for x, y in DataLoader(val_data(), batch_size=VAL_BATCH):
            logits = model(x)
            losses.append(task.loss_fn(logits, y).item())
            acc.update(logits.flatten(0, 1), y.flatten())
            ppl.update(logits, y)
    return {"val/loss": sum(losses) / len(losses), "val/token_acc": acc.compute().item(),
            "val/perplexity": ppl.compute().item()}


def reference(steps: int, per_replica_batch: int, replicas: int, microbatches: int, accumulate: int = 1,
              clip: float | None = None) -> dict:
    """Single process: the same global batches, as replicas x microbatches accumulated chunks."""
    task = _task()
    model = task.model
    opt = build_adamw(model, OPTIM)
    total = steps  # Lightning's estimated_stepping_batches = max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(OPTIM, total))
    data = make_data()
    # Lightning injects DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED or 0) for training.
    from torch.utils.data import DistributedSampler

    per_replica = [torch.tensor(list(DistributedSampler(data, num_replicas=replicas, rank=r, shuffle=True, seed=0))) for r in range(replicas)]
    losses = []
    batch_index = 0
    for _ in range(steps):
        opt.zero_grad()
        for _a in range(accumulate):
            step_loss = 0.0
            for r in range(replicas):
                idx = per_replica[r][batch_index * per_replica_batch : (batch_index + 1) * per_replica_batch]
                x, y = data.tensors[0][idx], data.tensors[1][idx]
                for xc, yc in zip(x.chunk(microbatches), y.chunk(microbatches)):
                    loss = task.loss_fn(model(xc), yc) / (microbatches * replicas * accumulate)
                    loss.backward()
                    step_loss += loss.item() * accumulate
            losses.append(step_loss)
            batch_index += 1
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
    state = {k: v.detach().clone() for k, v in task.state_dict().items()}
    return {"losses": losses, "state": state}


def _trainer(strategy, **kwargs):
    import lightning as L

    os.environ["PL_GLOBAL_SEED"] = "0"
    return L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def evaluate_and_predict(strategy_kwargs: dict, prompts: torch.Tensor, new_tokens: int) -> dict:
    """validate() metrics and predict() samples of the untrained model under the strategy."""
    from lightning_scale.strategies import PipelineStrategy

    task = LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=new_tokens, seed=7)
    torch.manual_seed(0)
    task.model.reset_parameters()
    trainer = _trainer(PipelineStrategy(**strategy_kwargs))
    val = DataLoader(make_data(64), batch_size=8, shuffle=False)
    metrics = trainer.validate(task, dataloaders=val, verbose=False)[0]
    preds = trainer.predict(task, dataloaders=DataLoader(TensorDataset(prompts), batch_size=len(prompts)))
    return {"metrics": metrics, "preds": torch.cat([p for p in preds]) if preds else None,
            "stage_modules": len(list(task.model.blocks.keys()))}


def reference_evaluate_and_predict(prompts: torch.Tensor, new_tokens: int) -> dict:
    from lightning_scale.models.gpt import sample_tokens

    task = LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=new_tokens, seed=7)
    torch.manual_seed(0)
    task.model.reset_parameters()
    model = task.model.eval()
    data = make_data(64)
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for i in range(0, 64, 8):
            x, y = data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]
            logits = model(x)
            losses.append(task.loss_fn(logits, y).item())
            correct += (logits.argmax(-1) == y).sum().item()
            total += y.numel()
        gen = torch.Generator().manual_seed(7)
        preds = sample_tokens(model, prompts, new_tokens, block_size=CFG.block_size, top_k=50, generator=gen)
    return {"val/loss": sum(losses) / len(losses), "val/token_acc": correct / total, "preds": preds}


def timeline_run(png: str, schedule: str = "1f1b") -> dict:
    from lightning_scale.strategies import PipelineStrategy

    strategy = PipelineStrategy(stages=2, schedule=schedule, microbatches=4, timeline_step=2, timeline_path=png,
                                virtual_stages=2 if schedule == "interleaved_1f1b" else None)
    trainer = _trainer(strategy, max_steps=3, limit_val_batches=0)
    trainer.fit(_task(), train_dataloaders=DataLoader(make_data(64), batch_size=8, drop_last=True))
    events = [(e.kind, e.microbatch, e.stage) for e in strategy.runtime.timeline]
    return {"png": str(strategy.last_timeline_png) if strategy.last_timeline_png else None, "events": events}


def balance_by_time(example_batch: int) -> list[list[str]]:
    from lightning_scale.strategies import PipelineStrategy

    task = _task()
    task.example_input_array = torch.zeros(example_batch, 16, dtype=torch.long)
    strategy = PipelineStrategy(stages=2, microbatches=2, balance="time")
    trainer = _trainer(strategy, max_steps=1, limit_val_batches=0)
    trainer.fit(task, train_dataloaders=DataLoader(make_data(16), batch_size=4, drop_last=True))
    return strategy.runtime.plan.stage_keys
