"""PipelineStrategy on a model this project did not write: a Hugging Face Llama decoder."""

from __future__ import annotations

import pytest

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


_zero_true_gradient = targets.zero_true_gradient


def _assert_matches(results: list[dict], ref: dict, steps: int) -> None:
    targets.assert_matches(results, ref, steps, exclude=_zero_true_gradient)


@pytest.mark.parametrize("family", ["gpt2", "vit", "bert", "bert_mlm", "bert_clm", "gpt_neox", "gptj"])
def test_a_hugging_face_family_pipelines_with_no_stage_forward_given(family) -> None:
    # PipelineStrategy(stages=2) and nothing else: the family's shipped stage forward and block
    # container are picked from the model's structure (GPT-2: tied head, its copy on stage 1).
    steps = 20
    results = run_distributed(targets.fit_family_pipeline, 2, family, steps, init_process_group=False, timeout=300)
    _assert_matches(results, targets.reference_hf(steps, family=family), steps)


def test_bert_under_zero3_matches_single_process() -> None:
    steps = 20
    results = run_distributed(targets.fit_family_zero3, 2, "bert", steps, init_process_group=False, timeout=300)
    ref = targets.reference_hf(steps, microbatches=1, replicas=2, family="bert")
    assert len(results[0]["losses"]) == steps
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, value in results[0]["state"].items():
        if not _zero_true_gradient(name):
            assert (value - ref["state"][name]).abs().max().item() <= 1e-5, name


def test_a_hugging_face_family_without_a_stage_forward_is_refused_with_the_ways_out() -> None:
    # GPT2Model (no LM head) matches no shipped family: named, with stage_forward= and
    # frontend='trace' as the two ways out (raised at setup, on every rank, before any collective).
    import transformers as tf

    from lightning_scale.strategies import PipelineStrategy

    model = tf.GPT2Model(tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match=r"no pipeline stage forward ships for GPT2Model \(Hugging Face model_type "
                                         r"'gpt2'.*stage_forward=fn\(stage, \*inputs\).*frontend='trace'"):
        PipelineStrategy(stages=2)._adopt_hugging_face_family(model)
    # an explicit stage_forward wins: nothing is adopted
    mine = PipelineStrategy(stages=2, stage_forward=lambda stage, x: x)
    mine._adopt_hugging_face_family(model)
    assert mine.stage_forward.__name__ == "<lambda>"


@pytest.mark.parametrize("family", ["gpt_neox", "gptj"])
def test_tp_from_the_models_own_plan_with_a_vocabulary_parallel_embedding(family) -> None:
    # GPT-NeoX (fused per-head query_key_value) and GPT-J declare plans whose embedding is
    # "embedding_rowwise" (V/t rows per rank, partial lookups summed): translated to torch's
    # RowwiseParallel on the embedding. TP = 2, no plan given, 20 steps against one process.
    steps = 20
    results = run_distributed(targets.fit_family_tp, 2, family, steps, init_process_group=False, timeout=300)
    _assert_matches(results, targets.reference_hf(steps, microbatches=1, family=family), steps)
    embedding = {"gpt_neox": "model.gpt_neox.embed_in.weight", "gptj": "model.transformer.wte.weight"}[family]
    assert results[0]["local_shapes"][embedding] == (32, 32)  # 64 tokens x 32 hidden: half the vocabulary


def test_hugging_face_llama_in_3d_from_its_own_plan_and_stage_forward() -> None:
    # pp=2 x tp=2 (4 ranks), Parallel3DStrategy with no tp_plan, stage_forward or block_container:
    # the stage forward and the TP plan both come from the model; 20 steps against one process.
    steps = 20
    results = run_distributed(targets.fit_hf_3d, 4, steps, init_process_group=False, timeout=300)
    _assert_matches(results, targets.reference_hf(steps), steps)


def test_save_pretrained_round_trip_through_a_two_stage_run(tmp_path) -> None:
    # GPT-2 (tied head) trained in 2 pipeline stages, its sharded checkpoint exported to a
    # save_pretrained directory, loaded back by transformers: the weights are the one-process
    # reference's after the same 20 steps, and the loaded model gives the reference's logits.
    import torch
    import transformers as tf

    from lightning_scale.adapters.huggingface import save_pretrained

    steps = 20
    ckpt = tmp_path / "run.ckpt"
    run_distributed(targets.fit_family_pipeline, 2, "gpt2", steps, save_to=str(ckpt), init_process_group=False,
                    timeout=300)
    with torch.device("meta"):
        like = targets._family_model("gpt2")
    written = save_pretrained(str(ckpt), str(tmp_path / "hf"), like)
    assert "lm_head.weight" in written and "transformer.wte.weight" in written
    loaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    ref = targets.reference_hf(steps, family="gpt2")["state"]
    loaded_state = loaded.state_dict()
    assert {f"model.{name}" for name in loaded_state} <= set(ref)  # every loaded tensor is compared
    for name, value in loaded_state.items():
        if not _zero_true_gradient(name):
            assert (value - ref[f"model.{name}"]).abs().max().item() <= 1e-5, name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    reference = targets._family_model("gpt2")
    reference.load_state_dict({k[len("model."):]: v for k, v in ref.items()})
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, reference(x).logits, atol=1e-4)
    with pytest.raises(ValueError, match="under prefix 'net.'"):
        save_pretrained(str(ckpt), str(tmp_path / "other"), like, prefix="net.")


def test_a_hugging_face_model_without_a_tp_plan_is_refused_naming_the_config() -> None:
    import transformers as tf

    from lightning_scale.strategies.tensor_parallel import builtin_plan

    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match=r"ViTForImageClassification's config declares no tensor-parallel plan "
                                         r"\(transformers' base_model_tp_plan, model_type 'vit'\); give tp_plan="):
        builtin_plan(vit, sequence_parallel=False)
