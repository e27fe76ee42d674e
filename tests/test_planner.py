"""The memory planner: published worked examples, exact model states, activations vs measurement."""

from __future__ import annotations

import pytest
import torch

import _pipeline_targets as targets
import _planner_targets as pt
from lightning_scale.core.activation_model import (
    ActivationModel,
    LayerShape,
    in_flight_microbatches,
    korthikanti_layer_bytes,
    layer_bytes,
    model_activation_bytes,
)
from lightning_scale.core.model_states import psi_model_states
from lightning_scale.core.planner import GB, Hardware, Layout, ModelSpec, Workload, plan_memory, recommend
from lightning_scale.models import GPTConfig
from lightning_scale.testing import run_distributed


# ---- published worked examples -----------------------------------------------------------------
def test_zero_paper_table_7_5b_on_64_gpus() -> None:
    # Rajbhandari et al. (arXiv 1910.02054), Figure 1: Psi = 7.5B, N_d = 64, mixed-precision Adam (K = 12).
    got = [psi_model_states(7_500_000_000, 64, stage, precision="mixed").total() for stage in range(4)]
    assert got == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]
    assert [round(b / GB, 1) for b in got] == [120.0, 31.4, 16.6, 1.9]


@pytest.mark.parametrize("t, sp", [(1, False), (2, False), (4, False), (8, False), (2, True), (4, True), (8, True)])
def test_inventory_reproduces_korthikanti_closed_forms(t: int, sp: bool) -> None:
    # GPT-3 175B-like layer (s = 2048, h = 12288, a = 96), b = 1: the paper's Table 2 setting.
    shape = LayerShape(b=1, s=2048, h=12288, a=96, f=4 * 12288, t=t, sp=sp)
    paper = ActivationModel.paper()
    assert layer_bytes(shape, paper) == korthikanti_layer_bytes(2048, 1, 12288, 96, t, sp=sp)
    assert layer_bytes(shape, paper, "full") == korthikanti_layer_bytes(2048, 1, 12288, 96, t, sp=sp, recompute="full") / (t if sp else 1)


def test_pipeline_in_flight_microbatches_follow_the_schedules() -> None:
    p, m = 4, 8
    assert [in_flight_microbatches("gpipe", p, m, r) for r in range(p)] == [8, 8, 8, 8]
    assert [in_flight_microbatches("1f1b", p, m, r) for r in range(p)] == [4, 3, 2, 1]
    # Interleaved, v = 2: rank 0 holds 2(p-1) + (v-1)p + 1 = 11 chunk-microbatches of L/(pv) layers each,
    # i.e. L (1 + (p-1)/(pv)) layers' worth (Korthikanti et al. section 4.2.3).
    assert in_flight_microbatches("interleaved_1f1b", p, m, 0, v=2) == 11
    assert 11 / (p * 2) == 1 + (p - 1) / (p * 2)
    with pytest.raises(ValueError, match="schedules"):
        in_flight_microbatches("zb_v", p, m, 0)


def test_eight_billion_adam_does_not_fit_one_80gb_gpu_and_the_recommendation_fits() -> None:
    model = ModelSpec(n_layer=32, hidden=4096, heads=32, vocab=50304, mlp_hidden=16384, params=8_000_000_000)
    work = Workload(batch_size=8, seq_len=2048, precision="bf16-mixed")
    one = plan_memory(model, work, Layout(), Hardware.named("H100", gpus=1))
    assert one.ranks[0].model_states == 16 * 8_000_000_000  # 16 bytes per parameter = 128 GB
    assert not one.fits
    eight = Hardware.named("A100-80GB", gpus=8)
    assert not plan_memory(model, work, Layout(), eight).fits
    found = recommend(model, work, eight)
    assert found, "some layout of 8 x A100 80GB must fit an 8B model"
    for plan in found:  # every recommendation is a layout the planner itself says fits
        again = plan_memory(model, work, plan.layout, eight)
        assert again.fits and again.worst.peak == plan.worst.peak
    # Fastest-first: the first fitting layout is plain data parallelism with as little sharding as needs be.
    assert found[0].layout.tp == 1 and found[0].layout.pp == 1 and not found[0].layout.offload


