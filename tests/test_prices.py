"""GPU price table (lightning_scale/core/prices.py): every cleaning rule against the real shipped
file, overrides, env var, errors. Each defect test counts the affected rows in the raw CSV, so it
fails if the rule (or the data) changes.

prices.py and peak_flops.py are stdlib-only; they are loaded from their files so this test does
not import the ``lightning_scale`` package (which imports Lightning, ~15 s) and stays < 10 s.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_CORE = Path(__file__).resolve().parents[1] / "lightning_scale" / "core"


def _load(name: str):
    full = f"_test_prices_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, _CORE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


prices = _load("prices")
peak_flops = _load("peak_flops")

CSV = _CORE / "data" / "cloud-gpus.csv"
MD = _CORE / "data" / "cloud-gpus.md"
SHARED = Path("/work/shared/data/cloud-gpus.csv")


@pytest.fixture(scope="module")
def raw() -> list[dict[str, str]]:
    with open(CSV, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def table(monkeypatch):
    monkeypatch.delenv(prices.ENV_VAR, raising=False)
    return prices.load_price_table(supplement=False)  # the FSDL table's cleaning (2026 rows: test_prices_2026.py)


def _key(r: dict[str, str]) -> tuple:
    gpu, memory = prices.canonical_gpu(r["GPU Type"])
    return (r["Cloud"], gpu, memory, int(r["GPUs"]), r["Name"].strip())


def _by_key(table) -> dict[tuple, object]:
    rows = {(r.cloud, r.gpu, r.memory_gb, r.gpus, r.instance): r for r in table.rows}
    assert len(rows) == len(table.rows), "duplicate keys left in the table"
    return rows


def _kept(raw, table) -> list[dict[str, str]]:
    """Raw rows whose key survived cleaning."""
    keys = _by_key(table)
    return [r for r in raw if _key(r) in keys]


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------
def test_shipped_file_is_the_verbatim_source_with_attribution(table):
    digest = hashlib.sha256(CSV.read_bytes()).hexdigest()
    assert digest == prices.TABLE_SHA256
    if SHARED.exists():
        assert CSV.read_bytes() == SHARED.read_bytes()
    md = MD.read_text(encoding="utf-8")
    for needle in (digest, "MIT License", "Copyright (c) 2023 Full Stack Deep Learning, LLC",
                   "the-full-stack/website", "docs/cloud-gpus/cloud-gpus.csv", "2025-03-07", "October 30, 2023"):
        assert needle in md, needle
    assert prices.TABLE_DATE == "2023-10-30" and table.date == prices.TABLE_DATE
    assert table.source == prices.TABLE_SOURCE
    assert "MIT" in prices.TABLE_SOURCE and "2023-10-30" in prices.TABLE_SOURCE and "2025-03-07" in prices.TABLE_SOURCE


def test_load_is_deterministic_and_every_row_is_table_sourced(table):
    again = prices.load_price_table(supplement=False)
    assert again.rows == table.rows and again.cleaning == table.cleaning
    assert len(table.rows) == 231
    assert {r.source for r in table.rows} == {"table"}
    for r in table.rows:
        assert r.on_demand_per_gpu_hour is not None and math.isfinite(r.on_demand_per_gpu_hour) and r.on_demand_per_gpu_hour > 0
        assert r.gpus >= 1 and r.memory_gb > 0


# ---------------------------------------------------------------------------------------------
# Known defects, one test each
# ---------------------------------------------------------------------------------------------
def test_ranges_in_vcpus_ram_are_ignored_not_dropped(raw, table):
    def num(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    ranges = [r for r in raw if "-" in r["vCPUs"] or "-" in r["RAM"]]
    assert len(ranges) == 9 and {r["Cloud"] for r in ranges} == {"Dataoorts"}
    odd = [r for r in raw if not (num(r["vCPUs"]) and num(r["RAM"]))]
    assert len(odd) == 10  # + Oracle BM.GPU.H100.8 with empty vCPUs/RAM
    rows = _by_key(table)
    for r in odd:  # all kept, priced from On-demand
        assert rows[_key(r)].on_demand_per_gpu_hour == float(r["On-demand"]) / int(r["GPUs"])
    assert not {"vcpus", "ram", "vCPUs", "RAM"} & {f for f in prices.PriceRow.__dataclass_fields__}
    assert sum(line.startswith("columns: line") for line in table.cleaning) == 10


def test_per_gpu_price_is_instance_price_over_gpus(raw, table):
    priced = [r for r in raw if r["On-demand"].strip()]
    disagree = [r for r in priced if prices._cents_disagree(float(r["Per-GPU"]), float(r["On-demand"]) / int(r["GPUs"]))]
    assert len(disagree) == 29
    over_2_cents = [r for r in priced if abs(float(r["Per-GPU"]) - float(r["On-demand"]) / int(r["GPUs"])) > 0.02]
    assert len(over_2_cents) == 23  # the source README's count
    # every row: per-GPU = On-demand / GPUs exactly (no rounding); duplicates keep the cheapest
    expected: dict[tuple, float] = {}
    spot: dict[tuple, float | None] = {}
    rows = _by_key(table)
    for r in _kept(raw, table):
        value = float(r["On-demand"]) / int(r["GPUs"])
        if value < expected.get(_key(r), math.inf):
            expected[_key(r)] = value
            spot[_key(r)] = float(r["Spot"]) / int(r["GPUs"]) if r["Spot"].strip() else None
    assert set(expected) == set(rows)
    for key, row in rows.items():
        assert row.on_demand_per_gpu_hour == expected[key], key
        assert row.spot_per_gpu_hour == spot[key], key
    # rows that survived (winners of their duplicate group) carry On-demand / GPUs, not Per-GPU
    winners = [r for r in disagree if _key(r) in rows
               and rows[_key(r)].on_demand_per_gpu_hour == float(r["On-demand"]) / int(r["GPUs"])]
    assert len(winners) >= 12
    assert all(rows[_key(r)].on_demand_per_gpu_hour != float(r["Per-GPU"]) for r in winners)
    oblivus = table.rates("RTX4000", cloud="Oblivus Cloud")
    assert [r.on_demand_per_gpu_hour for r in oblivus] == [0.41, 0.41, 0.41]  # source Per-GPU says 0.27


def test_memory_per_gpu_comes_from_the_type_not_gpu_ram(raw, table):
    bad = [r for r in raw if float(r["GPU RAM"]) != int(r["GPUs"]) * prices.canonical_gpu(r["GPU Type"])[1]]
    assert len(bad) == 12
    rows = _by_key(table)
    kept = [r for r in bad if _key(r) in rows]
    assert len(kept) == 10  # the 2 Exoscale rows have no on-demand price (dropped)
    for r in kept:
        assert rows[_key(r)].memory_gb == prices.canonical_gpu(r["GPU Type"])[1] != float(r["GPU RAM"]) / int(r["GPUs"])
    fluid = table.rates("A100", cloud="FluidStack")
    assert {r.gpus for r in fluid} == {1, 2, 4, 8} and {r.memory_gb for r in fluid} == {80.0}


def test_a10_without_memory_is_24_gb(raw, table):
    bare = [r for r in raw if r["GPU Type"] == "A10"]
    assert len(bare) == 2
    assert prices.canonical_gpu("A10") == ("A10", 24.0)
    assert prices.canonical_gpu("A10 (24 GB)") == ("A10", 24.0)
    oracle = table.rates("A10", cloud="Oracle Cloud")
    assert len(oracle) == 2 and {r.memory_gb for r in oracle} == {24.0}
    assert {r.gpu for r in table.rows if r.gpu.startswith("A10") and not r.gpu.startswith("A100")} == {"A10", "A10G"}


@pytest.mark.parametrize("text, expected", [
    ("V100 (16 GB)", ("V100 SXM2", 16.0)), ("V100 (32 GB)", ("V100 SXM2", 32.0)),
    ("H100 HGX (80GB)", ("H100 SXM", 80.0)), ("H100 PCIe (80GB)", ("H100 PCIe", 80.0)),
    ("H100 (80 GB)", ("H100", 80.0)), ("RTX A6000 (48 GB)", ("A6000", 48.0)), ("A6000 (48 GB)", ("A6000", 48.0)),
    ("A10G (24 GB)", ("A10G", 24.0)), ("A100 (40 GB)", ("A100", 40.0)), ("T4 (16 GB)", ("T4", 16.0)),
    ("L4 (24 GB)", ("L4", 24.0)), ("Quadro RTX 6000 (24 GB)", ("Quadro RTX 6000", 24.0)),
    ("3080Ti (12 GB)", ("3080Ti", 12.0)), ("GH200 (96 GB)", ("GH200", 96.0)), ("RTX4000 (8 GB)", ("RTX4000", 8.0)),
    # canonical names are fixed points
    ("V100 SXM2", ("V100 SXM2", None)), ("H100 SXM", ("H100 SXM", None)), ("H100 PCIe", ("H100 PCIe", None)),
])
def test_canonical_gpu(text, expected):
    assert prices.canonical_gpu(text) == expected


def test_naming_variants_unified_and_peak_flops_names_match(raw, table):
    assert len({r["GPU Type"] for r in raw}) == 25
    names = {r.gpu for r in table.rows}
    assert len(names) == 19
    assert not any("(" in n or "RTX A" in n or "HGX" in n for n in names)
    assert {r.gpu for r in table.rows if r.cloud == "NovoNimbus" and r.memory_gb == 48} == {"A6000"}
    devices = {p.device for p in peak_flops.PEAKS}
    assert {"V100 SXM2", "A100", "H100 SXM", "H100 PCIe", "L4", "A10G", "T4"} <= names & devices
    for gpu, _ in table.gpus():  # every canonical name that is a device resolves to its peak
        if gpu in devices:
            assert peak_flops.peak_flops(gpu, "fp16") is not None
    assert "H100" not in devices  # plain H100: form factor unknown, no peak (honest)
    assert len(table.rates("H100")) == 14 and len(table.rates("H100 SXM")) == 4 and len(table.rates("H100 PCIe")) == 4


def test_missing_spot_is_none(raw, table):
    assert sum(1 for r in raw if not r["Spot"].strip()) == 178
    kept_missing = {_key(r) for r in _kept(raw, table) if not r["Spot"].strip()}
    assert {k for k, row in _by_key(table).items() if row.spot_per_gpu_hour is None} == kept_missing
    spot = table.rates("A100", spot=True)
    assert spot and all(r.spot_per_gpu_hour is not None for r in spot)
    assert len(spot) < len(table.rates("A100"))


def test_aws_has_no_h100_so_rate_is_none_until_the_user_adds_one(raw, table):
    assert not [r for r in raw if r["Cloud"] == "AWS" and "H100" in r["GPU Type"]]
    assert table.rate("H100 SXM", cloud="AWS") is None
    assert table.rates("H100", cloud="AWS") == []
    assert any(line.startswith("coverage: AWS has no H100") for line in table.cleaning)
    user = table.with_overrides([{"cloud": "AWS", "gpu": "H100 SXM", "memory_gb": 80, "gpus": 8,
                                  "on_demand_per_gpu_hour": 4.0, "instance": "p5.48xlarge"}])
    row = user.rate("H100 SXM", cloud="aws")
    assert row is not None and row.source == "user" and row.on_demand_per_gpu_hour == 4.0


def test_rows_without_on_demand_are_dropped_and_reported(raw, table):
    missing = [r for r in raw if not r["On-demand"].strip()]
    assert len(missing) == 6
    keys = _by_key(table)
    assert not [r for r in missing if _key(r) in keys]
    assert table.rates("3080Ti") == []
    assert sum(line.startswith("no-on-demand:") for line in table.cleaning) == 6


def test_duplicates_are_collapsed_to_the_cheapest(raw, table):
    priced = [r for r in raw if r["On-demand"].strip() and (r["Cloud"], r["GPU Type"], r["GPUs"]) not in prices._SUSPECT_ROWS]
    keys = [_key(r) for r in priced]
    duplicates = len(keys) - len(set(keys))
    assert duplicates == 19
    assert len(table.rows) == len(set(keys))
    assert sum(line.startswith("duplicate:") for line in table.cleaning) == 19
    t4 = [r for r in table.rows if r.instance == "g4dn.4xlarge"]
    assert len(t4) == 1 and t4[0].on_demand_per_gpu_hour == 1.20
    cudo = table.rates("A4000", cloud="Cudo Compute")
    assert {r.gpus: r.on_demand_per_gpu_hour for r in cudo} == {1: 0.30, 2: 0.325, 4: 0.36, 8: 2.89 / 8}
    for key in set(keys):  # the cheapest of each group survives
        group = [float(r["On-demand"]) / int(r["GPUs"]) for r in priced if _key(r) == key]
        assert _by_key(table)[key].on_demand_per_gpu_hour == min(group)


def test_copied_lambda_quadro_row_is_dropped(raw, table):
    quadro = [r for r in raw if r["GPU Type"].startswith("Quadro")]
    v100 = [r for r in raw if r["Cloud"] == "Lambda" and r["GPU Type"].startswith("V100")]
    assert len(quadro) == 1 and len(v100) == 1
    same = ("vCPUs", "RAM", "On-demand")
    assert [quadro[0][c] for c in same] == [v100[0][c] for c in same] and quadro[0]["GPUs"] == "1" != v100[0]["GPUs"]
    assert table.rates("Quadro RTX 6000") == []
    assert sum(line.startswith("suspect:") for line in table.cleaning) == 1


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------
def test_rates_sorted_cheapest_first_and_filters(table):
    for spot in (False, True):
        for gpu, _ in table.gpus():
            found = table.rates(gpu, spot=spot)
            values = [r.spot_per_gpu_hour if spot else r.on_demand_per_gpu_hour for r in found]
            assert values == sorted(values) and None not in values
            if found:
                assert table.rate(gpu, spot=spot) == found[0]
    a100 = table.rates("A100")
    assert {r.memory_gb for r in a100} == {40.0, 80.0}
    assert {r.memory_gb for r in table.rates("A100", memory_gb=40)} == {40.0}
    assert {r.memory_gb for r in table.rates("A100 (80 GB)")} == {80.0}
    assert table.rates("RTX A6000 (48 GB)") == table.rates("A6000")
    assert {r.cloud for r in table.rates("V100", cloud="gcp")} == {"GCP"}
    assert table.rate("V100 SXM2", cloud="AWS", spot=True).instance == "p3.8xlarge"  # 3.67 / 4 < 0.92
    assert table.rate("no such gpu") is None
    assert ("H100 SXM", 80.0) in table.gpus() and table.gpus() == sorted(set(table.gpus()))


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------
def test_override_replaces_same_key_and_adds_new(table):
    before = table.rates("A10G", cloud="AWS")
    assert len([r for r in before if r.gpus == 1]) == 5  # g5.xlarge ... g5.16xlarge
    user = table.with_overrides([
        {"cloud": "AWS", "gpu": "A10G", "memory_gb": 24, "on_demand_per_gpu_hour": 0.9},  # gpus default 1
        {"cloud": "MyCloud", "gpu": "V100 (32 GB)", "gpus": 8, "on_demand_per_gpu_hour": 1.5, "spot_per_gpu_hour": 0.5},
    ])
    after = user.rates("A10G", cloud="AWS")
    ones = [r for r in after if r.gpus == 1]
    assert len(ones) == 1 and ones[0].source == "user" and ones[0].on_demand_per_gpu_hour == 0.9
    assert [r for r in after if r.gpus > 1] == [r for r in before if r.gpus > 1]
    mine = user.rate("V100 SXM2", cloud="MyCloud", spot=True)
    assert (mine.memory_gb, mine.gpus, mine.spot_per_gpu_hour, mine.source) == (32.0, 8, 0.5, "user")
    assert len(user.rows) == len(table.rows) - 5 + 2
    assert table.rates("A10G", cloud="AWS") == before  # the original is unchanged
    assert sum(line.startswith("override:") for line in user.cleaning) == 2
    assert user.source == table.source and user.date == table.date
    # a PriceRow is accepted too
    again = table.with_overrides([ones[0]])
    assert again.rate("A10G", cloud="AWS").on_demand_per_gpu_hour == 0.9


def test_env_var_applied_before_explicit_overrides(tmp_path, monkeypatch):
    env_file = tmp_path / "prices.yaml"
    env_file.write_text("- {cloud: AWS, gpu: H100 SXM, memory_gb: 80, gpus: 8, on_demand_per_gpu_hour: 5.0}\n"
                        "- {cloud: Lab, gpu: T4, memory_gb: 16, on_demand_per_gpu_hour: 0.1}\n")
    monkeypatch.setenv(prices.ENV_VAR, str(env_file))
    table = prices.load_price_table()
    assert table.rate("H100 SXM", cloud="AWS").on_demand_per_gpu_hour == 5.0
    assert table.rate("T4", cloud="Lab").source == "user"
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps({"prices": [{"cloud": "AWS", "gpu": "H100 SXM", "memory_gb": 80, "gpus": 8,
                                                 "on_demand_per_gpu_hour": 3.0}]}))
    both = prices.load_price_table(explicit)
    assert both.rate("H100 SXM", cloud="AWS").on_demand_per_gpu_hour == 3.0  # explicit wins
    assert len(both.rates("H100 SXM", cloud="AWS")) == 1
    assert both.rate("T4", cloud="Lab") is not None
    listed = prices.load_price_table([{"cloud": "Lab", "gpu": "T4", "memory_gb": 16, "on_demand_per_gpu_hour": 0.2}])
    assert listed.rate("T4", cloud="Lab").on_demand_per_gpu_hour == 0.2
    monkeypatch.setenv(prices.ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="LIGHTNING_SCALE_GPU_PRICES"):
        prices.load_price_table()


@pytest.mark.parametrize("bad, field", [
    ({"gpu": "T4", "memory_gb": 16, "on_demand_per_gpu_hour": 1.0}, "cloud"),
    ({"cloud": "X", "memory_gb": 16, "on_demand_per_gpu_hour": 1.0}, "gpu"),
    ({"cloud": "X", "gpu": "H100 SXM", "on_demand_per_gpu_hour": 1.0}, "memory_gb"),
    ({"cloud": "X", "gpu": "A100 (80 GB)", "memory_gb": 40, "on_demand_per_gpu_hour": 1.0}, "memory_gb"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "gpus": 0, "on_demand_per_gpu_hour": 1.0}, "gpus"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "gpus": 2.5, "on_demand_per_gpu_hour": 1.0}, "gpus"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16}, "on_demand_per_gpu_hour"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "on_demand_per_gpu_hour": -1}, "on_demand_per_gpu_hour"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "on_demand_per_gpu_hour": "$2"}, "on_demand_per_gpu_hour"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "on_demand_per_gpu_hour": 1, "spot_per_gpu_hour": float("nan")},
     "spot_per_gpu_hour"),
    ({"cloud": "X", "gpu": "T4", "memory_gb": 16, "price": 1.0}, "price"),
])
def test_bad_override_names_the_field(table, bad, field):
    with pytest.raises(ValueError, match=field):
        table.with_overrides([bad])


def test_bad_override_containers(table, tmp_path):
    with pytest.raises(ValueError, match="list of mappings"):
        table.with_overrides({"cloud": "X"})
    with pytest.raises(ValueError, match="expected a mapping"):
        table.with_overrides([3])
    not_a_list = tmp_path / "p.yaml"
    not_a_list.write_text("cloud: X\n")
    with pytest.raises(ValueError, match="list of price rows"):
        prices.load_price_table(not_a_list)
