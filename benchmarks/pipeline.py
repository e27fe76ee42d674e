"""Pipeline-parallel step time on CPU: 1 process vs 2 pipeline stages (gloo), per schedule and m.

Usage (from the repository root)::

    python benchmarks/pipeline.py                    # full run: nano + micro, m = 2 4 8 16, 4 schedules
    python benchmarks/pipeline.py --quick            # smoke configuration, < 1 minute
    python benchmarks/pipeline.py --presets micro --microbatches 8 --schedules 1f1b --repeats 5

What is measured (every process runs with 1 thread, started by
``lightning_scale.testing.multiprocess.run_distributed``, so the baseline and the stages see the
same environment):

* **1 process, gradient accumulation over m microbatches**: the same GPT, the same global batch
  (``--batch`` sequences of ``--seq`` tokens) cut into m microbatches, forward + backward of each
  (loss / m), then one AdamW step. This is the baseline of the speedup.
* **1 process, full batch** (no accumulation): reported for reference only.
* **2 pipeline stages**: 2 ranks, :class:`~lightning_scale.core.pipeline.PipelineRuntime` runs
  forward + backward of the m microbatches with the schedule, then the tied-embedding gradient
  all-reduce (as ``PipelineStrategy.finalize_gradients`` does) and AdamW on each stage's
  parameters. Multi-stage schedules use ``--virtual`` (default 2) stages per rank. The model is
  split with the library's default plan (``plan_pipeline``, blocks balanced by parameter count).

Timing: ``time.perf_counter`` around whole steps (zero_grad .. optimizer step), ``--warmup``
untimed steps first, a barrier before the timed steps. A run's step time is the mean of its
``--steps`` timed steps; for the pipeline it is the max over ranks. Each figure is the median of
``--repeats`` runs (fresh processes each time; min and max are reported too). Repeats loop over
the whole matrix so a change in machine load hits baseline and pipeline alike.

Measured bubble: on timed steps the runtime records a per-action timeline (``record_timeline``);
per rank, idle = 1 - busy / schedule time, where busy is the sum of its forward/backward(/weight)
actions and schedule time is the wall time of ``train_step`` on that rank (the schedule incl.
p2p waits and the loss broadcast, not the optimizer). The figure is the mean over ranks and
timed steps. Theoretical bubble: ``theoretical_bubble(p, m, v)`` = (p-1)/(v m + p - 1)
(design guide section 6; Narayanan et al. 2021). Theoretical speedup = p (1 - bubble);
efficiency = measured speedup / theoretical speedup. The target: efficiency >= 90% at m = 8.

Outputs: a ``rich`` table per preset, JSON with every raw number (``--json``), the markdown table
next to it (same name, ``.md``), and one PNG timeline per schedule at m = 8 for the largest
preset (``timeline_<schedule>_m8.png``, via :func:`lightning_scale.core.timeline.plot_timeline`).
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
if str(REPO) not in sys.path:  # `python benchmarks/pipeline.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common  # noqa: E402
from benchmarks._common import Window as _Window  # noqa: E402
from benchmarks._common import add_load_arguments  # noqa: E402
from benchmarks._common import loadavg as _loadavg  # noqa: E402
from benchmarks._common import measure as _measure  # noqa: E402
from lightning_scale.core.grads import allreduce_gradients  # noqa: E402
from lightning_scale.core.pipeline import (  # noqa: E402
    MULTI_STAGE_SCHEDULES,
    PipelineConfig,
    PipelineRuntime,
    TimelineEvent,
    plan_pipeline,
    theoretical_bubble,
)
from lightning_scale.core.timeline import replay_span  # noqa: E402
from lightning_scale.models import GPT, GPTConfig  # noqa: E402

STAGES = 2  # p: pipeline ranks (the machine has 2 cores; 1 thread per rank)
TARGET_M = 8
TARGET_EFFICIENCY = 0.90
ALL_SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "zbv_zero_bubble"]

FULL_DEFAULTS = dict(
    presets=["nano", "micro"], microbatches=[2, 4, 8, 16], schedules=ALL_SCHEDULES, batch=32, seq=128,
    steps=4, warmup=2, repeats=3, json="benchmarks/results/pipeline.json", retries=3,
)
QUICK_DEFAULTS = dict(
    presets=["nano"], microbatches=[2, 8], schedules=ALL_SCHEDULES, batch=16, seq=64,
    steps=2, warmup=1, repeats=1, json="benchmarks/results/pipeline_quick.json", retries=0,
)


# ----------------------------------------------------------------------------------------------
# Rank functions (module level: the harness pickles them by reference)
# ----------------------------------------------------------------------------------------------
def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _model_config(preset: str, seq: int) -> GPTConfig:
    cfg = GPTConfig.from_preset(preset)
    if seq > cfg.block_size:  # a longer sequence needs a longer position table
        cfg = GPTConfig.from_preset(preset, block_size=seq)
    return cfg


def _make_model(preset: str, seq: int) -> GPT:
    torch.manual_seed(0)
    return GPT(_model_config(preset, seq))


def _batches(vocab: int, n: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g))
        for _ in range(n)
    ]


def single_process_worker(preset: str, seq: int, batch: int, accum: int, warmup: int, steps: int, lr: float) -> dict:
    """One process: ``accum`` microbatches of gradient accumulation + AdamW per step."""
    model = _make_model(preset, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = _batches(model.config.vocab_size, warmup + steps, batch, seq)
    step_s: list[float] = []
    compute_s: list[float] = []  # forward + backward only, comparable with the stages' busy time
    losses: list[float] = []
    window = _Window()
    for i, (x, y) in enumerate(data):
        if i == warmup:
            if dist.is_initialized():
                dist.barrier()  # the "2 independent" runs time the same window (foreign_cores assumes it)
            window.start()
        t = time.perf_counter()
        opt.zero_grad()
        total = torch.zeros(())
        t_compute = time.perf_counter()
        for xc, yc in zip(x.chunk(accum), y.chunk(accum)):
            loss = _loss(model(xc), yc) / accum
            loss.backward()
            total += loss.detach()
        t_optim = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        if i >= warmup:
            step_s.append(dt)
            compute_s.append(t_optim - t_compute)
            losses.append(float(total))
    w = window.stop()
    return {"step_s": step_s, "compute_s": compute_s, "losses": losses, "cpu_util": w["own_cpu_s"] / w["wall_s"],
            "window": w, "threads": torch.get_num_threads()}


def pipeline_worker(
    preset: str, seq: int, batch: int, m: int, schedule: str, virtual: int, warmup: int, steps: int, lr: float
) -> dict:
    """One pipeline rank: schedule fwd+bwd, tied-gradient all-reduce, AdamW on the local stages."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _make_model(preset, seq)
    pcfg = PipelineConfig(
        stages=world, schedule=schedule, microbatches=m, virtual_stages=virtual if schedule in MULTI_STAGE_SCHEDULES else 1
    )
    plan = plan_pipeline(model, pcfg)
    rt = PipelineRuntime(model, plan, pcfg, rank, dist.group.WORLD, list(range(world)), torch.device("cpu"), _loss)
    rt.check_batch(batch)
    # Tied parameters held on several ranks (GPT head = token embedding): sum their gradients,
    # as PipelineStrategy.finalize_gradients does. new_group is collective: every rank, same order.
    tied = []
    for holders, name in rt.tied:
        group = dist.new_group(holders)
        if rank in holders and name:
            tied.append((group, name))
    local = rt.local_module
    opt = torch.optim.AdamW(local.parameters(), lr=lr)
    data = _batches(model.config.vocab_size, warmup + steps, batch, seq)
    step_s, sched_s, busy_s, idle, losses = [], [], [], [], []
    events: list[Any] = []
    dist.barrier()
    window = _Window()
    for i, (x, y) in enumerate(data):
        timed = i >= warmup
        if i == warmup:
            dist.barrier()  # every rank starts the timed steps together
            window.start()
        rt.record_timeline = timed
        t = time.perf_counter()
        opt.zero_grad()
        loss = rt.train_step((x,), y)
        t_sched_end = time.perf_counter()
        for group, name in tied:
            allreduce_gradients([local.get_parameter(name)], group, average=False)
        opt.step()
        t_end = time.perf_counter()
        if timed:
            sched = t_sched_end - rt._t0  # the runtime's own step origin (events are relative to it)
            busy = sum(e.end - e.start for e in rt.timeline)
            step_s.append(t_end - t)
            sched_s.append(sched)
            busy_s.append(busy)
            idle.append(max(0.0, 1.0 - busy / sched))
            losses.append(float(loss))
            events = list(rt.timeline)  # keep the last timed step's timeline for plotting
    w = window.stop()
    return {
        "rank": rank,
        "window": w,
        "stages": rt.stage_indices,
        "plan": plan.describe(),
        "params_local": sum(p.numel() for p in local.parameters()),
        "tied_allreduce": [name for _, name in tied],
        "step_s": step_s,
        "schedule_s": sched_s,
        "busy_s": busy_s,
        "idle_fraction": idle,
        "losses": losses,
        "cpu_util": w["own_cpu_s"] / w["wall_s"],
        "threads": torch.get_num_threads(),
        "last_step_events": [vars(e) for e in events],
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="GPT presets (default: nano micro)")
    p.add_argument("--microbatches", nargs="+", type=int, help="microbatch counts m (default: 2 4 8 16)")
    p.add_argument("--schedules", nargs="+", choices=ALL_SCHEDULES + ["looped_bfs", "interleaved_zero_bubble"],
                   help="pipeline schedules (default: gpipe 1f1b interleaved_1f1b zbv_zero_bubble)")
    p.add_argument("--virtual", type=int, default=2, help="stages per rank of the multi-stage schedules (default 2)")
    p.add_argument("--batch", type=int, help="global batch in sequences per step; every m must divide it (default 32)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 128; a preset whose block_size is shorter gets a longer position table)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 4)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default 2)")
    p.add_argument("--repeats", type=int, help="runs per figure; the figure is their median (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--json", help="output JSON (default benchmarks/results/pipeline.json); the .md table goes next to it")
    p.add_argument("--no-plots", action="store_true", help="skip the timeline PNGs")
    p.add_argument("--quick", action="store_true", help="smoke configuration (nano, m=2 8, short sequences, 1 repeat; < 1 min)")
    add_load_arguments(p)
    args = p.parse_args(argv)
    _common.apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    for m in args.microbatches:
        if m < 1 or args.batch % m:
            p.error(f"--batch {args.batch} is not divisible by microbatches {m}; choose a batch that every m divides")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def _seq_for(preset: str, args: argparse.Namespace) -> int:
    return args.seq if args.seq is not None else GPTConfig.from_preset(preset).block_size


