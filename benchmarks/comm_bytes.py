"""Communication bytes per step, counted vs closed form, for every layout of the suite.

Usage (from the repository root)::

    python benchmarks/comm_bytes.py                 # GPT 4 x 256, vocab 1024, batch 4 x 64: 9 layouts
    python benchmarks/comm_bytes.py --quick         # GPT 2 x 64, vocab 128, batch 4 x 16
    python benchmarks/comm_bytes.py --layouts zero3 zero3_bf16

What is counted: ``ScaleProfiler``'s ``perf/comm_bytes_<dim>`` of the last optimizer step of a
``Trainer.fit`` (2 steps, fp32 AdamW, the suite's ``LanguageModelingTask``), on every rank: the
payload each rank hands to ``torch.distributed`` and DTensor's functional collectives, by mesh
dimension (``lightning_scale.core.comm_bytes`` defines the payload of each call). The same bytes
by collective kind (all-gather, reduce-scatter, ...) come from ``CommBytes.kinds``.

The closed forms below are written from the layouts' algorithms (P parameters, L blocks, hidden
h, vocabulary V, per-replica batch B x T tokens, 4 bytes per fp32 element), not from the counter:

* data parallel (``MeshStrategy``): one all-reduce of every gradient, ``4 P``;
* ZeRO-1 / ZeRO-2 (the suite's bucketed engine): each bucket's gradients reduce-scattered and its
  updated parameters all-gathered, ``2 x 4 P'`` (P' = the buckets' padded element count, read from
  the engine);
* ZeRO-3 (FSDP2, blocks resharded after forward): parameters all-gathered in forward and again in
  backward, gradients reduce-scattered: ``(2 a + 4) P_N``, a = 4 in fp32 and 2 under bf16-mixed
  (FSDP2's ``MixedPrecisionPolicy`` gathers bf16), P_N = the parameters with dim 0 padded to a
  multiple of N ranks;
* TP (Megatron, separate q, k, v): per block 2 all-reduces of (B, T, h) in forward and 4 in
  backward, ``6 L B T h 4``;
* TP + sequence parallelism: per block 2 all-gathers and 2 reduce-scatters of (B, T, h) in
  forward and 4 in backward, plus the final norm's all-gather before the head and the
  embedding's in backward, ``(8 L + 2) B T h 4``, plus the norms' weight and bias gradients
  all-reduced over the sequence shards, ``(4 L + 2) h 4``;
* pipeline (S stages): a stage sends each microbatch's activation forward (all but the last) and
  its input gradient backward (all but the first), ``B T h 4`` each over the step; the mean loss
  is broadcast (4 bytes); the stages holding the tied embedding / head all-reduce its gradient,
  ``V h 4``;
* 3D (pp=2 x tp=2): the pipeline's bytes on "pp" (each tensor-parallel rank sends its own copy of
  the replicated activation) and Megatron's over the stage's L / 2 blocks on "tp".

Target (issue 24): counted == closed form, byte for byte, on every rank of every layout; and the
bf16 policy's all-gather bytes are half of fp32's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/comm_bytes.py` from anywhere
    sys.path.insert(0, str(REPO))

#: layout -> ranks
LAYOUTS = {"mesh": 2, "zero1": 2, "zero2": 2, "zero3": 2, "zero3_bf16": 2, "tp": 2, "tp_sp": 2, "pipeline": 2, "3d": 4}


def rank_run(layout: str, layers: int, hidden: int, heads: int, vocab: int, batch: int, seq: int) -> dict:
    """One rank: 2 optimizer steps under the layout's strategy; the last step's counted bytes."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_scale.callbacks import ScaleProfiler
    from lightning_scale.core.comm_bytes import CommBytes
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.strategies import (
        MeshStrategy,
        Parallel3DStrategy,
        PipelineStrategy,
        TensorParallelStrategy,
        ZeroStrategy,
    )
    from lightning_scale.tasks import LanguageModelingTask

    torch.set_num_threads(1)
    strategy = {
        "mesh": lambda: MeshStrategy(),
        "zero1": lambda: ZeroStrategy(stage=1),
        "zero2": lambda: ZeroStrategy(stage=2),
        "zero3": lambda: ZeroStrategy(stage=3),
        "zero3_bf16": lambda: ZeroStrategy(stage=3),
        "tp": lambda: TensorParallelStrategy(tensor_parallel_size=2),
        "tp_sp": lambda: TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
        "pipeline": lambda: PipelineStrategy(stages=2, microbatches=4),
        "3d": lambda: Parallel3DStrategy(pipeline_parallel_size=2, tensor_parallel_size=2, microbatches=2),
    }[layout]()
    cfg = GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, n_embd=hidden, dropout=0.0)
    task = LanguageModelingTask(model=cfg, optim=OptimConfig(lr=1e-3, warmup_steps=0), sample_tokens=0)
    world = int(os.environ["WORLD_SIZE"])
    replicas = world if layout in ("mesh", "zero1", "zero2", "zero3", "zero3_bf16") else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch * replicas * 2, seq), generator=g)
    profiler = ScaleProfiler(log_every_n_steps=1, print_summary=False)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[profiler],
                        precision="bf16-mixed" if layout.endswith("_bf16") else "32-true")
    trainer.fit(task, DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=batch, drop_last=True))
    row = profiler.history[-1]
    engine = trainer.strategy.engine() if hasattr(trainer.strategy, "engine") else None
    return {"rank": int(os.environ["RANK"]), "stage": trainer.strategy.coordinate("pp") if hasattr(trainer.strategy, "coordinate") else None,
            "counted": {k[len("perf/comm_bytes_"):]: int(v) for k, v in row.items() if k.startswith("perf/comm_bytes_")},
            "kinds": dict(CommBytes.get().kinds),  # the last step's, by collective kind
            "padded_numel": engine.padded_numel() if engine is not None else None}


