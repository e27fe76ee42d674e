"""``NonFiniteGuard``: stop training at the first NaN / inf training loss, on every rank at once.

On each checked step every rank puts its training loss into one small tensor (one slot per
rank) and all-reduces it over the default process group: every rank then knows every rank's
loss, and if any is NaN or infinite, every rank raises the same :class:`NonFiniteLossError`
naming the global step, the batch, and the rank(s) whose loss was not finite. No rank raises
alone, so no peer is left waiting in a collective until the timeout.

Under pipeline parallelism only the last stage computes the loss; the strategy broadcasts it to
every stage of the pipeline, so every rank of an affected pipeline reports it: the error says
which rank computed it. Tensor-parallel ranks compute the same loss, and say so together.

The check runs in ``on_train_batch_end``, which Lightning calls on every rank for every batch,
after the optimizer step of the batch and before ``ModelCheckpoint`` (checkpoint callbacks run
last): the step's weights may already be NaN, but no checkpoint of them is written.

Cost: one all-reduce of ``2 x world_size`` floats per checked batch (``check_every_n_steps``
samples optimizer steps; every micro-batch of a sampled step is checked).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

FIXES = (
    "lower the learning rate (or lengthen the warm-up), enable gradient clipping "
    "(Trainer(gradient_clip_val=1.0)), prefer precision='bf16-mixed' to '16-mixed', and check the data of this "
    "batch for NaN/inf values or out-of-range labels; see docs/troubleshooting.md, 'NaN or diverging loss'"
)


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; raised on every rank with the same message.

    Attributes: ``step`` (global optimizer step of the batch), ``batch_idx``, ``ranks`` (the
    ranks whose loss was not finite), ``losses`` (rank -> loss value, None where no loss).
    """

    def __init__(self, message: str, step: int, batch_idx: int, ranks: list[int], losses: dict[int, float | None]):
        super().__init__(message)
        self.step, self.batch_idx, self.ranks, self.losses = step, batch_idx, ranks, losses


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The training loss from ``training_step``'s output (a tensor, or a dict with ``"loss"``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def _computing_rank(trainer: Any) -> int:
    """The global rank that computed this rank's loss: the last pipeline stage under the suite's
    pipeline strategies (which broadcast it), otherwise this rank."""
    runtime = getattr(trainer.strategy, "runtime", None)
    ranks = getattr(runtime, "pp_global_ranks", None)
    last = getattr(runtime, "last_stage_rank", None)
    if ranks is not None and last is not None:
        return int(ranks[last])
    return trainer.global_rank


class NonFiniteGuard(Callback):
    """Raise :class:`NonFiniteLossError` on every rank at the first non-finite training loss.

    Args:
        check_every_n_steps: check the batches of every n-th optimizer step (1 = every step).
            Every rank checks the same steps (the all-reduce is collective).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(
                f"check_every_n_steps must be an integer >= 1 (1 checks every optimizer step); got {check_every_n_steps!r}"
            )
        self.check_every_n_steps = check_every_n_steps
        self._step = 0
        self.checked = 0  # batches checked so far (this rank)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the optimizer step this batch contributes to (0-based)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step % self.check_every_n_steps != 0:
            return
        self.checked += 1
        loss = _loss_of(outputs)
        rank = trainer.global_rank
        world = trainer.world_size if dist.is_available() and dist.is_initialized() else 1
        device = trainer.strategy.root_device
        # Slots: [loss of rank r for r in ranks] + [1 if rank r had a loss] + [rank that computed it].
        values = torch.zeros(3 * world, dtype=torch.float64, device=device)
        if loss is not None:
            values[rank] = loss.detach().to(device=device, dtype=torch.float64).reshape(-1)[0] if loss.numel() else 0.0
            values[world + rank] = 1.0
            values[2 * world + rank] = float(_computing_rank(trainer))
        if world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.cpu().tolist()
        losses = {r: (values[r] if values[world + r] else None) for r in range(world)}
        bad = [r for r, v in losses.items() if v is not None and not math.isfinite(v)]
        if not bad:
            return
        sources = {int(values[2 * world + r]) for r in bad}
        step = self._step
        seen = ", ".join(f"rank {r}: {losses[r]}" for r in bad)
        finite = [r for r, v in losses.items() if v is not None and math.isfinite(v)]
        origin = ""
        if sources != set(bad):
            origin = (f" (computed on rank{'s' if len(sources) > 1 else ''} {', '.join(map(str, sorted(sources)))}: the "
                      f"last pipeline stage, which sends the loss to every stage)")
        message = (
            f"non-finite training loss at global step {step} (epoch {trainer.current_epoch}, batch {batch_idx}): "
            f"{seen}{origin}"
            + (f"; finite on rank{'s' if len(finite) > 1 else ''} {', '.join(map(str, finite))}" if finite else "")
            + f". Training stopped on every rank. To fix: {FIXES}"
        )
        raise NonFiniteLossError(message, step, batch_idx, bad, losses)
