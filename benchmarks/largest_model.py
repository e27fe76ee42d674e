"""The largest GPT that trains 2 optimizer steps with ZeRO-3 on 8 ranks on this machine, with eager
and with deferred initialization.

Usage (from the repository root; it runs models up to the machine's memory, one at a time)::

    python benchmarks/largest_model.py --mode eager --layers 8 10 12
    python benchmarks/largest_model.py --mode deferred --layers 16 20 22

Each size is one ``Trainer.fit`` of 2 optimizer steps under ``ZeroStrategy(stage=3)`` on
``--ranks`` processes (1 thread each), the suite's ``LanguageModelingTask`` with a GPT of
``--layers`` blocks of hidden ``--hidden`` (byte vocabulary, batch 1 x 16 tokens per rank, fp32
AdamW). eager: every rank builds the whole model in ``__init__``; deferred:
``lightning_scale.deferred(LanguageModelingTask, ...)``. A run that dies (the kernel's OOM
killer, an allocation error) is reported as not fitting, with its error.

The bounds (printed): eager setup holds ``ranks`` full fp32 copies (4 bytes per parameter each,
32 bytes per parameter in all on 8 ranks) before FSDP2 shards them; training holds 16 bytes per
parameter over all ranks (fp32 parameters, gradients, two Adam moments). Add each process's fixed
overhead (its resident set at start, measured) and compare with the machine's available memory.
Writes ``benchmarks/results/largest_model_<mode>_h<hidden>.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.deferred_init import _status  # noqa: E402


def rank_train(mode: str, layers: int, hidden: int, heads: int) -> dict:
    """One rank: 2 optimizer steps of ZeRO-3; its memory figures."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_scale import deferred
    from lightning_scale.core.optim import OptimConfig
    from lightning_scale.models import GPTConfig
    from lightning_scale.strategies import ZeroStrategy
    from lightning_scale.tasks import LanguageModelingTask

    torch.set_num_threads(1)
    start = _status("VmRSS")
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=layers, n_head=heads, n_embd=hidden, dropout=0.0)
    kwargs = dict(model=cfg, optim=OptimConfig(lr=1e-4, warmup_steps=0), sample_tokens=0)
    task = deferred(LanguageModelingTask, **kwargs) if mode == "deferred" else LanguageModelingTask(**kwargs)
    world = int(os.environ["WORLD_SIZE"])
    data = TensorDataset(torch.randint(0, 256, (4 * world, 16)), torch.randint(0, 256, (4 * world, 16)))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=ZeroStrategy(stage=3), max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, DataLoader(data, batch_size=1))
    return {"start_rss": start, "peak": _status("VmHWM") - start, "steps": trainer.global_step}


def main(argv: list[str] | None = None) -> int:
    from lightning_scale.models import GPTConfig
    from lightning_scale.models.gpt import gpt_param_count
    from lightning_scale.testing import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["eager", "deferred"], required=True)
    p.add_argument("--layers", type=int, nargs="+", required=True, help="block counts to try, in order")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--json", default=None, help="default benchmarks/results/largest_model_<mode>_h<hidden>.json")
    args = p.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed buffers go back to the OS
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    rows = []
    for layers in args.layers:
        cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=layers, n_head=args.heads, n_embd=args.hidden)
        params = gpt_param_count(cfg)
        t0 = time.perf_counter()
        try:
            res = run_distributed(rank_train, args.ranks, args.mode, layers, args.hidden, args.heads,
                                  init_process_group=False, timeout=3600)
            row = {"layers": layers, "params": params, "fits": all(r["steps"] == 2 for r in res),
                   "peak_per_rank_max": max(r["peak"] for r in res), "start_rss": max(r["start_rss"] for r in res)}
        except Exception as err:  # noqa: BLE001 - not fitting is the result
            row = {"layers": layers, "params": params, "fits": False, "error": f"{type(err).__name__}: {str(err)[-400:]}"}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{args.mode:>8} {layers:3d} layers {params / 1e6:7.1f}M: "
              + (f"trains, peak per rank {row['peak_per_rank_max'] / 2**30:.2f} GiB above start"
                 if row["fits"] else f"does not fit ({row.get('error', '')[:160]})")
              + f" ({row['seconds']:.0f} s)", flush=True)
    started = [r["start_rss"] for r in rows if "start_rss" in r]
    bounds = None
    if started:  # the bounds of the module docstring, with the fixed overhead measured in these runs
        overhead = args.ranks * max(started)
        bounds = {"process_start_rss": max(started), "mem_available": available,
                  "eager_params": (available - overhead) / (4 * args.ranks),
                  "deferred_params": (available - overhead) / 16}
        print(f"process start {max(started) / 2**20:.0f} MiB x {args.ranks} ranks; bounds from "
              f"{available / 2**30:.1f} GiB available: eager (ranks x 4 B) {bounds['eager_params'] / 1e6:.0f}M, "
              f"deferred (16 B over all ranks) {bounds['deferred_params'] / 1e6:.0f}M parameters")
        for r in rows:
            if r["fits"]:
                print(f"  {r['params'] / 1e6:7.1f}M trains: {r['params'] / bounds[args.mode + '_params']:.0%} of the "
                      f"{args.mode} bound")
    out = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"largest_model_{args.mode}_h{args.hidden}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python benchmarks/largest_model.py", *(argv or sys.argv[1:])]),
                               "mem_available_at_start": available, "ranks": args.ranks, "hidden": args.hidden,
                               "bounds": bounds, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                              indent=1))
    print(f"MemAvailable at start {available / 2**30:.1f} GiB; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
