"""PipelineStrategy on a model this project did not write: a Hugging Face Llama decoder."""

from __future__ import annotations

import _hf_targets as targets
from lightning_scale.testing import run_distributed


def test_hugging_face_llama_two_stages_matches_single_process() -> None:
    steps = 20
    results = run_distributed(targets.fit_hf, 2, steps, init_process_group=False, timeout=300)
    ref = targets.reference_hf(steps)
    assert len(results[0]["losses"]) == len(ref["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert results[0]["losses"] == results[1]["losses"]
    held = {}
    for r in results:
        held.update(r["state"])
    assert set(held) == set(ref["state"])
    for name, value in held.items():
        assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name


def test_hugging_face_llama_pipeline_with_zero3_on_the_replicas_matches_single_process() -> None:
    # pp=2 x dp=2: each stage's FSDP2 root is the stage_forward adapter the schedule calls (the
    # embeddings, final norm and head are gathered by its hooks), 20 steps.
    steps = 20
    results = run_distributed(targets.fit_hf_pp_zero3, 4, steps, init_process_group=False, timeout=300)
    ref = targets.reference_hf(steps, replicas=2)
    assert len(results[0]["losses"]) == len(ref["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    held = {}
    for r in results:  # stage 0 on ranks 0-1, stage 1 on ranks 2-3: gathered full tensors
        held.update(r["state"])
    assert set(held) == set(ref["state"])
    for name, value in held.items():
        assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name


def test_hugging_face_llama_with_the_documented_tp_plan_matches_single_process() -> None:
    steps = 10
    results = run_distributed(targets.fit_hf_tp, 2, steps, init_process_group=False, timeout=300)
    ref = targets.reference_hf(steps, microbatches=1)
    assert results[0]["local_q"] == (16, 32)  # q_proj column-sharded: half the heads per rank
    assert len(results[0]["losses"]) == len(ref["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert results[0]["losses"] == results[1]["losses"]
    assert set(results[0]["state"]) == set(ref["state"])
    for name, value in results[0]["state"].items():
        assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name


def test_hugging_face_llama_tp_from_the_models_own_plan_matches_single_process() -> None:
    # No tp_plan given: the strategy reads LlamaConfig.base_model_tp_plan (q/k/v, gate/up
    # colwise; o, down rowwise) and trains like one process, 20 steps.
    steps = 20
    results = run_distributed(targets.fit_hf_tp_own_plan, 2, steps, init_process_group=False, timeout=300)
    ref = targets.reference_hf(steps, microbatches=1)
    assert results[0]["local_q"] == (16, 32) and results[0]["local_down"] == (32, 32)  # halves of (32, 32), (32, 64)
    assert len(results[0]["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, value in results[0]["state"].items():
        assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name
