"""Traced planning (``lightning_scale.core.traced_memory``, ``lightning_scale.strategies.offline``):
a user's module built on fake tensors, parallelized by the strategies' own code under a fake
process group, stepped under torch's MemTracker, in this one process. Checked against exact
arithmetic that does not come from the tracer (model states of a sharded module), against the
planner's closed form where that is exact (the suite's GPT), and for the optimizer-step
temporary the closed forms used to miss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lightning_scale.core.traced_memory import TraceError
from lightning_scale.strategies import MeshStrategy, TensorParallelStrategy, ZeroStrategy
from lightning_scale.strategies.offline import trace_layout

D, LAYERS, B = 64, 4, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 4 * D, bias=False)
        self.fc2 = nn.Linear(4 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class UserMLP(nn.Module):
    """Written the way users write them: layers on the module, a ModuleList of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


P = LAYERS * 2 * 4 * D * D  # parameters: every dim 0 (4D, D) divides by 2 and 4


def _batch() -> torch.Tensor:
    return torch.randn(B, 16, D)


def _loss(module, x):
    return module(x).pow(2).mean()


def _trace(strategy, world: int, **kwargs):
    return trace_layout(UserMLP, _batch, _loss, strategy, world, **kwargs)


@pytest.mark.parametrize(("strategy", "world", "share"), [
    (lambda: MeshStrategy(), 2, 1),  # data parallel: every rank holds all
    (lambda: ZeroStrategy(stage=3), 4, 4),  # FSDP2 over 4 ranks: a quarter
    (lambda: TensorParallelStrategy(tensor_parallel_size=2, tp_plan={
        "model.blocks.*.fc1": ColwiseParallel(), "model.blocks.*.fc2": RowwiseParallel()}), 2, 2),
    # TP = 2 inside each replica, FSDP2 over 2 replicas: a quarter
    (lambda: __import__("lightning_scale.strategies", fromlist=["Parallel3DStrategy"]).Parallel3DStrategy(
        pipeline_parallel_size=1, tensor_parallel_size=2, zero_stage=3, microbatches=1, tp_plan={
            "model.blocks.*.fc1": ColwiseParallel(), "model.blocks.*.fc2": RowwiseParallel()}), 4, 4),
])
def test_between_steps_a_rank_holds_its_share_of_parameters_and_adam_states(strategy, world, share) -> None:
    # fp32 AdamW: parameter 4 B + two moments 8 B per parameter this rank holds (gradients freed
    # by zero_grad(set_to_none=True)); the step counters are 0-d fp32 tensors, one per parameter.
    traced = _trace(strategy(), world)
    counters = 2 * LAYERS  # one 4-byte step tensor per parameter tensor
    assert traced.after_step == 12 * P // share + 4 * counters
    assert traced.world_size == world


@pytest.mark.parametrize(("stage", "grads_share"), [(1, 1), (2, 4)])
def test_zero_1_and_2_hold_the_buckets_of_the_strategys_own_engine(stage, grads_share) -> None:
    # ZeroStrategy's engine (core/sharding.py) on 4 ranks, one 25 MiB bucket (P fp32 elements,
    # divisible by 4): the full flat parameters (4 P), gradients (stage 1: the full flat buffer
    # kept between steps, 4 P; stage 2: this rank's reduced chunk, P), AdamW moments of the
    # rank's chunk (8 P / 4) and one 4-byte step counter for the bucket's chunk parameter.
    traced = _trace(ZeroStrategy(stage=stage), 4)
    assert traced.after_step == 4 * P + 4 * P // grads_share + 8 * P // 4 + 4
    # stage 2 reduces bucket by bucket as gradients arrive: with 8 buckets of 64 KiB it holds at
    # most a few buckets' staging, where stage 1 holds every gradient
    if stage == 2:
        two = _trace(ZeroStrategy(stage=2, bucket_mb=1 / 16), 4)
        one = _trace(ZeroStrategy(stage=1, bucket_mb=1 / 16), 4)
        assert two.phase_peaks["backward"] < one.phase_peaks["backward"] - 2 * P


