"""Cloud GPU price table (USD per GPU-hour), for cost reports. Stdlib only (PyYAML optional).

One concept: the price table. The data is a verbatim copy of the Full Stack Deep Learning cloud
GPU table (``core/data/cloud-gpus.csv``, MIT, attribution and cleaning notes in
``core/data/cloud-gpus.md``). It is a snapshot: prices were collected by the page's date
(:data:`TABLE_DATE`), so every report must show :data:`TABLE_SOURCE` / :data:`TABLE_DATE` and let
the user override any rate (:meth:`PriceTable.with_overrides`, :func:`load_price_table`,
env var ``LIGHTNING_SCALE_GPU_PRICES``).

The shipped file stays the verbatim source; it is cleaned here, at load time, deterministically,
and every fix or drop is logged in :attr:`PriceTable.cleaning`. Rules (see the .md for details):

* columns: only Cloud, GPU Type, GPUs, On-demand, Spot and Name are used. vCPUs / RAM (ranges
  such as "20-26" in Dataoorts rows, empty in one Oracle row), GPU Arch, GPU RAM and Per-GPU are
  ignored.
* price per GPU = instance price / GPUs (On-demand and Spot are what one pays for the instance;
  the source's Per-GPU column disagrees with that on many rows). Not rounded.
* memory per GPU comes from the GPU type string ("A100 (80 GB)"), never from the GPU RAM column
  (wrong on 12 rows); "A10" without a size is the 24 GB A10 (the only A10 NVIDIA makes).
* GPU names are canonical (:func:`canonical_gpu`): the device names of ``peak_flops.PEAKS`` where
  the row is that device, so the cost callback can look up peak FLOPs by ``row.gpu``.
* empty Spot -> None; rows without an On-demand price are dropped; duplicate
  (cloud, gpu, memory, gpus, instance) rows are collapsed to the cheapest; one row copied from
  another (Lambda "Quadro RTX 6000") is dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Provenance (shown in every report)
# ---------------------------------------------------------------------------------------------
TABLE_SOURCE = "Full Stack Deep Learning cloud GPU table (MIT), file of 2025-03-07, page updated 2023-10-30"
TABLE_DATE = "2023-10-30"  # "Updated October 30, 2023" on https://fullstackdeeplearning.com/cloud-gpus/
TABLE_FILE = Path(__file__).resolve().parent / "data" / "cloud-gpus.csv"
# SHA-256 of the shipped (verbatim) file; the cleaning rules below were written against it.
TABLE_SHA256 = "cd69e286d6dcf872a5f1829a36e1a28765ce1f4e005fca8c7a88d2d964bffbf3"
ENV_VAR = "LIGHTNING_SCALE_GPU_PRICES"  # path of a YAML/JSON overrides file

_COLUMNS = ["Cloud", "GPU Type", "GPU Arch", "GPUs", "GPU RAM", "vCPUs", "RAM", "On-demand", "Per-GPU", "Spot", "Name"]

# ---------------------------------------------------------------------------------------------
# GPU names
# ---------------------------------------------------------------------------------------------
# Key: GPU type without the memory suffix, upper-cased, spaces/hyphens/underscores removed.
_CANONICAL: dict[str, str] = {
    # V100: cloud V100s are mostly SXM2 boards (AWS p3/p3dn are SXM2 with NVLink), some are PCIe;
    # the table does not say which. Mapped to "V100 SXM2": its peak (125 TFLOPS fp16 tensor) is
    # then used for every V100 row; a PCIe V100 peaks at 112 (NVIDIA V100 datasheet), so MFU on
    # a PCIe board is understated by ~10%.
    "V100": "V100 SXM2", "V100SXM2": "V100 SXM2", "TESLAV100": "V100 SXM2",
    "A100": "A100",  # one peak for SXM4 and PCIe (peak_flops.PEAKS)
    # H100: "HGX" boards are SXM5. Plain "H100 (80 GB)" does not say SXM or PCIe and no instance
    # name in the table does either, so it stays "H100" (form factor unknown: no peak FLOPs).
    "H100HGX": "H100 SXM", "H100SXM": "H100 SXM", "H100SXM5": "H100 SXM",
    "H100PCIE": "H100 PCIe", "H100": "H100",
    "H200": "H200 SXM", "H200SXM": "H200 SXM",
    "L4": "L4", "L40S": "L40S", "A10G": "A10G", "T4": "T4", "MI300X": "MI300X",
    "A10": "A10", "A40": "A40", "GH200": "GH200",
    "A6000": "A6000", "RTXA6000": "A6000", "A5000": "A5000", "RTXA5000": "A5000", "A4000": "A4000", "RTXA4000": "A4000",
    "P100": "P100", "K80": "K80", "P4": "P4",
    "RTX4000": "RTX4000", "RTX5000": "RTX5000", "QUADRORTX6000": "Quadro RTX 6000", "RTX6000": "Quadro RTX 6000",
    "3080TI": "3080Ti",
}
# Memory when the type string has none. The A10 exists only with 24 GB GDDR6 (NVIDIA A10 Tensor
# Core GPU datasheet); the source's two bare "A10" rows (Oracle VM.GPU.A10.*) say GPU RAM 24/48.
_DEFAULT_MEMORY_GB: dict[str, float] = {"A10": 24.0}

_MEMORY_RE = re.compile(r"\(\s*(\d+(?:\.\d+)?)\s*GB\s*\)\s*$", re.IGNORECASE)


def canonical_gpu(name: str) -> tuple[str, float | None]:
    """Source GPU type string -> (canonical name, memory GB per GPU or None).

    ``"H100 HGX (80GB)"`` -> ``("H100 SXM", 80.0)``; ``"RTX A6000 (48 GB)"`` -> ``("A6000", 48.0)``;
    ``"A10"`` -> ``("A10", 24.0)``. Canonical names map to themselves (memory None unless the
    GPU has a single size). An unknown GPU keeps its stripped name.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"GPU name must be a non-empty string, got {name!r}")
    text = name.strip()
    memory: float | None = None
    match = _MEMORY_RE.search(text)
    if match:
        memory = float(match.group(1))
        text = text[: match.start()].strip()
    key = re.sub(r"[\s\-_]+", "", text).upper()
    canonical = _CANONICAL.get(key, text)
    if memory is None:
        memory = _DEFAULT_MEMORY_GB.get(canonical)
    return canonical, memory


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriceRow:
    cloud: str
    gpu: str  # canonical name (canonical_gpu); equals a peak_flops.PEAKS device where the row is that device
    memory_gb: float  # per GPU, GB
    gpus: int  # GPUs per instance
    on_demand_per_gpu_hour: float | None  # USD per GPU-hour = instance On-demand $/h / gpus
    spot_per_gpu_hour: float | None = None  # USD per GPU-hour = instance Spot $/h / gpus; None when unknown
    instance: str = ""  # the Name column ("" when empty)
    source: str = "table"  # "table" (the FSDL snapshot), "2026" (a sourced 2026 figure) or "user"
    date: str = TABLE_DATE  # when the price was stated (ISO date; a user's row: the day it was given)

    def price(self, spot: bool = False) -> float | None:
        """USD per GPU-hour for on-demand (default) or spot."""
        return self.spot_per_gpu_hour if spot else self.on_demand_per_gpu_hour


