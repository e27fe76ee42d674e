"""ZeroStrategy (ZeRO stages 1/2 on torch primitives, stage 3 on FSDP2, CPU offload): parity with
a single-process reference on real gloo ranks, memory accounting, checkpoints, errors.

Tolerances as for every parallel feature: relative loss difference <= 1e-5 per step over 20
optimizer steps, max abs weight difference <= 1e-5, fp32. The reference runs the same global
batches in one process (the replicas' shards accumulated, i.e. the DDP gradient).
"""

from __future__ import annotations

import pytest

import _pipeline_targets as targets
from lightning_scale.testing import run_distributed
from _parity import assert_planner_states, assert_val_metrics
from _parity import STEPS
from _parity import assert_parity as _assert_parity

CASES = [
    pytest.param(dict(stage=1), id="stage1"),
    pytest.param(dict(stage=1, offload_optimizer=True), id="stage1-offload"),
    pytest.param(dict(stage=2), id="stage2"),
    pytest.param(dict(stage=2, offload_optimizer=True), id="stage2-offload"),
    pytest.param(dict(stage=3), id="stage3"),
    pytest.param(dict(stage=3, offload_params=True), id="stage3-offload"),
    # fairscale 0.4.13: ShardedDataParallel + zero_grad(set_to_none=True) diverges from step 3;
    # this parity test fails if ZeroOSS stops forcing in-place zeroing.
    pytest.param(dict(stage=1, implementation="fairscale"), id="fairscale-stage1"),
    pytest.param(dict(stage=2, implementation="fairscale"), id="fairscale-stage2"),
]


@pytest.mark.parametrize("zero", CASES)
def test_two_rank_parity_with_clipping(zero: dict) -> None:
    # Small buckets (several per model) so bucketing, padding and in-flight reductions are exercised.
    small_buckets = zero["stage"] < 3 and zero.get("implementation", "native") == "native"
    kwargs = dict(zero=True, bucket_mb=0.02, **zero) if small_buckets else dict(zero=True, **zero)
    results = run_distributed(targets.fit, 2, kwargs, STEPS, 4, clip=0.05, validate=True, init_process_group=False,
                              timeout=300)
    ref = targets.reference(STEPS, 4, replicas=2, microbatches=1, clip=0.05)
    _assert_parity(results, ref)
    assert_val_metrics(results, ref["state"])  # validation with sharded (and offloaded) parameters


# ---- memory accounting ---------------------------------------------------------------------------
# Psi' = parameters incl. bucket padding (stages 1/2) or FSDP2's dim-0 padding (stage 3); Adam also
# keeps one 4-byte "step" tensor per tensor it steps (one per bucket at stages 1/2, per parameter at 3).
def _expected(zero: dict, r: dict, world: int) -> dict[str, int]:
    from lightning_scale.core.memory import zero_state_bytes

    if zero["stage"] == 3:
        return zero_state_bytes(r["psi_fsdp"], world, 3, step_tensors=r["n_params"])
    return zero_state_bytes(r["psi_padded"], world, zero["stage"], offload=zero.get("offload_optimizer", False),
                            step_tensors=r["buckets"])


def test_zero_state_bytes_formulas() -> None:
    from lightning_scale.core.memory import zero_state_bytes

    # Psi = 1000 elements, N = 4 (bytes): the design guide's table for fp32 Adam.
    assert zero_state_bytes(1000, 4, 0) == {"params": 4000, "grads": 4000, "optimizer": 8000}
    assert zero_state_bytes(1000, 4, 1) == {"params": 4000, "grads": 4000, "optimizer": 2000}
    assert zero_state_bytes(1000, 4, 2) == {"params": 4000, "grads": 1000, "optimizer": 2000}
    assert zero_state_bytes(1000, 4, 3, step_tensors=2) == {"params": 1000, "grads": 1000, "optimizer": 2008}
    assert zero_state_bytes(1000, 4, 1, offload=True) == {"params": 4000, "grads": 5000, "optimizer": 3000}
    assert zero_state_bytes(1000, 4, 2, offload=True) == {"params": 4000, "grads": 1000, "optimizer": 3000}


