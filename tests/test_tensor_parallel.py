"""TensorParallelStrategy under Lightning: parity with a single-process reference on real gloo
ranks (per-step losses over 20 steps and final weights, fp32), TP x DP, sequence parallel,
clipping across TP shards, checkpoints, and errors before collectives."""

from __future__ import annotations

import pytest
import torch

import _pipeline_targets as targets
from _parity import assert_planner_states, assert_sample_matches_full_model, assert_val_metrics
from _parity import STEPS, assert_parity


def _assert_parity(results: list[dict], ref: dict) -> None:
    assert_parity(results, ref, every_rank_holds_all=True)  # TP weights are gathered to full tensors
from lightning_scale.testing import RankFailedError, run_distributed



@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_parity(sequence_parallel: bool) -> None:
    kwargs = dict(tensor=True, tensor_parallel_size=2, sequence_parallel=sequence_parallel)
    # The sample at the end of fit: every rank samples (a TP forward is a collective); none under
    # SP (lengths 3, 4, 5 ... do not divide by tp).
    sample = 0 if sequence_parallel else 4  # each new length re-plans DTensor's sharding: keep it short
    results = run_distributed(targets.fit, 2, kwargs, STEPS, 8, clip=0.05, sample_tokens=sample,
                              validate=sequence_parallel, init_process_group=False, timeout=300)
    ref = targets.reference(STEPS, 8, replicas=1, microbatches=1, clip=0.05)
    _assert_parity(results, ref)
    if sample:
        assert_sample_matches_full_model(results, targets.CFG, tokens=sample)
    else:
        assert all(r["sample"] is None for r in results)
        assert_val_metrics(results, ref["state"])  # validation with sequence-parallel regions
    assert_planner_states(results)


def test_tp2_times_dp2_parity() -> None:
    kwargs = dict(tensor=True, tensor_parallel_size=2)
    results = run_distributed(targets.fit, 4, kwargs, STEPS, 4, validate=True, init_process_group=False, timeout=300)
    ref = targets.reference(STEPS, 4, replicas=2, microbatches=1)
    _assert_parity(results, ref)
    assert_planner_states(results)
    # Each dp rank validates half the data: a metric not synchronised over dp would differ from one process's.
    assert_val_metrics(results, ref["state"])


def test_heads_not_divisible_by_tp_fails_on_every_rank_with_the_fix() -> None:
    # The tiny GPT has 2 heads; 4-way TP cannot give every rank whole heads.
    kwargs = dict(tensor=True, tensor_parallel_size=4)
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fit, 4, kwargs, 2, 8, init_process_group=False, timeout=180)
    text = str(info.value)
    assert "n_head" in text and "4 of 4 ranks failed" in text


def test_world_size_not_divisible_by_tp_names_the_fix() -> None:
    from lightning_scale.core.mesh import ParallelDims

    with pytest.raises(ValueError, match="launch a multiple of 2 processes"):
        ParallelDims(pp=1, dp=-1, tp=2).resolve(3)


def test_tp2_checkpoint_resumes_exactly_and_loads_without_tp(tmp_path) -> None:
    common = dict(n_samples=64, max_epochs=2, init_process_group=False, timeout=300)
    tp = dict(tensor=True, tensor_parallel_size=2)
    full = run_distributed(targets.fit, 2, dict(tp), 0, 8, ckpt_dir=str(tmp_path), **common)
    ckpt = str(tmp_path / "epoch=0.ckpt")
    expected = full[0]["losses"][8:]
    # Same layout, and resharded to a single process without tensor parallelism.
    for world, kwargs in [(2, dict(tp)), (1, dict(stages=1, microbatches=1))]:
        resumed = run_distributed(targets.fit, world, kwargs, 0, 8, resume=ckpt, **common)
        got = resumed[0]["losses"]
        assert len(got) == 8
        for a, b in zip(got, expected):
            assert abs(a - b) <= 1e-5 * abs(b)


