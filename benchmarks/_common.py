"""What the benchmark scripts share: machine-load accounting, the idle guard, re-runs of polluted
runs, the environment record. Stdlib + torch only; the rank functions live in each script."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat; steal counts as busy)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Window:
    """Wall time, this process's CPU time and the machine's busy CPU time over the timed steps."""

    def start(self) -> None:
        self.wall0, self.cpu0, self.machine0 = time.perf_counter(), time.process_time(), machine_busy_s()

    def stop(self) -> dict:
        return {
            "wall_s": time.perf_counter() - self.wall0,
            "own_cpu_s": time.process_time() - self.cpu0,
            "machine_busy_s": machine_busy_s() - self.machine0,
        }


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return " ".join(["python", shown, *sys.argv[1:]])


def apply_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Fill the options left unset (None) from the full or ``--quick`` defaults."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def output_path(json_arg: str) -> Path:
    """The JSON output path (relative paths are taken from the repository root); its folder exists."""
    path = Path(json_arg)
    if not path.is_absolute():
        path = REPO / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def console() -> Any:
    """A rich console (170 columns when not on a terminal, so logs keep the tables whole)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 170)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The idle-guard options every benchmark takes."""
    p.add_argument("--max-load", type=float, default=0.5, help="1-minute load average regarded as idle (default 0.5)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before measuring, wait up to this many seconds for the load to drop below --max-load (default 0)")
    p.add_argument("--max-foreign", type=float, default=0.1,
                   help="cores other processes may use during a run's timed steps before it is re-run (default 0.1)")
    p.add_argument("--retries", type=int, help="re-runs of a polluted run (default 3; 0 with --quick)")
    p.add_argument("--retry-wait", type=float, default=30.0, help="seconds to wait before a re-run (default 30)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before the harness kills it")


def wait_for_idle(args: argparse.Namespace, console: Any) -> tuple[list[float], float]:
    """Wait up to ``--wait-idle`` s for load < ``--max-load``; returns (load, seconds waited)."""
    waited = 0.0
    while loadavg() and loadavg()[0] > args.max_load and waited < args.wait_idle:
        console.print(f"load average {loadavg()} > {args.max_load}: waiting 60 s ({waited:.0f}/{args.wait_idle:.0f} s)")
        time.sleep(60)
        waited += 60
    load = loadavg()
    if load and load[0] > args.max_load:
        console.print(f"[yellow]warning: load average {load} is above {args.max_load}; other work on the "
                      f"machine shares the cores and pollutes the timings[/]")
    return load, waited


def environment(load_before: list[float], waited: float) -> dict:
    return {
        "command": command_line(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads_per_rank": 1,
        "load_before": load_before,
        "waited_for_idle_s": waited,
    }


def foreign_cores(results: list[dict]) -> float:
    """Cores used by other processes during a run's timed steps: machine busy - our ranks' CPU, / wall.

    Taken over rank 0's window; the ranks' windows start together (barrier) and end within a step.
    """
    w0 = results[0]["window"]
    own = sum(r["window"]["own_cpu_s"] for r in results)
    return max(0.0, (w0["machine_busy_s"] - own) / w0["wall_s"])


def measure(args: argparse.Namespace, console: Any, label: str, launch: Callable[[], list[dict]]) -> dict:
    """Run ``launch()`` (-> per-rank results); retry while other processes polluted its timed steps.

    A run during which other processes used more than ``--max-foreign`` cores is re-run after
    ``--retry-wait`` s, up to ``--retries`` times; the cleanest attempt is kept, every attempt's
    pollution is recorded, and the result says whether the kept run is still polluted
    (``polluted``) for the script's table to show.
    """
    attempts = []
    for attempt in range(args.retries + 1):
        results = launch()
        foreign = foreign_cores(results)
        attempts.append((foreign, results))
        if foreign <= args.max_foreign:
            break
        if attempt < args.retries:
            console.print(f"    {label}: other processes used {foreign:.2f} cores during the timed steps; "
                          f"retrying in {args.retry_wait:.0f} s (load {loadavg()})")
            time.sleep(args.retry_wait)
    foreign, results = min(attempts, key=lambda a: a[0])
    return {"results": results, "foreign_cores": foreign, "polluted": foreign > args.max_foreign,
            "attempts_foreign_cores": [a[0] for a in attempts]}


def start(args: argparse.Namespace) -> tuple[Any, Path, dict]:
    """What every benchmark's ``main`` does first: a console, quiet harness output, the output
    path, the idle guard, the harness's fork server (its default preload includes the suite's
    modules) and the environment record. Returns (console, json path, environment)."""
    from lightning_scale.testing import multiprocess as mp_harness

    out = console()
    mp_harness.SETTINGS.forward_output = False
    path = output_path(args.json)
    load_before, waited = wait_for_idle(args, out)
    mp_harness.warm_up()  # start the forkserver before anything is timed
    return out, path, environment(load_before, waited)


def stats(values: list[float]) -> dict:
    """Median, min, max and count of a figure's repeats."""
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratio(numerator: list[dict], denominator: list[dict], key: str = "step_s") -> dict | None:
    """Stats of ``numerator[key] / denominator[key]`` taken within each repeat (runs carry
    ``"repeat"``): repeats loop over the whole matrix, so both sides of a ratio ran close together
    in time (the load can still change between them: the min-max shows how much). None when no
    repeat has both."""
    den = {r["repeat"]: r[key] for r in denominator}
    ratios = [r[key] / den[r["repeat"]] for r in numerator if r["repeat"] in den]
    return stats(ratios) if ratios else None


