"""ZeRO on CPU: per-rank model-state bytes and step time of DDP, each ZeRO stage (native and
fairscale backends) and Lightning's ModelParallelStrategy with FSDP2, all under Lightning.

Usage (from the repository root)::

    python benchmarks/zero.py                  # GPT nano and micro, 2 ranks, 3 repeats
    python benchmarks/zero.py --quick          # smoke configuration, < 1 minute
    python benchmarks/zero.py --presets micro --variants ddp zero1 zero2 --repeats 5

Each run is a real ``Trainer.fit`` on 2 gloo processes (1 thread each) of the suite's
``LanguageModelingTask`` (fp32 AdamW, random tokens, batch ``--batch`` x ``--seq`` per rank), so
every variant pays the same Lightning overhead. Step time: wall time from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, reductions, optimizer
step, all-gathers), mean over ``--steps`` steps after ``--warmup``, max over ranks; each figure is
the median over ``--repeats`` fresh runs. Model-state bytes: counted after a step from the tensors
each rank holds (:func:`lightning_scale.core.memory.model_state_bytes`; each storage once).

Expected bytes: :func:`lightning_scale.core.memory.zero_state_bytes` (fp32 Adam, Psi parameters,
N ranks; design guide section 6): DDP 16 Psi; ZeRO-1 8 Psi + 8 Psi/N; ZeRO-2 4 Psi + 12 Psi/N;
ZeRO-3 16 Psi/N; offload adds the fp32 master chunk and a CPU gradient chunk (4 Psi/N each).
Native stages use Psi' (bucket padding) and Adam's 4-byte step per bucket / parameter;
fairscale partitions whole parameters, so it has no per-rank formula. Targets: native bytes exactly at the formula;
native ZeRO-1/2 step time within 15% of DDP.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/zero.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

WORLD = 2
TARGET_SLOWDOWN = 1.15
VARIANTS: dict[str, dict[str, Any] | None] = {
    "ddp": None,
    "zero1": dict(stage=1),
    "zero2": dict(stage=2),
    "zero3": dict(stage=3),
    "zero1_offload": dict(stage=1, offload_optimizer=True),
    "zero2_offload": dict(stage=2, offload_optimizer=True),
    "zero3_offload": dict(stage=3, offload_params=True),
    "fairscale_zero1": dict(stage=1, implementation="fairscale"),
    "fairscale_zero2": dict(stage=2, implementation="fairscale"),
    "lightning_fsdp2": None,
}
FULL_DEFAULTS = dict(presets=["nano", "micro"], variants=list(VARIANTS), batch=8, seq=128, steps=4, warmup=2, repeats=3,
                     json="benchmarks/results/zero.json", retries=3)
QUICK_DEFAULTS = dict(presets=["nano"], variants=["ddp", "zero1", "zero2", "zero3", "fairscale_zero2", "lightning_fsdp2"],
                      batch=4, seq=64, steps=2, warmup=1, repeats=1, json="benchmarks/results/zero_quick.json", retries=0)


# ----------------------------------------------------------------------------------------------
# Rank function (module level: the harness pickles it by reference)
# ----------------------------------------------------------------------------------------------
def bench_worker(variant: str, preset: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks._common import Window
    from lightning_scale.core.memory import model_state_bytes
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.tasks import LanguageModelingTask

    cfg = GPTConfig.from_preset(preset)
    cfg = GPTConfig(**{**cfg.to_dict(), "block_size": max(cfg.block_size, seq), "dropout": 0.0})
    out: dict[str, Any] = {"step_s": []}
    window = Window()

    class Measure(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                torch.distributed.barrier()
                window.start()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= warmup:
                out["step_s"].append(time.perf_counter() - self.t0)
            if batch_idx == warmup + steps - 1:
                out["window"] = window.stop()
                strategy = trainer.strategy
                engine = strategy.engine() if hasattr(strategy, "engine") else None
                optimizers = [getattr(o, "optim", o) for o in trainer.optimizers]
                out["counts"] = model_state_bytes(pl_module, optimizers, engine.held_tensors() if engine else None)
                out["psi_padded"] = engine.padded_numel() if engine else None
                out["buckets"] = len(engine.specs) if engine else None

    torch.manual_seed(0)
    task_cls = common.fsdp2_task_class() if variant == "lightning_fsdp2" else LanguageModelingTask
    task = task_cls(model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0), sample_tokens=0)
    shapes = [tuple(p.shape) for p in {id(p): p for p in task.parameters()}.values()]
    out["psi"] = sum(math.prod(s) for s in shapes)
    out["psi_fsdp"] = sum(math.ceil(s[0] / WORLD) * WORLD * math.prod(s[1:]) for s in shapes)
    out["n_params"] = len(shapes)
    if variant == "ddp":
        strategy: Any = "ddp"
    elif variant == "lightning_fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    else:
        from lightning_scale.strategies import ZeroStrategy

        strategy = ZeroStrategy(**VARIANTS[variant])  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    n = WORLD * batch * (warmup + steps)
    x = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
    data = DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=batch, drop_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=warmup + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Measure()])
    trainer.fit(task, data)
    out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def expected_bytes(variant: str, r: dict) -> int | None:
    """Formula total for this rank (None where the backend's partition is not a formula)."""
    from lightning_scale.core.memory import zero_state_bytes

    if variant.startswith("fairscale"):
        return None
    if variant == "ddp":  # + Adam's 4-byte step per parameter
        return sum(zero_state_bytes(r["psi"], WORLD, 0, step_tensors=r["n_params"]).values())
    spec = VARIANTS.get(variant) or {"stage": 3}  # lightning_fsdp2: FSDP2 like stage 3
    if spec["stage"] == 3:  # FSDP2 pads dim 0 of each parameter to a multiple of N
        return sum(zero_state_bytes(r["psi_fsdp"], WORLD, 3, step_tensors=r["n_params"]).values())
    return sum(zero_state_bytes(r["psi_padded"], WORLD, spec["stage"], offload=spec.get("offload_optimizer", False),
                                step_tensors=r["buckets"]).values())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="GPT presets (default nano micro)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="what to run (default: all)")
    common.add_run_arguments(p, FULL_DEFAULTS, "sequences per rank per step", "nano, 6 variants, 1 repeat")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    common.check_run_arguments(p, args, min_warmup=1)
    return args


HEADERS = ["variant", "params MB", "grads MB", "optimizer MB", "total MB", "formula MB", "at formula", "step ms",
           "vs DDP"]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rich.table import Table

    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    runs: list[dict] = []
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for preset in args.presets:
            for variant in args.variants:
                t0 = time.perf_counter()
                label = f"[{rep}] {preset} {variant}"
                meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                    bench_worker, WORLD, variant, preset, args.batch, args.seq, args.warmup, args.steps,
                    init_process_group=False, timeout=args.timeout))
                res = meas.pop("results")
                step = max(statistics.mean(r["step_s"]) for r in res)
                runs.append({"preset": preset, "variant": variant, "repeat": rep, "step_s": step, **meas, "results": res})
                console.print(f"  {label:<30} {1e3 * step:8.0f} ms/step (others {meas['foreign_cores']:.2f} cores; "
                              f"{time.perf_counter() - t0:.0f} s)")
    env["wall_s"] = time.perf_counter() - t_start
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    env["load_after"] = common.loadavg()
    rows = []
    md = []
    for preset in args.presets:
        table = Table(title=f"GPT {preset}: {WORLD} ranks, batch {args.batch} x {args.seq} per rank, fp32 AdamW "
                            f"(median of {args.repeats})")
        for h in HEADERS:
            table.add_column(h, justify="right")
        md += [f"**GPT {preset}** ({WORLD} ranks, batch {args.batch} x {args.seq} per rank, fp32 AdamW, median of "
               f"{args.repeats}; bytes of rank 0)", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        ddp = [r["step_s"] for r in runs if r["preset"] == preset and r["variant"] == "ddp"]
        ddp_s = statistics.median(ddp) if ddp else None
        for variant in args.variants:
            mine = [r for r in runs if r["preset"] == preset and r["variant"] == variant]
            step = statistics.median(r["step_s"] for r in mine)
            first = mine[0]["results"][0]
            counts = {c: sum(v.values()) for c, v in first["counts"].items()}
            total = sum(counts.values())
            formula = expected_bytes(variant, first)
            row = {"preset": preset, "variant": variant, "bytes": counts, "total": total, "formula": formula,
                   "at_formula": formula == total if formula is not None else None, "step_s": step,
                   "vs_ddp": step / ddp_s if ddp_s else None,
                   "step_stats": common.stats([r["step_s"] for r in mine]),
                   "vs_ddp_stats": common.paired_ratio(mine, [r for r in runs if r["preset"] == preset
                                                             and r["variant"] == "ddp"]),
                   "polluted_runs": sum(r["polluted"] for r in mine)}
            rows.append(row)
            cells = [variant, *(f"{counts[c] / 1e6:.3f}" for c in ("params", "grads", "optimizer")), f"{total / 1e6:.3f}",
                     f"{formula / 1e6:.3f}" if formula is not None else "-",
                     {True: "yes", False: "NO", None: "-"}[row["at_formula"]], f"{1e3 * step:.0f}",
                     f"{row['vs_ddp']:.2f}x" if row["vs_ddp"] else "-"]
            table.add_row(*cells)
            md.append("| " + " | ".join(cells) + " |")
        console.print(table)
        md.append("")
    md.append(f"Command: `{env['command']}`; CPU: {env['cpu_model']} ({env['nproc']} cores); torch {env['torch']}.")
    json_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    json_path.write_text(json.dumps({"config": vars(args), "environment": env, "summary": rows, "runs": runs},
                                    indent=1, default=str))
    for row in rows:
        if row["variant"] in ("zero1", "zero2") and row["vs_ddp"] is not None:
            verdict = "met" if row["vs_ddp"] <= TARGET_SLOWDOWN else "NOT met"
            console.print(f"{row['preset']} {row['variant']}: {row['vs_ddp']:.2f}x DDP step time -> within 15%: {verdict}")
    console.print(f"wall time {env['wall_s']:.0f} s; wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
