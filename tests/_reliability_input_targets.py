"""Rank functions for the bad-input, NaN-loss and checkpoint-error tests (run by lightning_scale.testing)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scale.core.optim import OptimConfig
from lightning_scale.models import GPTConfig
from lightning_scale.tasks import LanguageModelingTask

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
OTHER_CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=48)  # "another model": other shapes
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1)


def make_data(n: int = 64, seq: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, CFG.vocab_size, (n, seq), generator=g)
    return TensorDataset(x, torch.roll(x, -1, dims=1))


class NaNTask(LanguageModelingTask):
    """A language model whose loss is NaN on ``nan_rank`` at global step ``nan_step`` (None: never).

    The NaN enters in ``loss_fn``, which under pipeline parallelism runs on the last stage only."""

    def __init__(self, *args: Any, nan_rank: int | None = None, nan_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_rank, self.nan_step = nan_rank, nan_step

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().loss_fn(logits, targets)
        if self.global_rank == self.nan_rank and self.trainer.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss


def _strategy(kind: str) -> Any:
    from lightning_scale.strategies import MeshStrategy, PipelineStrategy, ZeroStrategy

    if kind == "ddp":
        return "ddp"
    if kind == "mesh":
        return MeshStrategy()
    if kind == "pipeline":
        return PipelineStrategy(stages=2, microbatches=2)
    if kind.startswith("zero"):
        return ZeroStrategy(stage=int(kind[-1]))
    raise ValueError(kind)


def _trainer(kind: str, steps: int, callbacks: list, root: str, checkpoint: bool = False) -> Any:
    import lightning as L

    warnings.filterwarnings("ignore")
    # Lightning's cluster environment deletes WORLD_SIZE at teardown: restore it for the next Trainer.
    os.environ["WORLD_SIZE"] = os.environ.setdefault("LS_TEST_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    return L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=_strategy(kind), max_steps=steps,
        logger=False, enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, default_root_dir=root,
    )


def _loader() -> DataLoader:
    return DataLoader(make_data(), batch_size=4, shuffle=False, drop_last=True)


# -- NaN / inf loss -------------------------------------------------------------------------------------
def fit_with_guard(kind: str, steps: int, nan_rank: int | None, nan_step: int | None, root: str,
                   check_every_n_steps: int = 1) -> dict:
    """Train ``steps`` steps under ``kind`` with NonFiniteGuard; return the losses seen and the
    number of checked batches (a NonFiniteLossError propagates)."""
    from lightning.pytorch.callbacks import Callback

    from lightning_scale.callbacks import NonFiniteGuard

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    guard = NonFiniteGuard(check_every_n_steps=check_every_n_steps)
    torch.manual_seed(0)
    task = NaNTask(model=CFG, optim=OPTIM, sample_tokens=0, nan_rank=nan_rank, nan_step=nan_step)
    trainer = _trainer(kind, steps, [Record(), guard], root)
    trainer.fit(task, train_dataloaders=_loader())
    return {"losses": losses, "checked": guard.checked, "global_step": trainer.global_step}


# -- a bad layout, seen by every rank before any collective --------------------------------------------
def fit_bad_layout() -> None:
    """Parallel3D with pp=2 x tp=2 on 2 processes: every rank must raise in setup, before the
    process group exists."""
    import lightning as L

    from lightning_scale.strategies import Parallel3DStrategy

    warnings.filterwarnings("ignore")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=Parallel3DStrategy(pipeline_parallel_size=2,
                        tensor_parallel_size=2), max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=0), train_dataloaders=_loader())
    finally:
        import torch.distributed as dist

        # Raised before any collective: no process group was ever created.
        assert not dist.is_initialized(), "the process group was created before the layout error"


# -- checkpoints ----------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class EvilPayload:
    """Unpickling this runs code: it would create the file ``marker`` (a checkpoint must never do that)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_bad_copies(good: Path, bad: Path, marker: str) -> None:
    """Rank 0: damaged copies of the DCP checkpoint directory ``good`` and single-file ones."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from lightning_scale.core.checkpoint import consolidate

    bad.mkdir()
    # "Another model": a DCP directory and a single file of a model with other shapes.
    torch.manual_seed(1)
    other = LanguageModelingTask(model=OTHER_CFG, optim=OPTIM, sample_tokens=0).state_dict()
    dcp.save({"state_dict": other}, checkpoint_id=bad / "dcp_other_model", no_dist=True)
    shutil.copy(good / "meta.pt", bad / "dcp_other_model" / "meta.pt")
    torch.save({"state_dict": other}, bad / "single_other_model.ckpt")
    consolidate(good, bad / "single_good.ckpt")  # a plain single-file checkpoint of the same model: loads
    data = (bad / "single_good.ckpt").read_bytes()
    (bad / "single_truncated.ckpt").write_bytes(data[: len(data) // 2])
    (bad / "single_corrupt.ckpt").write_bytes(b"\x00garbage" * 100)
    torch.save({"state_dict": {}, "payload": EvilPayload(marker)}, bad / "single_pickled.ckpt")
    for name in ("dcp_missing_shard", "dcp_truncated_shard", "dcp_corrupt_metadata", "dcp_pickled_metadata",
                 "dcp_pickled_meta_pt", "dcp_truncated_meta_pt"):
        shutil.copytree(good, bad / name)
    sorted((bad / "dcp_missing_shard").glob("*.distcp"))[-1].unlink()
    shard = sorted((bad / "dcp_truncated_shard").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (bad / "dcp_corrupt_metadata" / ".metadata").write_bytes(b"\x80\x04garbage")
    (bad / "dcp_pickled_metadata" / ".metadata").write_bytes(pickle.dumps(EvilPayload(marker)))
    meta = torch.load(bad / "dcp_pickled_meta_pt" / "meta.pt", weights_only=True)
    meta["payload"] = EvilPayload(marker)
    torch.save(meta, bad / "dcp_pickled_meta_pt" / "meta.pt")
    meta_pt = bad / "dcp_truncated_meta_pt" / "meta.pt"
    meta_pt.write_bytes(meta_pt.read_bytes()[:100])


def checkpoint_errors(kind: str, root: str) -> dict:
    """Train 2 steps under ``kind`` and save a DCP checkpoint; rank 0 writes damaged copies (and
    single-file checkpoints); every rank then resumes from each one: through ``trainer.fit(...,
    ckpt_path=...)`` for the "another model" directory, and through the strategy's
    ``load_checkpoint`` (what ``fit`` calls) on the already set-up strategy for the others.

    Returns ``{case: "LOADED" or the error}``, the files that changed and whether pickled code ran."""
    import torch.distributed as dist

    root_p = Path(root)
    marker = str(root_p / "PWNED")
    trainer = _trainer(kind, 2, [], root)
    torch.manual_seed(0)
    trainer.fit(LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=0), train_dataloaders=_loader())
    good = root_p / "good.ckpt"
    trainer.save_checkpoint(good)  # a DCP directory under the suite's strategies
    if trainer.global_rank == 0:
        _write_bad_copies(good, root_p / "bad", marker)
    dist.barrier()
    before = _snapshot(root_p)
    results: dict[str, str] = {}
    cases = {"dcp_good": good, **{p.name: p for p in sorted((root_p / "bad").iterdir())}}
    for name, path in cases.items():
        try:
            if name == "dcp_other_model":
                fresh = _trainer(kind, 3, [], root)
                fresh.fit(LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=0), train_dataloaders=_loader(),
                          ckpt_path=str(path))
            else:
                trainer.strategy.load_checkpoint(str(path))
            results[name] = "LOADED"
            if name == "single_good.ckpt":  # the loaded weights are the file's, exactly
                from torch.distributed.tensor import DTensor

                saved = torch.load(path, weights_only=True)["state_dict"]
                own = trainer.lightning_module.state_dict()
                diffs = [float(((v.full_tensor() if isinstance(v, DTensor) else v) - saved[k]).abs().max()) for k, v in own.items()]
                results["single_good_max_diff"] = str(max(diffs))
        except Exception as err:  # noqa: BLE001 - the message is what the test checks
            results[name] = f"{type(err).__name__}: {err}"
    dist.barrier()
    changed = sorted(k for k in set(before) | set(_snapshot(root_p)) if before.get(k) != _snapshot(root_p).get(k))
    return {"results": results, "changed": changed, "pwned": Path(marker).exists()}
