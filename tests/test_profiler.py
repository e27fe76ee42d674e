"""ScaleProfiler and its torch-only core (FLOPs, peak FLOP/s): formulas, and the callback on real gloo ranks.

No wall-clock time is asserted: only relations between the measured parts (the breakdown adds
up to the step), counts (samples and tokens per step) and which rank is slowest when one rank
is made 0.2 s slower per batch.
"""

from __future__ import annotations

import pytest
import torch

import _profiler_targets as targets
from lightning_scale.core import flops
from lightning_scale.core.peak_flops import dtype_key, lookup, peak_flops
from lightning_scale.models import GPT, GPTConfig, ViT
from lightning_scale.models.vit import ViTConfig
from lightning_scale.testing import run_distributed

SEQ = 16  # _pipeline_targets.make_data's sequence length


@pytest.mark.parametrize("preset", ["tiny", "nano", "micro"])
def test_analytic_gpt_flops_equal_the_closed_form(preset: str) -> None:
    c = GPTConfig.from_preset(preset)
    L, D, F, V, H, T = c.n_layer, c.n_embd, c.mlp_hidden, c.vocab_size, c.n_head, c.block_size
    n = L * (4 * D * D + 2 * D * F) + D * V  # q, k, v, out, MLP up/down per block; the head
    assert flops.gpt_flops_per_token(c, T) == 6 * n + 12 * L * H * (D // H) * T


@pytest.mark.parametrize("preset, dropout", [("tiny", 0.0), ("nano", 0.0), ("nano", 0.1)])
def test_analytic_gpt_flops_agree_with_flop_counter(preset: str, dropout: float) -> None:
    # dropout 0: CPU flash SDPA (our formulas); 0.1: the unfused math path (torch's bmm formulas).
    cfg = GPTConfig.from_preset(preset, dropout=dropout)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    measured = flops.measure_training_flops(model, x, lambda out: out.float().mean())
    analytic = flops.gpt_flops_per_token(cfg, cfg.block_size) * x.numel()
    assert abs(measured / analytic - 1) <= 0.02
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradients


def test_analytic_vit_flops_agree_with_flop_counter() -> None:
    cfg = ViTConfig()
    model = ViT(cfg)
    measured = flops.measure_training_flops(model, torch.randn(4, 1, 8, 8), lambda out: out.mean())
    assert abs(measured / (4 * flops.vit_flops_per_image(cfg)) - 1) <= 0.02


def test_full_recompute_counts_as_hardware_flops_only() -> None:
    assert flops.hardware_flops_per_token(300.0, 1.0) == 400.0
    assert flops.hardware_flops_per_token(300.0) == 300.0
    with pytest.raises(ValueError, match="recompute_fraction"):
        flops.hardware_flops_per_token(300.0, 2.0)


def test_peak_table_matches_exact_device_names_only() -> None:
    assert peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32, allow_tf32=True) == 494.5e12
    assert peak_flops("Tesla T4", torch.bfloat16) is None  # T4 has no bf16 column
    assert peak_flops("NVIDIA L40", "bf16") is None and peak_flops("L4 something", "bf16") is None
    assert peak_flops("cpu", "fp32") is None
    assert lookup("A100").tflops["bf16"] == 312.0
    assert all(row.source for row in __import__("lightning_scale.core.peak_flops", fromlist=["PEAKS"]).PEAKS)
    with pytest.raises(ValueError, match="no peak-FLOPs column"):
        dtype_key(torch.int8)


def _check_breakdown(row: dict) -> None:
    named = sum(row[f"perf/{p}_s"] for p in ("data", "forward", "backward", "grad_sync", "optimizer"))
    assert named <= row["perf/step_s"] * 1.0001
    assert named >= 0.9 * row["perf/step_s"], row  # the named phases explain >= 90% of the step


def test_ddp_with_accumulation_counts_global_tokens_and_reports_mfu_with_a_given_peak() -> None:
    results = run_distributed(targets.fit_profiled, 2, "ddp", 6, 4, accumulate=2, peak_tflops=0.05,
                              init_process_group=False, timeout=240)
    rows = results[0]["history"]
    assert len(rows) == 6
    for row in rows[1:]:  # step 1 includes start-up
        # global samples per optimizer step = 4 per device x 2 accumulated x 2 replicas
        assert row["perf/samples_per_s"] * row["perf/step_s_max"] == pytest.approx(16)
        assert row["perf/tokens_per_s"] * row["perf/step_s_max"] == pytest.approx(16 * SEQ)
        assert row["perf/tokens_per_s_per_device"] == pytest.approx(row["perf/tokens_per_s"] / 2)
        flops_step = row["perf/model_flops_per_step"]
        assert row["perf/mfu"] == pytest.approx(flops_step / row["perf/step_s_max"] / (2 * 0.05e12))
        assert not any(k.startswith("perf/comm") for k in row)  # DDP's C++ reducer: not seen, so not reported
        _check_breakdown(row)
    assert results[1]["history"][-1]["perf/step_s_max"] == rows[-1]["perf/step_s_max"]  # gathered: same on all ranks


