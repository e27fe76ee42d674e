"""Plot a measured pipeline step: one row per pipeline rank, one box per microbatch action.

Input: :class:`~lightning_scale.core.pipeline.TimelineEvent` records (seconds since the step
began on each rank; clocks of different ranks are not synchronised, so rows are aligned at
their own start). Idle time is the white space; the bubble fraction printed in the title is
``1 - busy / (ranks x span)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}


def bubble_fraction(events: Sequence[Any], num_ranks: int) -> float:
    """Idle share of ``num_ranks x span`` where span = last end - first start over all ranks."""
    if not events:
        return 0.0
    start = min(e.start for e in events)
    end = max(e.end for e in events)
    busy = sum(e.end - e.start for e in events)
    return max(0.0, 1.0 - busy / (num_ranks * (end - start)))


def plot_timeline(events: Sequence[Any], path: str | Path, *, title: str = "", num_ranks: int | None = None) -> Path:
    """Save a PNG Gantt chart of ``events`` to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = num_ranks or (max(e.rank for e in events) + 1 if events else 1)
    fig, ax = plt.subplots(figsize=(12, 0.7 * ranks + 1.8))
    for e in events:
        ax.barh(e.rank, (e.end - e.start) * 1e3, left=e.start * 1e3, height=0.8, color=_COLORS.get(e.kind, "gray"), edgecolor="black", linewidth=0.4)
        width_ms = (e.end - e.start) * 1e3
        ax.text((e.start * 1e3) + width_ms / 2, e.rank, f"{e.kind}{e.microbatch}" + (f"/s{e.stage}" if ranks > 1 else ""), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time since step start (ms)")
    bubble = bubble_fraction(events, ranks)
    ax.set_title(f"{title}  |  measured bubble {bubble:.1%}  (F forward, B backward, W weight grad)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, ["forward", "backward", "weight grad"], loc="upper center", bbox_to_anchor=(0.5, -0.35),
              ncol=3, fontsize=7, frameon=False)  # below the axis, never over a box
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