def _key(cloud: str, gpu: str, memory_gb: float, gpus: int) -> tuple[str, str, float, int]:
    return (cloud.casefold(), gpu, float(memory_gb), int(gpus))


@dataclass
class PriceTable:
    rows: list[PriceRow]
    source: str
    date: str
    cleaning: list[str] = field(default_factory=list)  # one line per rule summary / row touched

    def rates(self, gpu: str, *, memory_gb: float | None = None, cloud: str | None = None,
              spot: bool = False) -> list[PriceRow]:
        """Rows of ``gpu`` (any alias, see :func:`canonical_gpu`) that have a price for the choice
        (on-demand or spot), cheapest USD per GPU-hour first. ``memory_gb`` defaults to the size in
        the name ("A100 (80 GB)"), else any size; ``cloud`` matches case-insensitively."""
        name, memory_from_name = canonical_gpu(gpu)
        if memory_gb is None and _MEMORY_RE.search(gpu.strip()):
            memory_gb = memory_from_name
        out = [
            row for row in self.rows
            if row.gpu == name
            and (memory_gb is None or row.memory_gb == float(memory_gb))
            and (cloud is None or row.cloud.casefold() == cloud.casefold())
            and row.price(spot) is not None
        ]
        return sorted(out, key=lambda r: (r.price(spot), r.cloud, r.gpus, r.instance, r.memory_gb))

    def rate(self, gpu: str, *, memory_gb: float | None = None, cloud: str | None = None,
             spot: bool = False) -> PriceRow | None:
        """The cheapest row of :meth:`rates`, or None (then ask the user for a rate)."""
        found = self.rates(gpu, memory_gb=memory_gb, cloud=cloud, spot=spot)
        return found[0] if found else None

    def gpus(self) -> list[tuple[str, float]]:
        """Distinct (canonical gpu, memory GB per GPU), sorted."""
        return sorted({(row.gpu, row.memory_gb) for row in self.rows})

    def dates(self) -> str:
        """The rows' dates, for reports: "2023-10-30 (FSDL, 213 rows), 2026-05-18 ... 2026-11-09 (19 rows)"."""
        old = [r for r in self.rows if r.source == "table"]
        new = sorted(r.date for r in self.rows if r.source == "2026")
        user = [r for r in self.rows if r.source == "user"]
        if not new and not user:
            return TABLE_DATE
        parts = []
        if old:
            parts.append(f"{TABLE_DATE} (FSDL table, {len(old)} rows)")
        if new:
            parts.append(f"{new[0]} to {new[-1]} (sourced 2026 figures, {len(new)} rows)")
        if user:
            parts.append(f"yours ({len(user)} rows)")
        return "; ".join(parts)


    def with_overrides(self, overrides: Iterable[Mapping[str, Any] | PriceRow] | None) -> PriceTable:
        """A new table with user rows (``source="user"``). Each override is a mapping (or a
        :class:`PriceRow`) with ``cloud``, ``gpu``, ``memory_gb`` (optional when the name carries
        it), ``gpus`` (default 1), ``on_demand_per_gpu_hour`` (USD per GPU-hour), optional
        ``spot_per_gpu_hour`` and ``instance``. It replaces every row with the same
        (cloud, gpu, memory_gb, gpus), else it is added. Later overrides win."""
        if overrides is None:
            return PriceTable(list(self.rows), self.source, self.date, list(self.cleaning))
        if isinstance(overrides, (str, bytes, Mapping)) or not isinstance(overrides, Iterable):
            raise ValueError(
                "GPU price overrides must be a list of mappings like {cloud: AWS, gpu: H100 SXM, memory_gb: 80, "
                f"gpus: 8, on_demand_per_gpu_hour: 4.1}}; got {type(overrides).__name__} "
                "(to read a YAML/JSON file use load_price_table(path))")
        rows = list(self.rows)
        log = list(self.cleaning)
        for index, item in enumerate(overrides):
            row = _user_row(item, index)
            key = _key(row.cloud, row.gpu, row.memory_gb, row.gpus)
            replaced = [r for r in rows if _key(r.cloud, r.gpu, r.memory_gb, r.gpus) == key]
            rows = [r for r in rows if _key(r.cloud, r.gpu, r.memory_gb, r.gpus) != key]
            rows.append(row)
            what = f"replaced {len(replaced)} row(s)" if replaced else "added"
            log.append(f"override: {row.cloud} {row.gpu} {row.memory_gb:g} GB x{row.gpus}: {what}, "
                       f"on-demand {row.on_demand_per_gpu_hour} USD/GPU-h, spot {row.spot_per_gpu_hour}")
        return PriceTable(rows, self.source, self.date, log)