def test_pipeline_microbatches_do_not_add_samples_and_the_schedule_is_timed(tmp_path) -> None:
    results = run_distributed(targets.fit_profiled, 2, "pipeline", 5, 8, trace_dir=str(tmp_path),
                              init_process_group=False, timeout=240)
    # torch.profiler trace of steps 2-3 on rank 0 only: a Chrome trace file and a top-ops table.
    assert results[0]["trace"].endswith("rank0_steps2-3.json") and (tmp_path / "rank0_steps2-3.json").is_file()
    assert results[0]["top_ops"] and results[1]["trace"] == ""
    for row in results[0]["history"][1:]:
        assert row["perf/tokens_per_s"] * row["perf/step_s_max"] == pytest.approx(8 * SEQ)  # 1 replica
        # The schedule (forward and backward of every microbatch) is the training step: forward.
        # Lightning's backward hooks still fire (around restoring the schedule's gradients).
        assert 0 < row["perf/backward_s"] < 0.1 * row["perf/forward_s"]
        assert 0 < row["perf/bubble_theory_s"] < row["perf/forward_s"]
        # Measured bubble: schedule time minus this rank's recorded compute actions.
        assert 0 <= row["perf/bubble_fraction"] < 1
        assert row["perf/bubble_s"] == pytest.approx(row["perf/bubble_fraction"] * row["perf/forward_s"])
        # Stage-to-stage waits and the loss broadcast happen inside the schedule (the forward phase).
        assert 0 < row["perf/comm_pp_s"] <= row["perf/forward_s"]
        _check_breakdown(row)


def test_a_slowed_rank_is_found_and_an_unknown_device_omits_mfu() -> None:
    results = run_distributed(targets.fit_profiled, 2, "mesh", 5, 4, slow_rank=1, init_process_group=False, timeout=240)
    rows = results[0]["history"]
    assert all(row["perf/slowest_rank"] == 1 for row in rows[1:])
    # Rank 0 waits for the slow rank in the data-parallel all-reduce after its backward.
    for fast, slow in zip(rows[1:], results[1]["history"][1:]):
        assert fast["perf/grad_sync_s"] > slow["perf/grad_sync_s"]
        # ... and that wait is communication on the dp dimension (the 0.2 s sleep is in rank 1's forward).
        assert fast["perf/comm_dp_s"] > 0.15 > slow["perf/comm_dp_s"]
        assert fast["perf/comm_s"] <= fast["perf/grad_sync_s"] + fast["perf/optimizer_s"] + fast["perf/forward_s"]
        assert fast["perf/compute_s"] == pytest.approx(
            sum(fast[f"perf/{p}_s"] for p in ("forward", "backward", "grad_sync", "optimizer")) - fast["perf/comm_s"])
    assert any("rank 1 is a straggler" in w for w in results[0]["warnings"])
    assert all("perf/mfu" not in row for row in rows) and "perf/model_flops_per_step" in rows[0]
    assert sum("MFU is omitted" in w for w in results[0]["warnings"]) == 1  # warned once
    assert not any("MFU is omitted" in w or "straggler" in w for w in results[1]["warnings"])  # by rank 0 only


@pytest.mark.parametrize("kind, world, batch, replicas", [("tp", 2, 4, 1), ("zero3", 2, 4, 2), ("3d", 4, 4, 1),
                                                         ("mesh_ac", 2, 4, 2)])
