"""Metric helpers shared by the tasks."""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric


def compute_quietly(metric: Metric) -> torch.Tensor:
    """``metric.compute()`` without torchmetrics' warning on ranks that saw no update.

    Pipeline stages without outputs never update the metric; their value is replaced by the
    last stage's through ``share_from_output_ranks``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compute.*called before.*update.*")
        value = metric.compute()
    return torch.nan_to_num(value.float(), nan=0.0)