def months_old(row_date: str, today: "datetime.date | None" = None) -> float:
    """Age of a price in months (30.44 days) on ``today`` (default: the run's date)."""
    import datetime

    today = today or datetime.date.today()
    return (today - datetime.date.fromisoformat(row_date[:10])).days / 30.44


#: A price older than this (months) gets a warning naming its date and the override option.
STALE_MONTHS = 12


_OVERRIDE_KEYS = ("cloud", "gpu", "memory_gb", "gpus", "on_demand_per_gpu_hour", "spot_per_gpu_hour", "instance", "date",
                  "source")


def _price_field(value: Any, name: str, where: str, required: bool) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        need = "required" if required else "optional"
        raise ValueError(f"{where}: {name} ({need}) must be a number >= 0 in USD per GPU-hour, e.g. 2.5; got {value!r}")
    return float(value)


def _user_row(item: Mapping[str, Any] | PriceRow, index: int) -> PriceRow:
    where = f"GPU price override #{index}"
    if isinstance(item, PriceRow):
        item = dataclasses.asdict(item)
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(_OVERRIDE_KEYS[:-1])}; "
                         f"got {type(item).__name__}")
    unknown = sorted(set(item) - set(_OVERRIDE_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(_OVERRIDE_KEYS[:-1])}")
    cloud = item.get("cloud")
    if not isinstance(cloud, str) or not cloud.strip():
        raise ValueError(f"{where}: cloud is required (a non-empty string such as 'AWS'); got {cloud!r}")
    gpu_in = item.get("gpu")
    if not isinstance(gpu_in, str) or not gpu_in.strip():
        raise ValueError(f"{where}: gpu is required (a name such as 'H100 SXM' or 'A100 (80 GB)'); got {gpu_in!r}")
    gpu, memory_from_name = canonical_gpu(gpu_in)
    memory = item.get("memory_gb")
    if memory is None:
        memory = memory_from_name
        if memory is None:
            raise ValueError(f"{where}: memory_gb is required for gpu {gpu_in!r} (GB per GPU, e.g. 80)")
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not math.isfinite(memory) or memory <= 0:
        raise ValueError(f"{where}: memory_gb must be a number > 0 (GB per GPU, e.g. 80); got {memory!r}")
    if memory_from_name is not None and _MEMORY_RE.search(gpu_in.strip()) and float(memory) != memory_from_name:
        raise ValueError(f"{where}: memory_gb={memory!r} disagrees with the gpu name {gpu_in!r}; drop one of them")
    gpus = item.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"{where}: gpus must be an integer >= 1 (GPUs per instance, default 1); got {gpus!r}")
    if "on_demand_per_gpu_hour" not in item:
        raise ValueError(f"{where}: on_demand_per_gpu_hour is required (USD per GPU-hour, e.g. 2.5)")
    on_demand = _price_field(item["on_demand_per_gpu_hour"], "on_demand_per_gpu_hour", where, required=True)
    spot = _price_field(item.get("spot_per_gpu_hour"), "spot_per_gpu_hour", where, required=False)
    instance = item.get("instance") or ""
    if not isinstance(instance, str):
        raise ValueError(f"{where}: instance must be a string (instance type name); got {instance!r}")
    import datetime

    date = item.get("date") or datetime.date.today().isoformat()  # when you stated it: default today
    try:
        datetime.date.fromisoformat(str(date)[:10])
    except ValueError:
        raise ValueError(f"{where}: date must be an ISO date such as 2026-05-20 (when the price was stated); got "
                         f"{date!r}") from None
    return PriceRow(cloud.strip(), gpu, float(memory), gpus, on_demand, spot, instance.strip(), "user", str(date)[:10])


