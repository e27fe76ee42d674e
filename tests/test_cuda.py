"""The GPU lane: every CUDA branch of the suite that one GPU can reach, small and fast.

Run it with ``python -m lightning_scale.gpu_check`` (the report) or ``pytest -m cuda
tests/test_cuda.py``. Without a CUDA device every test here is skipped with the reason
:data:`NO_CUDA`. Each test writes its figures (one JSON line per call of the ``gpu_report`` fixture)
to the file named by ``LIGHTNING_SCALE_GPU_REPORT`` when it is set, before it asserts, so a failing
check still leaves its numbers in the report.

What runs (tiny GPT: hidden 64, 4 blocks, vocabulary 64, 16 tokens; global batch 8; fp32 unless
stated; ranks are real processes, ``tests/_cuda_targets.py``):

* the reference: a plain single-device Lightning run on the GPU;
* world size 1 on the GPU: pipeline (1 stage), tensor parallel (size 1), plain data parallel (also with
  activation offload), ZeRO-1/2/3 and fairscale ZeRO-2, each against the reference; ZeRO-1/2/3 with CPU offload against the same
  stage without offload, with the offloaded buffers pinned and the copies really ``non_blocking``;
  ZeRO-1/2 offload again with the CUDA stream held busy after every backward (the device-to-host
  copies then land late: a host read that does not wait for them trains on stale gradients);
  bf16-mixed; compiled selective activation checkpointing (Triton) against eager;
  MemoryAccountant's CUDA allocator figures next to the planner's; ScaleProfiler's phase timing of
  GPU work, its MFU for the detected device, CostReporter's device lookup, a CUDA trace;
* ``LIGHTNING_SCALE_GPU_WORLD`` ranks (default 2): tensor parallel, ZeRO-3, ZeRO-2 offload and a
  2-stage pipeline against the reference. With a GPU per rank the strategies choose their backend
  (``nccl``, ``"cuda:nccl,cpu:gloo"`` with offload); with fewer GPUs than ranks (2 ranks on one GPU)
  the ranks share GPUs over ``gloo``, and a collective gloo cannot run on CUDA tensors skips the test
  with gloo's own message. The pipeline is skipped there: gloo's send/recv take host memory only.

Tolerances: fp32 parity as everywhere in the suite (``tests/_parity.py``): relative loss difference
<= 1e-5 per step over 20 steps, max abs weight difference <= 1e-5; both sides run on the same GPU.
Compiled against eager: 1e-4 relative per step (see that test).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Any

import pytest

from _parity import LOSS_RTOL, STEPS, WEIGHT_ATOL
from lightning_scale.core.device import machine_has_cuda

NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not machine_has_cuda(), reason=NO_CUDA)]

REPORT_ENV = "LIGHTNING_SCALE_GPU_REPORT"  # a JSON-lines file the figures are appended to
WORLD_ENV = "LIGHTNING_SCALE_GPU_WORLD"  # ranks of the multi-rank checks (default 2; the 8-GPU release check: 8)
MIXED = "cuda:nccl,cpu:gloo"
RUN_TIMEOUT_S = 120  # seconds one fit may take once its ranks are up (a hang fails the test, not the lane)
COMPILE_TIMEOUT_S = 360  # the compiled fit: Inductor compiles the blocks' forward and backward first


def _world() -> int:
    world = int(os.environ.get(WORLD_ENV, "2"))
    if world < 2 or world % 2 or 8 % (world // 2):
        raise ValueError(f"{WORLD_ENV}={world}: use 2, 4 or 8 (the global batch of 8 sequences splits over the replicas)")
    return world


# -- the report ------------------------------------------------------------------------------------
@pytest.fixture
def gpu_report(request):
    """``gpu_report(**figures)``: append ``{"check": <test id>, "figures": {...}}`` (one JSON line) to
    the file named by ``LIGHTNING_SCALE_GPU_REPORT``; nothing when it is not set."""

    def _record(**figures: Any) -> None:
        path = os.environ.get(REPORT_ENV)
        if not path:
            return
        line = json.dumps({"check": request.node.nodeid, "figures": figures}, default=str)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    return _record


# -- running fits ----------------------------------------------------------------------------------
_RUNS: dict[tuple, list[dict]] = {}  # fits shared by several tests (references), run once per session
_GLOO_UNSUPPORTED = re.compile(r"processgroupgloo|\bgloo\b.*(unsupported|not supported|does not support|not implemented)"
                               r"|(unsupported|not supported|does not support|not implemented).*\bgloo\b", re.IGNORECASE)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _fit(kind: str, world: int = 1, steps: int = STEPS, timeout: float = RUN_TIMEOUT_S, **kwargs: Any) -> list[dict]:
    """``_cuda_targets.fit`` on ``world`` fresh ranks, without the CPU doubles (real copies, real
    collectives). Ranks sharing a GPU over gloo: a collective gloo refuses for CUDA tensors skips."""
    import _cuda_targets as targets
    from lightning_scale.testing import RankFailedError, run_distributed

    shared = world > _gpus()
    try:
        return run_distributed(targets.fit, world, kind, steps, init_process_group=False, gpu_semantics=False,
                               backend="gloo" if shared else "nccl", timeout=timeout, **kwargs)
    except RankFailedError as err:
        # The first failure only: the others are peers that lost it ("Connection closed by peer").
        if shared and err.failures and err.failures[0].kind == "raised":
            first = err.failures[0]
            for line in (first.summary + "\n" + first.traceback).splitlines():
                if _GLOO_UNSUPPORTED.search(line):
                    pytest.skip(f"{world} ranks share {_gpus()} GPU(s) over gloo, and gloo refuses a collective on "
                                f"CUDA tensors: {line.strip()[:300]}")
        raise


def _cached(kind: str, world: int = 1, **kwargs: Any) -> list[dict]:
    key = (kind, world, tuple(sorted(kwargs.items())))
    if key not in _RUNS:
        _RUNS[key] = _fit(kind, world, **kwargs)
    return _RUNS[key]


def _plain_reference() -> dict:
    return _cached("plain")[0]


def _parity(results: list[dict], ref: dict, loss_rtol: float = LOSS_RTOL) -> dict[str, Any]:
    """Figures of a parity comparison: the ranks' mean loss per step against ``ref``'s, each rank's
    weights against ``ref``'s (a pipeline rank holds its stage's), and which names are missing."""
    def finite(x: float) -> float:  # NaN / inf (garbage read from a copy that had not landed) fail every bound
        return x if math.isfinite(x) else math.inf

    steps = min([len(r["losses"]) for r in results] + [len(ref["losses"])])
    mean = [sum(vals) / len(vals) for vals in zip(*(r["losses"] for r in results))]
    rel = [finite(abs(a - b) / abs(b)) for a, b in zip(mean, ref["losses"])]
    weight = 0.0
    for r in results:
        for name, value in r["state"].items():
            weight = max(weight, finite((value - ref["state"][name]).abs().max().item()))
    held = set().union(*(r["state"] for r in results))
    return {"steps": steps, "max_loss_rel_diff": max(rel) if rel else None, "max_weight_abs_diff": weight,
            "loss_first": mean[0] if mean else None, "loss_last": mean[-1] if mean else None,
            "missing_weights": sorted(set(ref["state"]) - held), "loss_rtol": loss_rtol, "weight_atol": WEIGHT_ATOL}


def _assert_parity(figures: dict[str, Any], loss_rtol: float = LOSS_RTOL, weights: bool = True) -> None:
    assert figures["steps"] >= STEPS, figures
    assert figures["max_loss_rel_diff"] <= loss_rtol, figures
    if weights:
        assert figures["max_weight_abs_diff"] <= WEIGHT_ATOL, figures
    assert not figures["missing_weights"], figures


def _assert_on_gpu(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["figures"]["root_device"].startswith("cuda"), f"rank {rank}: {r['figures']}"
        assert r["global_step"] == len(r["losses"]), f"rank {rank}"


# -- the reference ---------------------------------------------------------------------------------
def test_plain_single_device_fit_runs_on_the_gpu(gpu_report) -> None:
    ref = _plain_reference()
    gpu_report(device=ref["figures"].get("device_name"), losses=ref["losses"],
               max_memory_allocated_bytes=ref["figures"].get("max_memory_allocated_bytes"))
    _assert_on_gpu([ref])
    assert len(ref["losses"]) == STEPS and all(math.isfinite(x) for x in ref["losses"])
    assert all(v.is_floating_point() and bool(v.isfinite().all()) for v in ref["state"].values())


# -- world size 1: every strategy against the plain run ----------------------------------------------
@pytest.mark.parametrize("kind", ["pipeline", "tensor_parallel", "mesh", "ddp_ac_offload", "zero1", "zero2", "zero3",
                                  "zero2_fairscale"])
def test_world1_strategy_matches_the_plain_single_device_run(kind: str, gpu_report) -> None:
    """``ddp_ac_offload``: activation offload, the saved activations copied to pinned host memory
    in the forward (non_blocking) and back in the backward, each copy waited on before it is read."""
    if kind.endswith("fairscale") and importlib.util.find_spec("fairscale") is None:
        pytest.skip("fairscale is not installed here")
    results = _cached(kind)
    figures = _parity(results, _plain_reference())
    got = results[0]["figures"]
    gpu_report(**figures, backend=got["backend"], root_device=got["root_device"], copies=got["copies"])
    _assert_on_gpu(results)
    # One rank on CUDA, no optimizer state on the host: NCCL (design guide section 9).
    assert got["backend"] == "nccl"
    if kind == "ddp_ac_offload":
        assert got["copies"]["non_blocking"] > 0, got["copies"]
    _assert_parity(figures)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_matches_the_same_stage_without_offload(stage: int, gpu_report) -> None:
    offloaded = _fit(f"zero{stage}_offload")
    figures = _parity(offloaded, _cached(f"zero{stage}")[0])
    got = offloaded[0]["figures"]
    gpu_report(**figures, backend=got["backend"], pinned=got.get("pinned"), copies=got["copies"])
    _assert_on_gpu(offloaded)
    # Host tensors in some collectives (the optimizer state's all-gather of a checkpoint): the mixed backend.
    assert got["backend"] == MIXED
    pinned = got["pinned"]
    if stage < 3:  # the engine's fp32 master chunks and reduced-gradient chunks: pinned host memory
        assert pinned["master_devices"] == ["cpu"] and pinned["buckets"] > 0
        assert pinned["masters_pinned"] == pinned["buckets"], pinned
        assert pinned["shard_grads_pinned"] == pinned["shard_grads"] == pinned["buckets"], pinned
        # Copies between pinned host memory and the GPU are non_blocking (a CUDA event to wait on).
        assert got["copies"]["non_blocking"] > 0, got["copies"]
    else:  # FSDP2 CPUOffloadPolicy(pin_memory=True): every parameter shard on the host, pinned
        assert pinned["param_devices"] == ["cpu"], pinned
        assert pinned["host_params_pinned"] == pinned["host_params"] == pinned["params"], pinned
    _assert_parity(figures)


@pytest.mark.parametrize("stage", [1, 2])
def test_offload_reads_device_to_host_copies_only_after_they_land(stage: int, gpu_report) -> None:
    """The silent defect CPU cannot show: a host read of a non_blocking device-to-host copy before
    it lands. After every backward the current stream spins ~25 ms (``torch.cuda._sleep``), so the
    copies of the reduced gradient chunks queue behind it: code that reads the host buffer without
    waiting on the copy's event steps on whatever the pinned buffer held before (a previous step's
    chunk, or uninitialised memory) and diverges at once."""
    import _cuda_targets as targets

    delayed = _fit(f"zero{stage}_offload", stream_delay_cycles=targets.STREAM_DELAY_CYCLES)
    figures = _parity(delayed, _cached(f"zero{stage}")[0])
    gpu_report(**figures, copies=delayed[0]["figures"]["copies"], stream_delay_cycles=targets.STREAM_DELAY_CYCLES)
    _assert_on_gpu(delayed)
    assert delayed[0]["figures"]["copies"]["non_blocking"] > 0
    _assert_parity(figures)


# -- precision and compilation ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mesh", "zero3"])
def test_bf16_mixed_loss_is_finite_and_falls(kind: str, gpu_report) -> None:
    # Learnable data (each token = the previous + 1): the loss must fall, not just stay finite.
    results = _fit(kind, precision="bf16-mixed", counting=True)
    losses = [sum(v) / len(v) for v in zip(*(r["losses"] for r in results))]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    gpu_report(losses=losses, first5_mean=first, last5_mean=last, param_dtypes=results[0]["figures"]["param_dtypes"])
    _assert_on_gpu(results)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert last < 0.9 * first, f"loss did not fall: first 5 steps {first:.4f}, last 5 {last:.4f}"
    assert results[0]["figures"]["param_dtypes"] == ["torch.float32"]  # bf16-mixed keeps fp32 weights


def test_compiled_selective_activation_checkpointing_matches_eager(gpu_report) -> None:
    """``{"policy": "selective", "compile": True}`` under ``ddp_ac`` at world size 1, Inductor's
    Triton kernels, against the same policy in eager mode.

    Tolerance 1e-4 relative per step (not the 1e-5 of the other parity checks): Inductor fuses the
    blocks' LayerNorms, GELU, residual adds and bias adds into Triton kernels that accumulate in
    another order than eager's ATen kernels, a few fp32 ulps (~1e-7 relative) per op, and 20 Adam
    steps carry them on. A wrong recompute (a stale or missing saved tensor) moves the loss by far
    more. Weights are recorded, not asserted (Adam turns ulp-level gradient differences of nearly
    zero gradients into differences of up to a learning rate)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: torch.compile has no GPU backend here")
    eager = _cached("ddp_ac_selective")
    compiled = _fit("ddp_ac_selective_compiled", timeout=COMPILE_TIMEOUT_S)
    against_eager = _parity(compiled, eager[0], loss_rtol=1e-4)
    eager_vs_plain = _parity(eager, _plain_reference())
    gpu_report(compiled_vs_eager=against_eager, eager_vs_plain=eager_vs_plain,
               compiled_graphs=compiled[0]["figures"]["compiled_graphs"])
    _assert_on_gpu(compiled)
    assert compiled[0]["figures"]["compiled_graphs"] > 0  # Dynamo built graphs: the blocks did run compiled
    _assert_parity(eager_vs_plain)  # eager recompute replays the same kernels: the plain run's numbers
    _assert_parity(against_eager, loss_rtol=1e-4, weights=False)


