"""The small interface between LightningModules/callbacks and the suite's strategies.

Works with any strategy: under Lightning's own strategies every function falls back to the
plain behaviour (outputs everywhere, the world group, no broadcast). Tasks use it to compute
metrics where the network's outputs live and to log the same value on every rank.
"""

from __future__ import annotations

from typing import Any

import torch


class PipelineOutput:
    """Stands in for the network's output inside a step run by the pipeline strategy.

    The schedule runs forward (and backward) of all microbatches when this object is passed to
    the loss method; only the last stage ever holds real outputs (``value``, eval steps only).
    """

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args = args
        self.kwargs = kwargs
        self.value: Any = None  # merged outputs on the last stage after an eval step, else None
        self.consumed = False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"under PipelineStrategy the network's output is not a tensor on every rank (tried .{name}). "
            f"Pass it to the loss method first (loss = self.loss_fn(self.model(x), y)); for metrics use "
            f"lightning_scale.strategies.outputs_here(output), which is None on ranks without outputs"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: D105
        raise TypeError(
            f"under PipelineStrategy the network's output cannot be used by {getattr(func, '__name__', func)} "
            f"directly: pass it to the loss method, and use lightning_scale.strategies.outputs_here(output) for metrics"
        )


def outputs_here(output: Any) -> Any:
    """The network output on this rank, or None on ranks that do not hold it (earlier pipeline stages)."""
    if isinstance(output, PipelineOutput):
        return output.value
    return output


def data_parallel_group(trainer: Any) -> Any:
    """Process group over which metrics of the same model part are synchronised (None = world)."""
    group_fn = getattr(trainer.strategy, "group", None) if trainer is not None else None
    if group_fn is None or getattr(trainer.strategy, "device_mesh", None) is None:
        return None
    return group_fn("dp")


def share_from_output_ranks(trainer: Any, value: torch.Tensor) -> torch.Tensor:
    """Give every rank the value computed on the ranks that hold the outputs (last pipeline stage)."""
    share = getattr(trainer.strategy, "share_from_output_ranks", None) if trainer is not None else None
    return value if share is None else share(value)
