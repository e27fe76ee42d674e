"""Rank functions of the GPU lane (tests/test_cuda.py), run by lightning_scale.testing on real ranks.

Every fit here builds the same tiny GPT (hidden 64, 4 blocks, vocabulary 64, sequences of 16
tokens) from the same seed, and trains it on the same global batches of 8 sequences:

* ``kind="plain"``: a plain single-device Lightning run (``SingleDeviceStrategy``) whose loader
  draws the batches in the order Lightning's ``DistributedSampler`` gives one replica
  (``shuffle=True, seed=0``); it is the reference the suite's strategies are compared with;
* every other kind: one of the suite's strategies; Lightning inserts the ``DistributedSampler``
  (``num_replicas`` = data-parallel replicas), each replica takes ``8 / replicas`` sequences, so
  the global batch of every step is the same 8 sequences as the plain run's.

Devices (``accelerator="gpu"``): each rank first makes ``cuda:<LOCAL_RANK mod GPUs>`` its device
(design guide section 9). With at least as many GPUs as ranks, each rank drives its own GPU and the
strategy picks its backend (``nccl``, or ``"cuda:nccl,cpu:gloo"`` with CPU offload); with fewer GPUs
than ranks (2 ranks on one GPU) the ranks share the GPUs and the process groups use ``gloo``, the
one torch backend that accepts several ranks on one GPU (NCCL refuses duplicate GPUs in a group).
``accelerator="cpu"`` runs the same code on CPU: the way this module is checked on machines without
a GPU.

Results travel back to the test process as CPU tensors and plain Python values.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_scale.core.optim import OptimConfig
from lightning_scale.models import GPTConfig

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=64)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1)
SEQ = 16  # tokens per sequence
SAMPLES = 256  # sequences in the data set: 20 steps x 8 sequences stay inside one epoch
GLOBAL_BATCH = 8  # sequences per optimizer step, whatever the number of replicas
STEPS = 20  # optimizer steps of a parity run (the project's standard: >= 20)
CLIP = 0.05  # gradient-norm clipping (L2); the tiny model's norm is above it, so every step clips
# GPU cycles torch.cuda._sleep spins after each backward (about 25 ms at the H200's ~1.98 GHz boost
# clock): the device-to-host copies of the gradient chunks queue behind it, so a host read that
# does not wait for its copy sees the buffer before the copy lands.
STREAM_DELAY_CYCLES = 50_000_000

PLAIN = "plain"
# kind -> (strategy class name, keyword arguments); the registry's presets by name where they exist.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "mesh": ("MeshStrategy", {}),
    "ddp_ac_selective": ("MeshStrategy", {"activation_checkpointing": "selective"}),
    "ddp_ac_selective_compiled": ("MeshStrategy", {"activation_checkpointing": {"policy": "selective", "compile": True}}),
    "ddp_ac_offload": ("MeshStrategy", {"activation_checkpointing": "offload"}),  # saved activations on the host
    "pipeline": ("PipelineStrategy", {"schedule": "1f1b", "microbatches": 2}),  # stages: see _strategy
    "tensor_parallel": ("TensorParallelStrategy", {}),  # tensor_parallel_size: see _strategy
    "zero1": ("ZeroStrategy", {"stage": 1, "bucket_mb": 0.25}),
    "zero1_offload": ("ZeroStrategy", {"stage": 1, "offload_optimizer": True, "bucket_mb": 0.25}),
    "zero2": ("ZeroStrategy", {"stage": 2, "bucket_mb": 0.25}),
    "zero2_offload": ("ZeroStrategy", {"stage": 2, "offload_optimizer": True, "bucket_mb": 0.25}),
    "zero3": ("ZeroStrategy", {"stage": 3}),
    "zero3_offload": ("ZeroStrategy", {"stage": 3, "offload_params": True}),
    "zero2_fairscale": ("ZeroStrategy", {"stage": 2, "backend": "fairscale"}),
}


def make_data(n: int = SAMPLES, counting: bool = False) -> TensorDataset:
    """``n`` sequences of ``SEQ`` token ids, targets = the next token. Random tokens (nothing to
    learn in 20 steps: the loss stays near ln 64 = 4.16), or ``counting``: each token is the previous
    one + 1 (mod 64) from a random start, which the model learns within a few steps."""
    g = torch.Generator().manual_seed(42)
    if counting:
        x = (torch.randint(0, CFG.vocab_size, (n, 1), generator=g) + torch.arange(SEQ)) % CFG.vocab_size
    else:
        x = torch.randint(0, CFG.vocab_size, (n, SEQ), generator=g)
    return TensorDataset(x, torch.roll(x, -1, dims=1))


def model_parallel_size(kind: str, world: int) -> int:
    """Ranks per replica: pipeline stages or tensor-parallel ranks (2 when there are 2+ ranks)."""
    return min(2, world) if kind in ("pipeline", "tensor_parallel") else 1


def replicas(kind: str, world: int) -> int:
    return world // model_parallel_size(kind, world)


def _strategy(kind: str, world: int, extra: dict[str, Any]) -> Any:
    import lightning_scale.strategies as strategies

    name, kwargs = KINDS[kind]
    kwargs = dict(kwargs, **extra)
    if kind == "pipeline":
        kwargs["stages"] = model_parallel_size(kind, world)
    if kind == "tensor_parallel":
        kwargs["tensor_parallel_size"] = model_parallel_size(kind, world)
    return getattr(strategies, name)(**kwargs)


def _devices(accelerator: str, world: int) -> tuple[int, dict[str, Any], bool]:
    """(Trainer ``devices``, strategy keyword arguments, whether ranks share a GPU)."""
    if accelerator != "gpu":
        return world, {}, False
    from lightning_scale.core import device as dev

    dev.set_local_device(int(os.environ["LOCAL_RANK"]))  # before any process group (design guide section 9)
    gpus = torch.cuda.device_count()
    if world <= gpus:
        return world, {}, False  # one GPU per rank; the strategy picks nccl / "cuda:nccl,cpu:gloo"
    # More ranks than GPUs: Lightning's devices= cannot name one GPU twice, the strategy's
    # parallel_devices can; NCCL refuses two ranks on one GPU, gloo takes CUDA tensors.
    shared = [torch.device("cuda", r % gpus) for r in range(world)]
    return 1, {"parallel_devices": shared, "process_group_backend": "gloo"}, True


class _CopyCounter:
    """Counts the transfer helper's copies, and those that were real non_blocking copies (a CUDA
    event to wait on), while installed."""

    def __init__(self) -> None:
        self.total = 0
        self.non_blocking = 0
        self._original: Any = None

    def install(self) -> None:
        from lightning_scale.core import device as dev

        self._original = original = dev.copy_

        def counted(dst: torch.Tensor, src: torch.Tensor) -> Any:
            handle = original(dst, src)
            self.total += 1
            self.non_blocking += handle.event is not None
            return handle

        dev.copy_ = counted  # module global: sharding.py calls dev.copy_, to_host/to_device call copy_

    def uninstall(self) -> None:
        from lightning_scale.core import device as dev

        if self._original is not None:
            dev.copy_ = self._original


def _pinned_figures(strategy: Any, module: torch.nn.Module) -> dict[str, Any]:
    """Which host buffers of an offloading ZeRO run are pinned (page-locked) host memory: counts of
    the ZeRO-1/2 engine's fp32 master chunks and gradient chunks, or of FSDP2's parameter shards."""
    from torch.distributed.tensor import DTensor

    engine = strategy.engine() if callable(getattr(strategy, "engine", None)) else None
    if engine is not None:
        grads = [b.shard_grad for b in engine.buckets if b.shard_grad is not None]
        return {"buckets": len(engine.buckets),
                "master_devices": sorted({str(b.master.device) for b in engine.buckets}),
                "masters_pinned": sum(bool(b.master.is_pinned()) for b in engine.buckets),
                "shard_grads": len(grads), "shard_grads_pinned": sum(bool(g.is_pinned()) for g in grads)}
    local = [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]
    host = [t for t in local if t.device.type == "cpu"]
    return {"params": len(local), "param_devices": sorted({str(t.device) for t in local}),
            "host_params": len(host), "host_params_pinned": sum(bool(t.is_pinned()) for t in host)}


def _planner_device_figures(trainer: Any, pl_module: Any, batch: Any) -> dict[str, Any]:
    """The memory planner's figures for this rank's device (bytes), host memory apart."""
    try:
        from lightning_scale.callbacks._run_layout import plan_inputs
        from lightning_scale.core.planner import Hardware, plan_memory

        inputs = plan_inputs(trainer, pl_module, batch)
        if inputs is None:
            return {"error": "the planner does not model this run"}
        model, workload, layout, pp_rank = inputs
        rank = plan_memory(model, workload, layout, Hardware(gpus=trainer.world_size, memory_gb=1.0),
                           dp_rank=0).ranks[pp_rank]
        return {"params": rank.params, "grads": rank.grads, "optimizer": rank.optimizer,
                "model_states": rank.model_states, "activations": rank.activations, "transient": rank.transient,
                "peak": rank.peak, "host": rank.host, "transient_detail": dict(rank.detail)}
    except Exception as err:  # noqa: BLE001 - a figure for the report; the test asserts on what it needs
        return {"error": f"{type(err).__name__}: {err}"}


def _sleep_figures(cycles: int) -> dict[str, float]:
    """Seconds one ``torch.cuda._sleep(cycles)`` kernel takes on this rank's GPU, by CUDA events
    (DeviceClock: kernel time), and the seconds the host spent launching it."""
    import time

    from lightning_scale.core.device import DeviceClock

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda._sleep(1000)  # first launch out of the way
    torch.cuda.synchronize(device)
    clock = DeviceClock(device)
    start = clock.mark()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    launch_s = time.perf_counter() - t0
    end = clock.mark()
    return {"kernel_s": clock.seconds(start, end), "launch_s": launch_s, "cycles": cycles}


def fit(kind: str, steps: int = STEPS, *, accelerator: str = "gpu", precision: str = "32-true",
        clip: float | None = CLIP, memory: bool = False, profiler: bool = False, trace_dir: str | None = None,
        run_dir: str | None = None, stream_delay_cycles: int = 0, forward_delay_cycles: int = 0,
        counting: bool = False) -> dict[str, Any]:
    """Train ``kind`` for ``steps`` optimizer steps on this rank; per-step losses, weights and figures.

    Args:
        kind: :data:`PLAIN` or a key of :data:`KINDS`.
        accelerator: ``"gpu"`` (the lane) or ``"cpu"`` (checking this module without a GPU).
        memory: add MemoryAccountant and read the CUDA allocator after its sampled step.
        profiler: add ScaleProfiler (every step logged) and CostReporter.
        trace_dir: with ``profiler``, a torch.profiler trace of steps 2-3 on rank 0 goes there.
        stream_delay_cycles: after every backward, spin the current CUDA stream this many cycles
            (``torch.cuda._sleep``) so the copies queued next land late.
        forward_delay_cycles: with ``profiler``, spin the CUDA stream this many cycles at the start of
            every training step, inside ScaleProfiler's forward phase (its duration by CUDA events is
            measured first: ``figures["sleep"]``).
        counting: train on :func:`make_data`'s learnable counting sequences.
    """
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import Callback
    import torch.distributed as dist

    from lightning_scale.tasks import LanguageModelingTask

    os.environ["PL_GLOBAL_SEED"] = "0"  # the seed of Lightning's DistributedSampler (and the plain run's)
    world = int(os.environ["WORLD_SIZE"])
    devices, device_kwargs, shared = _devices(accelerator, world)
    if kind == PLAIN:
        if world != 1:
            raise ValueError("the plain reference is a single-device run")
        strategy: Any = "auto"
        reps = 1
    else:
        strategy = _strategy(kind, world, device_kwargs)
        reps = replicas(kind, world)
    out: dict[str, Any] = {"kind": kind, "world": world, "shared_gpu": shared, "losses": [], "figures": {}}
    figures = out["figures"]
    counter = _CopyCounter()

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            figures["root_device"] = str(trainer.strategy.root_device)
            figures["backend"] = str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
            figures["param_dtypes"] = sorted({str(p.dtype) for p in pl_module.parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            out["losses"].append(float(outputs["loss"]))

        def on_after_backward(self, trainer, pl_module):
            if stream_delay_cycles and trainer.strategy.root_device.type == "cuda":
                torch.cuda._sleep(stream_delay_cycles)

        def on_train_end(self, trainer, pl_module):
            if kind.startswith("zero") and "offload" in kind:
                figures["pinned"] = _pinned_figures(trainer.strategy, pl_module)

    class AllocatorProbe(Callback):
        """The CUDA caching allocator's allocated bytes (``torch.cuda.memory_allocated``), twice:

        * ``baseline``: in ``setup``, before the strategy moves the model to the GPU, after a
          warm-up linear layer forward and backward, so that cuBLAS / cuBLASLt workspaces (which the
          allocator serves, and which stay allocated) are already counted;
        * ``end``: right after the sampled step's optimizer step, where MemoryAccountant counts the
          model states (this step's gradients still alive, its activations freed).

        ``end - baseline`` is the allocator's figure for the model states (plus the batch, the loss
        and logged values: a few KiB). ``end`` once more after freeing cuBLAS's workspaces is
        recorded too."""

        def __init__(self, step: int) -> None:
            self.step = step

        def setup(self, trainer, pl_module, stage):
            device = trainer.strategy.root_device
            if device.type != "cuda":
                return
            x = torch.randn(8, 64, device=device, requires_grad=True)
            w = torch.randn(64, 64, device=device, requires_grad=True)
            b = torch.randn(64, device=device, requires_grad=True)
            torch.nn.functional.linear(x, w, b).sum().backward()  # addmm (cuBLASLt) and mm (cuBLAS)
            del x, w, b
            torch.cuda.synchronize(device)
            figures["allocated_baseline_bytes"] = int(torch.cuda.memory_allocated(device))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            device = trainer.strategy.root_device
            if trainer.global_step != self.step + 1:
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                figures["allocated_end_bytes"] = int(torch.cuda.memory_allocated(device))
                clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
                if clear is not None:
                    clear()
                    figures["allocated_end_bytes_without_cublas_workspaces"] = int(torch.cuda.memory_allocated(device))
            figures["planner_device"] = _planner_device_figures(trainer, pl_module, batch)

    class ForwardDelay(Callback):
        """After ScaleProfiler's on_train_batch_start (it comes later in the list): GPU work of a
        known duration inside the forward phase. Timed by launches, the phase would miss it."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda._sleep(forward_delay_cycles)

    callbacks: list[Any] = [Record()]
    accountant = prof = cost = None
    if memory:
        from lightning_scale.callbacks import MemoryAccountant

        accountant = MemoryAccountant(sample_step=1, log=False, print_table=False, plot=False)
        callbacks += [accountant, AllocatorProbe(accountant.sample_step)]
    if profiler:
        from lightning_scale.callbacks import CostReporter, ScaleProfiler

        prof = ScaleProfiler(log_every_n_steps=1, print_summary=False, trace_steps=(2, 3) if trace_dir else None,
                             trace_dir=trace_dir)
        cost = CostReporter(log_every_n_steps=1, print_table=False, plot=False)
        callbacks += [prof, cost]
        if forward_delay_cycles and accelerator == "gpu":
            figures["sleep"] = _sleep_figures(forward_delay_cycles)
            callbacks.append(ForwardDelay())
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=steps, precision=precision,
        gradient_clip_val=clip, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        default_root_dir=run_dir or tempfile.mkdtemp(prefix="lightning-scale-gpu-lane-"),  # never the checkout
    )
    torch.manual_seed(0)
    task = LanguageModelingTask(model=CFG, optim=OPTIM, sample_tokens=0)
    data = make_data(counting=counting)
    if kind == PLAIN:  # the order Lightning's DistributedSampler gives the suite's strategies (one replica)
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(data, batch_size=GLOBAL_BATCH, sampler=sampler, drop_last=True)
    else:
        loader = DataLoader(data, batch_size=GLOBAL_BATCH // reps, shuffle=False, drop_last=True)
    counter.install()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(task, train_dataloaders=loader)
    finally:
        counter.uninstall()
    figures["copies"] = {"total": counter.total, "non_blocking": counter.non_blocking}
    from torch.distributed.tensor import DTensor

    # DTensor weights (tensor parallel, FSDP2) gathered to full tensors: a collective, same order on every rank.
    out["state"] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu", torch.float32).clone()
                    for k, v in task.state_dict().items()}
    out["global_step"] = trainer.global_step
    out["warnings"] = [str(w.message) for w in caught]
    if accountant is not None:
        out["memory_record"] = accountant.record
    if prof is not None:
        out["history"] = prof.history
        out["trace"] = str(getattr(prof, "trace_path", "") or "")
        out["cost_report"] = {k: cost.report.get(k) for k in ("devices", "rate_per_gpu_hour", "rate_note", "seconds")}
    if accelerator == "gpu":
        device = trainer.strategy.root_device
        figures["device_name"] = torch.cuda.get_device_name(device)
        figures["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        from torch._dynamo.utils import counters

        figures["compiled_graphs"] = int(counters["stats"]["unique_graphs"])  # graphs torch.compile built here
    except Exception:  # noqa: BLE001 - a figure, not a check
        figures["compiled_graphs"] = None
    return out