# -- callbacks ---------------------------------------------------------------------------------------
def test_memory_accountant_cuda_allocator_figures_next_to_the_planner(gpu_report, tmp_path) -> None:
    """After the sampled step's optimizer step: MemoryAccountant's exact tensor counts equal the
    planner's prediction (bytes, as on CPU); the CUDA caching allocator's allocated bytes at that
    moment minus those before the model reached the GPU (cuBLAS workspaces already allocated: they
    are not model states) are the predicted model states within 10% (the rest: the batch, the loss,
    logged values, the allocator's rounding of each tensor up to 512 bytes). The allocator's peak
    (``cuda_max_allocated``) is recorded next to the planner's predicted peak, not asserted: it holds
    cuBLAS workspaces and kernel temporaries the planner leaves out."""
    result = _fit("mesh", steps=4, memory=True, run_dir=str(tmp_path))[0]
    rec, fig = result["memory_record"], result["figures"]
    states = {c: rec[c] for c in ("params", "grads", "optimizer")}
    predicted = {c: (rec["predicted"] or {}).get(c) for c in ("params", "grads", "optimizer")}
    planner = fig.get("planner_device", {})
    baseline, end = fig.get("allocated_baseline_bytes"), fig.get("allocated_end_bytes")
    allocator_states = end - baseline if end is not None and baseline is not None else None
    predicted_states = sum(v for v in predicted.values() if v is not None)
    gpu_report(tensor_counts=states, planner_prediction=predicted, planner_device=planner,
               allocated_baseline_bytes=baseline, allocated_end_bytes=end, allocator_model_states_bytes=allocator_states,
               allocated_end_bytes_without_cublas_workspaces=fig.get("allocated_end_bytes_without_cublas_workspaces"),
               allocator_vs_planner_rel=((allocator_states - predicted_states) / predicted_states
                                         if allocator_states is not None and predicted_states else None),
               cuda_max_allocated=rec.get("cuda_max_allocated"), cuda_max_reserved=rec.get("cuda_max_reserved"),
               alloc_retries=rec.get("alloc_retries"), planner_peak=planner.get("peak"),
               activations_measured=rec.get("activations"), activations_predicted=(rec["predicted"] or {}).get("activations"),
               by_device=rec.get("by_device"))
    assert rec["predicted"] is not None, "the planner does not model a plain data-parallel GPT run"
    assert states == predicted, f"tensor counts {states} vs planner {predicted}"
    assert set(rec["by_device"]["params"]) == {"cuda:0"}, rec["by_device"]
    assert rec["peak_kind"].startswith("cuda") and rec["cuda_max_allocated"] >= end > baseline >= 0
    assert rec["alloc_retries"] == 0
    assert abs(allocator_states - predicted_states) <= 0.10 * predicted_states, (allocator_states, predicted_states)


