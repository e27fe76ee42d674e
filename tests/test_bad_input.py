"""Bad input (issue 11, reliability item 5): one table of invalid configurations, each raising a
clear error that names the fix, before any collective.

Every row is checked in this process, where no process group exists: an error raised here is
raised on every rank, identically, before a rank could enter a collective (strategy options are
validated in ``__init__``, layouts in ``setup_environment`` before the process group starts, data
paths in the data module's ``__init__``, price rows and callback options when built). One
multi-rank case after the table shows it with real processes: both ranks raise the same error,
and no process group was ever created.

NaN / inf losses (the other half of item 5) are tested at the end of this file: NonFiniteGuard
stops every rank together, naming the step and the rank.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT_RECIPE = str(REPO_ROOT / "recipes" / "gpt" / "nano-cpu.yaml")
SINGLE_PROCESS = ["--trainer.devices=1", "--trainer.logger=false"]

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:(?s).*deprecated in v4\.49:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:(?s).*JSONARGPARSE_DEPRECATION_WARNINGS:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:No seed found:UserWarning"),  # the CLI rows fail before seeding matters
]


@dataclass(frozen=True)
class Bad:
    """One invalid input: ``make(tmp_path)`` must raise ``error`` with a message matching ``match``
    (a regex that includes the fix the message names)."""

    id: str
    make: Callable[[Path], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    match: str


# -- builders -------------------------------------------------------------------------------------------
def _pipeline(**kw: Any) -> Any:
    from lightning_scale.strategies import PipelineStrategy

    return PipelineStrategy(**kw)


def _tp(**kw: Any) -> Any:
    from lightning_scale.strategies import TensorParallelStrategy

    return TensorParallelStrategy(**kw)


def _colwise() -> Any:
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel()


def _3d(**kw: Any) -> Any:
    from lightning_scale.strategies import Parallel3DStrategy

    return Parallel3DStrategy(**kw)


def _zero(**kw: Any) -> Any:
    from lightning_scale.strategies import ZeroStrategy

    return ZeroStrategy(**kw)


def _mesh(**kw: Any) -> Any:
    from lightning_scale.strategies import MeshStrategy

    return MeshStrategy(**kw)


def _layout(strategy: Any, world_size: int) -> Any:
    """What the strategy's ``setup_environment`` checks first, before the process group starts."""
    return strategy.dims.resolve(world_size)


def _cli(*args: str) -> None:
    from lightning_scale.cli import main

    main(list(args))


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _text(tmp: Path, **kw: Any) -> Any:
    from lightning_scale.data import TextDataModule

    return TextDataModule(**kw)


def _image(tmp: Path, **kw: Any) -> Any:
    from lightning_scale.data import ImageDataModule

    return ImageDataModule(**kw)


def _loose_images(tmp: Path) -> str:
    from PIL import Image

    root = tmp / "loose"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "a.png")
    return str(root)


def _partial_cifar(tmp: Path) -> str:
    root = tmp / "cifar"
    root.mkdir()
    for name in ("data_batch_1", "data_batch_2", "batches.meta"):
        (root / name).write_bytes(b"")
    return str(root)


def _overrides(rows: Any) -> Any:
    from lightning_scale.core.prices import load_price_table

    return load_price_table(rows)


def _prices_env(tmp: Path, text: str | None) -> Any:
    import os

    from lightning_scale.core.prices import ENV_VAR, load_price_table

    os.environ[ENV_VAR] = str(tmp / "prices.yaml") if text is None else _write(tmp / "prices.yaml", text)
    return load_price_table()


def _plan(**layout: Any) -> Any:
    from lightning_scale.core.planner import Hardware, Layout, ModelSpec, Workload, plan_memory

    return plan_memory(ModelSpec.from_gpt("nano"), Workload(batch_size=8, seq_len=64), Layout(**layout),
                       Hardware(gpus=4, memory_gb=80))


def _hardware(name: str) -> Any:
    from lightning_scale.core.planner import Hardware

    return Hardware.named(name, gpus=1)


def _planner_layout(**kw: Any) -> Any:
    from lightning_scale.core.planner import Layout

    return Layout(**kw)


def _cost(**kw: Any) -> Any:
    from lightning_scale.callbacks import CostReporter

    return CostReporter(**kw)


def _profiler(**kw: Any) -> Any:
    from lightning_scale.callbacks import ScaleProfiler

    return ScaleProfiler(**kw)


