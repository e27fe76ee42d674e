"""Cost arithmetic: dollars from rates and time, and a run's projected time and cost on other GPUs.

Torch-free. Units: rates in USD per GPU-hour, times in seconds (hours where named), FLOPs as
counts, peaks in FLOP/s.

**Projection method.** A run needs ``F`` model FLOPs in total (measured per step x the steps of
the run). On ``n`` devices of peak ``P`` FLOP/s (dense, for the run's compute dtype; table in
:mod:`lightning_scale.core.peak_flops`) at model-FLOPs utilisation ``u`` it takes
``T = F / (n P u)`` seconds and costs ``rate x n x T / 3600`` dollars. The same ``u`` on every
GPU is an assumption: in practice MFU differs between GPU generations (memory bandwidth,
interconnect, kernel support), so the projection ranks GPUs by what their datasheets and prices
imply, not by measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_scale.core.peak_flops import peak_flops


def dollars(rate_per_gpu_hour: float, gpus: int, seconds: float) -> float:
    """What ``gpus`` devices at ``rate_per_gpu_hour`` USD cost for ``seconds`` of wall time."""
    if rate_per_gpu_hour < 0 or gpus < 1 or seconds < 0:
        raise ValueError(f"need rate >= 0, gpus >= 1, seconds >= 0; got {rate_per_gpu_hour}, {gpus}, {seconds}")
    return rate_per_gpu_hour * gpus * seconds / 3600.0


@dataclass(frozen=True)
class Projection:
    """The run on ``gpus`` x ``gpu`` of ``cloud``: hours and dollars at the assumed MFU."""

    gpu: str
    memory_gb: float
    cloud: str
    instance: str
    gpus: int
    rate_per_gpu_hour: float
    peak_flops: float
    hours: float
    dollars: float
    fits: bool | None  # the memory planner's verdict (None: not known)
    rate_source: str = "table"
    rate_date: str = ""  # when the price was stated (ISO date)


def project(total_flops: float, mfu: float, gpus: int, peak_flops: float, rate_per_gpu_hour: float) -> tuple[float, float]:
    """(hours, dollars) of ``total_flops`` on ``gpus`` devices of ``peak_flops`` at utilisation ``mfu``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1]; got {mfu}")
    if total_flops < 0 or peak_flops <= 0:
        raise ValueError(f"need total_flops >= 0 and peak_flops > 0; got {total_flops}, {peak_flops}")
    seconds = total_flops / (gpus * peak_flops * mfu)
    return seconds / 3600.0, dollars(rate_per_gpu_hour, gpus, seconds)


def project_across(table, total_flops: float, mfu: float, gpus: int, dtype: str, *, spot: bool = False,
                   fits: Callable[[float], bool | None] | None = None) -> tuple[list[Projection], list[str]]:
    """The run on every (GPU, memory, cloud) of the price table whose peak for ``dtype`` is known.

    Per cloud and GPU the cheapest per-GPU offer is taken among instances with at least ``gpus``
    GPUs (all instances when none is that large). Returns (projections sorted by dollars, the
    table's GPUs skipped because no peak is known for them and ``dtype``).
    """
    offers: dict[tuple[str, float, str], list] = {}  # (gpu, memory, cloud) -> priced rows
    for row in table.rows:
        if row.price(spot) is not None:
            offers.setdefault((row.gpu, row.memory_gb, row.cloud), []).append(row)
    out: list[Projection] = []
    skipped: set[str] = set()
    for (gpu, memory_gb, cloud), rows in offers.items():
        peak = peak_flops(gpu, dtype)
        if peak is None:
            skipped.add(gpu)
            continue
        large = [r for r in rows if r.gpus >= gpus] or rows
        row = min(large, key=lambda r: r.price(spot))
        rate = row.price(spot)
        hours, cost = project(total_flops, mfu, gpus, peak, rate)
        out.append(Projection(gpu, memory_gb, cloud, row.instance, gpus, rate, peak, hours, cost,
                              fits(memory_gb) if fits is not None else None, row.source, row.date))
    out.sort(key=lambda p: (p.dollars, p.gpu, p.cloud))
    return out, sorted(skipped)