def test_tp2_bf16_mixed_trains_close_to_fp32() -> None:
    kwargs = dict(tensor=True, tensor_parallel_size=2)
    bf16 = run_distributed(targets.fit, 2, kwargs, 5, 8, precision="bf16-mixed", init_process_group=False, timeout=300)
    fp32 = targets.reference(5, 8, replicas=1, microbatches=1)
    for a, b in zip(bf16[0]["losses"], fp32["losses"]):
        assert abs(a - b) <= 2e-2 * abs(b)  # bf16 keeps ~3 significant digits
    assert bf16[0]["losses"] == bf16[1]["losses"]


def test_tp2_checkpoint_consolidates_to_full_tensors(tmp_path) -> None:
    from lightning_scale.core.checkpoint import consolidate

    res = run_distributed(targets.fit, 2, dict(tensor=True, tensor_parallel_size=2), 0, 8, n_samples=64, max_epochs=1,
                          ckpt_dir=str(tmp_path), init_process_group=False, timeout=300)
    checkpoint = consolidate(tmp_path / "epoch=0.ckpt")
    assert set(checkpoint["state_dict"]) == set(res[0]["state"])
    for name, value in res[0]["state"].items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0)


def layout_after_setup(kind: str) -> dict:
    """Fit 2 steps with a TP strategy on CPU, the optimizer AdamW(foreach=True): which parameters
    of the network are not DTensors after setup (and after training)."""
    import os

    import lightning as L
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from lightning_scale.strategies import Parallel3DStrategy, TensorParallelStrategy
    from lightning_scale.tasks import LanguageModelingTask

    seen: dict = {}

    class Task(LanguageModelingTask):
        def configure_optimizers(self):
            # After the strategy's setup (parallelize) and before the first step. foreach=True (torch's
            # default on CUDA) raises on a parameter list mixing DTensors and plain tensors.
            seen["plain"] = [n for n, p in self.model.named_parameters() if not isinstance(p, DTensor)]
            seen["n"] = len(list(self.model.parameters()))
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)

    strategy = {"tp": lambda: TensorParallelStrategy(tensor_parallel_size=2),
                "tp_sp": lambda: TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
                "3d": lambda: Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=2)}[kind]()
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    task = Task(model=targets.CFG, optim=targets.OPTIM, sample_tokens=0)
    trainer.fit(task, train_dataloaders=DataLoader(targets.make_data(32), batch_size=8, drop_last=True))
    seen["plain_after_fit"] = [n for n, p in task.model.named_parameters() if not isinstance(p, DTensor)]
    seen["steps"] = trainer.global_step
    return seen


@pytest.mark.parametrize("kind, world", [("tp", 2), ("tp_sp", 2), ("3d", 4)])
def test_tp_layout_does_not_depend_on_the_device(kind: str, world: int) -> None:
    # "The layout tested on CPU is the layout a GPU runs": on CUDA every parameter must be a DTensor
    # (foreach/fused optimizers reject a mix), so after a TP strategy's setup on CPU every parameter
    # of the network (this rank's stage under 3D) is one too, and AdamW(foreach=True) trains.
    for rank, res in enumerate(run_distributed(layout_after_setup, world, kind, init_process_group=False, timeout=300)):
        assert res["n"] > 0 and res["plain"] == [], f"rank {rank}: plain-tensor parameters {res['plain']}"
        assert res["plain_after_fit"] == [] and res["steps"] == 2, (rank, res)



def test_a_hugging_face_plan_with_sequence_parallel_is_refused_not_silently_off() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_scale.strategies.tensor_parallel import builtin_plan

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert len(builtin_plan(model, sequence_parallel=False)) == 7  # the model's own plan, translated
    with pytest.raises(ValueError, match="sequence_parallel=True with LlamaForCausalLM's own Hugging Face plan"):
        builtin_plan(model, sequence_parallel=True)