@pytest.mark.parametrize("world, zero", [
    (2, dict(stage=1, bucket_mb=0.02)),
    (2, dict(stage=2, bucket_mb=0.02)),
    (2, dict(stage=1, offload_optimizer=True, bucket_mb=0.02)),
    (2, dict(stage=2, offload_optimizer=True)),
    (2, dict(stage=3)),
    (2, dict(stage=3, offload_params=True)),
    (4, dict(stage=1, bucket_mb=0.02)),
    (4, dict(stage=2, bucket_mb=0.02)),
    (4, dict(stage=3)),
])
def test_model_state_bytes_equal_the_zero_formulas(world: int, zero: dict) -> None:
    import _zero_targets as zt

    results = run_distributed(zt.memory, world, zero, init_process_group=False, timeout=240)
    for rank, r in enumerate(results):
        if zero["stage"] < 3:
            # Bucket padding is less than one element per rank per bucket.
            assert r["psi"] <= r["psi_padded"] < r["psi"] + world * r["buckets"]
        counts = {c: sum(per_device.values()) for c, per_device in r["counts"].items()}
        assert counts == _expected(zero, r, world), f"rank {rank}: {r['counts']} (psi {r['psi']})"
        # The memory planner (lightning-scale plan) predicts the same bytes, device and host together.
        assert {c: r["predicted"][c] for c in counts} == counts, f"rank {rank}: planner {r['predicted']}"
        assert r["optimizer_devices"] == ["cpu"]


def test_fairscale_partitions_the_optimizer_state_by_whole_parameters() -> None:
    import _zero_targets as zt

    results = run_distributed(zt.memory, 2, dict(stage=2, implementation="fairscale"), init_process_group=False, timeout=240)
    per_rank = [sum(r["counts"]["optimizer"].values()) for r in results]
    psi, n_params = results[0]["psi"], results[0]["n_params"]
    # Every parameter's moments (8 bytes per element) and step (4 bytes) live on exactly one rank.
    assert sum(per_rank) == 8 * psi + 4 * n_params
    assert all(0 < b < 8 * psi for b in per_rank), per_rank


# ---- checkpoints -----------------------------------------------------------------------------------
def _run(world: int, zero: dict, per_rank_batch: int, **kwargs) -> list[dict]:
    # 64 samples, global batch 8 -> 8 steps per epoch, 2 epochs. The same global batches whatever
    # the world size (DistributedSampler: replica r of N takes permutation[r::N]).
    return run_distributed(targets.fit, world, dict(zero=True, **zero), 0, per_rank_batch, n_samples=64, max_epochs=2,
                           init_process_group=False, timeout=300, **kwargs)


def _mean_losses(results: list[dict]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*(r["losses"] for r in results))]


