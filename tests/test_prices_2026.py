"""The sourced 2026 price rows (core/data/gpu-prices-2026.csv), stale-price warnings, and a
user's own rates as one option (a dict, a CSV, an env var). Pure, no processes."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest

from lightning_scale.core import prices

SHARED = Path("/work/shared/data/gpu-prices-2026.csv")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(prices.ENV_VAR, raising=False)
    monkeypatch.delenv(prices.RATES_ENV_VAR, raising=False)


def test_the_shipped_2026_file_is_the_sourced_one_and_every_row_keeps_its_date() -> None:
    assert hashlib.sha256(prices.SUPPLEMENT_FILE.read_bytes()).hexdigest() == prices.SUPPLEMENT_SHA256
    if SHARED.exists():
        assert prices.SUPPLEMENT_FILE.read_bytes() == SHARED.read_bytes()
    rows = prices.supplement_rows()
    assert len(rows) == 13 and {r.source for r in rows} == {"2026"}
    assert all(r.date.startswith("2026-") for r in rows)
    by = {(r.cloud, r.gpu, r.memory_gb): r for r in rows}
    h100 = by[("market median (aimultiple GPU index, 37 providers)", "H100", 80.0)]
    assert (h100.on_demand_per_gpu_hour, h100.date) == (2.95, "2026-05-20")
    p5 = by[("AWS", "H100 SXM", 80.0)]
    assert (p5.on_demand_per_gpu_hour, p5.instance, p5.gpus, p5.date) == (6.88, "p5.48xlarge", 8, "2026-11-09")
    h200 = by[("spot market median (GPU Markets, provisional)", "H200 SXM", 141.0)]
    assert h200.on_demand_per_gpu_hour is None and h200.spot_per_gpu_hour == 3.4117  # never an invented on-demand


def test_a_2026_list_price_replaces_the_same_instance_of_2023_and_older_rows_keep_their_date() -> None:
    table = prices.load_price_table()
    p4d = [r for r in table.rows if r.cloud == "AWS" and r.instance == "p4d.24xlarge"]
    assert len(p4d) == 1 and (p4d[0].on_demand_per_gpu_hour, p4d[0].date) == (2.7447, "2026-11-09")
    assert p4d[0].spot_per_gpu_hour is None  # the 2023 spot price is not carried onto a 2026 row
    t4 = table.rate("T4")  # no 2026 figure: the 2023 row, dated
    assert t4.date == prices.TABLE_DATE
    assert table.date.startswith("2023-10-30 (FSDL table") and "2026-04-18 to 2026-11-09" in table.date


def test_age_in_months() -> None:
    assert prices.months_old("2023-10-30", datetime.date(2026, 12, 3)) == pytest.approx(37.1, abs=0.1)
    assert prices.months_old("2026-05-20", datetime.date(2026, 12, 3)) < prices.STALE_MONTHS


def test_your_rates_are_one_option_as_a_dict_a_csv_or_an_env_var(tmp_path, monkeypatch) -> None:
    mine = prices.load_price_table({"H100 SXM": 2.1, "A100 (80 GB)": 1.2})
    assert mine.rate("H100 SXM", cloud="yours").on_demand_per_gpu_hour == 2.1
    assert mine.rate("A100", memory_gb=80, cloud="yours").on_demand_per_gpu_hour == 1.2
    with pytest.raises(ValueError, match=r"give the memory in the name \(e.g. 'A100 \(80 GB\)'\)"):
        prices.load_price_table({"A100": 1.0})  # 40 and 80 GB exist
    csv_file = tmp_path / "rates.csv"
    csv_file.write_text("gpu,on_demand_per_gpu_hour,cloud,memory_gb,date\nL4,0.35,MyCloud,24,2026-10-01\n")
    from_csv = prices.load_price_table(csv_file)
    l4 = from_csv.rate("L4", cloud="MyCloud")
    assert (l4.on_demand_per_gpu_hour, l4.source, l4.date) == (0.35, "user", "2026-10-01")
    monkeypatch.setenv(prices.RATES_ENV_VAR, "H100 SXM=1.9; T4 (16 GB)=0.11")
    env = prices.load_price_table()
    assert env.rate("H100 SXM", cloud="yours").on_demand_per_gpu_hour == 1.9
    assert env.rate("T4", cloud="yours").on_demand_per_gpu_hour == 0.11
    with pytest.raises(ValueError, match="each entry is NAME=USD_PER_GPU_HOUR"):
        prices.parse_rates("H100 SXM:1.9")


def test_the_cli_takes_your_prices_as_one_option_each(monkeypatch) -> None:
    from lightning_scale.cli import _take_price_options

    monkeypatch.setenv(prices.RATES_ENV_VAR, "")  # restored (unset) after the test
    monkeypatch.setenv(prices.ENV_VAR, "")
    rest = _take_price_options(["fit", "--config", "r.yaml", "--gpu-rates", "H100 SXM=2.1", "--prices=mine.csv",
                                "--trainer.max_steps", "5"])
    assert rest == ["fit", "--config", "r.yaml", "--trainer.max_steps", "5"]
    import os

    assert os.environ[prices.RATES_ENV_VAR] == "H100 SXM=2.1" and os.environ[prices.ENV_VAR] == "mine.csv"
    with pytest.raises(SystemExit, match="each entry is NAME=USD_PER_GPU_HOUR"):
        _take_price_options(["fit", "--gpu-rates", "H100"])
