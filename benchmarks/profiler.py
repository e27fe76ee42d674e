"""Callback overhead on CPU: step time of a 2-rank ddp fit without and with the suite's callbacks
(ScaleProfiler, MemoryAccountant, CostReporter).

Usage (from the repository root)::

    python benchmarks/profiler.py            # GPT nano, 5 variants, 3 repeats
    python benchmarks/profiler.py --quick    # smoke configuration, < 1 minute
    python benchmarks/profiler.py --strategy tensor_parallel --variants default every_step

Each run is a ``Trainer.fit`` of the suite's ``LanguageModelingTask`` (GPT ``--preset``, random
tokens, batch ``--batch`` x ``--seq`` per rank) on 2 gloo processes with 1 thread each,
strategy ``--strategy``: ``ddp`` (Lightning's), ``mesh`` (the suite's data parallelism, where
ScaleProfiler also times communication) or ``tensor_parallel`` (TP=2, communication inside
forward and backward). Variants: ``off`` (no callback), ``default`` (``ScaleProfiler()``: logs and
all-gathers every 10 steps), ``every_step`` (``ScaleProfiler(log_every_n_steps=1)``), ``memory``
(``MemoryAccountant`` sampling the first timed step, no table / plot) and ``cost``
(``CostReporter(rate_per_gpu_hour=1.0)``, no table / plot). The step time is measured by a
separate callback listed *before* the one under test, from one ``on_train_batch_start`` to the
next, so it includes everything the callback does in its hooks (end-of-fit tables are not
counted). Mean over ``--steps`` steps after ``--warmup``, max over ranks, median over
``--repeats``. Overhead = variant / off - 1. MemoryAccountant works on one sampled step only: its
steady overhead leaves that step out, and its one-off cost is reported apart (the sampled step's
time minus the median of the run's other timed steps). Target (issue 7): ScaleProfiler with
default settings adds at most 3%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/profiler.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

WORLD = 2
TARGET = 0.03
VARIANTS = ["off", "default", "every_step", "memory", "cost"]
STRATEGIES = ["ddp", "mesh", "tensor_parallel"]
FULL_DEFAULTS = dict(preset="nano", batch=8, seq=128, steps=20, warmup=3, repeats=3,
                     json="benchmarks/results/profiler.json", retries=3)
QUICK_DEFAULTS = dict(preset="tiny", batch=4, seq=32, steps=10, warmup=2, repeats=1,
                      json="benchmarks/results/profiler_quick.json", retries=0)


def _callback(variant: str, warmup: int) -> Any:
    """The callback under test (None for ``off``)."""
    from lightning_scale.callbacks import CostReporter, MemoryAccountant, ScaleProfiler

    if variant == "default":
        return ScaleProfiler(print_summary=False)
    if variant == "every_step":
        return ScaleProfiler(print_summary=False, log_every_n_steps=1)
    if variant == "memory":
        return MemoryAccountant(sample_step=warmup, print_table=False, plot=False, oom_dump=False)
    if variant == "cost":
        return CostReporter(rate_per_gpu_hour=1.0, print_table=False, plot=False)
    return None


def _strategy(name: str) -> Any:
    from lightning_scale.strategies import MeshStrategy, TensorParallelStrategy

    return {"ddp": lambda: "ddp", "mesh": MeshStrategy,
            "tensor_parallel": lambda: TensorParallelStrategy(tensor_parallel_size=WORLD)}[name]()


def bench_worker(variant: str, preset: str, batch: int, seq: int, warmup: int, steps: int,
                 strategy: str = "ddp") -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks._common import Window
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.tasks import LanguageModelingTask

    cfg = GPTConfig.from_preset(preset, block_size=max(seq, GPTConfig.from_preset(preset).block_size))
    out: dict = {"step_s": [], "step_index": []}
    window = Window()

    class Measure(Callback):
        last: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if batch_idx == warmup:
                window.start()
            if self.last is not None and batch_idx > warmup:
                out["step_s"].append(now - self.last)  # step batch_idx - 1, callbacks' hooks included
                out["step_index"].append(batch_idx - 1)
            self.last = now

        def on_train_end(self, trainer, pl_module):
            out["window"] = window.stop()

    callbacks: list = [Measure()]
    under_test = _callback(variant, warmup)
    if under_test is not None:
        callbacks.append(under_test)
    torch.manual_seed(0)
    task = LanguageModelingTask(model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0), sample_tokens=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (WORLD * batch * (warmup + steps + 1), seq), generator=g)
    data = DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=batch, drop_last=True)
    with tempfile.TemporaryDirectory() as run_dir:  # CostReporter writes cost_report.json to the run directory
        trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=_strategy(strategy), max_steps=warmup + steps + 1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=run_dir)
        trainer.fit(task, data)
    out["sampled_step"] = warmup if variant == "memory" else None
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="GPT preset (default nano)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="what to run (default: all; off always runs)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="Trainer strategy (default ddp)")
    common.add_run_arguments(p, FULL_DEFAULTS, "sequences per rank per step", "tiny preset, 1 repeat")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    common.check_run_arguments(p, args, min_warmup=1)
    args.variants = ["off"] + [v for v in (args.variants or VARIANTS) if v != "off"]
    if "memory" in args.variants and args.steps < 2:
        p.error("--steps must be >= 2 with the memory variant (one sampled step + steady steps)")
    return args


def _run_figures(res: list[dict]) -> tuple[float, float | None]:
    """(Steady step time: mean over the timed steps but a sampled one, max over ranks; the sampled
    step's extra time over the median of the others, max over ranks, or None)."""
    steady, one_off = [], []
    for r in res:
        sampled = r["sampled_step"]
        others = [t for i, t in zip(r["step_index"], r["step_s"]) if i != sampled]
        steady.append(statistics.mean(others))
        if sampled is not None:
            one_off.append(r["step_s"][r["step_index"].index(sampled)] - statistics.median(others))
    return max(steady), (max(one_off) if one_off else None)


HEADERS = ["variant", "step ms", "overhead vs off", "one-off ms", "target"]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    runs: list[dict] = []
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for variant in args.variants:
            label = f"[{rep}] {variant}"
            meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                bench_worker, WORLD, variant, args.preset, args.batch, args.seq, args.warmup, args.steps,
                args.strategy, init_process_group=False, timeout=args.timeout))
            res = meas.pop("results")
            step, one_off = _run_figures(res)
            runs.append({"variant": variant, "repeat": rep, "step_s": step, "one_off_s": one_off, **meas,
                         "per_rank": [{k: r[k] for k in ("step_s", "step_index", "sampled_step")} for r in res]})
            extra = f", one-off {1e3 * one_off:+.0f} ms" if one_off is not None else ""
            console.print(f"  {label:<18} {1e3 * step:8.1f} ms/step{extra} (others {meas['foreign_cores']:.2f} cores)")
    env["wall_s"] = time.perf_counter() - t_start
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    off = statistics.median(r["step_s"] for r in runs if r["variant"] == "off")
    rows, cells = [], []
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        s = common.stats([r["step_s"] for r in mine])
        one_off = common.stats([r["one_off_s"] for r in mine]) if mine[0]["one_off_s"] is not None else None
        overhead = s["median"] / off - 1
        met = None if variant != "default" else overhead <= TARGET
        ratio = common.paired_ratio(mine, [r for r in runs if r["variant"] == "off"])
        overhead_stats = {k: (v - 1 if k in ("median", "min", "max") else v) for k, v in ratio.items()}
        rows.append({"variant": variant, "step_s": s, "overhead": overhead, "overhead_stats": overhead_stats,
                     "one_off_s": one_off, "target_met": met,
                     "polluted_runs": sum(r["polluted"] for r in mine)})
        cells.append([variant, f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})",
                      f"{overhead:+.1%}", "-" if one_off is None else f"{1e3 * one_off['median']:+.0f}",
                      "-" if met is None else f"<= {TARGET:.0%}: " + ("met" if met else "NOT met")])
    title = (f"Callback overhead: GPT {args.preset}, {args.strategy} x {WORLD}, batch {args.batch} x {args.seq} per rank "
             f"(median of {args.repeats})")
    caption = (f"GPT {args.preset}, {args.strategy} on {WORLD} ranks (1 thread each), batch {args.batch} x {args.seq} per rank, "
               f"{args.steps} timed steps; median of {args.repeats} runs (min-max). default / every_step: ScaleProfiler; "
               f"memory: MemoryAccountant (steady steps; one-off = its sampled step's extra time); cost: CostReporter.")
    common.write_outputs(console, json_path, title, HEADERS, cells, caption,
                         {"config": vars(args), "environment": env, "summary": rows, "runs": runs}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