def test_every_strategy_counts_its_replicas(kind: str, world: int, batch: int, replicas: int) -> None:
    results = run_distributed(targets.fit_profiled, world, kind, 3, batch, init_process_group=False, timeout=300)
    for r in results:
        row = r["history"][-1]
        assert row["perf/tokens_per_s"] * row["perf/step_s_max"] == pytest.approx(batch * replicas * SEQ)
        per_token = row["perf/model_flops_per_step"] / (batch * replicas * SEQ)
        if kind == "mesh_ac":  # full recompute: + one forward of every block
            from _pipeline_targets import CFG

            D, F = CFG.n_embd, CFG.mlp_hidden  # one more forward per block: 2 x weights + 4 H Q T
            extra = CFG.n_layer * (2 * (4 * D * D + 2 * D * F) + 4 * D * SEQ) * batch * replicas * SEQ
            assert row["perf/hardware_flops_per_step"] == pytest.approx(row["perf/model_flops_per_step"] + extra)
        else:
            assert "perf/hardware_flops_per_step" not in row
        assert per_token > 0
        # Communication by mesh dimension: the dimensions this layout communicates over, and no other.
        dims = {"tp": {"tp"}, "zero3": {"dp"}, "3d": {"tp", "pp"}, "mesh_ac": {"dp"}}[kind]
        seen = {k[len("perf/comm_"):-2] for k in row if k.startswith("perf/comm_") and k.endswith("_s")
                and k != "perf/comm_s"}
        assert seen == dims, seen
        assert all(row[f"perf/comm_{d}_s"] > 0 for d in dims)
        assert 0 < row["perf/comm_s"] < row["perf/step_s"]


def test_recompute_flops_of_full_checkpointing_are_a_third_of_the_block_flops() -> None:
    # nano (D=128, F=512, L=4), T=128: a block's forward is 2 x 196,608 weights + 4 x 128 x 128.
    cfg = GPTConfig.from_preset("nano")
    assert flops.gpt_recompute_flops_per_token(cfg, 128, 4) == 4 * (2 * 196_608 + 4 * 128 * 128) == 1_835_008
    # A third of the blocks' 6N + 12LHQT (the head, outside the blocks, is not recomputed).
    blocks_model = flops.gpt_flops_per_token(cfg, 128) - 6 * cfg.n_embd * cfg.vocab_size
    assert flops.gpt_recompute_flops_per_token(cfg, 128, 4) == pytest.approx(blocks_model / 3)


def test_comm_timer_counts_blocking_waits_once_by_dimension() -> None:
    results = run_distributed(targets.comm_timer_calls, 2, timeout=120)
    for r in results:
        assert r["patched"] and r["restored"]
        # all_reduce + broadcast_object_list (its inner broadcast is nested: not counted again)
        assert r["calls"] == {"dp": 2, "other": 1}, r["calls"]
        assert r["seconds"]["other"] >= 0.05
    assert results[0]["seconds"]["dp"] >= 0.15  # rank 0 waited for the late rank 1
    assert results[1]["seconds"]["dp"] < 0.1


# -- stragglers and the final table (pure) -------------------------------------------------------
class _Trainer:
    is_global_zero = True


def _straggle(profiler, forwards_per_step: list[list[float]]) -> list[str]:
    import warnings as w

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        for step, forwards in enumerate(forwards_per_step):
            profiler._track_stragglers(_Trainer(), step, forwards)
    return [str(c.message) for c in caught]


def test_noise_that_moves_between_ranks_is_counted_but_not_warned() -> None:
    from lightning_scale.callbacks import ScaleProfiler

    profiler = ScaleProfiler()  # spread > 20% on every step, but the slowest rank changes
    warned = _straggle(profiler, [[1.0, 1.5], [1.5, 1.0], [1.0, 1.5], [1.5, 1.0], [1.0, 1.5]])
    assert warned == []
    assert profiler.straggles == {0: 2, 1: 3}


def test_a_persistent_straggler_is_warned_once_with_every_ranks_figures() -> None:
    from lightning_scale.callbacks import ScaleProfiler

    profiler = ScaleProfiler(straggler_patience=3)
    warned = _straggle(profiler, [[1.0, 1.0, 1.6]] * 6)
    assert len(warned) == 1
    assert "rank 2 is a straggler: slowest forward on 3 logged steps in a row (to step 2)" in warned[0]
    assert "forward seconds by rank at step 2: [1.000, 1.000, 1.600], median 1.000 s, rank 2 +0.600 s" in warned[0]