@pytest.mark.parametrize("save, load", [
    ((2, dict(stage=2, bucket_mb=0.02)), (2, dict(stage=2, bucket_mb=0.02))),  # same layout
    ((2, dict(stage=2, bucket_mb=0.02)), (4, dict(stage=2, bucket_mb=0.01))),  # 2 -> 4 ranks, other buckets
    ((4, dict(stage=1, offload_optimizer=True)), (2, dict(stage=2))),  # 4 -> 2 ranks, stage 1 -> 2
    ((2, dict(stage=2)), (4, dict(stage=3))),  # stage 2 -> FSDP2
    ((4, dict(stage=3)), (2, dict(stage=1, bucket_mb=0.02))),  # FSDP2 -> stage 1
    ((2, dict(stage=2, implementation="fairscale")), (4, dict(stage=2, implementation="fairscale"))),  # fairscale 2 -> 4
    ((4, dict(stage=2)), (2, dict(stage=1, implementation="fairscale"))),  # native -> fairscale
], ids=["2to2", "2to4", "4to2-stage1to2", "stage2to3", "stage3to1", "fairscale-2to4", "native-to-fairscale"])
def test_resume_is_exact_across_world_sizes_and_stages(tmp_path, save, load) -> None:
    (w_save, z_save), (w_load, z_load) = save, load
    full = _run(w_save, z_save, 8 // w_save, ckpt_dir=str(tmp_path))
    expected = _mean_losses(full)[8:]
    resumed = _run(w_load, z_load, 8 // w_load, resume=str(tmp_path / "epoch=0.ckpt"))
    got = _mean_losses(resumed)
    assert len(got) == len(expected) == 8
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {8 + step}: resumed {a} vs uninterrupted {b}"
    for name, value in full[0]["state"].items():
        diff = (resumed[0]["state"][name] - value).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"


def test_zero_checkpoint_consolidates_to_a_plain_state_dict(tmp_path) -> None:
    import torch

    from lightning_scale.core.checkpoint import consolidate
    from lightning_scale.tasks import LanguageModelingTask

    results = run_distributed(targets.fit, 2, dict(zero=True, stage=3), 0, 4, n_samples=64, max_epochs=1,
                              ckpt_dir=str(tmp_path), init_process_group=False, timeout=300)
    checkpoint = consolidate(tmp_path / "epoch=0.ckpt", tmp_path / "plain.ckpt")
    for name, value in results[0]["state"].items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0)
    task = LanguageModelingTask.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=True)
    torch.testing.assert_close(task.model.head.weight, results[0]["state"]["model.head.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("zero", [dict(stage=2, bucket_mb=0.02), dict(stage=3), dict(stage=2, implementation="fairscale")],
                         ids=["stage2", "stage3", "fairscale-stage2"])
def test_four_rank_parity_with_gradient_accumulation(zero: dict) -> None:
    # Stage 2 reduce-scatters every micro-step and accumulates the chunks; FSDP2 accumulates shards.
    # 4 replicas x 1 sequence x 2 accumulated batches per step (256 samples cover the 20 steps).
    results = run_distributed(targets.fit, 4, dict(zero=True, **zero), STEPS, 1, accumulate=2,
                              init_process_group=False, timeout=300)
    _assert_parity(results, targets.reference(STEPS, 1, replicas=4, microbatches=1, accumulate=2))


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=4), "stage must be 1, 2 or 3"),
    (dict(stage=2, offload_params=True), "offload_params=True needs stage=3"),
    (dict(stage=3, offload_optimizer=True), "set offload_params=True"),
    (dict(stage=3, implementation="fairscale"), "needs CUDA"),
    (dict(stage=2, implementation="deepspeed"), "implementation must be one of"),
    (dict(stage=2, bucket_mb=0), "bucket_mb must be > 0"),
])
def test_bad_configurations_name_the_fix(kwargs: dict, match: str) -> None:
    from lightning_scale.strategies import ZeroStrategy

    with pytest.raises(ValueError, match=match):
        ZeroStrategy(**kwargs)


def test_stage2_rejects_tensor_parallel_parameters_on_every_rank() -> None:
    import _zero_targets as zt
    from lightning_scale.testing import RankFailedError

    with pytest.raises(RankFailedError) as info:
        run_distributed(zt.zero_over_dtensor, 2, timeout=120)
    assert sorted(info.value.failed_ranks) == [0, 1]
    assert "is a DTensor" in str(info.value) and "Use stage 3" in str(info.value)


@pytest.mark.parametrize("precision, zero", [
    ("bf16-mixed", dict(stage=2, bucket_mb=0.02)),
    ("bf16-true", dict(stage=2, bucket_mb=0.02)),  # bf16 parameters: fp32 master chunks on the device
    ("bf16-true", dict(stage=1, offload_optimizer=True)),
    ("bf16-mixed", dict(stage=3)),  # FSDP2 MixedPrecisionPolicy: bf16 all-gathers and compute, fp32 reduction
])
def test_bf16_trains_close_to_fp32(precision: str, zero: dict) -> None:
    bf16 = run_distributed(targets.fit, 2, dict(zero=True, **zero), 5, 4, precision=precision,
                           init_process_group=False, timeout=300)
    fp32 = targets.reference(5, 4, replicas=2, microbatches=1)
    if precision == "bf16-true":  # the parameters really were bf16 (the engine kept fp32 masters)
        import torch

        assert all(v.dtype == torch.bfloat16 for v in bf16[0]["state"].values() if v.is_floating_point())
    mean = _mean_losses(bf16)
    for step, (a, b) in enumerate(zip(mean, fp32["losses"])):
        assert abs(a - b) <= 2e-2 * abs(b), f"step {step}: {a} vs fp32 {b}"  # bf16 keeps ~3 significant digits