def _memory(**kw: Any) -> Any:
    from lightning_scale.callbacks import MemoryAccountant

    return MemoryAccountant(**kw)


def _guard(**kw: Any) -> Any:
    from lightning_scale.callbacks import NonFiniteGuard

    return NonFiniteGuard(**kw)


BAD_STRATEGY_YAML = """\
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  strategy:
    class_path: lightning_scale.strategies.PipelineStrategy
    init_args:
      stages: 2
      timeline_step: -3
model:
  class_path: lightning_scale.tasks.LanguageModelingTask
data:
  class_path: lightning_scale.data.TextDataModule
"""

H100 = "H100 SXM"

# -- the table ------------------------------------------------------------------------------------------
TABLE: list[Bad] = [
    # strategy options: pipeline
    Bad("pipeline stages=0", lambda t: _pipeline(stages=0), ValueError, r"stages must be a positive integer, got 0"),
    Bad("pipeline unknown schedule", lambda t: _pipeline(schedule="zigzag"), ValueError,
        r"unknown pipeline schedule 'zigzag'; choose one of \['1f1b', 'gpipe'"),
    Bad("pipeline too few microbatches", lambda t: _pipeline(stages=4, microbatches=2), ValueError, r"microbatches >= 4"),
    Bad("pipeline balance='flops'", lambda t: _pipeline(balance="flops"), ValueError,
        r"balance must be 'params' \(split blocks by parameter count\) or 'time'"),
    Bad("pipeline split_points as a string", lambda t: _pipeline(split_points="blocks.2"), ValueError,
        r"split_points must be a list of block names .* e\.g\. \['blocks\.2'\]"),
    Bad("pipeline zero_stage=2", lambda t: _pipeline(zero_stage=2), ValueError,
        r"stages 1 and 2 are not offered with pipelining"),
    Bad("pipeline selective AC with a two-pass backward", lambda t: _pipeline(
        schedule="interleaved_zero_bubble", activation_checkpointing="selective"), ValueError,
        r"use activation_checkpointing='full'"),
    Bad("pipeline compiled AC with a two-pass backward", lambda t: _pipeline(
        schedule="zbv_zero_bubble", virtual_stages=2, activation_checkpointing={"policy": "full", "compile": True}),
        ValueError, r"drop compile \(eager checkpointing works with it\) or use schedule='1f1b'"),
    Bad("pipeline timeout in seconds", lambda t: _pipeline(timeout=30), ValueError,
        r"timeout must be a datetime\.timedelta, e\.g\. timedelta\(minutes=10\)"),
    Bad("pipeline stage_forward not importable", lambda t: _pipeline(stage_forward="no.such.fn"), ValueError,
        r"is not an importable function 'package\.module\.function'"),
    Bad("pipeline timeline_step=-1", lambda t: _pipeline(timeline_step=-1), ValueError,
        r"timeline_step must be a global step >= 0"),
    Bad("pipeline world size not a multiple of stages", lambda t: _layout(_pipeline(stages=2), 3), ValueError,
        r"launch a multiple of 2 processes or change the degrees"),
    # tensor parallel, 3D
    Bad("tensor_parallel_size=0", lambda t: _tp(tensor_parallel_size=0), ValueError,
        r"parallel degree tp must be a positive integer or -1"),
    Bad("tensor parallel sequence_parallel='yes'", lambda t: _tp(sequence_parallel="yes"), ValueError,
        r"sequence_parallel must be True or False"),
    Bad("tensor parallel sequence_parallel with a user plan that shards no sequence",
        lambda t: _tp(sequence_parallel=True, tp_plan={"fc1": _colwise()}), ValueError,
        r"your tp_plan has no SequenceParallel\(\) entry, so the sequence would not be sharded"),
    Bad("3D sequence_parallel with a user plan that shards no sequence",
        lambda t: _3d(sequence_parallel=True, tp_plan={"fc1": _colwise()}), ValueError,
        r"Parallel3DStrategy\(sequence_parallel=True, tp_plan=...\): your tp_plan has no SequenceParallel"),
    Bad("tensor parallel plan as a list", lambda t: _tp(tp_plan=["blocks.*"]), ValueError,
        r"tp_plan must be a dict \{'module pattern': ParallelStyle\}"),
    Bad("tensor parallel plan and tp_plan both", lambda t: _tp(plan={}, tp_plan={}), ValueError,
        r"plan= is the old name of tp_plan=; pass only tp_plan="),
    Bad("pipeline container and block_container both", lambda t: _pipeline(container="a", block_container="b"), ValueError,
        r"container= is the old name of block_container=; pass only block_container="),
    Bad("block_container and block_class both", lambda t: _zero(block_container="a", block_class="Block"), ValueError,
        r"give block_container= \(where the blocks are\) or block_class= \(what they are\), not both"),
    Bad("block_class a number", lambda t: _zero(block_class=3), ValueError,
        r"block_class must be a module class, a class name"),
    Bad("3d two degrees = -1", lambda t: _3d(tensor_parallel_size=-1), ValueError,
        r"at most one of pp/dp/tp may be -1 .* give explicit sizes for the others"),
    Bad("3d data_parallel_size=0", lambda t: _3d(data_parallel_size=0), ValueError,
        r"parallel degree dp must be a positive integer or -1"),
    Bad("3d pp x dp x tp != world size", lambda t: _layout(_3d(data_parallel_size=2), 4), ValueError,
        r"2 x 2 x 2 = 8 does not equal the world size 4 .* change the degrees or set one of them to -1"),
    # ZeRO
    Bad("zero stage=4", lambda t: _zero(stage=4), ValueError, r"stage must be 1, 2 or 3"),
    Bad("zero offload_params without stage 3", lambda t: _zero(stage=2, offload_params=True), ValueError,
        r"offload_params=True needs stage=3"),
    Bad("zero fairscale stage 3", lambda t: _zero(stage=3, implementation="fairscale"), ValueError, r"needs CUDA"),
    Bad("zero bucket_mb=0", lambda t: _zero(bucket_mb=0), ValueError, r"bucket_mb must be > 0"),
    Bad("zero offload_optimizer='yes'", lambda t: _zero(offload_optimizer="yes"), ValueError,
        r"offload_optimizer must be True or False"),
    # data parallel (ddp_ac = MeshStrategy)
    Bad("ddp_ac unknown activation checkpointing", lambda t: _mesh(activation_checkpointing="sometimes"), ValueError,
        r"'sometimes' is not a policy; use 'full', 'selective', 'every_<k>'"),
    Bad("ddp_ac compiled AC with offload", lambda t: _mesh(activation_checkpointing={
        "policy": "every_k", "offload": True, "compile": True}), ValueError,
        r"compile=True does not combine with offload=True .* drop one of them"),
    Bad("ddp_ac compile without a policy", lambda t: _mesh(activation_checkpointing={"policy": "none", "compile": True}),
        ValueError, r"pick a policy \('full', 'selective', 'every_k', 'classes'\) or compile the model yourself"),
    Bad("ddp_ac compile='yes'", lambda t: _mesh(activation_checkpointing={"policy": "full", "compile": "yes"}),
        ValueError, r"ACConfig\.compile must be True or False"),
    Bad("ddp_ac unknown backend", lambda t: _mesh(process_group_backend="nccl2"), ValueError,
        r"not a torch\.distributed backend; use one of \[.*'gloo'.*\] .* or None"),
    Bad("ddp_ac trust_checkpoint='yes'", lambda t: _mesh(trust_checkpoint="yes"), ValueError,
        r"trust_checkpoint must be True or False"),
    Bad("ddp_ac module_name=''", lambda t: _mesh(module_name=""), ValueError,
        r"module_name must be the name of an attribute of your LightningModule, e\.g\. 'model'"),
    # recipe YAML / CLI
    Bad("cli unknown strategy name", lambda t: _cli("fit", "--config", GPT_RECIPE, "--trainer.strategy=pipline",
                                                    *SINGLE_PROCESS), ValueError, r"invalid strategy name"),
    Bad("cli recipe YAML with a bad strategy option", lambda t: _cli(
        "fit", "--config", _write(t / "bad.yaml", BAD_STRATEGY_YAML)), ValueError,
        r"PipelineStrategy\(timeline_step=-3\): timeline_step must be a global step >= 0"),
    Bad("cli strategy option of the wrong type", lambda t: _cli(
        "fit", "--config", GPT_RECIPE, "--trainer.strategy=lightning_scale.strategies.PipelineStrategy",
        "--trainer.strategy.balance=flops", *SINGLE_PROCESS), SystemExit,
        r"\"balance\":\s+Expected a typing\.Literal\['params', 'time'\]"),
    Bad("cli recipe YAML that does not parse", lambda t: _cli(
        "fit", "--config", _write(t / "broken.yaml", "trainer:\n  devices: [1\n")), SystemExit,
        r"Problems parsing config: while parsing a flow sequence"),
    Bad("cli recipe file missing", lambda t: _cli("fit", "--config", str(t / "nope.yaml")), SystemExit,
        r"File does not exist: '.*nope\.yaml'"),
    Bad("cli model n_embd not divisible by n_head", lambda t: _cli(
        "fit", "--config", GPT_RECIPE, "--model.init_args.model.n_embd=100", "--model.init_args.model.n_head=3",
        *SINGLE_PROCESS), ValueError, r"n_embd \(100\) must be divisible by n_head \(3\)"),
    Bad("cli text data path missing", lambda t: _cli(
        "fit", "--config", GPT_RECIPE, "--data.init_args.path=/nonexistent/corpus", *SINGLE_PROCESS), ValueError,
        r"Text corpus path '/nonexistent/corpus' does not exist.*set path=None for the built-in corpus"),
    # data paths and options
    Bad("text path missing", lambda t: _text(t, path=str(t / "nope.txt")), FileNotFoundError,
        r"nope\.txt' does not exist.*Fix `path`, or set path=None"),
    Bad("text directory without matching files", lambda t: _text(t, path=str((t / "empty").mkdir() or t / "empty")),
        FileNotFoundError, r"has no file matching pattern '\*\*/\*\.txt'.*change `pattern`"),
    Bad("text corpus too small", lambda t: _text(t, path=_write(t / "tiny.txt", "hello"), block_size=128).setup(),
        ValueError, r"tiny\.txt' is too small: .*Reduce block_size or val_fraction, or add text"),
    Bad("text block_size=0", lambda t: _text(t, block_size=0), ValueError, r"block_size must be an integer >= 1"),
    Bad("text val_fraction=1", lambda t: _text(t, val_fraction=1.0), ValueError,
        r"val_fraction must be strictly between 0 and 1 \(e\.g\. 0\.1"),
    Bad("image path is a file", lambda t: _image(t, path=_write(t / "file.txt", "x")), ValueError,
        r"file\.txt' is a file; expected a directory"),
    Bad("image folder without class sub-directories", lambda t: _image(t, path=_loose_images(t)), ValueError,
        r"move them into one sub-directory per class"),
    Bad("image CIFAR-10 directory incomplete", lambda t: _image(t, path=_partial_cifar(t)), FileNotFoundError,
        r"is missing data_batch_3, .*test_batch.*Re-extract cifar-10-python\.tar\.gz there"),
    Bad("image batch_size=0", lambda t: _image(t, batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    # price table rows / overrides
    Bad("price override negative", lambda t: _overrides([{"cloud": "AWS", "gpu": H100, "memory_gb": 80,
                                                          "on_demand_per_gpu_hour": -3}]), ValueError,
        r"on_demand_per_gpu_hour \(required\) must be a number >= 0 in USD per GPU-hour, e\.g\. 2\.5"),
    Bad("price override unknown field", lambda t: _overrides([{"cloud": "AWS", "gpu": H100, "memory_gb": 80,
                                                              "on_demand_per_gpu_hour": 3, "price": 3}]), ValueError,
        r"unknown field\(s\) \['price'\]; allowed: cloud, gpu"),
    Bad("price override without memory", lambda t: _overrides([{"cloud": "AWS", "gpu": H100,
                                                               "on_demand_per_gpu_hour": 3}]), ValueError,
        r"memory_gb is required for gpu 'H100 SXM' \(GB per GPU, e\.g\. 80\)"),
    Bad("price override memory disagrees with the name", lambda t: _overrides([{
        "cloud": "AWS", "gpu": "A100 (80 GB)", "memory_gb": 40, "on_demand_per_gpu_hour": 3}]), ValueError,
        r"memory_gb=40 disagrees with the gpu name 'A100 \(80 GB\)'; drop one of them"),
    Bad("price overrides a mapping, not a list", lambda t: _overrides({"cloud": "AWS"}), ValueError,
        r"a single price row must be a list of mappings like \{cloud: AWS"),
    Bad("price rates not numbers", lambda t: _overrides({"H100 SXM": "cheap"}), ValueError,
        r"each rate is a number >= 0 in USD per GPU-hour"),
    Bad("price overrides file from the env var missing", lambda t: _prices_env(t, None), FileNotFoundError,
        r"LIGHTNING_SCALE_GPU_PRICES: GPU price overrides file .* not found; give a YAML/JSON file"),
    Bad("price overrides file not a list", lambda t: _prices_env(t, "cloud: AWS\n"), ValueError,
        r"must hold a list of price rows \(or \{prices: \[\.\.\.\]\}\)"),
    # planner inputs
    Bad("planner tp does not divide heads", lambda t: _plan(tp=3), ValueError, r"divisible by tp"),
    Bad("planner unknown GPU", lambda t: _hardware("H800"), ValueError,
        r"unknown GPU 'H800'; known: .*or give the memory size"),
    Bad("planner GPU with several sizes", lambda t: _hardware("A100"), ValueError, r"write e\.g\. A100-80GB"),
    Bad("planner ZeRO-2 with TP", lambda t: _planner_layout(zero_stage=2, tp=2), ValueError, r"zero_stage=3"),
    Bad("cli plan unknown GPU", lambda t: _cli("plan", "--model", "nano", "--batch-size", "8", "--seq-len", "64",
                                               "--gpus", "1", "--gpu", "H800"), SystemExit,
        r"lightning-scale plan: unknown GPU 'H800'"),
    # callback options
    Bad("cost negative rate", lambda t: _cost(rate_per_gpu_hour=-1), ValueError,
        r"rate_per_gpu_hour must be a number >= 0 \(USD per device-hour\)"),
    Bad("cost infinite rate", lambda t: _cost(rate_per_gpu_hour=float("inf")), ValueError,
        r"rate_per_gpu_hour must be a number >= 0"),
    Bad("cost assumed_mfu as a string", lambda t: _cost(assumed_mfu="0.4"), ValueError,
        r"assumed_mfu must be in \(0, 1\], e\.g\. 0\.4"),
    Bad("cost unknown GPU", lambda t: _cost(gpu="H9000"), ValueError,
        r"gpu='H9000' is neither in the price table nor in the peak-FLOPs table; use one of \[.*'A100'"),
    Bad("cost gpu_memory_gb=0", lambda t: _cost(gpu="A100", gpu_memory_gb=0), ValueError,
        r"gpu_memory_gb must be a number > 0 \(GB per GPU, e\.g\. 40 or 80"),
    Bad("profiler log_every_n_steps=0", lambda t: _profiler(log_every_n_steps=0), ValueError,
        r"log_every_n_steps must be an integer >= 1"),
    Bad("profiler trace_steps backwards", lambda t: _profiler(trace_steps=(5, 2)), ValueError,
        r"trace_steps must be \(first, last\) .* e\.g\. \(5, 7\)"),
    Bad("profiler trace_steps an int", lambda t: _profiler(trace_steps=3), ValueError,
        r"trace_steps must be \(first, last\)"),
    Bad("profiler negative peak", lambda t: _profiler(peak_tflops=-1), ValueError,
        r"peak_tflops must be a number > 0 .* or None to look it up"),
    Bad("profiler comm a string", lambda t: _profiler(comm="yes"), ValueError,
        r"comm must be True or False \(time communication on logged steps\)"),
    Bad("memory sample_step=-1", lambda t: _memory(sample_step=-1), ValueError,
        r"sample_step must be an int >= 0 \(the optimizer step to measure"),
    Bad("nonfinite check_every_n_steps=0", lambda t: _guard(check_every_n_steps=0), ValueError,
        r"check_every_n_steps must be an integer >= 1"),
]


def test_the_table_is_big_and_covers_every_kind_of_input() -> None:
    assert len(TABLE) >= 30
    ids = [row.id for row in TABLE]
    assert len(set(ids)) == len(ids), "duplicate row ids"
    for prefix in ("pipeline", "tensor", "3d", "zero", "ddp_ac", "cli", "text", "image", "price", "planner", "cost",
                   "profiler", "memory", "nonfinite"):
        assert any(i.startswith(prefix) for i in ids), f"no row for {prefix}"


@pytest.fixture(autouse=True)
def _cli_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI rows: bare argv (as for a user), W&B offline, files out of the repository."""
    monkeypatch.setattr(sys, "argv", ["lightning-scale"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_SCALE_GPU_PRICES", raising=False)


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_bad_input_raises_a_clear_error_naming_the_fix(row: Bad, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed as dist

    with pytest.raises(row.error) as info:
        row.make(tmp_path)
    # Usage errors (SystemExit) print their message; the others carry it.
    message = str(info.value) + "\n" + "".join(capsys.readouterr())
    if isinstance(info.value, SystemExit) and isinstance(info.value.code, int):
        assert info.value.code == 2, message
    import re

    assert re.search(row.match, message, flags=re.DOTALL), f"{row.id}: {row.match!r} not in:\n{message}"
    assert "Traceback" not in str(info.value)
    assert not (dist.is_available() and dist.is_initialized()), "a process group was started: not before any collective"


# -- the same, with real processes ------------------------------------------------------------------------
def test_every_rank_raises_the_same_error_before_any_collective(run_distributed) -> None:
    import _reliability_input_targets as targets

    from lightning_scale.testing import RankFailedError

    start = time.monotonic()  # the fixture started the fork server: this times the ranks only
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fit_bad_layout, 2, timeout=60, init_process_group=False)
    assert time.monotonic() - start < 30, "the error should come at once, not after a collective timeout"
    failures = {f.rank: f for f in info.value.failures}
    assert sorted(failures) == [0, 1] and all(f.kind == "raised" for f in failures.values()), info.value
    for failure in failures.values():  # the target asserts no process group existed when it raised
        assert "launch a multiple of 4 processes or change the degrees" in failure.summary, failure.describe()
    assert failures[0].summary == failures[1].summary


# -- NaN / inf loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddp", "pipeline"])
def test_nonfinite_loss_stops_every_rank_naming_step_and_rank(kind: str, run_distributed, tmp_path: Path) -> None:
    """A NaN loss on rank 1 at global step 2 (under pipeline: on the last stage, rank 1, which
    computes the loss): every rank raises NonFiniteLossError naming step 2 and rank 1, at once."""
    import _reliability_input_targets as targets

    from lightning_scale.testing import RankFailedError

    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fit_with_guard, 2, kind, 6, 1, 2, str(tmp_path), timeout=90, init_process_group=False)
    assert time.monotonic() - start < 60, "every rank must stop at once, not after a collective timeout"
    failures = {f.rank: f for f in info.value.failures}
    assert sorted(failures) == [0, 1] and all(f.kind == "raised" for f in failures.values()), info.value
    for failure in failures.values():
        summary = failure.summary
        assert "NonFiniteLossError: non-finite training loss at global step 2 (epoch 0, batch 2)" in summary, summary
        assert "rank 1: nan" in summary and "lower the learning rate" in summary and "gradient_clip_val" in summary
        if kind == "ddp":  # rank 0's own loss was finite
            assert "finite on rank 0" in summary and "rank 0: nan" not in summary
        else:  # the last stage computed it and sent it to stage 0
            assert "computed on rank 1: the last pipeline stage" in summary
    assert failures[0].summary == failures[1].summary


def test_nonfinite_guard_has_no_false_positive(run_distributed, tmp_path: Path) -> None:
    import math

    import _reliability_input_targets as targets

    results = run_distributed(targets.fit_with_guard, 2, "pipeline", 4, None, None, str(tmp_path), timeout=90,
                              init_process_group=False)
    for out in results:
        assert out["global_step"] == 4 and out["checked"] == 4
        assert all(math.isfinite(v) for v in out["losses"])


def test_nonfinite_guard_checks_sampled_steps_in_one_process() -> None:
    """No process group: the guard checks locally, only on sampled steps (check_every_n_steps=2)."""
    import torch

    from lightning_scale.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError

    class Trainer:
        global_rank, world_size, current_epoch, global_step = 0, 1, 0, 0
        strategy = type("S", (), {"root_device": torch.device("cpu")})()

    guard, trainer = NonFiniteGuard(check_every_n_steps=2), Trainer()

    def batch(step: int, loss: float) -> None:
        trainer.global_step = step
        guard.on_train_batch_start(trainer, None, None, step)
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)

    for step, loss in enumerate([1.0, float("inf"), 2.0]):
        batch(step, loss)
    assert guard.checked == 2  # steps 0 and 2; the inf of step 1 was not sampled
    with pytest.raises(NonFiniteLossError, match=r"global step 4 \(epoch 0, batch 4\): rank 0: -inf\. Training stopped"):
        batch(4, float("-inf"))