def markdown_table(caption: str, headers: list[str], rows: list[list[str]], env: dict) -> str:
    """A benchmark's markdown output: caption, table, and the command and machine that produced it."""
    lines = [caption, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", f"Command: `{env['command']}`; CPU: {env['cpu_model']} ({env['nproc']} cores); torch {env['torch']}; "
                  f"load before {env['load_before']}, re-runs of polluted runs: {env['reruns']}."]
    return "\n".join(lines)


def add_run_arguments(p: argparse.ArgumentParser, defaults: dict[str, Any], batch_help: str, quick_help: str) -> None:
    """The run-shape options most benchmarks take; help texts show the full run's ``defaults``."""
    p.add_argument("--batch", type=int, help=f"{batch_help} (default {defaults['batch']})")
    p.add_argument("--seq", type=int, help=f"tokens per sequence (default {defaults['seq']})")
    p.add_argument("--steps", type=int, help=f"timed steps per run (default {defaults['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps before them (default {defaults['warmup']})")
    p.add_argument("--repeats", type=int, help=f"runs per figure; the figure is their median (default {defaults['repeats']})")
    p.add_argument("--json", help=f"output JSON (default {defaults['json']}); the .md table goes next to it")
    p.add_argument("--quick", action="store_true", help=f"smoke configuration ({quick_help})")


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, min_warmup: int = 0) -> None:
    """Reject run shapes that cannot be measured (after :func:`apply_defaults`)."""
    if min(args.batch, args.seq, args.steps, args.repeats) < 1 or args.warmup < min_warmup:
        p.error(f"--batch, --seq, --steps, --repeats must be >= 1 and --warmup >= {min_warmup}")


def write_outputs(console: Any, json_path: Path, title: str, headers: list[str], cells: list[list[str]],
                  caption: str, payload: dict[str, Any], env: dict) -> Path:
    """Print the summary as a rich table, write it as markdown next to the JSON, and the JSON
    ``payload``; returns the markdown path."""
    import json

    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown_table(caption, headers, cells, env) + "\n")
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    console.print(f"wall time {env['wall_s']:.0f} s; wrote {json_path}, {md_path}")
    return md_path



def fsdp2_task_class() -> type:
    """The suite's LanguageModelingTask for Lightning's ``ModelParallelStrategy``: FSDP2
    (``fully_shard``) on every block, then on the network, over the ``data_parallel`` mesh dim."""
    from lightning_scale.tasks import LanguageModelingTask

    class FSDP2Task(LanguageModelingTask):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks.values():
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    return FSDP2Task
