"""Small utilities shared by lightning_scale (no Lightning imports at module level)."""

from lightning_scale.utils.wandb_offline import (
    WandbLogError,
    WandbLogTruncatedWarning,
    WandbLogWarning,
    configure_offline_if_needed,
    find_offline_runs,
    find_run_file,
    read_history,
    read_summary,
)

__all__ = [
    "WandbLogError",
    "WandbLogTruncatedWarning",
    "WandbLogWarning",
    "configure_offline_if_needed",
    "find_offline_runs",
    "find_run_file",
    "read_history",
    "read_summary",
]
