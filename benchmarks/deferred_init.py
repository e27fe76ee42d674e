"""Setup memory per rank: eager vs deferred initialization, for ZeRO-3, pipeline and TP.

Usage (from the repository root)::

    python benchmarks/deferred_init.py                       # GPT ~350M: zero3 x2/x4/x8, pipeline x2/x4, tp x2
    python benchmarks/deferred_init.py --layouts zero3:8 --layers 24 --hidden 1024
    python benchmarks/deferred_init.py --quick               # a small GPT, zero3 x2 and pipeline x2

What is measured, per rank (each rank a real process, 1 thread, started by
``lightning_scale.testing.run_distributed`` from a fork server that has torch and Lightning
imported): the process's resident-set high-water mark (``VmHWM`` of ``/proc/self/status``, bytes)
minus its resident set when the rank function starts (``VmRSS``: the fixed overhead of the
process, reported on its own). Read at two points: after setup (the first batch's start:
model built, split or sharded, materialized) and after the first optimizer step (forward,
backward and the optimizer's state included). The processes run with
``MALLOC_MMAP_THRESHOLD_=65536`` (unless ``--keep-malloc``): glibc then returns freed buffers of
64 KiB and more to the OS, so the high-water mark follows the tensors alive, not the heap glibc
keeps after freeing (measured 2026-12-03, ZeRO-3 on 2 ranks, 302.6M parameters, deferred, read
just before the first optimizer step: 2305 MiB with glibc's defaults, 1354 MiB with the
threshold; the same setup peak). One ``Trainer.fit`` of 1 optimizer step with the
suite's ``LanguageModelingTask`` (fp32 AdamW), batch 1 x ``--seq`` tokens per data-parallel rank.

* eager: the LightningModule builds its GPT in ``__init__`` on every rank (what Lightning does);
* deferred: the same module built with ``lightning_scale.deferred(LanguageModelingTask, ...)``:
  on the meta device until the strategy has split / sharded it, then each rank materializes its
  part (``docs/deferred_init.md``).

The model-state share printed next to the figures is exact arithmetic on the parameter counts:
16 bytes per parameter a rank holds (fp32 parameter, gradient, two Adam moments), i.e. 16 P / N
under ZeRO-3 on N ranks, 16 x the stage's parameters under a pipeline, and under TP the sharded
parameters / tp plus every replicated one. Target (issue 24): the deferred setup peak per rank
at most the rank's model-state share plus 10%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/deferred_init.py` from anywhere
    sys.path.insert(0, str(REPO))

LAYOUTS = ["zero3:2", "zero3:4", "zero3:8", "pipeline:2", "pipeline:4", "tensor_parallel:2"]


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (it is given in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rank_run(layout: str, world: int, mode: str, layers: int, hidden: int, heads: int, seq: int) -> dict:
    """One rank: build, set up and run one optimizer step; memory at setup end and at the step."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_scale  # noqa: F401  (registers the strategies by name)
    from lightning_scale import deferred
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.strategies import PipelineStrategy, TensorParallelStrategy, ZeroStrategy
    from lightning_scale.tasks import LanguageModelingTask

    torch.set_num_threads(1)
    start_rss = _status("VmRSS")
    marks: dict[str, int] = {}

    class Marks(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks.setdefault("setup_hwm", _status("VmHWM"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marks.setdefault("step_hwm", _status("VmHWM"))  # after the first optimizer step

    cfg = GPTConfig(vocab_size=256, block_size=seq, n_layer=layers, n_head=heads, n_embd=hidden, dropout=0.0)
    kwargs = dict(model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0), sample_tokens=0)
    t0 = time.perf_counter()
    task = deferred(LanguageModelingTask, **kwargs) if mode == "deferred" else LanguageModelingTask(**kwargs)
    build_s = time.perf_counter() - t0
    if layout == "zero3":
        strategy, dp = ZeroStrategy(stage=3), world
    elif layout == "pipeline":
        strategy, dp = PipelineStrategy(stages=world, schedule="gpipe", microbatches=world), 1
    else:
        strategy, dp = TensorParallelStrategy(tensor_parallel_size=world), 1
    rows = world if layout == "pipeline" else 1  # a pipeline needs a microbatch per stage
    data = TensorDataset(torch.randint(0, 256, (rows * dp * 2, seq)), torch.randint(0, 256, (rows * dp * 2, seq)))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Marks()],
                        use_distributed_sampler=False)
    trainer.fit(task, DataLoader(data, batch_size=rows, shuffle=False))
    held = [p.to_local() if hasattr(p, "to_local") else p for p in task.parameters()]
    return {"start_rss": start_rss, "setup_peak": marks["setup_hwm"] - start_rss,
            "step_peak": marks["step_hwm"] - start_rss, "params_held": sum(p.numel() for p in held),
            "params_total": sum(p.numel() for p in task.parameters()) if layout != "pipeline" else None,
            "build_s": build_s, "rank": int(os.environ["RANK"])}