# ---------------------------------------------------------------------------------------------
# Loading and cleaning the shipped file
# ---------------------------------------------------------------------------------------------
# Rows dropped by identity, with the evidence (found when cleaning; not in the source README).
_SUSPECT_ROWS: dict[tuple[str, str, str], str] = {
    ("Lambda", "Quadro RTX 6000 (24 GB)", "1"):
        "1 GPU with the vCPUs (92), RAM (448) and instance price (4.40 USD/h) of Lambda's 8x V100 row: "
        "a copy of that row, not a Quadro RTX 6000 price",
}


def _cents_disagree(per_gpu: float, computed: float) -> bool:
    """True when Per-GPU is not ``computed`` rounded to the cent (up or down)."""
    return per_gpu not in (math.floor(computed * 100 + 1e-9) / 100, math.ceil(computed * 100 - 1e-9) / 100)


def _read_raw(path: Path = TABLE_FILE) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != _COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the expected {_COLUMNS}; "
                             "the cleaning rules in lightning_scale/core/prices.py were written for the latter")
        return list(reader)


def _clean(raw: list[dict[str, str]]) -> tuple[list[PriceRow], list[str]]:
    log: list[str] = []
    where = lambda n, r: f"line {n}: {r['Cloud']} | {r['GPU Type']} x{r['GPUs']} | {r['Name'] or '-'}"  # noqa: E731

    def is_num(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    # Rule "columns": vCPUs/RAM/GPU Arch/GPU RAM/Per-GPU are not used (no parsing, no drop).
    odd = [(n, r) for n, r in enumerate(raw, start=2) if not (is_num(r["vCPUs"]) and is_num(r["RAM"]))]
    log.append(f"columns: vCPUs, RAM, GPU Arch, GPU RAM and Per-GPU are ignored; {len(odd)} rows have "
               "non-numeric vCPUs/RAM (ranges such as '20-26', or empty), kept")
    log += [f"columns: {where(n, r)}: vCPUs={r['vCPUs']!r} RAM={r['RAM']!r} ignored" for n, r in odd]

    names: dict[tuple[str, str, float | None], int] = {}
    kept: list[tuple[int, dict[str, str], PriceRow]] = []
    for n, r in enumerate(raw, start=2):
        if not r["On-demand"].strip():
            log.append(f"no-on-demand: {where(n, r)}: dropped (no On-demand price; Per-GPU={r['Per-GPU']!r} "
                       "is not used to guess one)")
            continue
        reason = _SUSPECT_ROWS.get((r["Cloud"], r["GPU Type"], r["GPUs"]))
        if reason:
            log.append(f"suspect: {where(n, r)}: dropped: {reason}")
            continue
        gpus = int(r["GPUs"])
        gpu, memory = canonical_gpu(r["GPU Type"])
        if memory is None:  # no rule gives a size: cannot price per GB-class, drop
            log.append(f"no-memory: {where(n, r)}: dropped (no memory size in the GPU type)")
            continue
        names[(r["GPU Type"], gpu, memory)] = names.get((r["GPU Type"], gpu, memory), 0) + 1
        if not _MEMORY_RE.search(r["GPU Type"]):
            log.append(f"memory-default: {where(n, r)}: {r['GPU Type']!r} has no size; {memory:g} GB per GPU")
        if is_num(r["GPU RAM"]) and float(r["GPU RAM"]) != gpus * memory:
            log.append(f"memory: {where(n, r)}: GPU RAM {r['GPU RAM']} != {gpus} x {memory:g} GB; "
                       f"{memory:g} GB per GPU from the type")
        on_demand = float(r["On-demand"]) / gpus  # USD per GPU-hour, exact (not rounded)
        if is_num(r["Per-GPU"]) and _cents_disagree(float(r["Per-GPU"]), on_demand):
            log.append(f"per-gpu: {where(n, r)}: Per-GPU {r['Per-GPU']} != On-demand {r['On-demand']} / {gpus} "
                       f"= {on_demand:.4f}; using {on_demand:.4f}")
        spot = float(r["Spot"]) / gpus if r["Spot"].strip() else None
        kept.append((n, r, PriceRow(r["Cloud"], gpu, memory, gpus, on_demand, spot, r["Name"].strip(), "table")))

    for (text, gpu, memory), count in sorted(names.items()):
        if text != f"{gpu} ({memory:g} GB)":
            log.append(f"gpu-name: {text!r} -> {gpu!r}, {memory:g} GB ({count} rows)")
    missing_spot = sum(1 for r in raw if not r["Spot"].strip())
    log.append(f"spot: {missing_spot} source rows have no Spot price -> spot_per_gpu_hour None")

    # Rule "duplicate": one row per (cloud, gpu, memory, gpus, instance); keep the cheapest on-demand
    # (file order breaks ties), so rate()/rates()[0] are what they would be without the rule.
    best: dict[tuple[Any, ...], tuple[int, dict[str, str], PriceRow]] = {}
    for entry in kept:
        row = entry[2]
        key = (row.cloud, row.gpu, row.memory_gb, row.gpus, row.instance)
        if key not in best or row.on_demand_per_gpu_hour < best[key][2].on_demand_per_gpu_hour:
            best[key] = entry
    winners = {id(entry) for entry in best.values()}
    rows: list[PriceRow] = []
    for entry in kept:
        n, r, row = entry
        if id(entry) in winners:
            rows.append(row)
            continue
        keep_n = best[(row.cloud, row.gpu, row.memory_gb, row.gpus, row.instance)][0]
        log.append(f"duplicate: {where(n, r)}: dropped (same cloud/gpu/memory/gpus/instance as line {keep_n}; "
                   f"On-demand {r['On-demand']} vs kept {raw[keep_n - 2]['On-demand']})")

    h100 = sorted({row.cloud for row in rows if row.gpu.startswith("H100")})
    if not any(row.cloud == "AWS" and row.gpu.startswith("H100") for row in rows):
        log.append(f"coverage: AWS has no H100 rows (H100 rows come from {', '.join(h100)}); "
                   f"add your own rate via overrides / ${ENV_VAR}")
    log.append(f"result: {len(rows)} of {len(raw)} rows kept")
    return rows, log


# ---------------------------------------------------------------------------------------------
# The 2026 figures (core/data/gpu-prices-2026.csv, sources and gaps in gpu-prices-2026.md)
# ---------------------------------------------------------------------------------------------
SUPPLEMENT_FILE = Path(__file__).resolve().parent / "data" / "gpu-prices-2026.csv"
SUPPLEMENT_SHA256 = "7f105edacc069ab736449985fbe679dc37d01518709635c229bc3cf1bfb3588b"
# Which rows of the file become table rows, and as what: (gpu column, source date column) ->
# (canonical gpu, memory GB, cloud label, instance, GPUs per instance, price column). Only a
# median or a list price is used; ranges (low/high without a median) are left out, never
# turned into a price. A row for an instance the FSDL table also lists (AWS p4d, p4de, g5.xlarge)
# replaces that row; market medians and single providers are added as their own "cloud".
_SUPPLEMENT_USE: dict[tuple[str, str], tuple[str, float, str, str, int, str]] = {
    ("H100 (all form factors, cohort)", "2026-05-20"):
        ("H100", 80.0, "market median (aimultiple GPU index, 37 providers)", "", 1, "on_demand_median"),
    ("H100 SXM 80GB", "2026-05-18"): ("H100 SXM", 80.0, "market median (cliffcenter.com)", "", 1, "on_demand_median"),
    ("L40S", "2026-06-15 (week of)"):
        ("L40S", 48.0, "market median (aiminingco.com, 13 marketplaces, tier not stated)", "", 1, "on_demand_median"),
    ("MI300X 192GB", "2026-05-18"):
        ("MI300X", 192.0, "market median (cliffcenter.com, one spot quote included)", "", 1, "on_demand_median"),
    ("H100 SXM 80GB (AWS p5.48xlarge list)", "2026-11-09 (retrieved)"): ("H100 SXM", 80.0, "AWS", "p5.48xlarge", 8, "on_demand_median"),
    ("A100 80GB SXM (AWS p4de.24xlarge list)", "2026-11-09 (retrieved)"): ("A100", 80.0, "AWS", "p4de.24xlarge", 8, "on_demand_median"),
    ("A100 40GB SXM (AWS p4d.24xlarge list)", "2026-11-09 (retrieved)"): ("A100", 40.0, "AWS", "p4d.24xlarge", 8, "on_demand_median"),
    ("A10G 24GB (AWS g5.xlarge list)", "2026-06-17"): ("A10G", 24.0, "AWS", "g5.xlarge", 1, "on_demand_median"),
    ("B200 180GB (Akash list)", "2026-09-20 (page read)"): ("B200", 180.0, "Akash (list, 'starting at')", "", 1, "on_demand_median"),
    ("RTX 4090 24GB (OpenRelay list)", "2026-09-20 (page read)"): ("RTX 4090", 24.0, "OpenRelay (list)", "", 1, "on_demand_median"),
    ("H200 141GB (SXM)", "2026-04-18"): ("H200 SXM", 141.0, "spot market median (GPU Markets, provisional)", "", 1, "spot_median"),
    ("L40S", "2026-04-18"): ("L40S", 48.0, "spot market median (GPU Markets, provisional)", "", 1, "spot_median"),
    ("MI300X 192GB", "2026-04-18"): ("MI300X", 192.0, "spot market median (GPU Markets, provisional)", "", 1, "spot_median"),
}


def supplement_rows(path: Path = SUPPLEMENT_FILE) -> list[PriceRow]:
    """The 2026 rows named in ``_SUPPLEMENT_USE``, each with its own date (the source's)."""
    with open(path, newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    rows = []
    found = set()
    for item in raw:
        use = _SUPPLEMENT_USE.get((item["gpu"], item["source_date"]))
        if use is None:
            continue
        found.add((item["gpu"], item["source_date"]))
        gpu, memory, cloud, instance, gpus, column = use
        price = float(item[column])
        on_demand, spot = (price, None) if column == "on_demand_median" else (None, price)
        rows.append(PriceRow(cloud, gpu, memory, gpus, on_demand, spot, instance, "2026", item["source_date"][:10]))
    missing = sorted(set(_SUPPLEMENT_USE) - found)
    if missing:
        raise ValueError(f"{path}: rows {missing} named in prices._SUPPLEMENT_USE are not in the file")
    return rows


def _with_supplement(rows: list[PriceRow], log: list[str]) -> list[PriceRow]:
    new = supplement_rows()
    replaced = {(r.cloud.casefold(), r.instance) for r in new if r.instance}
    kept = [r for r in rows if (r.cloud.casefold(), r.instance) not in replaced]
    for r in rows:
        if (r.cloud.casefold(), r.instance) in replaced:
            log.append(f"2026: {r.cloud} {r.instance} ({r.gpu}) of {TABLE_DATE} replaced by the 2026 list price")
    log.append(f"2026: {len(new)} sourced rows added (core/data/gpu-prices-2026.md)")
    return kept + new


def _read_overrides(path: str | Path, what: str) -> list[Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: GPU price overrides file {str(path)!r} not found; "
                                "give a YAML/JSON file holding a list of rows")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return _csv_overrides(path, what)
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            if path.suffix.lower() in (".yaml", ".yml"):
                raise ValueError(f"{what}: reading {path} needs PyYAML (pip install pyyaml), or use a .json file") from None
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    if isinstance(data, Mapping) and set(data) == {"prices"}:
        data = data["prices"]
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path} must hold a list of price rows (or {{prices: [...]}}); "
                         f"got {type(data).__name__}")
    return data


