"""Rank functions for tests/test_profiler.py (module level: the harness pickles them by reference)."""

from __future__ import annotations

import os
import time
import warnings

from torch.utils.data import DataLoader

from _pipeline_targets import _task, make_data


def fit_profiled(kind: str, steps: int, batch: int, accumulate: int = 1, slow_rank: int | None = None,
                 peak_tflops: float | None = None, trace_dir: str | None = None) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_scale.callbacks import ScaleProfiler
    from lightning_scale.strategies import MeshStrategy, PipelineStrategy

    os.environ["PL_GLOBAL_SEED"] = "0"
    from lightning_scale.strategies import Parallel3DStrategy, TensorParallelStrategy, ZeroStrategy

    strategy = {"ddp": lambda: "ddp", "mesh": MeshStrategy,
                "mesh_ac": lambda: MeshStrategy(activation_checkpointing="full"),
                "pipeline": lambda: PipelineStrategy(stages=2, microbatches=4),
                "tp": lambda: TensorParallelStrategy(tensor_parallel_size=2),
                "tp_sp": lambda: TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
                "zero3": lambda: ZeroStrategy(stage=3),
                "zero3_bf16": lambda: ZeroStrategy(stage=3),
                "zero1": lambda: ZeroStrategy(stage=1),
                "zero2": lambda: ZeroStrategy(stage=2),
                "3d": lambda: Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=2)}[kind]()
    profiler = ScaleProfiler(log_every_n_steps=1, peak_tflops=peak_tflops, print_summary=False,
                             trace_steps=(2, 3) if trace_dir else None, trace_dir=trace_dir)

    class SlowRank(Callback):
        """Runs after the profiler's batch start: its sleep is part of this rank's forward."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_rank == slow_rank:
                time.sleep(0.2)

    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_steps=steps,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[profiler, SlowRank()],
                        precision="bf16-mixed" if kind.endswith("_bf16") else "32-true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_task(), train_dataloaders=DataLoader(make_data(), batch_size=batch, drop_last=True))
    engine = trainer.strategy.engine() if hasattr(trainer.strategy, "engine") else None
    return {"padded_numel": engine.padded_numel() if engine is not None else None, "history": profiler.history, "trace": str(getattr(profiler, "trace_path", "")),
            "top_ops": getattr(profiler, "top_ops", []), "warnings": [str(w.message) for w in caught if "ScaleProfiler" in str(w.message)]}


def comm_timer_calls() -> dict:
    """CommTimer on 2 ranks: rank 1 arrives 0.2 s late to a synchronous all-reduce; an async one,
    a nested one (broadcast_object_list -> broadcast) and one outside start/stop."""
    import torch
    import torch.distributed as dist

    from lightning_scale.core.comm_timer import CommTimer, section

    timer = CommTimer.get()
    original = dist.all_reduce
    timer.install()
    timer.name_groups([("dp", dist.group.WORLD)], world="dp")
    t = torch.ones(4)
    dist.all_reduce(t)  # not active: not counted
    timer.start()
    if dist.get_rank() == 1:
        time.sleep(0.2)
    dist.all_reduce(t, group=dist.group.WORLD)  # rank 0 waits here for rank 1
    dist.all_reduce(t, async_op=True).wait()  # the launch is not a wait; the C++ wait is not seen
    dist.broadcast_object_list([1], src=0)  # counted once although it calls broadcast
    with section("other"):
        time.sleep(0.05)
    seconds, calls = timer.stop(), dict(timer.calls)
    patched = dist.all_reduce is not original
    timer.uninstall()
    return {"seconds": seconds, "calls": calls, "patched": patched, "restored": dist.all_reduce is original}
