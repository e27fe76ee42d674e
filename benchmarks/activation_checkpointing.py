"""Activation checkpointing on CPU: activation bytes and step time of each policy vs none.

Usage (from the repository root)::

    python benchmarks/activation_checkpointing.py            # GPT nano and micro, 3 repeats
    python benchmarks/activation_checkpointing.py --quick    # smoke configuration, < 1 minute
    python benchmarks/activation_checkpointing.py --presets micro --policies none full selective --repeats 5

One process with 1 thread (started by ``lightning_scale.testing.multiprocess.run_distributed``,
like every benchmark of the suite) per (preset, policy, repeat): a GPT preset with the policy
applied by :func:`lightning_scale.core.activation_checkpointing.apply_activation_checkpointing`,
batch ``--batch`` x ``--seq`` random tokens, fp32, AdamW.

* **Activation bytes**: one extra forward under
  :class:`lightning_scale.core.activation_memory.HeldActivationMeter`: the bytes of the storages
  the forward created that are still alive when it returns (what backward will use: autograd's
  saved tensors, checkpoint inputs, the selective-checkpoint cache, CPU copies of offloaded
  tensors), minus the logits. Parameters, buffers and the batch are not counted. With
  ``offload`` the figure is split by device; on this CPU-only machine "cpu" is also the compute
  device, so the table reports the bytes autograd keeps outside the offload hooks
  (``SavedTensorMeter``) as "on device".
* **Step time**: ``time.perf_counter`` around whole steps (zero_grad, forward, cross-entropy,
  backward, AdamW step), mean of ``--steps`` steps after ``--warmup``; each figure is the median
  over ``--repeats`` fresh processes (min-max in the JSON). Repeats loop over the whole matrix.

Ratios are to ``none`` of the same preset and repeat set. Targets (issue 6): full saves >= 80% of
activation bytes at <= 40% step-time overhead; selective saves >= 50% at <= 15% overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/activation_checkpointing.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

POLICIES = ["none", "full", "every_2", "selective", "offload"]
# Diagnostic rows (not policies of the suite; only with --policies): "sac_machinery" wraps each
# block in torch's selective-checkpoint contexts with every op saved, so nothing is recomputed
# and nothing is freed: its overhead is the cost of the contexts themselves (a TorchDispatchMode
# on every op of the forward, and the cache), which "selective" pays on top of its recompute.
DIAGNOSTICS = ["sac_machinery"]
TARGETS = {"full": (0.80, 0.40), "selective": (0.50, 0.15)}  # policy: (min saving, max overhead)
FULL_DEFAULTS = dict(presets=["nano", "micro"], policies=POLICIES, batch=8, seq=128, steps=4, warmup=1, repeats=3,
                     json="benchmarks/results/activation_checkpointing.json", retries=3)
QUICK_DEFAULTS = dict(presets=["tiny"], policies=POLICIES, batch=4, seq=32, steps=2, warmup=1, repeats=1,
                      json="benchmarks/results/activation_checkpointing_quick.json", retries=0)


def ac_worker(preset: str, policy: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """One process: measure the policy's activation bytes, then time training steps."""
    from benchmarks._common import Window
    from lightning_scale.core.activation_checkpointing import apply_activation_checkpointing, as_ac_config
    from lightning_scale.core.activation_memory import HeldActivationMeter, SavedTensorMeter
    from lightning_scale.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, block_size=max(seq, GPTConfig.from_preset(preset).block_size))
    model = GPT(cfg)
    if policy == "sac_machinery":
        _wrap_blocks_saving_every_op(model)
    else:
        config = as_ac_config(policy)
        if config is not None:
            apply_activation_checkpointing(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1234)
    data = [(torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)) for _ in range(warmup + steps + 1)]

    x, _ = data[-1]
    exclude = [*model.parameters(), *model.buffers(), x]
    with HeldActivationMeter(exclude) as held, SavedTensorMeter(exclude) as saved:
        logits = model(x)
    held_bytes = held.held([logits])
    on_device = saved.total
    del logits

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return float(loss)

    step_s = []
    window = Window()
    for i, (xb, yb) in enumerate(data[: warmup + steps]):
        if i == warmup:
            window.start()
        t = time.perf_counter()
        step(xb, yb)
        if i >= warmup:
            step_s.append(time.perf_counter() - t)
    w = window.stop()
    return {"window": w, "step_s": step_s, "held_bytes": held_bytes, "saved_on_device_bytes": on_device,
            "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_dict()}


def _wrap_blocks_saving_every_op(model: torch.nn.Module) -> None:
    """The ``sac_machinery`` diagnostic: each block under selective-checkpoint contexts whose
    policy saves every op's output."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def save_all(ctx, op, *args, **kwargs):  # noqa: ANN001, ANN202 - torch's policy signature
        return CheckpointPolicy.MUST_SAVE

    context_fn = partial(create_selective_checkpoint_contexts, save_all)
    for block in model.blocks.values():
        forward = block.forward
        block.forward = partial(checkpoint, forward, use_reentrant=False, context_fn=context_fn)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="GPT presets (default nano micro)")
    p.add_argument("--policies", nargs="+", help=f"policies (default {' '.join(POLICIES)}); 'none' is the baseline and always runs; "
                                           f"diagnostic rows: {' '.join(DIAGNOSTICS)}")
    common.add_run_arguments(p, FULL_DEFAULTS, "sequences per step", "tiny preset, 1 repeat; < 1 min")
    common.add_load_arguments(p)
    args = p.parse_args(argv)
    common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    from lightning_scale.core.activation_checkpointing import as_ac_config
    from lightning_scale.models import GPT_PRESETS

    for name in args.presets:
        if name not in GPT_PRESETS:
            p.error(f"--presets {name}: choose from {sorted(GPT_PRESETS)}")
    for policy in args.policies:
        if policy in DIAGNOSTICS:
            continue
        try:
            as_ac_config(policy)
        except ValueError as err:
            p.error(f"--policies {policy}: {err}")
    args.policies = ["none"] + [x for x in args.policies if x != "none"]
    common.check_run_arguments(p, args)
    return args


def _minus_one(ratio: dict | None) -> dict | None:
    """Ratio stats -> overhead stats (ratio - 1)."""
    if ratio is None:
        return None
    return {k: (v - 1 if k in ("median", "min", "max") else v) for k, v in ratio.items()}


def _summarise(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    rows = []
    for preset in args.presets:
        of = {pol: [r for r in runs if r["preset"] == preset and r["policy"] == pol] for pol in args.policies}
        base_t = common.stats([r["step_s"] for r in of["none"]])["median"]
        base_b = sum(of["none"][0]["held_bytes"].values())
        for pol in args.policies:
            t = common.stats([r["step_s"] for r in of[pol]])
            held = of[pol][0]["held_bytes"]  # deterministic: the same in every repeat
            total = sum(held.values())
            on_device = of[pol][0]["saved_on_device_bytes"] if pol == "offload" else total
            saving, overhead = 1 - on_device / base_b, t["median"] / base_t - 1
            target = TARGETS.get(pol)
            rows.append({
                "preset": preset, "policy": pol, "params": of[pol][0]["params"], "held_bytes": held,
                "activation_bytes_on_device": on_device, "saving": saving, "step_s": t, "overhead": overhead,
                "overhead_stats": _minus_one(common.paired_ratio(of[pol], of["none"])),
                "target": target, "target_met": None if target is None else (saving >= target[0] and overhead <= target[1]),
                "polluted_runs": sum(r["polluted"] for r in of[pol]),
            })
    return rows


HEADERS = ["preset", "policy", "activation MiB (on device)", "saved vs none", "step ms", "overhead vs none", "target"]


def _cells(row: dict) -> list[str]:
    s = row["step_s"]
    ms = f"{1e3 * s['median']:.0f}" + (f" ({1e3 * s['min']:.0f}-{1e3 * s['max']:.0f})" if s["n"] > 1 else "")
    mib = f"{row['activation_bytes_on_device'] / 2**20:.2f}"
    if row["policy"] == "offload":
        mib += f" (+{sum(row['held_bytes'].values()) / 2**20:.2f} CPU copies)"
    target = "-" if row["target"] is None else (
        f">= {row['target'][0]:.0%} at <= {row['target'][1]:.0%}: " + ("met" if row["target_met"] else "NOT met"))
    return [row["preset"], row["policy"], mib, f"{row['saving']:.0%}", ms, f"{row['overhead']:+.0%}", target]


def _caption(args: argparse.Namespace) -> str:
    return (f"GPT presets, batch {args.batch} x {args.seq} tokens, fp32, AdamW; 1 process, 1 thread; "
            f"median of {args.repeats} runs (min-max).")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    console.print(f"[bold]activation checkpointing benchmark[/] presets={args.presets} policies={args.policies} "
                  f"batch={args.batch} seq={args.seq} steps={args.steps} repeats={args.repeats}; load {env['load_before']}")
    t_start = time.perf_counter()
    runs: list[dict] = []
    for rep in range(args.repeats):
        for preset in args.presets:
            for policy in args.policies:
                t0 = time.perf_counter()
                label = f"[{rep}] {preset} {policy}"
                meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                    ac_worker, 1, preset, policy, args.batch, args.seq, args.warmup, args.steps, timeout=args.timeout))
                res = meas.pop("results")[0]
                entry = {"preset": preset, "policy": policy, "repeat": rep, **meas,
                         "step_s": statistics.mean(res["step_s"]), "held_bytes": res["held_bytes"],
                         "saved_on_device_bytes": res["saved_on_device_bytes"], "params": res["params"],
                         "model_config": res["config"]}
                runs.append(entry)
                console.print(f"  {label:<24} {1e3 * entry['step_s']:8.0f} ms/step  "
                              f"{sum(res['held_bytes'].values()) / 2**20:7.2f} MiB held "
                              f"(others {meas['foreign_cores']:.2f} cores; {time.perf_counter() - t0:.0f} s)")
    env["wall_s"] = time.perf_counter() - t_start
    env["load_after"] = common.loadavg()
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs)
    rows = _summarise(args, runs)

    common.write_outputs(
        console, json_path, f"Activation checkpointing: batch {args.batch} x {args.seq} tokens (median of {args.repeats})",
        HEADERS, [_cells(r) for r in rows], _caption(args), {"config": vars(args), "environment": env, "summary": rows,
                                                            "runs": runs}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
