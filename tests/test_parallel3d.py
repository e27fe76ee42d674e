"""Parallel3DStrategy: pipeline x tensor x data parallelism on one mesh, against a single process.

Per-step losses over 20 optimizer steps (relative <= 1e-5) and final weights (<= 1e-5), fp32,
with global-norm clipping active; resharding of a TP=2 checkpoint into PP=2 x TP=2.
"""

from __future__ import annotations

import pytest

import _pipeline_targets as targets
from _parity import assert_planner_states, assert_val_metrics
from _parity import STEPS
from _parity import assert_parity as _assert_parity
from lightning_scale.testing import run_distributed



@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_pp2_tp2_parity(sequence_parallel: bool) -> None:
    # With SP, also full activation checkpointing (bitwise exact, so the same reference; applied
    # after the split and TP, before dp: the documented order).
    # 2 microbatches with SP (every microbatch adds a dozen SP collectives per stage; 4 ranks share
    # the 2 cores here), 4 without.
    ac = dict(activation_checkpointing="full") if sequence_parallel else {}
    m = 2 if sequence_parallel else 4
    kwargs = dict(three_d=True, pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=m,
                  sequence_parallel=sequence_parallel, **ac)
    results = run_distributed(targets.fit, 4, kwargs, STEPS, 8, clip=0.05, validate=sequence_parallel,
                              init_process_group=False, timeout=400)
    ref = targets.reference(STEPS, 8, replicas=1, microbatches=m, clip=0.05)
    _assert_parity(results, ref)
    assert_planner_states(results)
    if sequence_parallel:
        assert_val_metrics(results, ref["state"])
    for rank, r in enumerate(results):  # AC is bitwise exact: parity alone would pass without it
        assert bool(r["checkpointed"]) == sequence_parallel, (rank, r["checkpointed"])


def test_pp2_tp2_dp2_parity_on_8_ranks_with_zero3_on_dp() -> None:
    # The full 3D layout, with FSDP2 (ZeRO-3) on the dp dimension and global-norm clipping; the
    # dp all-reduce without ZeRO is covered on 4 ranks (pp2 x dp2, tp2 x dp2).
    kwargs = dict(three_d=True, pipeline_parallel_size=2, tensor_parallel_size=2, data_parallel_size=2, microbatches=2,
                  zero_stage=3)
    results = run_distributed(targets.fit, 8, kwargs, STEPS, 4, clip=0.05, validate=True, init_process_group=False,
                              timeout=600)
    ref = targets.reference(STEPS, 4, replicas=2, microbatches=2, clip=0.05)
    _assert_parity(results, ref)
    assert_planner_states(results)
    assert_val_metrics(results, ref["state"])


def test_tp2_checkpoint_loads_into_pp2_tp2(tmp_path) -> None:
    common = dict(n_samples=64, max_epochs=2, init_process_group=False, timeout=400)
    full = run_distributed(targets.fit, 2, dict(tensor=True, tensor_parallel_size=2), 0, 8, ckpt_dir=str(tmp_path), **common)
    expected = full[0]["losses"][8:]
    three_d = dict(three_d=True, pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=1, schedule="gpipe")
    resumed = run_distributed(targets.fit, 4, three_d, 0, 8, resume=str(tmp_path / "epoch=0.ckpt"), **common)
    for res in resumed:
        assert len(res["losses"]) == 8
        for a, b in zip(res["losses"], expected):
            assert abs(a - b) <= 1e-5 * abs(b)


def test_mesh_product_must_equal_world_size() -> None:
    from lightning_scale.core.mesh import ParallelDims

    with pytest.raises(ValueError, match="does not equal the world size 8"):
        ParallelDims(pp=2, dp=3, tp=2).resolve(8)
    assert ParallelDims(pp=2, dp=-1, tp=2).resolve(8).dp == 2
