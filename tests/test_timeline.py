"""Replaying a measured pipeline timeline with free communication (core.timeline.replay_span)."""

from __future__ import annotations

import pytest

from lightning_scale.core.pipeline import TimelineEvent
from lightning_scale.core.timeline import replay_span


def _events(order: dict[int, list[tuple[str, int, int]]], dur: dict[str, float], gap: float = 0.0) -> list[TimelineEvent]:
    """Events laid out back to back on each rank in ``order``, with ``gap`` seconds before each
    action (as if every action had waited for a transfer); ``(kind, stage, microbatch)``."""
    out = []
    for rank, actions in order.items():
        t = 0.0
        for kind, stage, mb in actions:
            t += gap
            out.append(TimelineEvent(rank=rank, stage=stage, kind=kind, microbatch=mb, start=t, end=t + dur[kind]))
            t += dur[kind]
    return out


ONE_F_ONE_B = {  # p = 2, m = 2, the order torch's Schedule1F1B runs
    0: [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("B", 0, 1)],
    1: [("F", 1, 0), ("B", 1, 0), ("F", 1, 1), ("B", 1, 1)],
}


def test_replay_of_1f1b_follows_the_dependencies() -> None:
    # F = 1, B = 2. rank 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; rank 0: F0 [0,1] F1 [1,2]
    # B0 waits for rank 1's B0 -> [4,6]; B1 waits for rank 1's B1 -> [7,9]. Span 9.
    assert replay_span(_events(ONE_F_ONE_B, {"F": 1.0, "B": 2.0})) == pytest.approx(9.0)


def test_replay_removes_time_spent_between_actions() -> None:
    dur = {"F": 1.0, "B": 2.0}
    assert replay_span(_events(ONE_F_ONE_B, dur, gap=0.5)) == pytest.approx(replay_span(_events(ONE_F_ONE_B, dur)))


def test_replay_of_gpipe_and_of_weight_gradients() -> None:
    gpipe = {0: [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("B", 0, 1)],
             1: [("F", 1, 0), ("F", 1, 1), ("B", 1, 0), ("B", 1, 1)]}
    # rank 1: F0 [1,2] F1 [2,3] B0 [3,5] B1 [5,7]; rank 0: B0 [5,7] B1 [7,9].
    assert replay_span(_events(gpipe, {"F": 1.0, "B": 2.0})) == pytest.approx(9.0)
    # A weight-gradient action needs nothing from another rank: it fills rank 0's wait.
    zb = {0: [("F", 0, 0), ("W", 0, 9), ("B", 0, 0)], 1: [("F", 1, 0), ("B", 1, 0)]}
    # rank 0: F0 [0,1] W [1,4]; rank 1: F0 [1,2] B0 [2,4]; rank 0 B0 [4,6].
    assert replay_span(_events(zb, {"F": 1.0, "B": 2.0, "W": 3.0})) == pytest.approx(6.0)


def test_replay_refuses_an_order_that_deadlocks() -> None:
    bad = {0: [("B", 0, 0)], 1: [("F", 1, 0)]}  # rank 0 waits for B/s1 that rank 1 never runs; rank 1 for F/s0
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay_span(_events(bad, {"F": 1.0, "B": 2.0}))
