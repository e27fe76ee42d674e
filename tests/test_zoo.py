"""The zoo (tests/zoo.py): LightningModules written the way users write them, trained under a
strategy given by its registered name alone, ``Trainer(strategy="zero2_offload")``, against one
process of plain PyTorch (per-step loss rel <= 1e-5 over 20 steps, weights <= 1e-5, fp32).

Every shape runs under every strategy family by its registered name; each case either trains
in parity or is refused at setup with a message that names the fix, and the test says which:

* ZeRO-1, ZeRO-2 with offload, ZeRO-3 with offload (FSDP2), data parallel with activation checkpointing:
  all 8 shapes train unchanged (the layers on the LightningModule itself when it has no
  ``self.model``). Lightning's own ``ddp`` checks the reference itself.
* Pipeline (``"pipeline"``): all 8 shapes train unchanged. torch's tracer cuts each ``forward``;
  the loss computed inline in ``training_step`` is replayed per microbatch on the last stage;
  validation with torchmetrics runs unchanged on every rank. A ``loss_fn`` method
  (``zoo.LossMethod``) still runs the loss inside the schedule directly.
* Tensor parallel (``"tensor_parallel"``): a module without a plan is refused naming ``tp_plan=``;
  with a plan written from the LightningModule (``"blocks.*.fc1"``, ``"model.layers.*.fc1"``) or
  ``tp_plan={}`` (every layer replicated) it trains in parity.
* 3D (``"parallel_3d"``, 4 ranks: pp 2 x tp 2): two shapes with a plan; without one
  it is refused naming ``tp_plan=``.
"""

from __future__ import annotations

import pytest

import _zoo_targets as targets
import zoo
from _parity import STEPS, assert_parity
from lightning_scale.testing import run_distributed
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

BATCH = 4  # per data-parallel replica
CASES = [(shape, strategy) for strategy in ("zero1", "zero2_offload", "zero3_offload", "ddp_ac") for shape in zoo.SHAPES]
CASES += [("layers_on_module", "ddp"), ("cnn", "ddp")]  # Lightning's DDP: the reference is right


@pytest.mark.parametrize(("shape", "strategy"), CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_user_module_trains_with_one_argument(shape: str, strategy: str) -> None:
    results = run_distributed(targets.fit, 2, shape, strategy, STEPS, BATCH, init_process_group=False, timeout=180)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=2))


def _samples(world: int) -> int:
    return STEPS * BATCH * world  # what targets.fit builds: steps x batch x world


# -- blocks given by class ---------------------------------------------------------------------------
BY_CLASS = [("mha_transformer", "zero3_offload", {"block_class": "AttentionBlock"}),
            ("layers_on_module", "ddp_ac", {"block_class": "Block"}),
            ("blocks_in_dict", "pipeline", {"block_class": "Block", "balance": "time"})]


@pytest.mark.parametrize(("shape", "strategy", "kwargs"), BY_CLASS, ids=[f"{s}-{t}" for s, t, _ in BY_CLASS])
def test_blocks_given_by_class_are_the_units_of_every_strategy(shape: str, strategy: str, kwargs: dict) -> None:
    # block_class= names the units of ZeRO-3 sharding, activation checkpointing and pipeline cuts
    # (with balance='time' measured on the first batch's inputs: blocks_in_dict has no example_input_array).
    results = run_distributed(targets.fit, 2, shape, strategy, STEPS, BATCH, kwargs, init_process_group=False,
                              timeout=240)
    replicas = 1 if strategy == "pipeline" else 2
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=replicas, samples=_samples(2)))


# -- pipeline ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(zoo.SHAPES))
def test_pipeline_trains_the_module_unchanged(shape: str) -> None:
    # torch's tracer cuts the unchanged forward (example inputs: example_input_array, else the
    # first batch's); the inline loss of training_step is replayed per microbatch on the last stage.
    results = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, init_process_group=False, timeout=240)
    reference = targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(2))
    assert_parity(results, reference)
    # What training_step logs is logged once per step on every rank, averaged over microbatches:
    # the full batch's loss of plain PyTorch's last step.
    logged_name = {"layers_on_module": "train_loss", "mha_transformer": "train_loss", "custom_model_loop": "loss",
                   "metrics_in_val": "loss"}.get(shape)
    for rank in results:
        if logged_name is None:
            assert rank["logged"] == {}
        else:
            assert rank["logged"][logged_name] == pytest.approx(reference["losses"][-1], rel=1e-5)


