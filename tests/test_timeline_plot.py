"""The pipeline timeline PNG says only what is true of the schedule it shows (pure, no processes)."""

from __future__ import annotations

from lightning_scale.core.pipeline import TimelineEvent
from lightning_scale.core.timeline import label_fits, legend_labels, plot_timeline


def _events(kinds: str) -> list[TimelineEvent]:
    out, t = [], 0.0
    for i, kind in enumerate(kinds):
        out.append(TimelineEvent(rank=i % 2, stage=i % 2, kind=kind, microbatch=i // 2, start=t, end=t + 0.01))
        t += 0.01
    return out


def test_the_legend_lists_only_the_kinds_the_schedule_ran() -> None:
    assert legend_labels(_events("FFBB")) == {"F": "forward", "B": "backward"}  # 1F1B: no weight-grad pass
    assert legend_labels(_events("FFBBWW")) == {"F": "forward", "B": "backward (input grad)", "W": "weight grad"}


def test_labels_are_drawn_only_in_boxes_wide_enough_for_them(tmp_path) -> None:
    assert label_fits("F0/s1", 0.1, 1.0)  # a tenth of the axis: ~120 px
    assert not label_fits("F12/s3", 0.002, 1.0)  # ~2 px
    png = plot_timeline(_events("FFBB"), tmp_path / "t.png", title="1f1b")
    assert png.is_file() and png.stat().st_size > 1000
