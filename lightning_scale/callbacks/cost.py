"""``CostReporter``: what a run costs in dollars, and what it would cost on other GPUs and clouds.

**The rate** (USD per device-hour) comes from, in order:

1. ``rate_per_gpu_hour=`` (works for any device, CPU included);
2. the price table (:mod:`lightning_scale.core.prices`, a cleaned copy of a public table; the
   date of its prices is printed in every report) for ``gpu=`` or, on CUDA, the detected device
   (exact ``torch.cuda.get_device_name()`` match, :mod:`lightning_scale.core.peak_flops`), with
   ``cloud=`` the cheapest offer of that cloud, without it the **median** per-GPU offer over the
   table's clouds (the range is reported too). ``spot=True`` uses spot prices. Rates can be
   overridden or added with ``prices=`` (a YAML/JSON file or a list of rows) or the
   ``LIGHTNING_SCALE_GPU_PRICES`` environment variable.

Without a rate (a CPU run without ``rate_per_gpu_hour``, a GPU missing from the table) no dollars
are reported: one warning says how to give a rate.

**Accounting.** Devices = ``trainer.world_size`` (every process of every node drives one device).
Cost = rate x devices x wall time since the start of training (validation and checkpointing
included: the machines are paid for while they run). The cumulative figures are stored in the
checkpoint (``state_dict``) and continue after a resume, also with another device count or rate
(each part of the run is kept as a segment).

Metrics (rank 0, to every Lightning logger, every ``log_every_n_steps`` optimizer steps; USD):

==========================  ===================================================================
``cost/usd_total``          cumulative cost of the run so far (all segments)
``cost/usd_per_step``       rate x devices x mean wall time of the optimizer steps since the last log
``cost/usd_projected_run``  ``usd_total`` + remaining optimizer steps (max_steps or the epochs' steps) x ``usd_per_step``
``cost/gpu_hours``          cumulative device-hours
``cost/usd_epoch``          at the end of each training epoch: what that epoch cost
==========================  ===================================================================

**Projection** (end of fit, rank 0): the run's total model FLOPs (per step: ``flops_per_step=``,
else :class:`ScaleProfiler`'s ``perf/model_flops_per_step``, else the analytic count of the
suite's GPT, 6N + 12LHQT per token) at an MFU (``assumed_mfu=``, else the profiler's measured
``perf/mfu``; when neither exists the projection is omitted with a warning, never guessed) on
``projection_gpus`` devices (default: this run's count) of every GPU type and cloud in the table:
hours, dollars, and whether the run fits in that GPU's memory (the memory planner, for the
suite's GPT and strategies). A rich table sorted by cost, ``cost_projection.png`` and
``cost_report.json`` go to the run directory. See ``docs/callbacks/cost.md`` for the assumptions.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._pytree import tree_map

from lightning_scale.core.cost import Projection, dollars, project_across
from lightning_scale.core import device as dev
from lightning_scale.core.peak_flops import known_devices, lookup, precision_key
from lightning_scale.core.prices import STALE_MONTHS, TABLE_DATE, PriceTable, load_price_table, months_old

PNG_NAME = "cost_projection.png"
JSON_NAME = "cost_report.json"


class CostReporter(Callback):
    """Dollars per step, per epoch, per run, and the same run on other GPUs and clouds.

    Args:
        rate_per_gpu_hour: USD per device-hour; overrides the table (needed on CPU).
        gpu: the table's GPU name (e.g. ``"A100"``, ``"H100 SXM"``) when not detected (a device name
            the peak-FLOPs table lacks: the warning names it and lists the table's names), or to
            price a CPU rehearsal as if on that GPU.
        gpu_memory_gb: which memory size of ``gpu`` (e.g. 40 or 80 for the A100).
        cloud: take the rate of this cloud's cheapest offer (default: median over the clouds).
        spot: use spot prices.
        prices: overrides / additions to the price table (path or list of rows).
        assumed_mfu: MFU in (0, 1] for the projection when none is measured.
        flops_per_step: model FLOPs per optimizer step (global), for the projection.
        projection_gpus: device count of the projection (default: this run's).
        log_every_n_steps: how often to log the cost metrics.
        print_table: print the cost summary and the projection at the end of fit (rank 0).
        plot: write ``cost_projection.png``.
        top: rows of the projection table and bars of the chart.
    """

    def __init__(
        self,
        rate_per_gpu_hour: float | None = None,
        gpu: str | None = None,
        gpu_memory_gb: float | None = None,
        cloud: str | None = None,
        spot: bool = False,
        prices: str | list | None = None,
        assumed_mfu: float | None = None,
        flops_per_step: float | None = None,
        projection_gpus: int | None = None,
        log_every_n_steps: int = 10,
        print_table: bool = True,
        plot: bool = True,
        top: int = 15,
    ) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if rate_per_gpu_hour is not None and not (number(rate_per_gpu_hour) and rate_per_gpu_hour >= 0):
            raise ValueError(f"rate_per_gpu_hour must be a number >= 0 (USD per device-hour); got {rate_per_gpu_hour!r}")
        if assumed_mfu is not None and not (number(assumed_mfu) and 0 < assumed_mfu <= 1):
            raise ValueError(f"assumed_mfu must be in (0, 1], e.g. 0.4 for 40% MFU; got {assumed_mfu!r}")
        if flops_per_step is not None and not (number(flops_per_step) and flops_per_step > 0):
            raise ValueError(f"flops_per_step must be a number > 0 (model FLOPs per optimizer step); got {flops_per_step!r}")
        if gpu is not None and (not isinstance(gpu, str) or not gpu.strip()):
            raise ValueError(f"gpu must be a GPU name of the price table (e.g. 'A100', 'H100 SXM') or None; got {gpu!r}")
        if gpu_memory_gb is not None and not (number(gpu_memory_gb) and gpu_memory_gb > 0):
            raise ValueError(f"gpu_memory_gb must be a number > 0 (GB per GPU, e.g. 40 or 80 for the A100) or None; "
                             f"got {gpu_memory_gb!r}")
        if cloud is not None and (not isinstance(cloud, str) or not cloud.strip()):
            raise ValueError(f"cloud must be a cloud name of the price table (e.g. 'AWS') or None; got {cloud!r}")
        if not isinstance(spot, bool):
            raise ValueError(f"spot must be True or False; got {spot!r}")
        if projection_gpus is not None and (not isinstance(projection_gpus, int) or projection_gpus < 1):
            raise ValueError(f"projection_gpus must be a positive integer; got {projection_gpus!r}")
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer; got {log_every_n_steps!r}")
        if not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer; got {top!r}")
        self.rate_per_gpu_hour = rate_per_gpu_hour
        self.gpu, self.gpu_memory_gb, self.cloud, self.spot = gpu, gpu_memory_gb, cloud, spot
        self.assumed_mfu, self.flops_per_step, self.projection_gpus = assumed_mfu, flops_per_step, projection_gpus
        self.log_every_n_steps, self.print_table, self.plot, self.top = log_every_n_steps, print_table, plot, top
        self.table: PriceTable = load_price_table(prices)  # validates overrides now, on every rank
        if gpu is not None and not self.table.rates(gpu) and lookup(gpu) is None:
            known = sorted({name for name, _ in self.table.gpus()})
            raise ValueError(f"gpu={gpu!r} is neither in the price table nor in the peak-FLOPs table; use one of {known}, "
                             f"or add a row for it with prices=[{{cloud: ..., gpu: {gpu!r}, memory_gb: ..., "
                             f"on_demand_per_gpu_hour: ...}}]")
        # Resolved at train start.
        self.rate: float | None = None
        self.rate_note = ""
        self.devices = 0
        # Cumulative over the segments before this one (restored from a checkpoint).
        self._prior = {"usd": 0.0, "seconds": 0.0, "gpu_hours": 0.0}
        self.segments: list[dict[str, Any]] = []
        self._t0: float | None = None
        self._t_end: float | None = None
        self._last_log: tuple[float, int] | None = None
        self._epoch_start_usd = 0.0
        self._usd_per_step: float | None = None
        self._analytic_flops: float | None = None
        self._batch: Any = None
        self._run_dir: Path | None = None
        self.projections: list[Projection] = []
        self.png_path: Path | None = None
        self.report: dict[str, Any] = {}

    # -- rate -------------------------------------------------------------------------------------
    def _resolve_rate(self, trainer) -> None:
        self.devices = trainer.world_size
        if self.rate_per_gpu_hour is not None:
            self.rate, self.rate_note = float(self.rate_per_gpu_hour), "user rate"
            return
        gpu, memory = self.gpu, self.gpu_memory_gb
        device = trainer.strategy.root_device
        if gpu is None and dev.is_cuda(device):
            name = torch.cuda.get_device_name(device)
            row = lookup(name)
            if row is None:
                if trainer.is_global_zero:
                    known = sorted(set(known_devices()) | {g for g, _ in self.table.gpus()})
                    warnings.warn(f"CostReporter: dollars are not reported: torch.cuda.get_device_name() reports "
                                  f"{name!r}, which is not in the peak-FLOPs table (exact names only). Name the GPU "
                                  f"with CostReporter(gpu=<name>) (and gpu_memory_gb= where it comes in several "
                                  f"sizes), one of {known}, or give CostReporter(rate_per_gpu_hour=<USD per "
                                  f"device-hour>); for the projection's MFU, ScaleProfiler(device=<name>).", stacklevel=2)
                return
            gpu = row.device
            total_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
            memory = min(row.memory_gb, key=lambda m: abs(m - total_gb)) if memory is None else memory
        if gpu is None:
            warnings.warn(f"CostReporter: running on {device.type} without a rate: dollars are not reported. Give "
                          f"CostReporter(rate_per_gpu_hour=<USD per device-hour>) (e.g. your instance's hourly price "
                          f"/ processes), or gpu=<a GPU of the price table> to price the run as if on that GPU.",
                          stacklevel=2)
            return
        offers = self.table.rates(gpu, memory_gb=memory, cloud=self.cloud, spot=self.spot)
        kind = "spot" if self.spot else "on-demand"
        if not offers:
            where = f" on {self.cloud}" if self.cloud else ""
            warnings.warn(f"CostReporter: no {kind} price for {gpu}{f' {memory:g} GB' if memory else ''}{where} in the price "
                          f"table ({self.table.source}, prices of {self.table.date}): dollars are not reported. Give "
                          f"rate_per_gpu_hour= or add a row with prices=.", stacklevel=2)
            return
        rates = [o.price(self.spot) for o in offers]
        if self.cloud:
            self.rate = rates[0]
            used = offers[:1]
            self.rate_note = (f"{gpu} {kind}, cheapest {self.cloud} offer ({offers[0].instance or offers[0].gpus} GPUs), "
                              f"price of {offers[0].date}")
        else:
            self.rate = float(statistics.median(rates))
            used = offers
            dates = sorted({o.date for o in offers})
            self.rate_note = (f"{gpu} {kind}, median of {len(rates)} offers (${min(rates):.2f}-${max(rates):.2f}), "
                              f"prices of {', '.join(dates)}")
        stale = [o for o in used if months_old(o.date) > STALE_MONTHS]
        named = f"{gpu} ({memory:g} GB)" if memory else gpu
        if stale and trainer.is_global_zero:
            oldest = min(o.date for o in stale)
            warnings.warn(
                f"CostReporter: {len(stale)} of the {len(used)} price(s) behind this run's rate ({gpu}) are more than "
                f"{STALE_MONTHS} months old (oldest {oldest}, {months_old(oldest):.0f} months before this run); GPU "
                f"prices have fallen since (an H100 went from over $7 to about $3 per GPU-hour between early 2024 and "
                f"mid 2026). Give your rate: CostReporter(prices={{{named!r}: <USD per GPU-hour>}}), a CSV/YAML file with "
                f"prices=, or `lightning-scale fit ... --gpu-rates '{named}=<USD>'` (LIGHTNING_SCALE_GPU_RATES)",
                stacklevel=2)

    # -- Lightning hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._resolve_rate(trainer)
        # log_dir may be a collective under some strategies: every rank resolves it here.
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir or ".")
        self._t0, self._t_end = time.perf_counter(), None
        self._last_log = (self._t0, trainer.global_step)
        self._epoch_start_usd = self._prior["usd"]
        self.segments.append({"devices": self.devices, "rate_per_gpu_hour": self.rate, "rate_note": self.rate_note,
                              "seconds": 0.0, "usd": 0.0, "start_step": trainer.global_step})

    def _segment_seconds(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._t_end if self._t_end is not None else time.perf_counter()) - self._t0

    def _update_segment(self) -> None:
        if not self.segments or self._t0 is None:
            return
        seg = self.segments[-1]
        seg["seconds"] = self._segment_seconds()
        seg["usd"] = dollars(self.rate, self.devices, seg["seconds"]) if self.rate is not None else 0.0

    def totals(self) -> dict[str, float]:
        """Cumulative USD, wall seconds and device-hours of the whole run so far (all segments)."""
        self._update_segment()
        seg = self.segments[-1] if self.segments and self._t0 is not None else None
        seconds = seg["seconds"] if seg else 0.0
        return {"usd": self._prior["usd"] + (seg["usd"] if seg else 0.0),
                "seconds": self._prior["seconds"] + seconds,
                "gpu_hours": self._prior["gpu_hours"] + self.devices * seconds / 3600.0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch is None:
            # Only the shapes matter (FLOPs, the planner's fit verdict): keep no device memory.
            self._batch = tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")
                                   if isinstance(t, torch.Tensor) else t, batch)
            self._analytic_flops = self._gpt_flops(trainer, pl_module, self._batch)
        step = trainer.global_step
        if self._last_log is None or step == self._last_log[1] or step % self.log_every_n_steps:
            return
        now = time.perf_counter()
        t_last, s_last = self._last_log
        self._last_log = (now, step)
        if self.rate is None:
            return
        self._usd_per_step = dollars(self.rate, self.devices, (now - t_last) / (step - s_last))
        totals = self.totals()
        row = {"cost/usd_total": totals["usd"], "cost/usd_per_step": self._usd_per_step,
               "cost/gpu_hours": totals["gpu_hours"]}
        total_steps = self._total_steps(trainer)
        if total_steps is not None:
            row["cost/usd_projected_run"] = totals["usd"] + max(0, total_steps - step) * self._usd_per_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(row, step=step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.rate is None:
            return
        usd = self.totals()["usd"]
        epoch_usd, self._epoch_start_usd = usd - self._epoch_start_usd, usd
        self.segments[-1].setdefault("epochs", []).append(epoch_usd)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"cost/usd_epoch": epoch_usd}, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._t_end = time.perf_counter()  # the clock stops with training (a later save stores this total)
        totals = self.totals()
        steps_done = trainer.global_step - self.segments[-1]["start_step"] if self.segments else 0
        seg_seconds = self.segments[-1]["seconds"] if self.segments else 0.0
        self.report = {
            "prices": {"source": self.table.source, "date": self.table.date},
            "devices": self.devices, "rate_per_gpu_hour": self.rate, "rate_note": self.rate_note,
            "usd_total": totals["usd"] if self.rate is not None else None, "seconds": totals["seconds"],
            "gpu_hours": totals["gpu_hours"], "global_step": trainer.global_step,
            "usd_per_step": (dollars(self.rate, self.devices, seg_seconds / steps_done)
                             if self.rate is not None and steps_done else None),
            "segments": self.segments,
        }
        total_steps = self._total_steps(trainer)
        if self.report["usd_per_step"] is not None and total_steps is not None:
            self.report["usd_projected_run"] = totals["usd"] + max(0, total_steps - trainer.global_step) * self.report["usd_per_step"]
        self.projections, skipped, why = self._project(trainer, pl_module, total_steps)
        self.report["projection"] = {"assumption": why, "skipped_no_peak": skipped,
                                     "rows": [asdict(p) for p in self.projections]}
        if not trainer.is_global_zero or self._run_dir is None:
            return
        self._run_dir.mkdir(parents=True, exist_ok=True)
        (self._run_dir / JSON_NAME).write_text(json.dumps(self.report, indent=1, default=str))
        if self.print_table:
            self._print(why, skipped)
        if self.plot and self.projections:
            self.png_path = self._plot(self._run_dir / PNG_NAME, why)

    # -- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        totals = self.totals()
        return {"usd": totals["usd"], "seconds": totals["seconds"], "gpu_hours": totals["gpu_hours"],
                "segments": [dict(s) for s in self.segments], "prices_date": self.table.date}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._prior = {k: float(state_dict[k]) for k in ("usd", "seconds", "gpu_hours")}
            self.segments = [dict(s) for s in state_dict.get("segments", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"CostReporter: the checkpoint's cost state is not readable ({err}); resume without "
                             f"CostReporter or start a new run") from None

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _total_steps(trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - an unknown length: no projection of the run's cost
            return None
        return int(total) if total != float("inf") else None

    @staticmethod
    def _gpt_flops(trainer, pl_module, batch) -> float | None:
        """Analytic model FLOPs of one optimizer step of the suite's GPT (global), or None."""
        from lightning_scale.core.flops import gpt_flops_per_token
        from lightning_scale.models.gpt import GPTConfig

        cfg = getattr(getattr(pl_module, "model", None), "config", None)
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(cfg, GPTConfig) or not torch.is_tensor(tokens) or tokens.dim() != 2:
            return None
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        replicas = int(kwargs.get("num_replicas", trainer.world_size))
        b, t = tokens.shape
        return gpt_flops_per_token(cfg, t) * b * t * replicas * trainer.accumulate_grad_batches

    def _profiler_row(self, trainer) -> dict[str, float]:
        from lightning_scale.callbacks.profiler import ScaleProfiler

        for cb in trainer.callbacks:
            if isinstance(cb, ScaleProfiler) and cb.history:
                return cb.history[-1]
        return {}

    def _project(self, trainer, pl_module, total_steps: int | None) -> tuple[list[Projection], list[str], str]:
        prof = self._profiler_row(trainer)
        flops = self.flops_per_step or prof.get("perf/model_flops_per_step") or self._analytic_flops
        if self.assumed_mfu is not None:
            mfu, source = self.assumed_mfu, f"assumed MFU {self.assumed_mfu:.0%} (given), the same on every GPU"
        elif "perf/mfu" in prof:
            mfu, source = prof["perf/mfu"], f"this run's measured MFU {prof['perf/mfu']:.1%}, assumed the same on every GPU"
        else:
            mfu, source = None, ""
        if flops is None or mfu is None or total_steps is None:
            missing = ("model FLOPs per step (give flops_per_step=, or add ScaleProfiler)" if flops is None else
                       f"an MFU (none measured on this device: give assumed_mfu=, e.g. 0.4"
                       f"{self._unknown_device_note(trainer)})" if mfu is None else
                       "the run's length (max_steps or max_epochs)")
            if trainer.is_global_zero:
                warnings.warn(f"CostReporter: the projection across GPUs is omitted: it needs {missing}.", stacklevel=2)
            return [], [], ""
        n = self.projection_gpus or self.devices
        dtype = precision_key(trainer.precision, torch.backends.cuda.matmul.allow_tf32)
        fits = self._fits_function(trainer, pl_module, n)
        rows, skipped = project_across(self.table, flops * total_steps, mfu, n, dtype, spot=self.spot, fits=fits)
        self._projection_mfu, self._projection_dtype = mfu, dtype
        why = (f"{flops * total_steps:.3e} model FLOPs ({total_steps} steps x {flops:.3e}) on {n} GPUs at {source}; "
               f"dense {dtype} peaks (this run's precision, {trainer.precision}); "
               f"{'spot' if self.spot else 'on-demand'} prices of {self.table.date}")
        return rows, skipped, why

    @staticmethod
    def _unknown_device_note(trainer) -> str:
        """Why a CUDA run measured no MFU when its device name is not in the peak-FLOPs table ("" otherwise)."""
        from lightning_scale.callbacks.profiler import ScaleProfiler

        device = trainer.strategy.root_device
        if not dev.is_cuda(device) or any(isinstance(cb, ScaleProfiler) and (cb.device or cb.peak_tflops)
                                        for cb in trainer.callbacks):
            return ""
        name = torch.cuda.get_device_name(device)
        if lookup(name) is not None:
            return ""
        return (f"; or name the device for ScaleProfiler's MFU: torch.cuda.get_device_name() reports {name!r}, which "
                f"is not in the peak-FLOPs table (exact names only): ScaleProfiler(device=<name>), one of "
                f"{list(known_devices())}")

    def _fits_function(self, trainer, pl_module, n: int):
        from lightning_scale.callbacks._run_layout import plan_inputs
        from lightning_scale.core.planner import Hardware, plan_memory

        try:
            inputs = plan_inputs(trainer, pl_module, self._batch) if self._batch is not None else None
        except Exception:  # noqa: BLE001 - no verdict rather than a failed report
            inputs = None
        if inputs is None:
            return None
        model, workload, layout, _ = inputs
        # The same global batch on n devices; when it does not divide, each device takes the larger share.
        dp = max(1, n // (layout.tp * layout.pp))
        workload = replace(workload, batch_size=math.ceil(workload.batch_size / dp) * dp)
        cache: dict[float, bool | None] = {}

        def fits(memory_gb: float) -> bool | None:
            if memory_gb not in cache:
                try:
                    cache[memory_gb] = plan_memory(model, workload, layout, Hardware(gpus=n, memory_gb=memory_gb)).fits
                except ValueError:  # the layout does not divide onto n devices
                    cache[memory_gb] = None
            return cache[memory_gb]

        return fits

    def _print(self, why: str, skipped: list[str]) -> None:
        from rich.console import Console
        from rich.table import Table

        r = self.report
        console = Console(width=150)
        summary = Table(title=f"CostReporter: this run (prices: {self.table.source}; prices of {self.table.date})")
        for col in ("devices", "rate $/device-h", "wall h", "device-h", "$ so far", "$ per step", "$ projected run"):
            summary.add_column(col, justify="right")
        fmt = lambda x, d=2: "-" if x is None else f"{x:,.{d}f}"  # noqa: E731
        summary.add_row(str(r["devices"]), fmt(r["rate_per_gpu_hour"], 3), fmt(r["seconds"] / 3600, 4),
                        fmt(r["gpu_hours"], 4), fmt(r["usd_total"], 4), fmt(r["usd_per_step"], 6),
                        fmt(r.get("usd_projected_run"), 4))
        console.print(summary)
        if r["rate_note"]:
            console.print(f"rate: {r['rate_note']}")
        if not self.projections:
            return
        table = Table(title="the same run on other GPUs and clouds (cheapest first)", caption=why)
        for col in ("gpu", "GB", "cloud", "instance", "$/GPU-h", "price of", "hours", "$ run", "fits"):
            table.add_column(col, justify="left" if col in ("gpu", "cloud", "instance", "price of") else "right")
        for p in self.projections[: self.top]:
            table.add_row(p.gpu, f"{p.memory_gb:g}", p.cloud, p.instance or "", f"{p.rate_per_gpu_hour:.2f}",
                          p.rate_date, f"{p.hours:,.3g}", format_usd(p.dollars), FIT_LABELS[p.fits])
        console.print(table)
        for line in projection_notes(self.projections, skipped, self._projection_dtype, self.top):
            console.print(line)

    def _plot(self, path: Path, why: str) -> Path:
        return plot_projection(self.projections[: self.top], path, mfu=self._projection_mfu,
                               dtype=self._projection_dtype, prices_date=self.table.date)


#: How the table and the plot name the memory planner's verdict for a GPU.
FIT_LABELS: dict[bool | None, str] = {True: "yes", False: "NO", None: "unknown"}
_FIT_COLORS: dict[bool | None, str] = {True: "#4c72b0", False: "#c44e52", None: "#9a9a9a"}
_FIT_LEGEND: dict[bool | None, str] = {True: "fits (memory planner)", False: "does not fit (memory planner)",
                                        None: "fit unknown (no planner model for this module)"}


def format_usd(value: float) -> str:
    """Dollars with the digits a reader needs: $1,234, $12.3, $0.0421, $3.1e-05."""
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 0.01:
        return f"${value:.3g}"
    return f"${value:.2g}" if value >= 1e-4 else f"${value:.1e}"


def projection_notes(projections: list, skipped: list[str], dtype: str, top: int | None = None) -> list[str]:
    """What the projection table leaves out or rests on, in words."""
    notes = []
    shown = projections[:top] if top else projections
    old = [p for p in shown if p.rate_date and months_old(p.rate_date) > STALE_MONTHS]
    if old:
        notes.append(f"{len(old)} of the {len(shown)} rows shown are priced from lists more than {STALE_MONTHS} "
                     f"months old (FSDL table of {TABLE_DATE}): their ranking against 2026 prices can be wrong; "
                     f"give your rates with prices= or LIGHTNING_SCALE_GPU_RATES")
    if projections and all(p.fits is None for p in projections):
        notes.append("fits: unknown for every GPU: the memory planner has no model of this module (it knows the "
                     "suite's GPT/ViT/ResNet); check memory with MemoryAccountant or lightning-scale plan")
    if skipped:
        notes.append(f"not projected (no dense {dtype} peak in the peak-FLOPs table for this precision): "
                     f"{', '.join(skipped)}")
    return notes


def legend_entries(rows: list) -> list[tuple[str, str]]:
    """(label, colour) of each fit state present among ``rows``: fits, does not fit, unknown."""
    return [(_FIT_LEGEND[s], _FIT_COLORS[s]) for s in (True, False, None) if any(p.fits is s for p in rows)]


def plot_projection(rows: list, path: Path, *, mfu: float, dtype: str, prices_date: str) -> Path:
    """Bar chart of the projected run cost per (GPU, cloud), coloured by fit: fits, does not fit,
    unknown; the x axis in dollars; the title names the MFU, the peaks' dtype and the prices' date."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    rows = rows[::-1]
    fig = Figure(figsize=(8.0, 0.35 * len(rows) + 1.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh([f"{p.gpu} {p.memory_gb:g}GB, {p.cloud}" for p in rows], [p.dollars for p in rows],
            color=[_FIT_COLORS[p.fits] for p in rows])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_usd(x) if x > 0 else "$0"))
    ax.set_xlabel("projected cost of the whole run (USD)")
    ax.set_title(f"run cost by GPU and cloud at MFU {mfu:.1%} (same on every GPU), dense {dtype} peaks, "
                 f"prices of {prices_date}", fontsize=8)
    ax.legend(handles=[Patch(color=color, label=label) for label, color in legend_entries(rows)], fontsize=7,
              loc="lower right")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
