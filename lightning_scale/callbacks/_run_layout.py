"""Bridge from a running Trainer to the memory planner: what the planner predicts for this rank.

Filled in by the planner work (issue 8); until then :func:`predict_run` returns None.
"""

from __future__ import annotations

from typing import Any


def predict_run(trainer: Any, pl_module: Any, batch: Any) -> dict[str, int] | None:
    """Planner prediction for this rank, in bytes: ``{"params", "grads", "optimizer", "activations"}``
    (device and host together), or None when the run's model or layout is not one the planner models."""
    return None
