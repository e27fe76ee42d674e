"""Every benchmark in one command, and one combined summary: peers, pipeline efficiency vs theory,
TP speedup vs ideal, ZeRO bytes vs formula, activation checkpointing saving vs overhead, callback
overhead, planner accuracy (predicted vs measured bytes).

Usage (from anywhere; ``python -m benchmarks.run_all`` works from the repository root only,
because fairscale installs a top-level package named ``benchmarks`` too)::

    python benchmarks/run_all.py                   # the standard configuration (~20 min on a shared 2-core box)
    python benchmarks/run_all.py --smoke           # 1 repeat, 1-2 steps, tiny models: every section's rows
    python benchmarks/run_all.py --full-matrix     # every script's own full configuration (hours)
    python benchmarks/run_all.py --reuse           # summarise the JSONs already in --out-dir, run the missing
    python benchmarks/run_all.py --sections peers zero --repeats 5

The sections run one after the other in this process (one harness fork server for all), each
through its script's ``main`` with ``--json <out-dir>/<section>.json``; a section that fails is
reported and the others still run (exit code 1). The planner section runs nothing: it compares
the memory planner's predictions, which MemoryAccountant records in the peers runs, with the
bytes measured there. The combined JSON (``--json``, default ``<out-dir>/run_all.json``) holds
every section's summary rows, the targets and their verdicts, and the environment. Ratios, not
absolute times, are what to read on a shared machine; each is the median of the repeats
(min-max), paired within a repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/run_all.py` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import _common as common  # noqa: E402

SECTIONS = ["peers", "pipeline", "tensor_parallel", "zero", "activation_checkpointing", "profiler"]
TITLES = {
    "peers": "Peers: the suite vs Lightning and fairscale (ratios to Lightning ddp)",
    "pipeline": "Pipeline: 2 stages vs 1 process, efficiency vs theory",
    "tensor_parallel": "Tensor parallel: TP=2 speedup vs ideal",
    "zero": "ZeRO: model-state bytes vs formula, step time vs DDP",
    "activation_checkpointing": "Activation checkpointing: saving vs overhead",
    "profiler": "Callback overhead (2-rank ddp)",
    "planner": "Planner accuracy: predicted vs measured bytes per rank (peers runs)",
}
_PEER_VARIANTS = ["lightning_ddp", "pipeline_1f1b", "tensor_parallel", "zero2", "zero3", "lightning_fsdp2", "lightning_tp",
                  "fairscale_oss_sdp", "fairscale_pipe"]
#: --smoke: the smallest configuration of each script that still produces every kind of row.
SMOKE_ARGS: dict[str, list[str]] = {
    # every peer but parallel_3d (4 ranks; the slowest run by far), GPT tiny cut to 2 blocks
    "peers": ["--quick", "--layers", "2", "--steps", "1", "--variants", *_PEER_VARIANTS],
    "pipeline": ["--quick", "--presets", "tiny", "--microbatches", "2", "--schedules", "gpipe", "1f1b", "--batch", "8",
                 "--seq", "32", "--steps", "2", "--warmup", "1", "--no-plots"],
    "tensor_parallel": ["--quick", "--hidden", "128", "--layers", "1", "--batch", "4", "--seq", "32", "--steps", "2",
                        "--no-ceiling"],
    # ddp / zero2 / zero3 / FSDP2 bytes are checked in the peers rows; here the other formulas
    "zero": ["--quick", "--presets", "tiny", "--variants", "ddp", "zero1", "zero2_offload", "--batch", "4", "--seq", "32",
             "--steps", "2"],
    "activation_checkpointing": ["--quick", "--steps", "2"],
    "profiler": ["--quick", "--steps", "2", "--warmup", "1", "--variants", "default", "memory", "cost"],
}
#: Default (no --smoke): the standard configuration (20 min on the shared 2-core machine of
#: docs/benchmarks.md). --full-matrix runs every script's own full defaults instead (the
#: pipeline's m = 2 4 8 16 on two presets, TP up to hidden 2048, ZeRO on two presets: several hours).
STANDARD_ARGS: dict[str, list[str]] = {
    "peers": [],  # GPT nano, every variant, 3 repeats
    "pipeline": ["--presets", "nano", "--microbatches", "2", "8"],  # the 4 schedules, 3 repeats
    "tensor_parallel": ["--hidden", "256", "1024"],  # 3 repeats; the target is read at the largest run
    "zero": ["--presets", "nano"],  # the 10 variants, 3 repeats
    "activation_checkpointing": ["--presets", "nano"],  # the 5 policies eager, 4 compiled, 3 repeats
    "profiler": [],  # GPT nano, the 5 variants, 3 repeats
}
PASSED_ON = ["repeats", "retries", "retry_wait", "max_foreign", "max_load", "timeout"]


def _load_main(section: str) -> Callable[[list[str]], int]:
    import importlib

    return importlib.import_module(f"benchmarks.{section}").main


# ----------------------------------------------------------------------------------------------
# Section summaries: each returns (headers, rows of cells, rows as data, targets)
# ----------------------------------------------------------------------------------------------
def _r(s: dict | None, fmt: str = "{:.2f}x") -> str:
    """A ratio's median (min-max)."""
    if not s:
        return "-"
    text = fmt.format(s["median"])
    return text + (f" ({fmt.format(s['min'])}-{fmt.format(s['max'])})" if s.get("n", 1) > 1 else "")