def test_recommendation_for_a_gpt2_xl_on_a10g_fits_and_prefers_data_parallelism() -> None:
    model = ModelSpec.from_gpt("gpt2-xl")
    work = Workload(batch_size=64, seq_len=1024)
    hw = Hardware.named("A10G", gpus=8)
    assert not plan_memory(model, work, Layout(), hw).fits
    best = recommend(model, work, hw)[0]
    assert best.fits and best.layout.zero_stage >= 1 and best.layout.tp == best.layout.pp == 1


@pytest.mark.parametrize("bad, match", [
    (dict(layout=Layout(tp=3)), "divisible by tp"),
    (dict(hardware=Hardware(gpus=6, memory_gb=80), layout=Layout(pp=4)), "not divisible by tp x pp"),
    (dict(workload=Workload(batch_size=6, seq_len=64)), "not divisible by dp"),
    (dict(layout=Layout(pp=2, microbatches=3)), "microbatches"),
])
def test_bad_layouts_raise_naming_the_fix(bad: dict, match: str) -> None:
    base = dict(model=ModelSpec.from_gpt("nano"), workload=Workload(batch_size=8, seq_len=64),
                layout=Layout(), hardware=Hardware(gpus=4, memory_gb=80))
    with pytest.raises(ValueError, match=match):
        base.update({k: v for k, v in bad.items()})
        plan_memory(**base)


def test_layout_refuses_zero12_with_model_parallelism() -> None:
    with pytest.raises(ValueError, match="zero_stage=3"):
        Layout(zero_stage=2, tp=2)
    with pytest.raises(ValueError, match="schedule"):
        Layout(pp=2, schedule="zb_v")
    with pytest.raises(ValueError, match="unknown GPU"):
        Hardware.named("H800", gpus=1)
    with pytest.raises(ValueError, match="40, 80|write e.g."):
        Hardware.named("A100", gpus=1)


# ---- activations: prediction vs the saved-tensor measurement ----------------------------------
CFG = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=64)


def _predicted(cfg: GPTConfig, b: int, s: int, policy: str, t: int = 1, sp: bool = False, precision: str = "32-true") -> float:
    pol = "every_k" if policy.startswith("every_") else policy
    every = int(policy.split("_")[1]) if policy.startswith("every_") else 2
    return model_activation_bytes(b=b, s=s, h=cfg.n_embd, a=cfg.n_head, f=cfg.mlp_hidden, vocab=cfg.vocab_size,
                                  layers=cfg.n_layer, t=t, sp=sp, policy=pol, every=every,
                                  model=ActivationModel.for_precision(precision)).device


@pytest.mark.parametrize("b, s, policy", [
    (2, 32, "none"), (4, 64, "none"), (1, 128, "none"), (3, 48, "full"), (4, 64, "selective"), (4, 64, "every_2"),
    (2, 96, "every_3"),
])
def test_activation_prediction_matches_the_measurement_fp32(b: int, s: int, policy: str) -> None:
    measured = pt.measured_activations(CFG, b, s, policy)
    predicted = _predicted(CFG, b, s, policy)
    # Issue 8 asks for 15%; in fp32 the inventory is the model's own list of saved tensors, so it is
    # exact up to the loss's 4-byte scalar.
    assert abs(predicted - measured) <= 8, (predicted, measured)
    assert abs(predicted / measured - 1) <= 0.15


@pytest.mark.parametrize("policy", ["none", "full"])
def test_activation_prediction_under_bf16_autocast_is_exact(policy: str) -> None:
    # Exact once autocast's three 16-bit copies of the ln_1 output (one per q/k/v projection) are
    # counted (ActivationModel.qkv_input_copies); up to the loss's 4-byte scalar, as in fp32.
    measured = pt.measured_activations(CFG, 4, 64, policy, precision="bf16-mixed")
    predicted = _predicted(CFG, 4, 64, policy, precision="bf16-mixed")
    assert abs(predicted - measured) <= 8, (predicted, measured)