def _csv_overrides(path: Path, what: str) -> list[dict[str, Any]]:
    """A user's CSV: a header with the override fields (``gpu``, ``on_demand_per_gpu_hour``, and
    optionally ``cloud``, ``memory_gb``, ``gpus``, ``spot_per_gpu_hour``, ``instance``)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for line, item in enumerate(reader, start=2):
            row: dict[str, Any] = {"cloud": "yours"}
            for key, value in item.items():
                if value is None or value.strip() == "":
                    continue
                if key in ("memory_gb", "on_demand_per_gpu_hour", "spot_per_gpu_hour"):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        raise ValueError(f"{what}: {path} line {line}: {key}={value!r} is not a number") from None
                elif key == "gpus":
                    row[key] = int(value)
                else:
                    row[key] = value.strip()
            rows.append(_with_memory(row))
    return rows


def rates_to_rows(rates: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"H100 SXM": 2.5, "A100 (80 GB)": 1.4}``: per-GPU on-demand rates (USD per GPU-hour) as
    override rows of the cloud "yours" (memory from the name, else the only size the table knows)."""
    fields = set(rates) & set(_OVERRIDE_KEYS)
    if fields:
        raise ValueError(
            f"GPU prices {dict(rates)!r}: a mapping is read as {{gpu: USD per GPU-hour}}, and this one has the row "
            f"field(s) {sorted(fields)}: a single price row must be a list of mappings like {{cloud: AWS, gpu: H100 SXM, "
            f"memory_gb: 80, gpus: 8, on_demand_per_gpu_hour: 4.1}}, e.g. prices=[{{...}}]"
        )
    bad = {gpu: rate for gpu, rate in rates.items()
           if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0}
    if bad:
        raise ValueError(f"GPU rates {bad!r}: each rate is a number >= 0 in USD per GPU-hour, e.g. {{'H100 SXM': 2.1}}")
    return [_with_memory({"cloud": "yours", "gpu": gpu, "on_demand_per_gpu_hour": rate}) for gpu, rate in rates.items()]