def test_the_final_table_reports_ranges_and_counts_straggling_steps_per_rank() -> None:
    from lightning_scale.callbacks.profiler import summary_rows

    history = [{"perf/step_s": 1.0, "perf/slowest_rank": 0.0}, {"perf/step_s": 3.0, "perf/slowest_rank": 1.0},
               {"perf/step_s": 2.0, "perf/slowest_rank": 1.0}]
    rows = summary_rows(history, {1: 2}, 0.2)
    assert rows[0] == ("perf/step_s", "2", "1", "3")
    assert all(r[0] != "perf/slowest_rank" for r in rows)  # a rank index has no median
    assert rows[-1] == ("straggling steps (spread > 20%)", "rank 1: 2 of 3", "", "")



@pytest.mark.parametrize("kind, batch, world", [("mesh", 4, 2), ("zero1", 4, 2), ("zero2", 4, 2), ("zero3", 4, 2),
                                                ("zero3_bf16", 4, 2), ("tp", 4, 2), ("tp_sp", 4, 2),
                                                ("pipeline", 8, 2), ("3d", 4, 4)])
def test_communication_bytes_equal_the_closed_forms(kind: str, batch: int, world: int) -> None:
    """perf/comm_bytes_<dim>: the payload each rank handed to communication in one step, byte for
    byte the layout's formula (fp32; P parameters, L blocks, hidden h, batch B x T tokens)."""
    from _pipeline_targets import CFG

    from lightning_scale.models.gpt import gpt_param_count

    P, L, h, V, T = gpt_param_count(CFG), CFG.n_layer, CFG.n_embd, CFG.vocab_size, SEQ
    expected = {
        # data parallel: one all-reduce of every gradient
        "mesh": {"dp": 4 * P},
        # ZeRO-1 / ZeRO-2 (the suite's bucketed engine): each bucket's gradients reduce-scattered,
        # its updated parameters all-gathered; P' = the parameters with the buckets' padding
        "zero1": None, "zero2": None,  # {"dp": 2 x 4 P'}, with the engine's P' below
        # ZeRO-3 (FSDP2, blocks resharded after forward): all-gather in forward, again in backward,
        # reduce-scatter of the gradients (no padding: every dim 0 divides by 2 here)
        "zero3": {"dp": 3 * 4 * P},
        # ... under bf16-mixed (FSDP2's MixedPrecisionPolicy): both all-gathers carry bf16 (2 bytes
        # per parameter, half of fp32), the reduce-scatter stays fp32
        "zero3_bf16": {"dp": 2 * 2 * P + 4 * P},
        # Megatron TP (separate q, k, v): per block 2 all-reduces of (B, T, h) in forward (after
        # out_proj and down_proj) and 4 in backward (input gradients of q, k, v and up_proj)
        "tp": {"tp": 6 * L * batch * T * h * 4},
        # ... with sequence parallelism: per block 2 all-gathers (before attention and MLP) and 2
        # reduce-scatters (after out_proj and down_proj) of (B, T, h) in forward, the mirror in
        # backward; 1 more all-gather of the final norm's output before the head and 1 in backward
        # for the embedding's gradient (its sequence shard); the norms' weight and bias gradients
        # (Partial over the sequence shards, h each) all-reduced: 2 norms x 2 per block + ln_f's 2
        "tp_sp": {"tp": ((4 * L + 2) + 4 * L) * batch * T * h * 4 + (4 * L + 2) * h * 4},
        # 2 stages, 4 microbatches: every microbatch's activation forward (stage 0) or its gradient
        # backward (stage 1), the mean loss broadcast (an fp32 scalar), the tied embedding / head
        # gradient all-reduced between the two stages holding it (V x h)
        "pipeline": {"pp": batch * T * h * 4 + 4 + V * h * 4},
        # 3D, pp=2 x tp=2 (2 microbatches): each tensor-parallel rank of a stage sends its own copy
        # of the (replicated) activation, so "pp" is the pipeline's; "tp" is Megatron's over the
        # L / 2 blocks of the rank's stage (the embedding and head are replicated over tp)
        "3d": {"pp": batch * T * h * 4 + 4 + V * h * 4, "tp": 6 * (L // 2) * batch * T * h * 4},
    }[kind]
    results = run_distributed(targets.fit_profiled, world, kind, 3, batch, init_process_group=False, timeout=300)
    for r in results:
        if kind in ("zero1", "zero2"):
            assert r["padded_numel"] >= P
            expected = {"dp": 2 * 4 * r["padded_numel"]}
        row = r["history"][-1]
        counted = {k[len("perf/comm_bytes_"):]: v for k, v in row.items() if k.startswith("perf/comm_bytes_")}
        assert counted == expected, (kind, counted, expected)
        assert row["perf/comm_bytes"] == sum(expected.values())