def _tp_activations() -> dict:
    out = {}
    for sp in (False, True):
        for policy in ("none", "full"):
            out[(sp, policy)] = pt.measured_activations(CFG, 2, 64, policy, tp=2, sp=sp)
    return out


def test_activation_prediction_under_tensor_parallelism_within_15_percent() -> None:
    results = run_distributed(_tp_activations, 2, timeout=120)
    for rank, measured in enumerate(results):
        for (sp, policy), value in measured.items():
            predicted = _predicted(CFG, 2, 64, policy, t=2, sp=sp)
            assert abs(predicted / value - 1) <= 0.15, (rank, sp, policy, predicted, value)


# ---- model states: prediction vs the tensors of real runs, to the byte --------------------------
# The parity tests of the other strategies assert the same (``_parity.assert_planner_states``):
# tensor parallel (tp2 with and without SP, tp2 x dp2), pipeline (gpipe, 1f1b, interleaved; pp2 x dp2),
# pp2 x tp2, pp2 x dp2 with ZeRO-3; tests/test_zero.py covers every ZeRO engine case.
def test_planner_model_states_equal_the_tensors_of_a_ddp_run() -> None:
    from _parity import assert_planner_states, assert_val_metrics

    results = run_distributed(targets.fit, 2, dict(ddp=True), 2, 4, validate=True, init_process_group=False, timeout=240)
    assert_planner_states(results)
    # Lightning's ddp too: the task's metrics equal one process's (the suite's strategies: their parity tests).
    assert_val_metrics(results, targets.reference(2, 4, replicas=2, microbatches=1)["state"])


# ---- the command line ----------------------------------------------------------------------------
def test_plan_cli_prints_and_writes_the_asked_layout_and_a_recommendation(tmp_path, capsys) -> None:
    import json

    from lightning_scale.cli import main

    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "gpt2-xl", "--batch-size", "64", "--seq-len", "1024", "--gpus", "8", "--gpu", "A10G",
              "--precision", "bf16-mixed", "--json", str(out)])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "recommended:" in text
    data = json.loads(out.read_text())
    assert data["asked"]["fits"] is False and data["recommended"][0]["fits"] is True
    direct = plan_memory(ModelSpec.from_gpt("gpt2-xl"), Workload(64, 1024, "bf16-mixed"), Layout(),
                         Hardware.named("A10G", gpus=8))
    assert data["asked"]["ranks"][0]["peak"] == direct.worst.peak