def _check_pipeline(preset: str, seq: int, m: int, schedule: str, virtual: int) -> str | None:
    """Why this configuration cannot run (validated in the parent, before any process), or None."""
    try:
        pcfg = PipelineConfig(stages=STAGES, schedule=schedule, microbatches=m,
                              virtual_stages=virtual if schedule in MULTI_STAGE_SCHEDULES else 1)
        plan_pipeline(GPT(_model_config(preset, seq)), pcfg)
    except ValueError as err:
        return str(err)
    return None


def _virtual(schedule: str, args: argparse.Namespace) -> int:
    return args.virtual if schedule in MULTI_STAGE_SCHEDULES else 1


def _ceiling_m(args: argparse.Namespace) -> int:
    return TARGET_M if TARGET_M in args.microbatches else max(args.microbatches)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def _summarise(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """One row per (preset, schedule, m): medians over repeats, speedup, bubble."""
    base: dict[tuple, list[float]] = {}
    base_compute: dict[tuple, list[float]] = {}
    base_polluted: dict[tuple, int] = {}
    for r in runs:
        if r["kind"] == "single":
            key = (r["preset"], r["accum"])
            base.setdefault(key, []).append(statistics.mean(r["result"]["step_s"]))
            base_compute.setdefault(key, []).append(statistics.mean(r["result"]["compute_s"]))
            base_polluted[key] = base_polluted.get(key, 0) + int(r["polluted"])
    rows = []
    for preset in args.presets:
        for schedule in args.schedules:
            for m in args.microbatches:
                mine = [r for r in runs if r["kind"] == "pipeline" and r["preset"] == preset and r["schedule"] == schedule and r["m"] == m]
                if not mine:
                    continue
                v = _virtual(schedule, args)
                row: dict[str, Any] = {"preset": preset, "schedule": schedule, "m": m, "p": STAGES, "v": v,
                                       "theory_bubble": theoretical_bubble(STAGES, m, v)}
                row["theory_speedup"] = STAGES * (1 - row["theory_bubble"])
                if "skipped" in mine[0]:
                    row["skipped"] = mine[0]["skipped"]
                    rows.append(row)
                    continue
                pipe = [max(statistics.mean(rk["step_s"]) for rk in r["result"]) for r in mine]
                bubble = [statistics.mean(statistics.mean(rk["idle_fraction"]) for rk in r["result"]) for r in mine]
                busy = [[statistics.mean(rk["busy_s"]) for rk in r["result"]] for r in mine]
                sched = [max(statistics.mean(rk["schedule_s"]) for rk in r["result"]) for r in mine]
                b = base[(preset, m)]
                row.update(
                    single_s=_stats(b), full_batch_s=_stats(base[(preset, 1)]) if (preset, 1) in base else None,
                    pipeline_s=_stats(pipe), schedule_s=_stats(sched), bubble=_stats(bubble),
                    busy_per_rank_s=busy, cpu_util=[[rk["cpu_util"] for rk in r["result"]] for r in mine],
                    plan=mine[0]["result"][0]["plan"],
                    single_polluted_repeats=base_polluted[(preset, m)],
                    pipeline_polluted_repeats=sum(int(r["polluted"]) for r in mine),
                    pipeline_foreign_cores=[r["foreign_cores"] for r in mine],
                )
                # Sum of the ranks' forward/backward time over the 1-process forward/backward time (both
                # without the optimizer step): > 1 means the same work runs slower split over 2 concurrent
                # processes (plus per-action overheads).
                row["single_compute_s"] = _stats(base_compute[(preset, m)])
                row["busy_sum_over_single"] = (statistics.median(sum(bs) for bs in busy)
                                               / row["single_compute_s"]["median"])
                # The last timed step replayed with free communication (core.timeline.replay_span):
                # measured span / replayed span - 1 = time lost between actions (p2p, waits, the
                # schedule's own work); replayed span / ideal - 1 = imbalance and the bubble.
                spans, replays, ideals = [], [], []
                for r in mine:
                    events = [TimelineEvent(**e) for rk in r["result"] for e in rk["last_step_events"]]
                    spans.append(max(e.end for e in events) - min(e.start for e in events))
                    replays.append(replay_span(events))
                    ideals.append(sum(e.end - e.start for e in events) / STAGES / (1 - row["theory_bubble"]))
                row["span_s"], row["replay_s"], row["ideal_s"] = _stats(spans), _stats(replays), _stats(ideals)
                row["between_actions"] = statistics.median(s / q - 1 for s, q in zip(spans, replays))
                row["replay_over_ideal"] = statistics.median(q / i - 1 for q, i in zip(replays, ideals))
                row["speedup"] = row["single_s"]["median"] / row["pipeline_s"]["median"]
                row["speedup_per_repeat"] = [s / q for s, q in zip(b, pipe)] if len(b) == len(pipe) else None
                row["efficiency"] = row["speedup"] / row["theory_speedup"]
                row["efficiency_stats"] = (_common.stats([sp / row["theory_speedup"] for sp in row["speedup_per_repeat"]])
                                           if row["speedup_per_repeat"] else None)
                rows.append(row)
    return rows


def _ceilings(args: argparse.Namespace, runs: list[dict]) -> dict:
    """Per preset: the 1-process run alone vs 2 copies at once (no communication)."""
    out = {}
    for preset in args.presets:
        m = _ceiling_m(args)
        conc = [max(statistics.mean(rk["step_s"]) for rk in r["result"]) for r in runs
                if r["kind"] == "concurrent" and r["preset"] == preset]
        alone = [statistics.mean(r["result"]["step_s"]) for r in runs
                 if r["kind"] == "single" and r["preset"] == preset and r["accum"] == m]
        if conc and alone:
            a, c = statistics.median(alone), statistics.median(conc)
            out[preset] = {"m": m, "alone_s": _stats(alone), "concurrent_s": _stats(conc),
                           "slowdown": c / a, "ceiling_speedup": STAGES * a / c}
    return out


def _ceiling_text(c: dict) -> str:
    return (f"2 independent 1-process runs at once (accum m={c['m']}, no communication): "
            f"{1e3 * c['concurrent_s']['median']:.0f} ms/step vs {1e3 * c['alone_s']['median']:.0f} ms alone "
            f"(x{c['slowdown']:.2f}), so no 2-process run can exceed a speedup of {c['ceiling_speedup']:.2f} here.")


def _fmt_ms(s: dict, polluted: int = 0) -> str:
    med, lo, hi = (1e3 * s[k] for k in ("median", "min", "max"))
    text = f"{med:.0f} ({lo:.0f}-{hi:.0f})" if len(s["repeats"]) > 1 else f"{med:.0f}"
    return text + ("*" * min(polluted, 1))


def _target_mark(row: dict) -> str:
    if row["m"] != TARGET_M or "skipped" in row:
        return ""
    return "met" if row["efficiency"] >= TARGET_EFFICIENCY else "NOT met"


HEADERS = ["schedule", "m", "1-proc ms (accum m)", "pipeline ms", "speedup", "theory speedup", "efficiency %",
           "measured bubble %", "theory bubble %", "busy sum / 1-proc", "replay / ideal", "span / replay",
           f"m={TARGET_M} target (>= {TARGET_EFFICIENCY:.0%})"]


def _cells(row: dict) -> list[str]:
    label = row["schedule"] + (f" (v={row['v']})" if row["v"] > 1 else "")
    if "skipped" in row:
        return [label, str(row["m"]), "-", "skipped", "-", f"{row['theory_speedup']:.2f}", "-", "-",
                f"{100 * row['theory_bubble']:.1f}", "-", "-", "-", ""]
    return [
        label, str(row["m"]), _fmt_ms(row["single_s"], row["single_polluted_repeats"]),
        _fmt_ms(row["pipeline_s"], row["pipeline_polluted_repeats"]), f"{row['speedup']:.2f}",
        f"{row['theory_speedup']:.2f}", f"{100 * row['efficiency']:.0f}", f"{100 * row['bubble']['median']:.1f}",
        f"{100 * row['theory_bubble']:.1f}", f"{row['busy_sum_over_single']:.2f}",
        f"{1 + row['replay_over_ideal']:.2f}", f"{1 + row['between_actions']:.2f}", _target_mark(row),
    ]


def _markdown(args: argparse.Namespace, rows: list[dict], env: dict) -> str:
    out = [
        "# Pipeline benchmark: 1 process vs 2 stages (CPU, gloo, 1 thread per rank)",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; CPU: {env['cpu_model']} ({env['nproc']} cores); torch {env['torch']}; "
        f"load average before {env['load_before']} after {env['load_after']}; wall time {env['wall_s']:.0f} s.",
        "",
        f"Global batch {args.batch} sequences; {args.warmup} warm-up + {args.steps} timed steps per run; "
        f"median (min-max) of {args.repeats} repeats. Speedup = 1 process with m-step gradient accumulation / "
        f"2 stages; theory speedup = p (1 - (p-1)/(v m + p - 1)); efficiency = speedup / theory speedup.",
        f"Runs during which other processes used more than {args.max_foreign} cores were re-run (up to "
        f"{args.retries} times, {env.get('reruns', 0)} re-runs in all); `*` marks a figure that still includes a "
        f"polluted run. busy sum / 1-proc = the two ranks' forward/backward compute time added up, over the "
        f"1-process forward/backward time (> 1: the same work ran slower split over 2 concurrent processes). "
        f"Last timed step of each run, replayed with free communication (each rank's actions in their "
        f"measured order and durations): replay / ideal = the replay over (m + p - 1) / m x busy / p "
        f"(> 1: unequal stage or microbatch times); span / replay = the measured schedule over the replay "
        f"(> 1: time lost between actions to p2p transfers and the schedule's own work).",
        "",
    ]
    for preset in args.presets:
        mine = [r for r in rows if r["preset"] == preset]
        if not mine:
            continue
        cfg = _model_config(preset, _seq_for(preset, args))
        n = sum(p.numel() for p in GPT(cfg).parameters())
        full = next((r["full_batch_s"] for r in mine if r.get("full_batch_s")), None)
        out.append(f"## {preset} ({n / 1e6:.2f}M params, L={cfg.n_layer}, D={cfg.n_embd}, seq {_seq_for(preset, args)})")
        out.append("")
        if full:
            out.append(f"1 process, full batch (no accumulation): {_fmt_ms(full)} ms/step.")
            out.append("")
        if preset in env.get("ceilings", {}):
            out.append(_ceiling_text(env["ceilings"][preset]))
            out.append("")
        out.append("| " + " | ".join(HEADERS) + " |")
        out.append("|" + "|".join("---" for _ in HEADERS) + "|")
        for row in mine:
            out.append("| " + " | ".join(_cells(row)) + " |")
        out.append("")
    return "\n".join(out)


def _print_tables(console: Any, args: argparse.Namespace, rows: list[dict], ceilings: dict) -> None:
    from rich.table import Table

    for preset in args.presets:
        mine = [r for r in rows if r["preset"] == preset]
        if not mine:
            continue
        full = next((r["full_batch_s"] for r in mine if r.get("full_batch_s")), None)
        caption = f"1 process full batch (no accumulation): {_fmt_ms(full)} ms" if full else ""
        if preset in ceilings:
            caption += "\n" + _ceiling_text(ceilings[preset])
        table = Table(title=f"GPT {preset}, seq {_seq_for(preset, args)}, batch {args.batch}: 1 process vs {STAGES} stages",
                      caption=caption)
        for h in HEADERS:
            table.add_column(h, justify="left" if h == "schedule" else "right")
        for row in mine:
            cells = _cells(row)
            mark = cells[-1]
            if mark:
                cells[-1] = f"[green]{mark}[/]" if mark == "met" else f"[red]{mark}[/]"
            table.add_row(*cells)
        console.print(table)


def _plot(args: argparse.Namespace, runs: list[dict], out_dir: Path, prefix: str) -> list[str]:
    """One timeline PNG per schedule at m = 8 (else the largest m) for the largest preset."""
    from lightning_scale.core.timeline import plot_timeline

    sizes = {p: sum(x.numel() for x in GPT(_model_config(p, _seq_for(p, args))).parameters()) for p in args.presets}
    preset = max(args.presets, key=lambda p: sizes[p])
    m = TARGET_M if TARGET_M in args.microbatches else max(args.microbatches)
    paths = []
    for schedule in args.schedules:
        mine = [r for r in runs if r["kind"] == "pipeline" and r["preset"] == preset and r["schedule"] == schedule
                and r["m"] == m and "result" in r]
        if not mine:
            continue
        # the repeat with the median step time, its last timed step
        mine.sort(key=lambda r: max(statistics.mean(rk["step_s"]) for rk in r["result"]))
        run = mine[len(mine) // 2]
        events = [TimelineEvent(**e) for rk in run["result"] for e in rk["last_step_events"]]
        step_ms = 1e3 * max(rk["step_s"][-1] for rk in run["result"])
        v = _virtual(schedule, args)
        path = out_dir / f"{prefix}timeline_{schedule}_m{m}.png"
        plot_timeline(events, path, num_ranks=STAGES,
                      title=f"GPT {preset} {schedule} p={STAGES} v={v} m={m}, step {step_ms:.0f} ms, "
                            f"theory bubble {theoretical_bubble(STAGES, m, v):.1%}")
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from lightning_scale.testing import multiprocess as mp_harness

    console, json_path, env = _common.start(args)
    load_before = env["load_before"]
    console.print(f"[bold]pipeline benchmark[/] presets={args.presets} m={args.microbatches} schedules={args.schedules} "
                  f"batch={args.batch} steps={args.steps} warmup={args.warmup} repeats={args.repeats}; load {load_before}")

    t_start = time.perf_counter()
    runs: list[dict] = []
    loads: list[dict] = []
    skip_reason: dict[tuple, str | None] = {}
    common = dict(warmup=args.warmup, steps=args.steps, lr=args.lr)
    for rep in range(args.repeats):
        for preset in args.presets:
            seq = _seq_for(preset, args)
            for accum in [1] + [m for m in args.microbatches if m != 1]:
                t0 = time.perf_counter()
                label = f"[{rep}] {preset} 1 process accum={accum}"
                meas = _measure(args, console, label, lambda: mp_harness.run_distributed(
                    single_process_worker, 1, preset, seq, args.batch, accum, timeout=args.timeout, **common))
                res = meas.pop("results")[0]
                runs.append({"kind": "single", "preset": preset, "seq": seq, "accum": accum, "repeat": rep, **meas, "result": res})
                alone = statistics.mean(res["step_s"])
                console.print(f"  [{rep}] {preset} 1 process accum={accum:<2} {1e3 * alone:8.0f} ms/step "
                              f"(cpu {res['cpu_util']:.2f}, others {meas['foreign_cores']:.2f} cores; {time.perf_counter() - t0:.0f} s)")
                if accum == _ceiling_m(args):
                    # Machine ceiling: the same 1-process run on 2 ranks at once, no communication.
                    # Slower than alone = the 2 cores do not give 2x (shared caches / memory bandwidth,
                    # clock, other load); no 2-process run can beat this.
                    t0 = time.perf_counter()
                    meas = _measure(args, console, f"[{rep}] {preset} 2 independent", lambda: mp_harness.run_distributed(
                        single_process_worker, 2, preset, seq, args.batch, accum, timeout=args.timeout, **common))
                    res2 = meas.pop("results")
                    runs.append({"kind": "concurrent", "preset": preset, "seq": seq, "accum": accum, "repeat": rep, **meas, "result": res2})
                    slow = max(statistics.mean(r["step_s"]) for r in res2)
                    console.print(f"  [{rep}] {preset} 2 independent processes accum={accum:<2} {1e3 * slow:8.0f} ms/step "
                                  f"(x{slow / alone:.2f} vs alone; others {meas['foreign_cores']:.2f} cores; {time.perf_counter() - t0:.0f} s)")
                if accum not in args.microbatches:
                    continue
                m = accum
                for schedule in args.schedules:
                    key = (preset, m, schedule)
                    if key not in skip_reason:
                        skip_reason[key] = _check_pipeline(preset, seq, m, schedule, args.virtual)
                    entry = {"kind": "pipeline", "preset": preset, "seq": seq, "m": m, "schedule": schedule,
                             "v": _virtual(schedule, args), "repeat": rep}
                    if skip_reason[key]:
                        entry["skipped"] = skip_reason[key]
                        if rep == 0:
                            console.print(f"  [{rep}] {preset} {schedule} m={m}: skipped ({skip_reason[key]})")
                        runs.append(entry)
                        continue
                    t0 = time.perf_counter()
                    loads.append({"before": f"{preset}/{schedule}/m{m}/r{rep}", "load": _loadavg()})
                    meas = _measure(args, console, f"[{rep}] {preset} {schedule} m={m}", lambda: mp_harness.run_distributed(
                        pipeline_worker, STAGES, preset, seq, args.batch, m, schedule, _virtual(schedule, args),
                        timeout=args.timeout, **common))
                    res = meas.pop("results")
                    entry.update(meas, result=res)
                    runs.append(entry)
                    step = max(statistics.mean(rk["step_s"]) for rk in res)
                    bub = statistics.mean(statistics.mean(rk["idle_fraction"]) for rk in res)
                    cpus = ", ".join(f"{rk['cpu_util']:.2f}" for rk in res)
                    console.print(f"  [{rep}] {preset} {schedule:<16} m={m:<2} {1e3 * step:8.0f} ms/step  bubble {bub:.1%} "
                                  f"(cpu {cpus}; others {meas['foreign_cores']:.2f} cores; {time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t_start
    env["reruns"] = sum(len(r.get("attempts_foreign_cores", [])) - 1 for r in runs if "attempts_foreign_cores" in r)
    env["load_after"] = _loadavg()
    env["wall_s"] = wall
    env["load_samples"] = loads

    rows = _summarise(args, runs)
    env["ceilings"] = _ceilings(args, runs)
    _print_tables(console, args, rows, env["ceilings"])
    prefix = "quick_" if args.quick else ""
    plots = [] if args.no_plots else _plot(args, runs, json_path.parent, prefix)
    md = _markdown(args, rows, env)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md + "\n")
    config = {k: v for k, v in vars(args).items()}
    config["stages"] = STAGES
    config["seq_per_preset"] = {p: _seq_for(p, args) for p in args.presets}
    config["model_configs"] = {p: _model_config(p, _seq_for(p, args)).to_dict() for p in args.presets}
    json_path.write_text(json.dumps({"config": config, "environment": env, "summary": rows, "runs": runs, "plots": plots},
                                    indent=1, default=str))
    target_rows = [r for r in rows if r["m"] == TARGET_M and "skipped" not in r]
    for r in target_rows:
        console.print(f"m={TARGET_M} {r['preset']:<6} {r['schedule']:<16} efficiency {r['efficiency']:.0%} -> {_target_mark(r)} "
                      f"(where it went: compute x{r['busy_sum_over_single']:.2f} split over 2 processes, "
                      f"replay / ideal {1 + r['replay_over_ideal']:.2f}, span / replay {1 + r['between_actions']:.2f}, "
                      f"step / schedule {r['pipeline_s']['median'] / r['schedule_s']['median']:.2f})")
    console.print(f"wall time {wall:.0f} s; load before {load_before} after {env['load_after']}")
    console.print(f"wrote {json_path}, {md_path}" + (f", {len(plots)} timelines in {json_path.parent}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