@pytest.mark.parametrize("shape", ["functional_tie", "loss_outside_forward"])
def test_pipeline_keeps_tensors_used_on_two_stages_or_outside_forward_in_step(shape: str) -> None:
    # functional_tie: torch's tracer replicates the embedding weight (reused by the head) and a
    # scale on both stages; loss_outside_forward: class weights and a temperature no stage graph
    # holds. Each copy's gradients are summed over the pipeline ranks that hold it.
    results = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, init_process_group=False, timeout=240)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(2)))


def test_a_step_whose_inputs_change_per_call_is_refused_on_every_rank() -> None:
    # Noise drawn before the network call: the last stage's replay sees other inputs. Raised on
    # every rank after the schedule (no rank is left waiting in a receive).
    from lightning_scale.testing.multiprocess import RankFailedError

    with pytest.raises(RankFailedError) as caught:
        run_distributed(targets.fit, 2, "noisy_inputs", "pipeline", 2, BATCH, init_process_group=False, timeout=120)
    message = str(caught.value)
    assert "2 of 2 ranks failed" in message
    assert message.count("that are not those rows of what it passed for the whole batch") >= 2


@pytest.mark.parametrize("shape", ["cnn", "mha_transformer"])
def test_pipeline_traced_stages_run_bf16_mixed(shape: str) -> None:
    # Stage shapes and dtypes are inferred as the stages run (autocast's bf16 activations), not
    # taken from the fp32 meta trace: finite losses within bf16's error of plain fp32 PyTorch.
    results = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, precision="bf16-mixed",
                              init_process_group=False, timeout=240)
    reference = targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(2))
    for got, want in zip(results[0]["losses"], reference["losses"], strict=True):
        assert got == pytest.approx(want, rel=3e-2)


@pytest.mark.parametrize("shape", ["layers_on_module", "custom_model_loop"])
def test_pipeline_with_a_loss_method_runs_the_loss_in_the_schedule(shape: str) -> None:
    results = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, None, True, init_process_group=False,
                              timeout=240)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(2)))


def test_pipeline_validation_with_torchmetrics_matches_plain_pytorch() -> None:
    # validation_step runs unchanged on every rank with the whole output (sent from the last stage).
    results = run_distributed(targets.fit, 2, "metrics_in_val", "pipeline", STEPS, BATCH, None, False, False, True,
                              init_process_group=False, timeout=240)
    ref = targets.reference("metrics_in_val", STEPS, BATCH, replicas=1, samples=_samples(2))
    assert_parity(results, ref)
    expected = targets.reference_validation("metrics_in_val", ref["state"])
    for rank in results:
        assert rank["val"]["val_acc"] == pytest.approx(expected["val_acc"], abs=1e-6)
        assert rank["val"]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)


def test_pipeline_model_summary_shows_the_whole_model_with_example_input_array() -> None:
    # Lightning's summary runs on every rank after the split and pushes example_input_array
    # through forward: it summarizes a meta copy of the whole model (every parameter, the in/out
    # shapes; no crash, no collective), and training matches.
    results = run_distributed(targets.fit, 2, "mha_transformer", "pipeline", STEPS, BATCH, None, False, True,
                              init_process_group=False, timeout=240)
    assert_parity(results, targets.reference("mha_transformer", STEPS, BATCH, replicas=1, samples=_samples(2)))
    whole = sum(p.numel() for p in zoo.MHATransformer().parameters())
    for rank in results:
        ((total, in_sizes, out_sizes),) = rank["summary"]
        assert total == whole
        assert in_sizes == [[2, zoo.SEQ]] and out_sizes == [[2, zoo.SEQ, zoo.HIDDEN]]  # the token embedding