def main(argv: list[str] | None = None) -> int:
    from benchmarks._common import console as make_console
    from lightning_scale.models import GPTConfig
    from lightning_scale.models.gpt import gpt_param_count
    from lightning_scale.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=None, help=f"strategy:ranks (default {' '.join(LAYOUTS)})")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["eager", "deferred"])
    p.add_argument("--json", default="benchmarks/results/deferred_init.json")
    p.add_argument("--quick", action="store_true", help="a 4-layer hidden-256 GPT, zero3:2 and pipeline:2")
    p.add_argument("--keep-malloc", action="store_true", help="leave glibc's mmap threshold at its default")
    args = p.parse_args(argv)
    if not args.keep_malloc:  # read by glibc when the rank processes (a fresh fork server) start
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if args.quick:
        args.layers, args.hidden, args.heads = 4, 256, 4
        args.layouts = args.layouts or ["zero3:2", "pipeline:2"]
        if args.json == p.get_default("json"):
            args.json = "benchmarks/results/deferred_init_quick.json"
    layouts = args.layouts or LAYOUTS
    console = make_console()
    cfg = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.hidden)
    total = gpt_param_count(cfg)
    console.print(f"GPT {args.layers} x {args.hidden}: {total / 1e6:.1f}M parameters ({16 * total / 2**30:.2f} GiB "
                  f"of fp32 AdamW model states); batch 1 x {args.seq} tokens per replica")
    started = time.time()
    rows = []
    for spec in layouts:
        layout, world = spec.split(":")[0], int(spec.split(":")[1])
        for mode in args.modes:
            t0 = time.perf_counter()
            try:
                res = run_distributed(rank_run, world, layout, world, mode, args.layers, args.hidden, args.heads,
                                      args.seq, init_process_group=False, timeout=3600)
            except Exception as err:  # noqa: BLE001 - an OOM or failure is a result to report
                console.print(f"{spec} {mode}: FAILED {type(err).__name__}: {str(err)[-300:]}")
                rows.append({"layout": spec, "mode": mode, "failed": f"{type(err).__name__}: {str(err)[-300:]}"})
                continue
            worst = max(res, key=lambda r: r["setup_peak"])
            share = 16 * max(r["params_held"] for r in res)
            row = {"layout": spec, "mode": mode, "seconds": time.perf_counter() - t0,
                   "setup_peak_max": worst["setup_peak"], "step_peak_max": max(r["step_peak"] for r in res),
                   "model_state_share": share, "process_start_rss": worst["start_rss"], "ranks": res}
            rows.append(row)
            console.print(f"{spec:>18} {mode:>8}: setup peak {row['setup_peak_max'] / 2**20:8.0f} MiB, first step "
                          f"{row['step_peak_max'] / 2**20:8.0f} MiB, model-state share {share / 2**20:7.0f} MiB, "
                          f"process start {worst['start_rss'] / 2**20:5.0f} MiB ({row['seconds']:.0f} s)")
    import json

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python benchmarks/deferred_init.py", *(argv or sys.argv[1:])]),
                               "parameters": total, "layers": args.layers, "hidden": args.hidden, "seq": args.seq,
                               "rows": rows, "wall_s": time.time() - started}, indent=1))
    console.print(f"wrote {out}")
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