def test_plan_cli_reads_a_recipe(tmp_path, capsys) -> None:
    from lightning_scale.plan_cli import main

    assert main(["--recipe", "recipes/gpt/nano-cpu.yaml", "--gpu-memory-gb", "0.05", "--context-gb", "0", "--json", str(tmp_path / "p.json")]) == 0
    import json

    asked = json.loads((tmp_path / "p.json").read_text())["asked"]
    # The recipe: 2 devices, PipelineStrategy(stages=2, schedule=1f1b, microbatches=4), batch_size 32.
    assert asked["dp"] == 1 and asked["layout_fields"]["pp"] == 2 and asked["layout_fields"]["schedule"] == "1f1b"
    assert asked["microbatch_size"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "8", "--seq-len", "64", "--gpus", "1", "--gpu", "H100"], "give --model"),
    (["--model", "nano", "--batch-size", "8", "--gpus", "1", "--gpu", "A100"], "A100-80GB"),
    (["--model", "nano", "--batch-size", "8", "--gpus", "3", "--gpu", "H100", "--tp", "2"], "not divisible by tp x pp"),
])
def test_plan_cli_errors_name_the_fix(argv: list[str], message: str) -> None:
    from lightning_scale.plan_cli import main

    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_plan_cli_exits_nonzero_when_nothing_fits_and_names_the_minimum_gpu_count(tmp_path, capsys) -> None:
    import dataclasses
    import json

    from lightning_scale.core.planner import recommend
    from lightning_scale.plan_cli import main

    out = tmp_path / "plan.json"
    code = main(["--model", "gpt2-xl", "--batch-size", "64", "--seq-len", "1024", "--gpus", "1", "--gpu", "T4",
                 "--precision", "16-mixed", "--json", str(out)])
    assert code == 1
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["fits"] is False and "no layout fits on 1 x T4" in text
    n = data["minimum_gpus"]
    assert f"at least {n} x T4" in text
    # Independently: the planner finds a layout on n T4s and none on n / 2.
    model, work = ModelSpec.from_gpt("gpt2-xl"), Workload(64, 1024, "16-mixed")
    t4 = Hardware.named("T4", gpus=1)
    assert recommend(model, work, dataclasses.replace(t4, gpus=n), limit=1)
    assert not recommend(model, work, dataclasses.replace(t4, gpus=n // 2), limit=1)


def test_plan_cli_warns_about_bf16_on_gpus_without_bf16_tensor_cores(tmp_path, capsys) -> None:
    import json

    from lightning_scale.plan_cli import main

    out = tmp_path / "plan.json"
    main(["--model", "nano", "--batch-size", "8", "--seq-len", "64", "--gpus", "1", "--gpu", "T4",
          "--precision", "bf16-mixed", "--json", str(out)])
    assert "T4 has no bf16 tensor cores" in capsys.readouterr().out.replace("\n", " ")
    assert json.loads(out.read_text())["warnings"][0].startswith("T4 has no bf16 tensor cores")
    main(["--model", "nano", "--batch-size", "8", "--seq-len", "64", "--gpus", "1", "--gpu", "A10G",
          "--precision", "bf16-mixed", "--json", str(out)])
    assert json.loads(out.read_text())["warnings"] == []


# -- one rule for torch DDP's buckets; the optimizer step's temporary (issue 25) -------------------
@pytest.mark.parametrize("gpus", [1, 8])
def test_ddp_buckets_follow_one_rule_whatever_the_entry_path(gpus: int) -> None:
    # The GPT-2 1.5B shape entered as the suite's preset (exact states) and as its dimensions
    # (the ZeRO paper's forms): torch DDP's gradient copy on 8 ranks in both, on one GPU in neither.
    exact = ModelSpec.from_gpt("gpt2-xl")
    dims = ModelSpec(n_layer=exact.n_layer, hidden=exact.hidden, heads=exact.heads, vocab=exact.vocab,
                     mlp_hidden=exact.mlp_hidden, params=exact.params)
    work = Workload(batch_size=8, seq_len=1024, precision="bf16-mixed")
    hw = Hardware(gpus=gpus, memory_gb=141)
    buckets = [plan_memory(m, work, Layout(), hw).worst.detail.get("DDP gradient buckets", 0) for m in (exact, dims)]
    assert buckets == ([4 * exact.params] * 2 if gpus == 8 else [0, 0])


def test_the_foreach_adam_step_temporary_can_decide_the_verdict() -> None:
    # Model states 16 B/param; foreach AdamW adds sqrt(v) (4 B/param) at the step, measured by the
    # tracer (tests/test_traced_memory.py); fused adds nothing. A device between the two fits
    # only the fused run.
    model = ModelSpec.from_gpt("gpt2-xl")
    P = model.params
    fused = plan_memory(model, Workload(batch_size=1, seq_len=64, precision="32-true", optimizer_impl="fused"),
                        Layout(ac="full"), Hardware(gpus=1, memory_gb=1000)).worst
    foreach = plan_memory(model, Workload(batch_size=1, seq_len=64, precision="32-true", optimizer_impl="foreach"),
                          Layout(ac="full"), Hardware(gpus=1, memory_gb=1000)).worst
    assert fused.step_temporary == 0 and foreach.step_temporary == 4 * P
    assert foreach.peak == foreach.step_peak == 20 * P + (foreach.optimizer - 8 * P)  # + the 4-byte step counters
    between = (fused.peak + foreach.peak) / 2 / 1e9
    verdicts = [plan_memory(model, Workload(batch_size=1, seq_len=64, precision="32-true", optimizer_impl=impl),
                            Layout(ac="full"), Hardware(gpus=1, memory_gb=between, reserve_fraction=0,
                                                               context_gb=0)).fits
                for impl in ("fused", "foreach")]
    assert verdicts == [True, False]
