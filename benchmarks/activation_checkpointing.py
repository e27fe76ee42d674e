"""Activation checkpointing on CPU: activation bytes and step time of each policy vs none.

Usage (from the repository root)::

    python benchmarks/activation_checkpointing.py            # GPT nano, micro and milli, 3 repeats
    python benchmarks/activation_checkpointing.py --quick    # smoke configuration, < 1 minute
    python benchmarks/activation_checkpointing.py --presets micro --policies none full selective --repeats 5
    python benchmarks/activation_checkpointing.py --modes compiled   # every block compiled (torch.compile)

One process with 1 thread (started by ``lightning_scale.testing.multiprocess.run_distributed``,
like every benchmark of the suite) per (mode, preset, repeat) holds one copy of the GPT preset per
policy (same initial weights), each with its policy applied by
:func:`lightning_scale.core.activation_checkpointing.apply_activation_checkpointing`; batch
``--batch`` x ``--seq`` random tokens, fp32, AdamW.

* **Activation bytes**: one extra forward under
  :class:`lightning_scale.core.activation_memory.HeldActivationMeter`: the bytes of the storages
  the forward created that are still alive when it returns (what backward will use: autograd's
  saved tensors, checkpoint inputs, the selective-checkpoint cache, CPU copies of offloaded
  tensors), minus the logits. Parameters, buffers and the batch are not counted. With
  ``offload`` the figure is split by device; on this CPU-only machine "cpu" is also the compute
  device, so the table reports the bytes autograd keeps outside the offload hooks
  (``SavedTensorMeter``) as "on device".
* **Modes** (``--modes``): ``eager`` and ``compiled``. Compiled, every block of every model is
  compiled (``none``: ``Module.compile()``; the policies: ``ACConfig(compile=True)``), and the
  first ``--warmup`` rounds include the compilation. Bytes are then read with
  :class:`lightning_scale.core.activation_memory.AllocationMeter` (the allocator's own events,
  which see compiled kernels) minus the logits; it also counts the CPU RNG state that each
  checkpoint keeps (5 KiB), which the eager meter does not see. ``offload`` and the diagnostic
  row run eager only (``compile=True`` does not combine with offload).
* **Step time**: ``time.perf_counter`` around whole steps (zero_grad, forward, cross-entropy,
  backward, AdamW step). After ``--warmup`` rounds, ``--steps`` timed rounds; a round runs one
  step of every policy on the same batch, the order rotated each round. The overhead of a policy
  is the median over all rounds of its step over ``none``'s step in the same round: the two ran
  seconds apart, so a change of machine load (this VM's neighbours vary by tens of percent
  within minutes) hits both. The script also checks that every policy computed the same losses.

Ratios are to ``none`` of the same preset and round. Targets (issue 6): full saves >= 80% of
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
MODES = ["eager", "compiled"]
EAGER_ONLY = ["offload", *DIAGNOSTICS]  # compile=True does not combine with offload
FULL_DEFAULTS = dict(presets=["nano", "micro", "milli"], policies=POLICIES, modes=MODES, batch=8, seq=128, steps=6, warmup=1,
                     repeats=3, json="benchmarks/results/activation_checkpointing.json", retries=3)
QUICK_DEFAULTS = dict(presets=["tiny"], policies=POLICIES, modes=MODES, batch=4, seq=32, steps=2, warmup=1, repeats=1,
                      json="benchmarks/results/activation_checkpointing_quick.json", retries=0)


def ac_worker(preset: str, policies: list[str], batch: int, seq: int, warmup: int, steps: int, compiled: bool = False) -> dict:
    """One process, every policy: measure each policy's activation bytes, then time training
    steps in rounds, one step of every policy per round (order rotated each round).
    ``compiled``: every block compiled (the bytes are then measured after one compiling step)."""
    from benchmarks._common import Window
    from lightning_scale.core.activation_memory import AllocationMeter, HeldActivationMeter, SavedTensorMeter
    from lightning_scale.models import GPTConfig

    cfg = GPTConfig.from_preset(preset, block_size=max(seq, GPTConfig.from_preset(preset).block_size))
    g = torch.Generator().manual_seed(1234)
    data = [(torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)) for _ in range(warmup + steps + 1)]
    models, opts, out = {}, {}, {}
    for policy in policies:
        model = _build(cfg, policy, compiled)  # same seed: the same initial weights under every policy
        x, _ = data[-1]
        if compiled:
            model(x).sum().backward()  # compile forward and backward outside the meter
            model.zero_grad(set_to_none=True)
            with AllocationMeter() as meter:
                logits = model(x)
            held_bytes = {"cpu": meter.total - logits.untyped_storage().nbytes()}
            saved_on_device = sum(held_bytes.values())
        else:
            exclude = [*model.parameters(), *model.buffers(), x]
            with HeldActivationMeter(exclude) as held, SavedTensorMeter(exclude) as saved:
                logits = model(x)
            held_bytes, saved_on_device = held.held([logits]), saved.total
        out[policy] = {"held_bytes": held_bytes, "saved_on_device_bytes": saved_on_device,
                       "params": sum(p.numel() for p in model.parameters()), "round_s": [], "losses": []}
        del logits
        models[policy], opts[policy] = model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(policy: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        model, opt = models[policy], opts[policy]
        t = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return time.perf_counter() - t, float(loss)

    window = Window()
    for i, (xb, yb) in enumerate(data[: warmup + steps]):
        if i == warmup:
            window.start()
        k = i % len(policies)
        for policy in policies[k:] + policies[:k]:  # rotate: no policy always runs first
            seconds, loss = step(policy, xb, yb)
            if i >= warmup:
                out[policy]["round_s"].append(seconds)
                out[policy]["losses"].append(loss)
    return {"window": window.stop(), "policies": out, "config": cfg.to_dict()}


def _build(cfg, policy: str, compiled: bool = False) -> torch.nn.Module:  # noqa: ANN001 - GPTConfig
    import dataclasses

    from lightning_scale.core.activation_checkpointing import apply_activation_checkpointing, as_ac_config
    from lightning_scale.models import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    if policy == "sac_machinery":
        _wrap_blocks_saving_every_op(model)
        return model
    config = as_ac_config(policy)
    if config is not None:
        apply_activation_checkpointing(model, dataclasses.replace(config, compile=compiled))
    elif compiled:  # the baseline: the same blocks compiled, nothing checkpointed
        for block in model.blocks.values():
            block.compile()
    return model


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
    p.add_argument("--presets", nargs="+", help="GPT presets (default nano micro milli)")
    p.add_argument("--policies", nargs="+", help=f"policies (default {' '.join(POLICIES)}); 'none' is the baseline and always runs; "
                                           f"diagnostic rows: {' '.join(DIAGNOSTICS)}")
    p.add_argument("--modes", nargs="+", choices=MODES, help="eager and/or compiled (default both); compiled runs "
                                                                "every policy but " + " and ".join(EAGER_ONLY))
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
    """Per (preset, policy): step time (median over repeats of the median round), and the
    overhead: each round's step over the same round's ``none`` step, pooled over repeats
    (median; the quartiles and each repeat's median are in the JSON)."""
    rows = []
    for mode, preset in [(m, p) for m in args.modes for p in args.presets]:
        policies = _policies(args, mode)
        of = {pol: [r for r in runs if (r["mode"], r["preset"], r["policy"]) == (mode, preset, pol)] for pol in policies}
        base_b = sum(of["none"][0]["held_bytes"].values())
        base_rounds = {r["repeat"]: r["round_s"] for r in of["none"]}
        for pol in policies:
            t = common.stats([r["step_s"] for r in of[pol]])
            ratios = [[a / b for a, b in zip(r["round_s"], base_rounds[r["repeat"]])] for r in of[pol]]
            pooled = sorted(x for rep in ratios for x in rep)
            overhead = statistics.median(pooled) - 1
            held = of[pol][0]["held_bytes"]  # deterministic: the same in every repeat
            total = sum(held.values())
            on_device = of[pol][0]["saved_on_device_bytes"] if pol == "offload" else total
            saving = 1 - on_device / base_b
            target = TARGETS.get(pol)
            rows.append({
                "mode": mode, "preset": preset, "policy": pol, "params": of[pol][0]["params"], "held_bytes": held,
                "activation_bytes_on_device": on_device, "saving": saving, "step_s": t, "overhead": overhead,
                "overhead_stats": _minus_one(common.stats([statistics.median(rep) for rep in ratios])),
                "overhead_quartiles": [pooled[len(pooled) // 4] - 1, pooled[(3 * len(pooled)) // 4] - 1],
                "rounds": len(pooled),
                "target": target, "target_met": None if target is None else (saving >= target[0] and overhead <= target[1]),
                "polluted_runs": sum(r["polluted"] for r in of[pol]),
            })
    return rows


def _policies(args: argparse.Namespace, mode: str) -> list[str]:
    return [p for p in args.policies if mode == "eager" or p not in EAGER_ONLY]


HEADERS = ["mode", "preset", "policy", "activation MiB (on device)", "saved vs none", "step ms", "overhead vs none (quartiles)", "target"]


def _cells(row: dict) -> list[str]:
    s = row["step_s"]
    ms = f"{1e3 * s['median']:.0f}" + (f" ({1e3 * s['min']:.0f}-{1e3 * s['max']:.0f})" if s["n"] > 1 else "")
    mib = f"{row['activation_bytes_on_device'] / 2**20:.2f}"
    if row["policy"] == "offload":
        mib += f" (+{sum(row['held_bytes'].values()) / 2**20:.2f} CPU copies)"
    target = "-" if row["target"] is None else (
        f">= {row['target'][0]:.0%} at <= {row['target'][1]:.0%}: " + ("met" if row["target_met"] else "NOT met"))
    q1, q3 = row["overhead_quartiles"]
    over = f"{row['overhead']:+.0%}" + (f" ({q1:+.0%} to {q3:+.0%})" if row["policy"] != "none" and row["rounds"] > 1 else "")
    return [row["mode"], row["preset"], row["policy"], mib, f"{row['saving']:.0%}", ms, over, target]


def _caption(args: argparse.Namespace) -> str:
    return (f"GPT presets, batch {args.batch} x {args.seq} tokens, fp32, AdamW; 1 thread; every policy in one "
            f"process per repeat, one step each per round; step ms: median of {args.repeats} repeats (min-max); "
            f"overhead: median (quartiles) of the {args.steps * args.repeats} rounds' step / none's step of the same "
            f"mode; compiled: every block compiled under every policy (none included), bytes from the allocator's events.")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = common.start(args)
    console.print(f"[bold]activation checkpointing benchmark[/] presets={args.presets} policies={args.policies} "
                  f"batch={args.batch} seq={args.seq} steps={args.steps} repeats={args.repeats}; load {env['load_before']}")
    t_start = time.perf_counter()
    runs: list[dict] = []
    for rep in range(args.repeats):
        for mode, preset in [(m, p) for m in args.modes for p in args.presets]:
            t0 = time.perf_counter()
            label = f"[{rep}] {mode} {preset}"
            policies = _policies(args, mode)
            meas = common.measure(args, console, label, lambda: mp_harness.run_distributed(
                ac_worker, 1, preset, policies, args.batch, args.seq, args.warmup, args.steps, mode == "compiled",
                timeout=args.timeout))
            res = meas.pop("results")[0]
            losses = {pol: r["losses"] for pol, r in res["policies"].items()}
            for policy in policies:
                r = res["policies"][policy]
                runs.append({"mode": mode, "preset": preset, "policy": policy, "repeat": rep, **meas,
                             "step_s": statistics.median(r["round_s"]), "round_s": r["round_s"], "losses": r["losses"],
                             "held_bytes": r["held_bytes"], "saved_on_device_bytes": r["saved_on_device_bytes"],
                             "params": r["params"], "model_config": res["config"]})
                console.print(f"  {label} {policy:<16} {1e3 * runs[-1]['step_s']:8.0f} ms/step  "
                              f"{sum(r['held_bytes'].values()) / 2**20:7.2f} MiB held")
            # Checkpointing changes memory and time, never the math: the same losses under every policy.
            worst = max(abs(a - b) for pol in policies for a, b in zip(losses[pol], losses["none"]))
            console.print(f"  {label}: others used {meas['foreign_cores']:.2f} cores; largest loss difference "
                          f"to none {worst:.1e}; {time.perf_counter() - t0:.0f} s")
    env["wall_s"] = time.perf_counter() - t_start
    env["load_after"] = common.loadavg()
    env["reruns"] = sum(len(r["attempts_foreign_cores"]) - 1 for r in runs if r["policy"] == "none")  # one per process
    rows = _summarise(args, runs)

    common.write_outputs(
        console, json_path, f"Activation checkpointing: batch {args.batch} x {args.seq} tokens (median of {args.repeats})",
        HEADERS, [_cells(r) for r in rows], _caption(args), {"config": vars(args), "environment": env, "summary": rows,
                                                            "runs": runs}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