def param_shapes(layers: int, hidden: int, heads: int, vocab: int, seq: int) -> list[tuple[int, ...]]:
    """The GPT's unique parameter shapes (built on the meta device: nothing allocated)."""
    import torch

    from lightning_scale.models import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads, n_embd=hidden,
                              dropout=0.0))
    return [tuple(p.shape) for p in model.parameters()]


def closed_form(layout: str, shapes: list[tuple[int, ...]], layers: int, hidden: int, vocab: int, batch: int,
                seq: int, world: int, stage: int | None, padded_numel: int | None) -> dict[str, int]:
    """Payload bytes per rank per step by mesh dimension (see the module docstring)."""
    P = sum(math.prod(s) for s in shapes)
    act = batch * seq * hidden * 4  # one (B, T, h) fp32 tensor over the step's microbatches
    if layout == "mesh":
        return {"dp": 4 * P}
    if layout in ("zero1", "zero2"):
        return {"dp": 2 * 4 * padded_numel}
    if layout in ("zero3", "zero3_bf16"):
        padded = sum(math.ceil(s[0] / world) * world * math.prod(s[1:]) for s in shapes)
        gathered = 2 if layout == "zero3_bf16" else 4
        return {"dp": (2 * gathered + 4) * padded}
    if layout == "tp":
        return {"tp": 6 * layers * act}
    if layout == "tp_sp":
        return {"tp": (8 * layers + 2) * act + (4 * layers + 2) * hidden * 4}
    stages = 2
    last = stages - 1
    pp = act * ((stage < last) + (stage > 0)) + 4 + (vocab * hidden * 4 if stage in (0, last) else 0)
    if layout == "pipeline":
        return {"pp": pp}
    return {"pp": pp, "tp": 6 * (layers // stages) * act}  # 3d


def main(argv: list[str] | None = None) -> int:
    from rich.table import Table

    from benchmarks import _common as common
    from lightning_scale.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per replica per step (default 4)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="GPT 2 x 64, vocab 128, 16 tokens")
    p.add_argument("--json", default="benchmarks/results/comm_bytes.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.seq = 2, 64, 2, 128, 16
        if args.json == p.get_default("json"):
            args.json = "benchmarks/results/comm_bytes_quick.json"
    console = common.console()
    shapes = param_shapes(args.layers, args.hidden, args.heads, args.vocab, args.seq)
    console.print(f"GPT {args.layers} x {args.hidden}, vocab {args.vocab}: {sum(math.prod(s) for s in shapes):,} "
                  f"parameters; batch {args.batch} x {args.seq} tokens per replica; fp32 unless _bf16")
    started = time.time()
    rows = []
    for layout in args.layouts:
        world = LAYOUTS[layout]
        results = run_distributed(rank_run, world, layout, args.layers, args.hidden, args.heads, args.vocab,
                                  args.batch, args.seq, init_process_group=False, timeout=900)
        for r in sorted(results, key=lambda r: r["rank"]):
            expected = closed_form(layout, shapes, args.layers, args.hidden, args.vocab, args.batch, args.seq, world,
                                   r["stage"], r["padded_numel"])
            rows.append({"layout": layout, "ranks": world, **r, "expected": expected,
                         "equal": r["counted"] == expected})
    bf16 = {r["rank"]: r["kinds"].get("all_gather", 0) for r in rows if r["layout"] == "zero3_bf16"}
    fp32 = {r["rank"]: r["kinds"].get("all_gather", 0) for r in rows if r["layout"] == "zero3"}
    halved = {k: bf16[k] / fp32[k] for k in bf16 if fp32.get(k)}

    table = Table(title="Communication payload bytes per rank per step: counted vs closed form")
    for col in ("layout", "rank", "dimension", "counted", "closed form", "equal", "by collective (counted)"):
        table.add_column(col, justify="left" if col in ("layout", "dimension", "by collective (counted)") else "right")
    for r in rows:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r["kinds"].items()) if v)
        for i, dim in enumerate(sorted(set(r["counted"]) | set(r["expected"]))):
            kinds = kinds if i == 0 else ""  # the rank's bytes by collective, once
            table.add_row(r["layout"], str(r["rank"]), dim, f"{r['counted'].get(dim, 0):,}",
                          f"{r['expected'].get(dim, 0):,}", "yes" if r["equal"] else "NO", kinds)
    console.print(table)
    if halved:
        console.print("ZeRO-3 all-gather bytes, bf16-mixed / fp32, by rank: "
                      + ", ".join(f"rank {k}: {v:.4f}" for k, v in sorted(halved.items())))
    ok = all(r["equal"] for r in rows) and all(v == 0.5 for v in halved.values())
    console.print(f"target (counted == closed form on every rank; bf16 all-gathers = 1/2 fp32): "
                  f"{'met' if ok else 'NOT met'}")
    out = common.output_path(args.json)
    out.write_text(json.dumps({"command": common.command_line(), "date": time.strftime("%Y-%m-%d"),
                               "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                               "batch": args.batch, "seq": args.seq, "rows": rows,
                               "bf16_over_fp32_all_gather": halved, "target_met": ok,
                               "wall_s": time.time() - started}, indent=1))
    console.print(f"wrote {out} ({time.time() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