def test_profiler_times_gpu_work_and_reports_mfu_for_the_detected_device(gpu_report, tmp_path) -> None:
    """ScaleProfiler on the GPU (every step logged, so every phase boundary synchronises the device):
    a ~20 ms kernel launched inside the forward phase of every step must be in ``perf/forward_s``
    (timed by launches, the phase would hold microseconds and the kernel would surface in a later
    phase). DeviceClock (CUDA events) measures that kernel's duration first, and must see the
    kernel, not its launch. The device name torch reports must be a row of the peak-FLOPs table
    (the lane's machine: "NVIDIA H200"), so MFU is reported, in (0, 1). CostReporter must resolve
    the same name. A torch.profiler trace of steps 2-3 records the CUDA kernels."""
    from lightning_scale.core.peak_flops import lookup

    cycles = 40_000_000  # GPU cycles: about 20 ms at the H200's ~1.98 GHz boost clock
    trace_dir = tmp_path / "traces"
    result = _fit("mesh", steps=6, profiler=True, trace_dir=str(trace_dir), run_dir=str(tmp_path),
                  forward_delay_cycles=cycles)[0]
    rows, fig = result["history"][1:], result["figures"]  # step 1 includes start-up
    name = fig["device_name"]
    row = lookup(name)
    sleep = fig["sleep"]
    gpu_report(device_name=name, peak_row=row.device if row else None, sleep=sleep,
               mfu=[r.get("perf/mfu") for r in rows], forward_s=[r["perf/forward_s"] for r in rows],
               step_s=[r["perf/step_s"] for r in rows], cost=result["cost_report"], trace=result["trace"],
               warnings=[w for w in result["warnings"] if "ScaleProfiler" in w or "CostReporter" in w])
    _assert_on_gpu([result])
    assert sleep["kernel_s"] > 0.005 and sleep["kernel_s"] > 5 * sleep["launch_s"], sleep  # events time kernels
    assert row is not None, f"torch.cuda.get_device_name() reports {name!r}, which is not in the peak-FLOPs table"
    assert len(rows) == 5
    for r in rows:
        assert r["perf/forward_s"] >= 0.8 * sleep["kernel_s"], (r["perf/forward_s"], sleep)
        named = sum(r[f"perf/{p}_s"] for p in ("data", "forward", "backward", "grad_sync", "optimizer"))
        assert named <= r["perf/step_s"] * 1.0001
        assert 0 < r["perf/mfu"] < 1, r
    assert not any("not in the peak-FLOPs table" in w for w in result["warnings"]), result["warnings"]
    assert result["trace"] and os.path.isfile(result["trace"])
    with open(result["trace"], encoding="utf-8") as handle:
        trace = handle.read()
    assert re.search(r'"cat":\s*"kernel"', trace), "the trace has no CUDA kernel events"


