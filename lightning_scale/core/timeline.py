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


def _input_of(e: Any, last_stage: int) -> tuple[str, int, int] | None:
    """The action on another stage whose output ``e`` consumes: the previous stage's forward of
    the same microbatch, or the next stage's (input-)gradient. ``W`` (weight gradient) and the
    last stage's backward need only earlier actions of their own rank."""
    if e.kind == "F" and e.stage > 0:
        return ("F", e.stage - 1, e.microbatch)
    if e.kind == "B" and e.stage < last_stage:
        return ("B", e.stage + 1, e.microbatch)
    return None


def replay_span(events: Sequence[Any]) -> float:
    """Seconds the measured step would take if communication took no time.

    Each rank runs its actions in the measured order with the measured durations; an action
    starts when its rank is free and its input (see :func:`_input_of`) has been computed.
    ``measured span / replay_span - 1`` is the time lost between actions (p2p transfers, waits
    for them, the schedule's own work); what separates the replay from the ideal
    ``(m + p - 1) / m x work / p`` is unequal action durations (stage imbalance) and the bubble.
    Raises ``ValueError`` if the order cannot be replayed (not one step of a pipeline schedule).
    """
    if not events:
        return 0.0
    last_stage = max(e.stage for e in events)
    queues: dict[int, list[Any]] = {}
    for e in sorted(events, key=lambda e: e.start):
        queues.setdefault(e.rank, []).append(e)
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> replayed end
    free = dict.fromkeys(queues, 0.0)  # rank -> replayed time its previous action ended
    position = dict.fromkeys(queues, 0)
    left = len(events)
    while left:
        moved = False
        for rank, queue in queues.items():
            while position[rank] < len(queue):
                e = queue[position[rank]]
                needs = _input_of(e, last_stage)
                if needs is not None and needs not in done:
                    break  # another rank must compute the input first
                start = max(free[rank], done[needs] if needs is not None else 0.0)
                free[rank] = done[(e.kind, e.stage, e.microbatch)] = start + (e.end - e.start)
                position[rank] += 1
                left -= 1
                moved = True
        if not moved:
            waiting = {r: q[position[r]] for r, q in queues.items() if position[r] < len(q)}
            raise ValueError(f"the timeline cannot be replayed: every rank waits for an input never computed ({waiting})")
    return max(free.values())


def legend_labels(events: Sequence[Any]) -> dict[str, str]:
    """Legend entry of each action kind present: a weight-gradient pass ("W") exists only under
    the zero-bubble schedules, whose "B" is then the input gradient alone."""
    kinds = {e.kind for e in events}
    names = {"F": "forward", "B": "backward (input grad)" if "W" in kinds else "backward", "W": "weight grad"}
    return {k: names[k] for k in ("F", "B", "W") if k in kinds}


FIGURE_WIDTH_IN, DPI, LABEL_PX_PER_CHAR = 12.0, 120, 5.5  # fontsize 6 at 120 dpi: about 5.5 px per character
_PLOT_SHARE = 0.85  # of the figure width taken by the axis (tight_layout leaves the rest to labels)


def label_fits(text: str, width_s: float, span_s: float) -> bool:
    """Whether ``text`` fits inside a box ``width_s`` wide on an axis spanning ``span_s``."""
    if span_s <= 0:
        return False
    box_px = width_s / span_s * FIGURE_WIDTH_IN * DPI * _PLOT_SHARE
    return box_px >= LABEL_PX_PER_CHAR * len(text) + 4


def plot_timeline(events: Sequence[Any], path: str | Path, *, title: str = "", num_ranks: int | None = None) -> Path:
    """Save a PNG Gantt chart of ``events`` to ``path`` and return the path. Boxes too narrow for
    their label carry none (the colour says the kind); the legend lists the kinds present."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = num_ranks or (max(e.rank for e in events) + 1 if events else 1)
    fig = Figure(figsize=(FIGURE_WIDTH_IN, 0.7 * ranks + 1.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = (max(e.end for e in events) - min(e.start for e in events)) if events else 0.0
    for e in events:
        width_ms = (e.end - e.start) * 1e3
        ax.barh(e.rank, width_ms, left=e.start * 1e3, height=0.8, color=_COLORS.get(e.kind, "gray"),
                edgecolor="black", linewidth=0.4)
        label = f"{e.kind}{e.microbatch}" + (f"/s{e.stage}" if ranks > 1 else "")
        if label_fits(label, e.end - e.start, span):
            ax.text((e.start * 1e3) + width_ms / 2, e.rank, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time since step start (ms)")
    bubble = bubble_fraction(events, ranks)
    kinds = legend_labels(events)
    key = ", ".join(f"{k} {name}" for k, name in kinds.items())
    ax.set_title(f"{title}  |  measured bubble {bubble:.1%}  ({key}; label: kind, microbatch/stage)", fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, color=_COLORS[k]) for k in kinds]
    ax.legend(handles, list(kinds.values()), loc="upper center", bbox_to_anchor=(0.5, -0.35),
              ncol=max(1, len(kinds)), fontsize=7, frameon=False)  # below the axis, never over a box
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
