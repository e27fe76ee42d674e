"""ScaleProfiler overhead on CPU: step time of a 2-rank ddp fit with and without the callback.

Usage (from the repository root)::

    python benchmarks/profiler.py            # GPT nano, 3 variants, 3 repeats
    python benchmarks/profiler.py --quick    # smoke configuration, < 1 minute

Each run is a ``Trainer.fit`` of the suite's ``LanguageModelingTask`` (GPT ``--preset``, random
tokens, batch ``--batch`` x ``--seq`` per rank) on 2 gloo processes with 1 thread each,
strategy ``ddp``. Variants: ``off`` (no ScaleProfiler), ``default`` (``ScaleProfiler()``: logs and
all-gathers every 10 steps), ``every_step`` (``log_every_n_steps=1``). The step time is measured
by a separate callback listed *before* ScaleProfiler, from one ``on_train_batch_start`` to the
next, so it includes everything ScaleProfiler does in its hooks (timers, the all-gather, the
table is printed after fit and not counted). Mean over ``--steps`` steps after ``--warmup``, max
over ranks, median over ``--repeats``. Overhead = variant / off - 1. Target (issue 7): default
settings add at most 3%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/profiler.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

WORLD = 2
TARGET = 0.03
VARIANTS = {"off": None, "default": {}, "every_step": {"log_every_n_steps": 1}}
FULL_DEFAULTS = dict(preset="nano", batch=8, seq=128, steps=20, warmup=3, repeats=3,
                     json="benchmarks/results/profiler.json", retries=3)
QUICK_DEFAULTS = dict(preset="tiny", batch=4, seq=32, steps=10, warmup=2, repeats=1,
                      json="benchmarks/results/profiler_quick.json", retries=0)


def bench_worker(variant: str, preset: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks._common import Window
    from lightning_scale.callbacks import ScaleProfiler
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.tasks import LanguageModelingTask

    cfg = GPTConfig.from_preset(preset, block_size=max(seq, GPTConfig.from_preset(preset).block_size))
    out: dict = {"step_s": []}
    window = Window()

    class Measure(Callback):
        last: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if batch_idx == warmup:
                window.start()
            if self.last is not None and batch_idx > warmup:
                out["step_s"].append(now - self.last)
            self.last = now

        def on_train_end(self, trainer, pl_module):
            out["window"] = window.stop()

    callbacks: list = [Measure()]
    if VARIANTS[variant] is not None:
        callbacks.append(ScaleProfiler(print_summary=False, **VARIANTS[variant]))
    torch.manual_seed(0)
    task = LanguageModelingTask(model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0), sample_tokens=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (WORLD * batch * (warmup + steps + 1), seq), generator=g)
    data = DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=batch, drop_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=warmup + steps + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(task, data)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="GPT preset (default nano)")
    common.add_run_arguments(p, FULL_DEFAULTS, "sequences per rank per step", "tiny preset, 1 repeat")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    common.check_run_arguments(p, args, min_warmup=1)
    return args


HEADERS = ["variant", "step ms", "overhead vs off", "target"]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    runs: list[dict] = []
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for variant in VARIANTS:
            label = f"[{rep}] {variant}"
            meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                bench_worker, WORLD, variant, args.preset, args.batch, args.seq, args.warmup, args.steps,
                init_process_group=False, timeout=args.timeout))
            res = meas.pop("results")
            step = max(statistics.mean(r["step_s"]) for r in res)
            runs.append({"variant": variant, "repeat": rep, "step_s": step, **meas})
            console.print(f"  {label:<18} {1e3 * step:8.1f} ms/step (others {meas['foreign_cores']:.2f} cores)")
    env["wall_s"] = time.perf_counter() - t_start
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    off = statistics.median(r["step_s"] for r in runs if r["variant"] == "off")
    rows, cells = [], []
    for variant in VARIANTS:
        s = common.stats([r["step_s"] for r in runs if r["variant"] == variant])
        overhead = s["median"] / off - 1
        met = None if variant != "default" else overhead <= TARGET
        rows.append({"variant": variant, "step_s": s, "overhead": overhead, "target_met": met})
        cells.append([variant, f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})",
                      f"{overhead:+.1%}", "-" if met is None else f"<= {TARGET:.0%}: " + ("met" if met else "NOT met")])
    title = (f"ScaleProfiler overhead: GPT {args.preset}, ddp x {WORLD}, batch {args.batch} x {args.seq} per rank "
             f"(median of {args.repeats})")
    caption = (f"GPT {args.preset}, ddp on {WORLD} ranks (1 thread each), batch {args.batch} x {args.seq} per rank, "
               f"{args.steps} timed steps; median of {args.repeats} runs (min-max).")
    common.write_outputs(console, json_path, title, HEADERS, cells, caption,
                         {"config": vars(args), "environment": env, "summary": rows, "runs": runs}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