# -- several ranks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tensor_parallel", "zero3", "zero2_offload", "pipeline"])
def test_multi_rank_matches_the_plain_single_device_run(kind: str, gpu_report, tmp_path) -> None:
    """``LIGHTNING_SCALE_GPU_WORLD`` ranks (default 2) against the plain single-device run: the same
    global batch of 8 sequences per step, split over the replicas. The pipeline run also times its
    schedule with CUDA events (DeviceClock: ScaleProfiler's ``perf/bubble_*``)."""
    world = _world()
    shared = world > _gpus()
    if shared and kind == "pipeline":
        # Read in torch's ProcessGroupGloo::send/recv: they hand the tensor's data pointer to gloo's
        # TCP transport as host memory (no staging through the host, unlike gloo's collectives).
        pytest.skip(f"{world} ranks share {_gpus()} GPU(s) over gloo, and gloo's send/recv take host memory only: "
                    "CUDA tensors cannot go from stage to stage (this check runs with a GPU per rank, over NCCL)")
    results = _fit(kind, world, profiler=kind == "pipeline", run_dir=str(tmp_path))
    figures = _parity(results, _plain_reference())
    got = results[0]["figures"]
    extra: dict[str, Any] = {}
    if kind == "pipeline":
        extra["bubble_fraction"] = [r.get("perf/bubble_fraction") for r in results[0]["history"][1:]]
    gpu_report(**figures, world=world, gpus=_gpus(), shared_gpus=shared, backend=got["backend"],
               root_devices=[r["figures"]["root_device"] for r in results], pinned=got.get("pinned"),
               copies=got["copies"], **extra)
    _assert_on_gpu(results)
    expected = "gloo" if shared else (MIXED if "offload" in kind else "nccl")
    assert got["backend"] == expected
    if not shared:  # one GPU per rank, from LOCAL_RANK
        assert [r["figures"]["root_device"] for r in results] == [f"cuda:{i}" for i in range(world)]
    if "offload" in kind:
        assert got["pinned"]["masters_pinned"] == got["pinned"]["buckets"] > 0
        assert got["copies"]["non_blocking"] > 0
    if kind == "pipeline":
        assert extra["bubble_fraction"] and all(b is not None and 0 <= b < 1 for b in extra["bubble_fraction"])
    _assert_parity(figures)


# -- the traced pipeline frontend on the device ---------------------------------------------------------
@pytest.mark.parametrize(("shape", "split"), [("mha_transformer", "layers.1"), ("cnn", "features.2")])
def test_traced_pipeline_stages_run_on_the_gpu_and_match_the_model(shape: str, split: str, gpu_report) -> None:
    """The meta trace records ``device=meta`` for tensors the forward makes (the causal mask of
    ``mha_transformer``); the stages must run on CUDA with the model's own tensors and give its
    output (one process: the stages chained by hand; stage-to-stage transfers need one GPU per
    rank, see the multi-rank check)."""
    import torch

    import zoo
    from lightning_scale.core.pipeline_trace import TracedSplit

    device = torch.device("cuda", 0)
    model = zoo.SHAPES[shape]().to(device)
    x = zoo.batches(shape, 4)[0].to(device)
    first, last = TracedSplit(model, [split]).stage_modules((x[:2],), [0, 1], model, device)
    with torch.no_grad():
        h = first(x)
        out = last(*(h if isinstance(h, tuple) else (h,)))
        ref = model(x)
    gpu_report(shape=shape, max_abs_diff=float((out - ref).abs().max()), device=str(out.device))
    assert out.device == device
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