def test_foreach_adamw_holds_a_temporary_as_large_as_the_parameters_at_the_step() -> None:
    # torch's default (foreach) AdamW computes sqrt(v) for all parameters at once: 4 more bytes
    # per parameter at the step than the fused kernel (the Llama figure of issue 25).
    foreach = _trace(MeshStrategy(), 1, implementation="foreach")
    fused = _trace(MeshStrategy(), 1, implementation="fused")
    step_foreach, step_fused = foreach.phase_peaks["optimizer step"], fused.phase_peaks["optimizer step"]
    assert step_foreach - step_fused == 4 * P


def _real_step_peak(model: nn.Module, batch: torch.Tensor, loss, optimizer) -> int:
    """The reference: plain PyTorch on real CPU tensors, no strategy, the second step's peak as
    MemTracker counts the real storages."""
    from torch.distributed._tools.mem_tracker import MemTracker

    for step in range(2):
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())


def test_the_suite_gpt_traced_on_fake_tensors_equals_a_real_step() -> None:
    from lightning_scale.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)

    def loss(module, x):
        logits = module(x)
        return nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())

    traced = trace_layout(lambda: GPT(cfg), lambda: torch.randint(0, 512, (4, 128)), loss, MeshStrategy(), 1,
                          implementation="fused")
    torch.manual_seed(0)
    model = GPT(cfg)
    real = _real_step_peak(model, torch.randint(0, 512, (4, 128)), loss,
                           torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    assert traced.peak == real


def test_a_model_that_cannot_be_built_on_fake_tensors_is_named() -> None:
    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))
            self.n = int(self.w.sum().item() > 0)  # a data-dependent construction

    with pytest.raises(TraceError, match="could not be built on fake tensors"):
        trace_layout(ReadsValues, _batch, _loss, MeshStrategy(), 1)


# -- the command line: a Hugging Face config, traced ---------------------------------------------
def _llama_config(tmp_path, **overrides) -> str:
    import json

    fields = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
                  intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=128, tie_word_embeddings=False)
    fields.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return str(path)


