"""The vision task's top-1 accuracy under the suite's strategies equals one process's.

Both runs have a data-parallel dimension of 2 (so a metric not synchronised over dp would see
half the data) and a model-parallel one (pipeline: only the last stage holds logits; tensor
parallel: both ranks of a pair do), on 4 real gloo ranks.
"""

from __future__ import annotations

import pytest

import _vision_targets as targets
from _parity import LOSS_RTOL
from lightning_scale.testing import run_distributed


@pytest.mark.parametrize("kind", ["pipeline", "tensor_parallel"])
def test_top1_accuracy_equals_one_process(kind: str) -> None:
    results = run_distributed(targets.validate, 4, kind, init_process_group=False, timeout=240)
    ref = targets.reference()
    assert 0.0 < ref["val/acc"] < 1.0  # a value the test can get wrong
    for rank, metrics in enumerate(results):
        assert metrics["val/acc"] == pytest.approx(ref["val/acc"], abs=1e-7), (rank, metrics)
        assert abs(metrics["val/loss"] - ref["val/loss"]) <= LOSS_RTOL * ref["val/loss"], (rank, metrics)
