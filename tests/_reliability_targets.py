"""Rank functions of ``tests/test_reliability.py`` (run by ``lightning_scale.testing``).

One training function, :func:`train`, under every strategy of the reliability suite, with:

* a checkpoint every ``every`` optimizer steps (mid-epoch: the loader is a ``StatefulDataLoader``);
* optionally a *kill*: one rank sends itself SIGKILL (or SIGSTOP: a hung rank) in the middle of
  an optimizer step (inside a module's forward, while its peers are in the same step's
  collectives), after writing the time to ``<log_dir>/killed.json``;
* each step's loss appended to ``<log_dir>/rank<r>.<tag>.jsonl`` as it happens, so the losses a
  run produced before it was killed can be read back by the test.

A kill test is two launches: :func:`train` with a kill, then :func:`reference_then_resume`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import _pipeline_targets as base
from lightning_scale.models import GPTConfig
from lightning_scale.tasks import LanguageModelingTask

# The test GPT of the parity tests with 2 blocks instead of 4 (one per pipeline stage): tensor
# parallelism's per-op overhead dominates a step on CPU, so fewer layers make every launch faster.
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)

# Collective timeout given to every strategy (``timeout=``): a survivor blocked on a peer that is
# gone errors after at most this long instead of the 30-minute default.
COLLECTIVE_TIMEOUT_S = 20.0

# World size of each strategy under test, and what one rank sees of the global batch.
WORLD = {"ddp": 2, "pipeline": 2, "tensor_parallel": 2, "parallel_3d": 4, "zero3": 2, "single": 1}
GLOBAL_BATCH = 8
N_SAMPLES = 128  # 16 global batches per epoch: every checkpoint of the tests is mid-epoch


def make_strategy(name: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Any:
    """The strategy ``name`` with collective timeout ``timeout_s`` (seconds)."""
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_scale.strategies import (
        MeshStrategy,
        Parallel3DStrategy,
        PipelineStrategy,
        TensorParallelStrategy,
        ZeroStrategy,
    )

    timeout = timedelta(seconds=timeout_s)
    if name == "ddp":
        return DDPStrategy(timeout=timeout)
    if name == "pipeline":
        return PipelineStrategy(stages=2, schedule="1f1b", microbatches=2, timeout=timeout)
    if name == "tensor_parallel":
        return TensorParallelStrategy(tensor_parallel_size=2, timeout=timeout)
    if name == "parallel_3d":
        return Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=2, timeout=timeout)
    if name == "zero3":
        return ZeroStrategy(stage=3, timeout=timeout)
    if name == "single":
        return MeshStrategy(timeout=timeout)
    raise ValueError(f"unknown strategy {name!r}")


def per_rank_batch(name: str) -> int:
    """Per-rank batch that keeps the global batch at GLOBAL_BATCH sequences (dp replicas x batch)."""
    data_parallel = {"ddp": 2, "zero3": 2}.get(name, 1)
    return GLOBAL_BATCH // data_parallel


class _KillMidStep:
    """Global forward pre-hook: send this process ``sig`` at the ``nth`` module forward of the
    training step that starts at global step ``at``."""

    def __init__(self, trainer_ref: list, at: int, stamp: str, sig: int = signal.SIGKILL, nth: int = 3) -> None:
        self.trainer_ref, self.at, self.stamp, self.sig, self.nth = trainer_ref, at, stamp, sig, nth
        self.calls = 0

    def __call__(self, module, args) -> None:
        trainer = self.trainer_ref[0] if self.trainer_ref else None
        if trainer is None or not trainer.training or trainer.global_step != self.at:
            return
        self.calls += 1
        if self.calls == self.nth:
            Path(self.stamp).write_text(json.dumps({"time": time.time(), "step": self.at,
                                                    "rank": int(os.environ["RANK"])}))
            os.kill(os.getpid(), self.sig)


def train(strategy: str, steps: int, *, tag: str, log_dir: str, ckpt_dir: str | None = None, every: int = 0,
          resume: str | None = None, kill: tuple[int, int] | None = None, signal_name: str = "SIGKILL", seed: int = 0,
          timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dict[str, Any]:
    """Fit the test GPT for ``steps`` optimizer steps under ``strategy`` (constant LR, stateful loader).

    ``kill=(rank, step)``: that rank sends itself ``signal_name`` in the middle of the step that
    starts at global step ``step``; the time goes to ``<log_dir>/killed.json``. ``timeout_s``: the
    strategy's collective timeout. Returns this rank's per-step losses (exact Python floats) and
    its final global step, and the warnings this rank gave.
    """
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_scale.callbacks import ExactResume

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    environ = dict(os.environ)  # Lightning's teardown removes WORLD_SIZE; a second fit needs it back
    log = Path(log_dir) / f"rank{rank}.{tag}.jsonl"
    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            with log.open("a") as fh:
                fh.write(json.dumps({"step": trainer.global_step, "loss": losses[-1], "t": time.time()}) + "\n")

    os.environ["PL_GLOBAL_SEED"] = str(seed)  # the training DistributedSampler's seed
    callbacks: list[Callback] = [Record(), ExactResume()]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=make_strategy(strategy, timeout_s), max_steps=steps,
        logger=False, enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    hook = None
    if kill is not None and kill[0] == rank:
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            _KillMidStep([trainer], kill[1], str(Path(log_dir) / "killed.json"),
                         getattr(signal, signal_name)))
    try:
        torch.manual_seed(seed)
        task = LanguageModelingTask(model=CFG, optim=base.OPTIM_CONSTANT, sample_tokens=0)
        loader = StatefulDataLoader(base.make_data(N_SAMPLES), batch_size=per_rank_batch(strategy), shuffle=False,
                                    drop_last=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(task, train_dataloaders=loader, ckpt_path=resume)
    finally:
        if hook is not None:
            hook.remove()
        os.environ.clear()
        os.environ.update(environ)
    return {"losses": losses, "global_step": trainer.global_step, "warnings": [str(w.message) for w in caught]}


def reference_then_resume(strategy: str, steps: int, resume: str, log_dir: str) -> dict[str, Any]:
    """Two fits of ``steps`` steps in this rank process: an uninterrupted run from scratch, then a
    run resumed from ``resume``; both seeded the same way."""
    reference = train(strategy, steps, tag="reference", log_dir=log_dir)
    resumed = train(strategy, steps, tag="resumed", log_dir=log_dir, resume=resume)
    return {"reference": reference["losses"], "resumed": resumed["losses"], "global_step": resumed["global_step"]}


def read_log(log_dir: str | Path, rank: int, tag: str) -> list[dict[str, Any]]:
    """The ``{"step", "loss"}`` records a rank wrote for run ``tag`` (empty if none)."""
    path = Path(log_dir) / f"rank{rank}.{tag}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