@functools.lru_cache(maxsize=1)
def _known_sizes() -> dict[str, list[float]]:
    """Memory sizes (GB) each GPU has in the shipped tables (read and cleaned once)."""
    sizes: dict[str, set[float]] = {}
    for row in [*_clean(_read_raw())[0], *supplement_rows()]:
        sizes.setdefault(row.gpu, set()).add(row.memory_gb)
    return {gpu: sorted(s) for gpu, s in sizes.items()}


def _with_memory(row: dict[str, Any]) -> dict[str, Any]:
    """A user row without ``memory_gb``: the size in the GPU's name, else the only size the tables
    know for that GPU (an A100 comes in 40 and 80 GB: then the name must say which)."""
    gpu = row.get("gpu")
    if "memory_gb" in row or not isinstance(gpu, str):
        return row
    name, memory = canonical_gpu(gpu)
    if memory is None:
        sizes = _known_sizes().get(name, [])
        if len(sizes) != 1:
            raise ValueError(f"GPU rate for {gpu!r}: give the memory in the name (e.g. '{name} (80 GB)') or a "
                             f"memory_gb column; the price tables know sizes {sizes or 'none'}")
        row = {**row, "memory_gb": sizes[0]}
    return row


def parse_rates(text: str) -> dict[str, float]:
    """``"H100 SXM=2.5; A100 (80 GB)=1.4"`` (the CLI and env-var form) -> ``{name: rate}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, value = part.rpartition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"GPU rates {text!r}: each entry is NAME=USD_PER_GPU_HOUR, separated by ';' "
                             f"(e.g. 'H100 SXM=2.5; A100 (80 GB)=1.4'); got {part!r}")
    return out


RATES_ENV_VAR = "LIGHTNING_SCALE_GPU_RATES"  # "H100 SXM=2.5; A100 (80 GB)=1.4"


def load_price_table(overrides: str | Path | list | Mapping | None = None, supplement: bool = True) -> PriceTable:
    """The cleaned FSDL table with the sourced 2026 rows, then the overrides named by
    ``$LIGHTNING_SCALE_GPU_PRICES`` (a YAML/JSON/CSV file) and ``$LIGHTNING_SCALE_GPU_RATES``
    (``"H100 SXM=2.5; ..."``), then ``overrides``: a YAML/JSON/CSV file path, a list of row
    mappings (see :meth:`PriceTable.with_overrides`), or ``{gpu: USD per GPU-hour}``. Later rows
    replace earlier ones with the same key. ``supplement=False``: the FSDL table alone."""
    rows, log = _clean(_read_raw())
    if supplement:
        rows = _with_supplement(rows, log)
    source = TABLE_SOURCE + ("; 2026 figures: lightning_scale/core/data/gpu-prices-2026.md" if supplement else "")
    table = PriceTable(rows, source, TABLE_DATE, log)
    env_path = os.environ.get(ENV_VAR, "").strip()
    if env_path:
        table = table.with_overrides(_read_overrides(env_path, f"${ENV_VAR}"))
    env_rates = os.environ.get(RATES_ENV_VAR, "").strip()
    if env_rates:
        table = table.with_overrides(rates_to_rows(parse_rates(env_rates)))
    if isinstance(overrides, (str, Path)):
        overrides = _read_overrides(overrides, "overrides")
    elif isinstance(overrides, Mapping):
        overrides = rates_to_rows(overrides)
    table = table.with_overrides(overrides)
    table.date = table.dates()
    return table