def test_what_a_strategy_cannot_run_is_refused_naming_the_fix() -> None:
    cases = [("layers_on_module", "tensor_parallel", None), ("custom_model_loop", "tensor_parallel", None),
             ("mha_transformer", "tensor_parallel", {"tp_plan": {}}),
             ("layers_on_module", "parallel_3d", {"pipeline_parallel_size": 1}),  # tp=2 on 2 ranks, no plan
             # views replace the network attribute; layers on the LightningModule have none (setup)
             ("layers_on_module", "pipeline", {"frontend": "views"})]
    results = run_distributed(targets.refusals, 2, cases, init_process_group=False, timeout=300)
    for messages in results:  # every rank raises the same error
        for (shape, strategy, _), message in zip(cases, messages):
            if strategy == "pipeline":
                assert "keeps its layers on itself; use frontend='trace' (default)" in message, message
            elif shape == "mha_transformer":
                assert "nn.MultiheadAttention (layers.0.attn) computes with its fused in_proj weight" in message, message
            else:
                assert "there is no built-in tensor-parallel plan" in message and "tp_plan=" in message, (shape, message)


def test_stage_views_of_a_forward_that_does_not_skip_missing_modules_fail_naming_the_fix() -> None:
    # frontend='views' asked for explicitly: the forward calls a module the stage does not own.
    # Caught at the first step (every stage fails in its forward) and explained.
    from lightning_scale.testing.multiprocess import RankFailedError

    with pytest.raises(RankFailedError, match=r"TinyNet.forward calls a module this pipeline stage does not own.*"
                                              r"Use frontend='trace'"):
        run_distributed(targets.fit, 2, "custom_model_loop", "pipeline", 2, BATCH, {"frontend": "views"},
                        init_process_group=False, timeout=120)


def test_pipeline_checkpoint_of_a_traced_module_holds_the_reference_weights_and_resumes_exactly(tmp_path) -> None:
    # Each rank saves only its stages' tensors under the module's own names: consolidated, they
    # are the plain-PyTorch weights after 10 steps; resuming from them repeats steps 10-19. One
    # epoch is 10 steps (40 samples, one pipeline replica), so the checkpoint is at an epoch end.
    import torch

    from lightning_scale.core.checkpoint import consolidate

    shape = "layers_on_module"
    full = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, ckpt_dir=str(tmp_path), ckpt_every=10,
                           samples=10 * BATCH, init_process_group=False, timeout=240)
    half = targets.reference(shape, 10, BATCH, replicas=1, samples=10 * BATCH)
    saved = consolidate(tmp_path / "step=10.ckpt")["state_dict"]
    assert set(saved) == set(half["state"])
    for name, value in half["state"].items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-5)
    resumed = run_distributed(targets.fit, 2, shape, "pipeline", STEPS, BATCH, resume=str(tmp_path / "step=10.ckpt"),
                              samples=10 * BATCH, init_process_group=False, timeout=240)
    for a, b in zip(resumed[0]["losses"], full[0]["losses"][10:], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)


# -- tensor parallel --------------------------------------------------------------------------------
TP_PLANS = {
    # paths relative to the LightningModule, as a user reads them off print(model)
    "layers_on_module": {"blocks.*.fc1": ColwiseParallel(), "blocks.*.fc2": RowwiseParallel()},
    "custom_model_loop": {"model.layers.*.fc1": ColwiseParallel(), "model.layers.*.fc2": RowwiseParallel()},
    "sequential": {"net.0": ColwiseParallel(), "net.2": RowwiseParallel()},
    "cnn": {},  # every layer replicated: trains, no sharding
}


@pytest.mark.parametrize("shape", list(TP_PLANS))
def test_tensor_parallel_trains_user_modules_with_a_plan_from_the_lightning_module(shape: str) -> None:
    results = run_distributed(targets.fit, 2, shape, "tensor_parallel", STEPS, BATCH, {"tp_plan": TP_PLANS[shape]},
                              init_process_group=False, timeout=240)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(2)))


# -- 3D ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["layers_on_module", "custom_model_loop"])
def test_parallel_3d_traces_and_shards_a_user_module_on_4_ranks(shape: str) -> None:
    # pp 2 x tp 2: the unchanged forward traced into stages, the plan (from the LightningModule,
    # "model.layers.*" for a self.model) applied to each rank's part, the inline loss replayed.
    results = run_distributed(targets.fit, 4, shape, "parallel_3d", STEPS, BATCH, {"tp_plan": TP_PLANS[shape]},
                              init_process_group=False, timeout=300)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=1, samples=_samples(4)))