# ---- ZeRO-3 on the data-parallel dimension of pipeline / 3D ---------------------------------------
def _assert_dp_sharded(results: list[dict], dp: int) -> None:
    """Each rank holds 1/dp of its stage's parameters and Adam state (the dp ranks' shards add up)."""
    by_stage: dict[int, list[dict]] = {}
    for r in results:
        by_stage.setdefault(r["held"]["params_full"], []).append(r["held"])
    for full, held in by_stage.items():
        assert len(held) % dp == 0
        replica_groups = [held[i:i + dp] for i in range(0, len(held), dp)]  # consecutive ranks in a dp group
        for group in replica_groups:
            assert sum(h["params"] for h in group) == full
            # Dim-0 shards: equal up to the uneven last rows of some parameters.
            assert max(h["params"] for h in group) - min(h["params"] for h in group) <= 0.05 * full
            assert all(h["optim"] == 2 * h["params"] for h in group)  # Adam: exp_avg + exp_avg_sq per shard


def test_zero3_on_the_pipeline_dp_dimension_matches_the_reference_and_resumes_unsharded(tmp_path) -> None:
    # pp=2 x dp=2: FSDP2 on each stage's dp pair. Mesh (pp, dp, tp): ranks 0,1 = stage 0.
    kwargs = dict(stages=2, schedule="1f1b", microbatches=2, zero_stage=3)
    common = dict(n_samples=256, stateful_loader=True, init_process_group=False, timeout=300)
    results = run_distributed(targets.fit, 4, dict(kwargs), STEPS, 4, ckpt_dir=str(tmp_path), every_n_train_steps=10,
                              **common)
    _assert_parity(results, targets.reference(STEPS, 4, replicas=2, microbatches=2))
    _assert_dp_sharded(results, dp=2)
    assert_planner_states(results)
    # The step-10 checkpoint resumes exactly without sharding (same replicas, zero_stage=0).
    resumed = run_distributed(targets.fit, 4, dict(kwargs, zero_stage=0), STEPS, 4,
                              resume=str(tmp_path / "step=10.ckpt"), **common)
    for step, (a, b) in enumerate(zip(resumed[0]["losses"], results[0]["losses"][10:])):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {10 + step}: {a} vs {b}"
    assert len(resumed[0]["losses"]) == STEPS - 10


def test_zero3_on_the_dp_dimension_with_tensor_parallelism_matches_the_reference() -> None:
    # tp=2 x dp=2 (no pipeline): FSDP2 over TP's DTensors (2-D parameters on the (dp, tp) mesh).
    kwargs = dict(three_d=True, pipeline_parallel_size=1, tensor_parallel_size=2, zero_stage=3, microbatches=1)
    results = run_distributed(targets.fit, 4, kwargs, STEPS, 4, init_process_group=False, timeout=300)
    _assert_parity(results, targets.reference(STEPS, 4, replicas=2, microbatches=1))


# pp2 x tp2 x dp2 with ZeRO-3 on dp (8 ranks): tests/test_parallel3d.py::test_pp2_tp2_dp2_parity_on_8_ranks_with_zero3_on_dp.


def test_zero_stages_1_and_2_with_pipelining_are_refused_with_the_reason() -> None:
    from lightning_scale.strategies import Parallel3DStrategy, PipelineStrategy

    for stage in (1, 2):
        with pytest.raises(ValueError, match="stages 1 and 2 are not offered with pipelining"):
            PipelineStrategy(zero_stage=stage)
    with pytest.raises(ValueError, match="zero_stage=4"):
        Parallel3DStrategy(zero_stage=4)