def _pct(s: dict | None, signed: bool = True) -> str:
    if not s:
        return "-"
    f = "{:+.0%}" if signed else "{:.0%}"
    text = f.format(s["median"])
    return text + (f" ({f.format(s['min'])} to {f.format(s['max'])})" if s.get("n", 1) > 1 else "")


def _target(name: str, measured: str, met: bool | None, conclusive: bool = True) -> dict:
    """A target's verdict. ``met`` is read on the median; ``conclusive`` says whether every repeat
    (min and max) is on the same side of the threshold as the median (exact figures always are)."""
    return {"target": name, "measured": measured, "met": met, "conclusive": conclusive}


def _threshold(name: str, measured: str, s: dict, limit: float, higher_is_better: bool) -> dict:
    """A timing target: median vs ``limit``; conclusive when min and max agree with the median."""
    ok = (lambda v: v >= limit) if higher_is_better else (lambda v: v <= limit)
    met = ok(s["median"])
    return _target(name, measured, met, ok(s["min"]) == met and ok(s["max"]) == met)


def _verdict(t: dict) -> str:
    text = {True: "met", False: "NOT met", None: "-"}[t["met"]]
    return text if t.get("conclusive", True) else text + " (repeats on both sides)"


def summarise_peers(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["variant", "from", "step time vs ddp", "tokens/s vs ddp", "model states/rank vs ddp",
               "activations/rank vs ddp", "last loss - ddp"]
    rows, cells = [], []
    for r in data["summary"]:
        rows.append({k: r.get(k) for k in ("variant", "origin", "layout", "ranks", "step_vs_ddp", "tokens_per_s_vs_ddp",
                                           "model_states_bytes_max", "model_states_vs_ddp", "activation_bytes_max",
                                           "activations_vs_ddp", "activations_note", "final_loss_minus_ddp")})
        cells.append([r["variant"], r["origin"], _r(r["step_vs_ddp"]), _r(r["tokens_per_s_vs_ddp"]),
                      f"{r['model_states_vs_ddp']:.2f}x",
                      "-" if r["activations_vs_ddp"] is None else f"{r['activations_vs_ddp']:.2f}x",
                      f"{r['final_loss_minus_ddp']:+.1e}"])
    return headers, cells, rows, []


def summarise_pipeline(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["preset", "schedule", "m", "speedup", "theory speedup", "efficiency", "bubble measured", "bubble theory"]
    rows, cells, targets = [], [], []
    for r in data["summary"]:
        if "skipped" in r:
            continue
        one = {"min": r["efficiency"], "max": r["efficiency"], "median": r["efficiency"], "n": 1}
        eff = r.get("efficiency_stats") or one
        per_repeat = r.get("speedup_per_repeat")
        sp = common.stats(per_repeat) if per_repeat else {k: r["speedup"] for k in ("median", "min", "max")} | {"n": 1}
        label = r["schedule"] + (f" (v={r['v']})" if r["v"] > 1 else "")
        rows.append({"preset": r["preset"], "schedule": r["schedule"], "m": r["m"], "v": r["v"], "speedup": sp,
                     "theory_speedup": r["theory_speedup"], "efficiency": eff, "bubble": r["bubble"]["median"],
                     "theory_bubble": r["theory_bubble"]})
        cells.append([r["preset"], label, str(r["m"]), _r(sp), f"{r['theory_speedup']:.2f}x",
                      _pct(eff, signed=False), f"{r['bubble']['median']:.0%}", f"{r['theory_bubble']:.0%}"])
        if r["m"] == 8:
            targets.append(_threshold(f"pipeline {r['preset']} {label} m=8: efficiency >= 90%", _pct(eff, signed=False),
                                      eff, 0.90, higher_is_better=True))
    return headers, cells, rows, targets


def summarise_tensor_parallel(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["hidden", "params", "speedup", "ideal", "machine ceiling", "speedup / ideal", "comm share"]
    rows, cells, targets = [], [], []
    for r in data["summary"]:
        sp = r.get("speedup_stats") or {k: r["speedup"] for k in ("median", "min", "max")} | {"n": 1}
        rows.append({"hidden": r["hidden"], "params": r["params"], "speedup": sp, "ideal": 2.0,
                     "ceiling": r.get("ceiling_speedup"), "comm_share": r["comm_share"]["median"]})
        cells.append([str(r["hidden"]), f"{r['params'] / 1e6:.1f}M", _r(sp), "2.00x",
                      f"{r['ceiling_speedup']:.2f}x" if r.get("ceiling_speedup") else "-", f"{sp['median'] / 2:.0%}",
                      f"{r['comm_share']['median']:.0%}"])
        if r.get("target_met") is not None:
            targets.append(_threshold(f"TP=2 speedup >= 1.6x at hidden {r['hidden']} (the largest run)", _r(sp), sp,
                                      1.6, higher_is_better=True))
    return headers, cells, rows, targets


def summarise_zero(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["preset", "variant", "measured MiB", "formula MiB", "at formula", "step time vs ddp"]
    rows, cells, targets = [], [], []
    for r in data["summary"]:
        vs = r.get("vs_ddp_stats")
        rows.append({k: r.get(k) for k in ("preset", "variant", "total", "formula", "at_formula")} | {"vs_ddp": vs})
        cells.append([r["preset"], r["variant"], f"{r['total'] / 2**20:.3f}",
                      "-" if r["formula"] is None else f"{r['formula'] / 2**20:.3f}",
                      {True: "yes", False: "NO", None: "- (no formula)"}[r["at_formula"]], _r(vs)])
    native = [r for r in data["summary"] if r["at_formula"] is not None]
    if native:
        exact = sum(bool(r["at_formula"]) for r in native)
        targets.append(_target("ZeRO: native stages' bytes exactly at the formula",
                               f"{exact} of {len(native)} variants", exact == len(native)))
    for r in data["summary"]:
        if r["variant"] in ("zero1", "zero2") and r.get("vs_ddp_stats"):
            targets.append(_threshold(f"ZeRO {r['preset']} {r['variant']}: step time within 15% of DDP",
                                      _r(r["vs_ddp_stats"]), r["vs_ddp_stats"], 1.15, higher_is_better=False))
    return headers, cells, rows, targets


def summarise_activation_checkpointing(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["mode", "preset", "policy", "activation MiB (on device)", "saving vs none", "step-time overhead"]
    rows, cells, targets = [], [], []
    for r in data["summary"]:
        over = r.get("overhead_stats") or {k: r["overhead"] for k in ("median", "min", "max")} | {"n": 1}
        mode = r.get("mode", "eager")
        rows.append({"mode": mode, "preset": r["preset"], "policy": r["policy"],
                     "activation_bytes_on_device": r["activation_bytes_on_device"], "saving": r["saving"], "overhead": over})
        cells.append([mode, r["preset"], r["policy"], f"{r['activation_bytes_on_device'] / 2**20:.2f}", f"{r['saving']:.0%}",
                      _pct(over)])
        if r["target"] is not None:
            saving, max_over = r["target"]
            name = f"AC {mode} {r['preset']} {r['policy']}: saves >= {saving:.0%} at <= {max_over:.0%} overhead"
            measured = f"saves {r['saving']:.0%}, overhead {_pct(over)}"
            if r["saving"] < saving:  # bytes are exact: not met whatever the timing says
                targets.append(_target(name, measured, False))
            else:
                targets.append(_threshold(name, measured, over, max_over, higher_is_better=False))
    return headers, cells, rows, targets


def summarise_profiler(data: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    names = {"off": "none", "default": "ScaleProfiler()", "every_step": "ScaleProfiler(log_every_n_steps=1)",
             "memory": "MemoryAccountant()", "cost": "CostReporter()"}
    headers = ["variant", "callback", "step-time overhead", "one-off ms"]
    rows, cells, targets = [], [], []
    for r in data["summary"]:
        over = r.get("overhead_stats") or {k: r["overhead"] for k in ("median", "min", "max")} | {"n": 1}
        one_off = r.get("one_off_s")
        rows.append({"variant": r["variant"], "overhead": over, "one_off_s": one_off})
        cells.append([r["variant"], names.get(r["variant"], r["variant"]), _pct(over),
                      "-" if not one_off else f"{1e3 * one_off['median']:+.0f}"])
        if r["target_met"] is not None:
            targets.append(_threshold("ScaleProfiler default settings: overhead <= 3%", _pct(over), over, 0.03,
                                      higher_is_better=False))
    return headers, cells, rows, targets


def summarise_planner(peers: dict) -> tuple[list[str], list[list[str]], list[dict], list[dict]]:
    headers = ["variant", "ranks", "model states: predicted = measured", "activations predicted / measured"]
    rows, cells = [], []
    by_variant: dict[str, list[dict]] = {}
    for r in peers.get("planner", []):
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, ranks in by_variant.items():
        exact = sum(r["model_states_exact"] for r in ranks)
        ratios = [r["activations_ratio"] for r in ranks if r["activations_ratio"] is not None]
        act = (f"{min(ratios):.3f}-{max(ratios):.3f}" if len(set(ratios)) > 1 else f"{ratios[0]:.3f}") if ratios else \
            "- (not measured)"
        rows.append({"variant": variant, "ranks": len(ranks), "model_states_exact_ranks": exact,
                     "activation_ratios": ratios, "per_rank": ranks})
        cells.append([variant, str(len(ranks)), f"{exact} of {len(ranks)} ranks", act])
    targets = []
    if rows:
        all_ranks = [r for row in rows for r in row["per_rank"]]
        exact = sum(r["model_states_exact"] for r in all_ranks)
        targets.append(_target("planner: model states to the byte (docs/planner.md)",
                               f"{exact} of {len(all_ranks)} ranks", exact == len(all_ranks)))
        ratios = [x for row in rows for x in row["activation_ratios"]]
        if ratios:
            worst = max(abs(x - 1) for x in ratios)
            targets.append(_target("planner: fp32 activations within 15% of HeldActivationMeter (docs: exact without "
                                   "parallelism, within 15% under TP)", f"worst {worst:.1%} off", worst <= 0.15))
    return headers, cells, rows, targets


SUMMARISE: dict[str, Callable[[dict], Any]] = {
    "peers": summarise_peers, "pipeline": summarise_pipeline, "tensor_parallel": summarise_tensor_parallel,
    "zero": summarise_zero, "activation_checkpointing": summarise_activation_checkpointing,
    "profiler": summarise_profiler,
}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="smallest configuration of every section (checks rows, not speed)")
    p.add_argument("--full-matrix", action="store_true", help="every script's own full configuration (hours)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="what to run (default: all)")
    p.add_argument("--out-dir", help="where the sections' JSON and markdown go (default benchmarks/results/run_all, "
                                     "run_all_smoke with --smoke, run_all_full_matrix with --full-matrix)")
    p.add_argument("--json", help="the combined JSON (default <out-dir>/run_all.json); its .md goes next to it")
    p.add_argument("--reuse", action="store_true", help="summarise a section's existing <out-dir>/<section>.json "
                                                         "instead of running it (runs it when missing)")
    p.add_argument("--repeats", type=int, help="passed on to every section (default: each script's own)")
    p.add_argument("--retries", type=int, help="passed on: re-runs of a polluted run")
    p.add_argument("--retry-wait", type=float, help="passed on: seconds before a re-run")
    p.add_argument("--max-foreign", type=float, help="passed on: cores other processes may use before a re-run")
    p.add_argument("--max-load", type=float, help="passed on: load average regarded as idle")
    p.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this many seconds for an idle machine first")
    p.add_argument("--timeout", type=float, help="passed on: seconds per run before the harness kills it")
    args = p.parse_args(argv)
    default_dir = "run_all_smoke" if args.smoke else "run_all_full_matrix" if args.full_matrix else "run_all"
    out_dir = Path(args.out_dir) if args.out_dir else Path("benchmarks/results") / default_dir
    args.out_dir = common.output_path(str(out_dir / "x.json")).parent
    args.json = str(common.output_path(args.json or str(args.out_dir / "run_all.json")))
    return args


def section_argv(section: str, args: argparse.Namespace) -> list[str]:
    argv = list(SMOKE_ARGS[section]) if args.smoke else [] if args.full_matrix else list(STANDARD_ARGS[section])
    argv += ["--json", str(args.out_dir / f"{section}.json")]
    for name in PASSED_ON:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _print_table(console: Any, title: str, headers: list[str], cells: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def _markdown(title: str, headers: list[str], cells: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    console = common.console()
    idle = argparse.Namespace(max_load=0.5 if args.max_load is None else args.max_load, wait_idle=args.wait_idle)
    load_before, waited = common.wait_for_idle(idle, console)
    env = common.environment(load_before, waited)
    t_start = time.perf_counter()
    sections: dict[str, dict] = {}
    failed = False
    for section in args.sections:
        path = args.out_dir / f"{section}.json"
        entry: dict[str, Any] = {"json": str(path)}
        if args.reuse and path.is_file():
            entry["status"] = "reused"
        else:
            sub_argv = section_argv(section, args)
            entry["argv"] = sub_argv
            console.rule(f"[bold]{section}[/]: python benchmarks/{section}.py {' '.join(sub_argv)}")
            t0 = time.perf_counter()
            try:
                code = _load_main(section)(sub_argv)
                entry["status"] = "ran" if code == 0 else f"exit code {code}"
            except BaseException as err:  # noqa: BLE001 - report it, run the other sections
                if isinstance(err, KeyboardInterrupt):
                    raise
                entry["status"] = "failed"
                entry["error"] = "".join(traceback.format_exception(err))[-4000:]
                console.print(f"[red]{section} failed:[/] {type(err).__name__}: {err}")
            entry["wall_s"] = time.perf_counter() - t0
        sections[section] = entry
    env["wall_s"] = time.perf_counter() - t_start
    env["load_after"] = common.loadavg()

    targets: list[dict] = []
    markdown = [f"Command: `{env['command']}`; {env['date']}; CPU: {env['cpu_model']} ({env['nproc']} cores); torch "
                f"{env['torch']}; 1 thread per rank; load average before {env['load_before']}, after "
                f"{env['load_after']}; wall time {env['wall_s']:.0f} s.", ""]
    console.rule("[bold]combined summary[/]")
    data_of: dict[str, dict] = {}
    for section, entry in sections.items():
        path = Path(entry["json"])
        if entry["status"] not in ("ran", "reused") or not path.is_file():
            failed = True
            entry.setdefault("status", "missing")
            continue
        data = json.loads(path.read_text())
        data_of[section] = data
        headers, cells, rows, section_targets = SUMMARISE[section](data)
        entry.update(rows=rows, targets=section_targets, config=data.get("config"),
                     environment=data.get("environment"), notes=data.get("notes"))
        targets += section_targets
        _print_table(console, TITLES[section], headers, cells)
        markdown.append(_markdown(TITLES[section], headers, cells))
        measured = data.get("environment") or {}
        markdown.append(f"Measured by `{measured.get('command')}` ({entry['status']} here) on {measured.get('date')}; "
                        f"section wall time {measured.get('wall_s', 0):.0f} s; load average before "
                        f"{measured.get('load_before')}; runs re-run because other processes used the CPU: "
                        f"{measured.get('reruns')}.\n")
        if data.get("notes"):
            markdown.append("Notes: " + "; ".join(data["notes"]) + ".\n")
    if "peers" in data_of:
        headers, cells, rows, planner_targets = summarise_planner(data_of["peers"])
        sections["planner"] = {"status": "derived from peers", "rows": rows, "targets": planner_targets}
        targets += planner_targets
        _print_table(console, TITLES["planner"], headers, cells)
        markdown.append(_markdown(TITLES["planner"], headers, cells))
    t_cells = [[t["target"], t["measured"], _verdict(t)] for t in targets]
    _print_table(console, "Targets", ["target", "measured (median, min-max)", "verdict"], t_cells)
    markdown.append(_markdown("Targets", ["target", "measured (median, min-max)", "verdict"], t_cells))
    bad = [s for s, e in sections.items() if e["status"] not in ("ran", "reused", "derived from peers")]
    if bad:
        listed = ", ".join(f"{s} ({sections[s]['status']})" for s in bad)
        console.print(f"[red]sections not summarised: {listed}[/]")
    json_path = Path(args.json)
    json_path.write_text(json.dumps({"mode": "smoke" if args.smoke else "full-matrix" if args.full_matrix else "standard", "environment": env,
                                     "sections": sections, "targets": targets}, indent=1, default=str))
    json_path.with_suffix(".md").write_text("\n".join(markdown))
    console.print(f"wall time {env['wall_s']:.0f} s; wrote {json_path}, {json_path.with_suffix('.md')}")
    return 1 if (failed or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