def _plan(args: list[str], tmp_path) -> dict:
    import json

    from lightning_scale.plan_cli import main

    out = tmp_path / "plan.json"
    code = main([*args, "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == (0 if data["fits"] else 1)
    return data


def test_plan_traces_a_hugging_face_llama_from_its_config(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _llama_config(tmp_path)
    common = ["--hf-config", config, "--batch-size", "4", "--seq-len", "64", "--gpus", "1", "--precision", "32-true",
              "--optimizer-impl", "fused"]
    data = _plan([*common, "--gpu-memory-gb", "1"], tmp_path)
    assert data["source"] == "traced" and data["fits"]
    # independent reference: the same HF model, plain PyTorch on real CPU tensors, no strategy
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, 256, (4, 64))
    real = _real_step_peak(model, x, lambda m, b: m(input_ids=b, labels=b).loss,
                           torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    assert data["peak"] == pytest.approx(real, rel=0.03), (data["peak"], real)
    # "fits" only below the usable memory: the same run on a device just too small is refused
    small = _plan([*common, "--gpu-memory-gb", f"{data['peak'] * 0.999 / 1e9:.9f}", "--reserve", "0", "--context-gb",
                   "0"], tmp_path)
    assert not small["fits"] and small["peak"] == data["peak"]
    # the CUDA context (0.287 GB by default) is not the model's: 0.2 GB of room above the peak
    # is not enough with it, and is without it
    room = f"{(data['peak'] + 0.2e9) / 1e9:.9f}"
    assert not _plan([*common, "--gpu-memory-gb", room, "--reserve", "0"], tmp_path)["fits"]
    assert _plan([*common, "--gpu-memory-gb", room, "--reserve", "0", "--context-gb", "0"], tmp_path)["fits"]


def test_plan_traces_zero3_on_8_ranks_and_eager_attention_costs_more(tmp_path) -> None:
    config = _llama_config(tmp_path)
    common = ["--hf-config", config, "--batch-size", "8", "--seq-len", "128", "--gpu-memory-gb", "80",
              "--precision", "bf16-mixed"]
    one = _plan([*common, "--gpus", "1", "--attn-implementation", "sdpa"], tmp_path)
    eager = _plan([*common, "--gpus", "1", "--attn-implementation", "eager"], tmp_path)
    zero3 = _plan([*common, "--gpus", "8", "--strategy", "zero3"], tmp_path)
    assert eager["peak"] > one["peak"]  # the (seq x seq) scores and probabilities are kept for the backward
    assert zero3["peak"] < one["peak"] and zero3["layout"].startswith("dp8 zero3")


def test_checkpointed_blocks_are_recomputed_in_the_forwards_precision() -> None:
    # bf16-mixed (emulated CUDA autocast) with full checkpointing: the backward recomputes each
    # block with the casts of its forward (else torch's checkpoint refuses the recomputed
    # tensors' dtypes), and checkpointing lowers the forward's peak.
    plain = _trace(MeshStrategy(), 1, precision="bf16-mixed")
    checkpointed = _trace(MeshStrategy(activation_checkpointing="full", block_class=Block), 1, precision="bf16-mixed")
    assert checkpointed.phase_peaks["forward"] < plain.phase_peaks["forward"]


def test_tensor_parallel_from_the_models_own_hugging_face_plan(tmp_path) -> None:
    # TP = 2 with Llama's own plan (config.base_model_tp_plan, translated to torch styles): between
    # steps a rank holds 12 bytes per element of half of every planned projection and of every
    # replicated tensor (embeddings, norms, head), plus a 4-byte Adam step counter per tensor,
    # plus the rotary embedding's buffers.
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_scale.adapters.huggingface import hf_tp_plan
    from lightning_scale.core.planner import Hardware, Layout, Workload
    from lightning_scale.plan_trace import hf_model_from_config, trace_plan

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    plan = hf_tp_plan(model)
    assert set(plan) == {f"model.layers.*.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "mlp.down_proj")}
    planned = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    named = list(model.named_parameters())
    held = sum(p.numel() // 2 if n.split(".")[-2] in planned else p.numel() for n, p in named)
    traced = trace_plan(hf_model_from_config(cfg, 64), Workload(batch_size=4, seq_len=64, precision="32-true"),
                        Layout(tp=2), Hardware(gpus=2, memory_gb=1))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert traced.after_step == 12 * held + 4 * len(named) + buffers


def test_gpt2_tensor_parallel_is_traced_with_its_conv1d_plan(tmp_path) -> None:
    # TP = 2 with GPT-2's built-in Conv1D plan (its config declares none): between steps a rank
    # holds 12 bytes per element of half of every Conv1D weight and of c_fc's bias, and of all of
    # every other tensor (c_attn's fused bias and the row-split biases are replicated; embeddings,
    # norms; the tied head once), plus a 4-byte Adam step counter per tensor.
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_scale.core.planner import Hardware, Layout, Workload
    from lightning_scale.plan_trace import hf_model_from_config, trace_plan

    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    named = list(model.named_parameters())
    halved = {"c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight", "c_fc.bias"}
    held = sum(p.numel() // 2 if any(n.endswith(h) for h in halved) else p.numel() for n, p in named)
    traced = trace_plan(hf_model_from_config(cfg, 64), Workload(batch_size=4, seq_len=64, precision="32-true"),
                        Layout(tp=2), Hardware(gpus=2, memory_gb=1))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert traced.after_step == 12 * held + 4 * len(named) + buffers


def test_checkpointing_a_hugging_face_model_turns_its_generation_cache_off(tmp_path) -> None:
    # With use_cache=True (the config's default) a training forward keeps every layer's keys and
    # values in a cache that checkpointing cannot free. The suite's checkpointing turns it off,
    # as transformers' own gradient checkpointing does: the traced step then peaks where plain
    # PyTorch with Hugging Face's gradient checkpointing peaks on real tensors.
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_scale.core.planner import Hardware, Layout, Workload
    from lightning_scale.plan_trace import hf_model_from_config, trace_plan

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    assert cfg.use_cache
    with pytest.warns(UserWarning, match="config.use_cache set to False"):
        traced = trace_plan(hf_model_from_config(cfg, 256), Workload(batch_size=4, seq_len=256, precision="32-true",
                                                                    optimizer_impl="fused"),
                            Layout(ac="full"), Hardware(gpus=1, memory_gb=1))
    # the reference: plain PyTorch and transformers on fake tensors (the same kernels' shapes as
    # the trace), Hugging Face's own gradient checkpointing, no suite code
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "use_cache": True}))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        x = torch.randint(0, 256, (4, 256))
        reference = _real_step_peak(model, x, lambda m, b: m(input_ids=b, labels=b).loss,
                                    torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    assert traced.peak == pytest.approx(reference, rel=1e-3)  # 8 KiB apart at 12.3 MB


def test_a_16_bit_true_precision_is_traced_in_that_dtype() -> None:
    # bf16-true: Lightning converts the model; torch's Adam keeps its moments in the parameter
    # dtype: 2 + 2 + 2 bytes per parameter between steps, plus the fp32 step counters.
    traced = _trace(MeshStrategy(), 1, precision="bf16-true")
    assert traced.after_step == 6 * P + 4 * (2 * LAYERS)


@pytest.mark.parametrize("schedule,torch_name", [("gpipe", "GPipe"), ("1f1b", "1F1B")])
def test_a_traced_pipeline_matches_torchs_own_schedule_measured_on_gloo(schedule, torch_name) -> None:
    # Reference: torch's PipelineStage and schedule on 2 real gloo processes, real tensors, the
    # stages written by hand (tests/_pipeline_memory_targets.py, no suite code); each rank's peak
    # of live bytes in the second step from the profiler's allocation events. Traced: the
    # suite's PipelineStrategy (decoder adapter, same split) on fake tensors. Measured on
    # 2026-12-03: GPipe equal within 64 bytes on both ranks; 1F1B 0.995 (rank 0, torch holds one
    # more sent activation until its send is waited on) and 1.013 (rank 1).
    import _pipeline_memory_targets as targets

    from lightning_scale.adapters.huggingface import decoder_stage_forward
    from lightning_scale.plan_trace import hf_model_from_config
    from lightning_scale.strategies import PipelineStrategy
    from lightning_scale.strategies.offline import trace_pipeline_layout
    from lightning_scale.testing import run_distributed

    measured = run_distributed(targets.measured_pipeline_peak, 2, torch_name, timeout=300)
    model = hf_model_from_config(targets.config(), targets.SEQ)

    def batch():
        ids = torch.randint(0, targets.CONFIG["vocab_size"], (targets.ROWS, targets.SEQ))
        return (ids,), ids

    def loss(network, logits, target):
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    traced = trace_pipeline_layout(
        model.build, batch, loss,
        lambda: PipelineStrategy(stages=2, schedule=schedule, microbatches=targets.MICROBATCHES,
                                 split_points=["model.layers.2"], stage_forward=decoder_stage_forward),
        world_size=2)
    assert len(traced) == 2
    for rank, (t, m) in enumerate(zip(traced, measured)):
        assert abs(t.peak / m - 1) <= 0.02, f"rank {rank}: traced {t.peak} vs measured {m} bytes"


# -- the command line: a LightningCLI recipe with the user's own module ----------------------------
def _recipe(tmp_path, strategy: str, devices: int, batch: int = 8) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model:
  class_path: zoo.LayersOnModule
data:
  class_path: zoo.ZooData
  init_args: {{batch_size: {batch}}}
trainer:
  devices: {devices}
  precision: 32-true
  strategy: {strategy}
""")
    return str(path)


def test_plan_traces_a_recipes_own_module_datamodule_and_optimizer(tmp_path) -> None:
    # Independent reference: the same user LightningModule stepped for real on CPU (its own
    # training_step and configure_optimizers: AdamW, which picks the for-loop on CPU tensors).
    import zoo

    from lightning_scale.plan_cli import main

    data = _plan(["--config", _recipe(tmp_path, "ddp", 1), "--gpu-memory-gb", "1", "--optimizer-impl", "for-loop"],
                 tmp_path)
    assert data["source"] == "traced" and data["fits"]
    module = zoo.LayersOnModule()
    x, y = zoo.batches("layers_on_module", 8)
    real = _real_step_peak(module, (x, y), lambda m, b: m.training_step(b, 0), module.configure_optimizers())
    assert data["peak"] == pytest.approx(real, rel=0.03), (data["peak"], real)
    # the recipe's ZeRO-3 over 4 ranks: a quarter of the parameters and AdamW moments between steps
    # (fp32: parameter 4 B + two moments 8 B; every dim 0 of this module divides by 4; one 4-byte
    # step counter per parameter tensor, not sharded)
    sharded = _plan(["--config", _recipe(tmp_path, "zero3", 4), "--gpu-memory-gb", "1"], tmp_path)
    params = sum(p.numel() for p in module.parameters())
    assert sharded["after_step"] == 12 * params // 4 + 4 * len(list(module.parameters()))
    with pytest.raises(SystemExit, match="pipeline is not traced from --config"):
        main(["--config", _recipe(tmp_path, "pipeline", 2), "--gpu-memory-gb", "1"])


def test_a_traced_pipeline_with_zero3_on_the_replicas_matches_torchs_own_schedule() -> None:
    # pp=2 x dp=2 on 4 gloo processes: FSDP2 on each stage's replicas, kept gathered through the
    # schedule, torch's 1F1B with its no-sync backwards and the reduction at the end (the
    # unsharded gradients accumulate over the microbatches); live bytes from the profiler.
    # Traced: PipelineStrategy(zero_stage=3) on fake tensors, ranks (pp, dp=0).
    import _pipeline_memory_targets as targets

    from lightning_scale.adapters.huggingface import decoder_stage_forward
    from lightning_scale.plan_trace import hf_model_from_config
    from lightning_scale.strategies import PipelineStrategy
    from lightning_scale.strategies.offline import trace_pipeline_layout
    from lightning_scale.testing import run_distributed

    measured = run_distributed(targets.measured_pipeline_peak, 4, "1F1B", True, timeout=300)
    model = hf_model_from_config(targets.config(), targets.SEQ)

    def batch():
        ids = torch.randint(0, targets.CONFIG["vocab_size"], (targets.ROWS, targets.SEQ))
        return (ids,), ids

    traced = trace_pipeline_layout(
        model.build, batch, lambda network, logits, t: nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten()),
        lambda: PipelineStrategy(stages=2, schedule="1f1b", microbatches=targets.MICROBATCHES, zero_stage=3,
                                 split_points=["model.layers.2"], stage_forward=decoder_stage_forward),
        world_size=4)
    # Measured on 2026-12-03: pipeline rank 0 11,517,164 bytes in every run, traced 0.994 (without
    # the no-sync backwards the trace gave 0.969). Pipeline rank 1's real peak depends on timing:
    # 9,666,036 (4 of 5 quiet runs), 10,322,420 and, in a CI run on a busy machine, 10,978,804:
    # steps of exactly one decoder layer's fp32 parameters (656,384 bytes), an unsharded layer
    # buffer of FSDP2 still alive because its asynchronous reduction or gather has not completed
    # (k of the stage's 2 layers). The trace (no asynchrony) must match one of those states
    # within 2%; a 6% tolerance on the raw peak failed on the busy machine (traced 0.892).
    assert abs(traced[0].peak / measured[0] - 1) <= 0.02, (traced[0].peak, measured[0])
    with torch.device("meta"):
        layer_bytes = 4 * sum(p.numel() for p in model.build().model.layers[0].parameters())
    assert layer_bytes == 656_384
    states = [measured[2] - k * layer_bytes for k in range(3)]  # k in-flight layer buffers: 0, 1 or 2
    assert min(abs(traced[1].peak / state - 1) for state in states) <= 0.02, (traced[1].peak, measured[2])


def test_tracing_another_rank_leaves_this_process_rank_zero() -> None:
    # Tracing pipeline rank 1 plays global rank 1; Lightning's rank_zero_only (loggers, prints)
    # must still see this process as rank 0 afterwards.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from transformers import LlamaConfig

    from lightning_scale.core.planner import Hardware, Layout, Workload
    from lightning_scale.plan_trace import hf_model_from_config, trace_plan

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    traced = trace_plan(hf_model_from_config(cfg, 16), Workload(batch_size=4, seq_len=16, precision="32-true"),
                        Layout(pp=2), Hardware(gpus=2, memory_gb=1))
    assert len(traced.stage_peaks) == 2
    assert rank_zero_only.rank == 0
