"""Tensor-parallel step time on CPU: TP=2 vs TP=1 (gloo) for GPT models of growing hidden size.

Usage (from the repository root)::

    python benchmarks/tensor_parallel.py                  # hidden 256 512 1024 2048, 3 repeats
    python benchmarks/tensor_parallel.py --quick          # smoke configuration, < 1 minute
    python benchmarks/tensor_parallel.py --hidden 2048 --repeats 5 --sequence-parallel

What is measured (every process runs with 1 thread, started by
``lightning_scale.testing.multiprocess.run_distributed``):

* **TP=1**: one process, a GPT with ``--layers`` blocks of hidden size h (h / 64 heads, byte
  vocabulary, tied head), the batch of ``--batch`` sequences x ``--seq`` tokens: forward,
  cross-entropy, backward, AdamW step.
* **TP=2**: two processes, the same model parallelized with the suite's built-in GPT plan
  (:func:`lightning_scale.core.tensor_parallel.gpt_tp_plan`: q/k/v and MLP up column-wise,
  attention output and MLP down row-wise; embeddings, norms and head replicated; with
  ``--sequence-parallel`` the norms run on sequence shards) via the strategy's own
  ``parallelize_network``, so every parameter is a DTensor (the replicated ones ``Replicate``),
  the layout ``TensorParallelStrategy`` trains. Both ranks see the same batch. Same step as TP=1.
* **2 independent TP=1 processes at once** (no communication): the machine's ceiling. Each rank of
  a TP=2 run does about half the work of TP=1, so its ideal time is t(TP=1) / 2; but two busy cores
  share caches and memory bandwidth, so two processes run slower than one alone, by the factor
  measured here. The ceiling speedup is 2 / that factor.

Timing: ``time.perf_counter`` around whole steps (zero_grad .. optimizer step) after ``--warmup``
untimed steps and a barrier; a run's figure is the mean of its ``--steps`` timed steps, for TP=2 the
max over ranks; each table entry is the median over ``--repeats`` fresh runs (min-max kept in the
JSON). Runs during which other processes used CPU are re-run (see ``benchmarks/_common.py``).

Communication share: one extra step per TP=2 run under ``torch.profiler`` (CPU activities). The
time the training thread spends in ``_c10d_functional`` collectives (launching them plus
``wait_tensor``, i.e. blocked until the gloo all-reduce, all-gather or reduce-scatter finishes,
including waiting for the other rank) divided by that step's wall time. The profiled step is not
one of the timed steps (the profiler slows it down). Collective counts per step come from
``torch.distributed.tensor.debug.CommDebugMode``.

Ideal speedup: 2 (each rank does half the matmul FLOPs; the replicated embeddings, norms, head,
softmax and optimizer work on replicated parameters do not shrink, which is part of what the
measurement shows). Target: >= 1.6x at the largest hidden size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/tensor_parallel.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402
from lightning_scale.models import GPT, GPTConfig  # noqa: E402

TARGET_SPEEDUP = 1.6
HEAD_DIM = 64

FULL_DEFAULTS = dict(hidden=[256, 512, 1024, 2048], layers=2, batch=8, seq=128, steps=3, warmup=1, repeats=3,
                     json="benchmarks/results/tensor_parallel.json", retries=3)
QUICK_DEFAULTS = dict(hidden=[128, 256], layers=2, batch=4, seq=64, steps=2, warmup=1, repeats=1,
                      json="benchmarks/results/tensor_parallel_quick.json", retries=0)
COMM_OPS = ("_c10d_functional::",)  # launches and waits of the functional collectives DTensor uses


# ----------------------------------------------------------------------------------------------
# Rank function (module level: the harness pickles it by reference)
# ----------------------------------------------------------------------------------------------
def model_config(hidden: int, layers: int, seq: int) -> GPTConfig:
    return GPTConfig(vocab_size=256, block_size=seq, n_layer=layers, n_head=hidden // HEAD_DIM, n_embd=hidden,
                     dropout=0.0, tie_weights=True)


def _comm_time_s(prof: Any) -> float:
    """Seconds of the training thread inside functional collectives (outermost such events only)."""
    total = 0.0
    for event in prof.events():
        if not event.name.startswith(COMM_OPS):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(COMM_OPS):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            total += event.cpu_time_total / 1e6  # us -> s
    return total


def tp_worker(hidden: int, layers: int, seq: int, batch: int, warmup: int, steps: int, lr: float,
              tensor_parallel: bool, sequence_parallel: bool) -> dict:
    """One rank: TP over all ranks if ``tensor_parallel``, else an independent full model."""
    from benchmarks._common import Window

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(model_config(hidden, layers, seq))
    params_total = sum(p.numel() for p in model.parameters())
    if tensor_parallel:
        from torch.distributed.device_mesh import init_device_mesh

        from lightning_scale.strategies.tensor_parallel import parallelize_network

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallelize_network(model, mesh["tp"], None, sequence_parallel)  # the strategy's layout
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1234)
    data = [(torch.randint(0, 256, (batch, seq), generator=g), torch.randint(0, 256, (batch, seq), generator=g))
            for _ in range(warmup + steps + 1)]

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        if tensor_parallel:
            # As the strategy does: Partial gradients (sequence-parallel norms, replicated weights
            # used on sharded activations) are summed over the ranks; a no-op where there are none.
            from lightning_scale.core.grads import reduce_partial_gradients

            reduce_partial_gradients(list(model.parameters()))
        opt.step()
        return float(loss)

    step_s, losses = [], []
    window = Window()
    for i, (x, y) in enumerate(data[: warmup + steps]):
        if i == warmup:
            dist.barrier()
            window.start()
        t = time.perf_counter()
        loss = step(x, y)
        if i >= warmup:
            step_s.append(time.perf_counter() - t)
            losses.append(loss)
    w = window.stop()

    comm: dict[str, Any] = {}
    if tensor_parallel:
        from torch.distributed.tensor.debug import CommDebugMode
        from torch.profiler import ProfilerActivity, profile

        x, y = data[-1]
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step(x, y)
            profiled = time.perf_counter() - t
        comm_s = _comm_time_s(prof)
        with CommDebugMode() as counter:
            step(x, y)
        comm = {"profiled_step_s": profiled, "comm_s": comm_s, "comm_share": comm_s / profiled,
                "collectives": {str(k): v for k, v in counter.get_comm_counts().items()}}
    return {"rank": rank, "window": w, "step_s": step_s, "losses": losses, "params_total": params_total,
            "params_local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()),
            "cpu_util": w["own_cpu_s"] / w["wall_s"], "threads": torch.get_num_threads(), **comm}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", nargs="+", type=int, help="hidden sizes (default 256 512 1024 2048); multiples of 128 (heads of 64, split over 2 ranks)")
    p.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    common.add_run_arguments(p, FULL_DEFAULTS, "sequences per step", "hidden 128 256, 1 repeat; < 1 min")
    p.add_argument("--sequence-parallel", action="store_true", help="TP=2 with sequence-parallel norms")
    p.add_argument("--no-ceiling", action="store_true", help="skip the 2-independent-processes run")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    for h in args.hidden:
        if h < 1 or h % (2 * HEAD_DIM):
            p.error(f"--hidden {h}: use a multiple of {2 * HEAD_DIM} (heads of {HEAD_DIM}, split evenly over 2 ranks)")
    common.check_run_arguments(p, args)
    if args.layers < 1:
        p.error("--layers must be >= 1")
    return args


def _mean_step(results: list[dict]) -> float:
    return max(statistics.mean(r["step_s"]) for r in results)


def _summarise(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    rows = []
    for h in args.hidden:
        of = {kind: [r for r in runs if r["hidden"] == h and r["kind"] == kind] for kind in ("tp1", "tp2", "ceiling")}
        t1 = common.stats([r["step_s"] for r in of["tp1"]])
        t2 = common.stats([r["step_s"] for r in of["tp2"]])
        speedup = t1["median"] / t2["median"]
        row = {
            "hidden": h, "heads": h // HEAD_DIM, "params": of["tp1"][0]["results"][0]["params_total"],
            "params_local_tp2": of["tp2"][0]["results"][0]["params_local"],
            "tp1_s": t1, "tp2_s": t2, "speedup": speedup, "efficiency": speedup / 2,
            "speedup_stats": common.paired_ratio(of["tp1"], of["tp2"]),  # t(TP=1) / t(TP=2) within each repeat
            "comm_share": common.stats([r["comm_share"] for r in of["tp2"]]),
            "collectives": of["tp2"][0]["results"][0]["collectives"],
            "polluted_runs": sum(r["polluted"] for k in of.values() for r in k),
        }
        if of["ceiling"]:
            slow = common.stats([r["step_s"] / t for r, t in zip(of["ceiling"], [x["step_s"] for x in of["tp1"]])])
            row["concurrency_slowdown"] = slow
            row["ceiling_speedup"] = 2 / slow["median"]
        row["target_met"] = speedup >= TARGET_SPEEDUP if h == max(args.hidden) else None
        rows.append(row)
    return rows


HEADERS = ["hidden", "params", "TP=1 ms", "TP=2 ms", "speedup", "ideal", "machine ceiling", "comm share %",
           "collectives / step"]


def _cells(row: dict) -> list[str]:
    def ms(s: dict) -> str:
        return f"{1e3 * s['median']:.0f}" + (f" ({1e3 * s['min']:.0f}-{1e3 * s['max']:.0f})" if s["n"] > 1 else "")

    colls = ", ".join(f"{n} {k.split('.')[-1].replace('_c10d_functional', '').strip(':')}" for k, n in row["collectives"].items())
    return [
        str(row["hidden"]), f"{row['params'] / 1e6:.1f}M", ms(row["tp1_s"]), ms(row["tp2_s"]),
        f"{row['speedup']:.2f}x" + ("" if row["target_met"] is None else (" (target met)" if row["target_met"] else " (target NOT met)")),
        "2.00x", f"{row['ceiling_speedup']:.2f}x" if "ceiling_speedup" in row else "-",
        f"{100 * row['comm_share']['median']:.1f}", colls,
    ]


def _markdown(args: argparse.Namespace, rows: list[dict], env: dict) -> str:
    caption = (f"GPT, {args.layers} blocks, head dim {HEAD_DIM}, byte vocabulary, batch {args.batch} x {args.seq} tokens; "
               f"1 thread per rank; median of {args.repeats} runs (min-max); TP plan: built-in GPT plan"
               + (" with sequence parallelism" if args.sequence_parallel else "") + ".")
    return common.markdown_table(caption, HEADERS, [_cells(r) for r in rows], env)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rich.table import Table

    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    load_before = env["load_before"]
    console.print(f"[bold]tensor-parallel benchmark[/] hidden={args.hidden} layers={args.layers} batch={args.batch} "
                  f"seq={args.seq} steps={args.steps} repeats={args.repeats} sp={args.sequence_parallel}; load {load_before}")
    t_start = time.perf_counter()
    runs: list[dict] = []
    shape = dict(layers=args.layers, seq=args.seq, batch=args.batch, warmup=args.warmup, steps=args.steps, lr=args.lr)
    for rep in range(args.repeats):
        for h in args.hidden:
            plan = [("tp1", 1, False)] + [("tp2", 2, True)] + ([] if args.no_ceiling else [("ceiling", 2, False)])
            for kind, world, tp in plan:
                t0 = time.perf_counter()
                label = f"[{rep}] h={h} {kind}"
                meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                    tp_worker, world, h, tensor_parallel=tp, sequence_parallel=args.sequence_parallel,
                    timeout=args.timeout, **shape))
                res = meas.pop("results")
                entry = {"kind": kind, "hidden": h, "repeat": rep, **meas, "results": res, "step_s": _mean_step(res)}
                if kind == "tp2":
                    entry["comm_share"] = statistics.mean(r["comm_share"] for r in res)
                runs.append(entry)
                extra = f" comm {entry['comm_share']:.1%}" if kind == "tp2" else ""
                console.print(f"  {label:<18} {1e3 * entry['step_s']:9.0f} ms/step{extra} "
                              f"(others {meas['foreign_cores']:.2f} cores; {time.perf_counter() - t0:.0f} s)")
    env["wall_s"] = time.perf_counter() - t_start
    env["load_after"] = common.loadavg()
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    rows = _summarise(args, runs)

    table = Table(title=f"TP=2 vs TP=1: GPT {args.layers} blocks, batch {args.batch} x {args.seq} tokens "
                        f"(median of {args.repeats})")
    for h in HEADERS:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(_markdown(args, rows, env) + "\n")
    config = dict(vars(args), model_configs={h: model_config(h, args.layers, args.seq).to_dict() for h in args.hidden})
    json_path.write_text(json.dumps({"config": config, "environment": env, "summary": rows, "runs": runs},
                                    indent=1, default=str))
    largest = rows[-1] if rows else None
    if largest is not None:
        verdict = "met" if largest["target_met"] else "NOT met"
        console.print(f"largest hidden {largest['hidden']}: speedup {largest['speedup']:.2f}x -> target >= "
                      f"{TARGET_SPEEDUP}x {verdict}")
    console.print(f"wall time {env['wall_s']:.0f} s; wrote {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
