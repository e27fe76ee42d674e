"""Module-level target functions run on rank processes by ``tests/test_harness.py``.

They live in their own importable module because ranks receive targets by importable name.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

HARNESS_ENV_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "OMP_NUM_THREADS",
)

_calls_in_this_process = 0


def noop() -> None:
    """Does nothing (used to measure the harness's own overhead)."""


def rank_info(base: int, *, scale: int = 1) -> tuple[int, int, int]:
    """(rank, world size, (base + rank) * scale) as seen through the process group."""
    rank = dist.get_rank()
    return rank, dist.get_world_size(), (base + rank) * scale


def all_reduce_sum() -> torch.Tensor:
    """All-reduce (SUM) a tensor holding rank + 1; every rank returns the reduced tensor."""
    tensor = torch.full((3,), float(dist.get_rank() + 1))
    dist.all_reduce(tensor)
    return tensor


def fail_on_rank(bad_rank: int, message: str) -> None:
    """``bad_rank`` prints a marker and raises ValueError(message); the others block in an
    all_reduce waiting for it."""
    if dist.get_rank() == bad_rank:
        print(f"rank {bad_rank} is about to fail", flush=True)
        raise ValueError(message)
    dist.all_reduce(torch.ones(1))


def hang_on_rank(bad_rank: int) -> None:
    """``bad_rank`` sleeps (almost) forever; the others wait for it in a barrier."""
    if dist.get_rank() == bad_rank:
        sleep_forever_marker()
    dist.barrier()


def sleep_forever_marker() -> None:
    """Sleep for an hour; its distinctive name is looked for in stack dumps."""
    time.sleep(3600)


def die_on_rank(bad_rank: int, how: str) -> None:
    """``bad_rank`` ends without reporting (``how``: "exit3" = ``os._exit(3)``, "sigkill" =
    SIGKILL itself); the others block in a barrier."""
    if dist.get_rank() == bad_rank:
        if how == "exit3":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def report_environment() -> dict[str, Any]:
    """The harness's environment variables, an extra one, the thread count and pg state."""
    values: dict[str, Any] = {key: os.environ.get(key) for key in HARNESS_ENV_VARS}
    values["EXTRA_TEST_VAR"] = os.environ.get("EXTRA_TEST_VAR")
    values["num_threads"] = torch.get_num_threads()
    values["pg_initialized"] = dist.is_initialized()
    return values


def count_calls() -> int:
    """Increment and return a module-level counter: 1 in every fresh process."""
    global _calls_in_this_process
    _calls_in_this_process += 1
    return _calls_in_this_process


def fit_tiny_trainer(root_dir: str, max_steps: int) -> dict[str, Any]:
    """Fit a tiny model with ``Trainer(strategy="ddp", devices=2)``; Lightning must join the
    harness's processes (it launches none) and keep the replicas in sync."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    model = TinyModule()
    # Different data per rank (the DistributedSampler splits it), so only a DDP gradient
    # all-reduce keeps the weights identical across ranks.
    data = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    trainer.fit(model, data)
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "external": trainer.strategy.cluster_environment.creates_processes_externally,
        "weight": model.layer.weight.detach().clone(),
    }


def fail_while_peers_sleep(bad_rank: int) -> None:
    """``bad_rank`` raises RuntimeError; the others sleep outside any collective, so only the
    harness's grace period can end them."""
    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"rank {bad_rank} gives up")
    sleep_forever_marker()
