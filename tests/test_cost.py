"""Cost arithmetic, projection across GPUs, and the CostReporter callback."""

from __future__ import annotations


import pytest

import _cost_targets as ct
from lightning_scale.core.cost import dollars, project, project_across
from lightning_scale.core.peak_flops import peak_flops
from lightning_scale.core.prices import load_price_table
from lightning_scale.testing import run_distributed

HOUR = 3600.0


# ---- arithmetic ----------------------------------------------------------------------------------
def test_dollars_is_rate_times_devices_times_time() -> None:
    assert dollars(3.06, 4, 72 * HOUR) == pytest.approx(881.28, abs=1e-9)
    assert dollars(2.0, 8, 1800.0) == 8.0
    assert dollars(0.0, 1, 10.0) == 0.0
    with pytest.raises(ValueError):
        dollars(-1.0, 1, 1.0)
    with pytest.raises(ValueError):
        dollars(1.0, 0, 1.0)


def test_published_example_a100_cheaper_per_experiment_than_v100() -> None:
    # "72 h on 4 V100 at about $1,750 vs 8 h on 4 A100 at about $250" (the published example):
    # per GPU-hour the A100 is the more expensive one, per experiment the cheaper.
    v100_rate, a100_rate = 1750 / (72 * 4), 250 / (8 * 4)
    assert a100_rate > v100_rate
    v100, a100 = dollars(v100_rate, 4, 72 * HOUR), dollars(a100_rate, 4, 8 * HOUR)
    assert v100 == pytest.approx(1750) and a100 == pytest.approx(250) and a100 < v100


def test_project_time_and_cost_from_flops_and_mfu() -> None:
    # 1e18 FLOPs on 4 devices of 1e14 FLOP/s at 50% MFU: 1e18 / 2e14 = 5000 s.
    hours, cost = project(1e18, 0.5, 4, 1e14, 3.0)
    assert hours == pytest.approx(5000 / HOUR) and cost == pytest.approx(3.0 * 4 * 5000 / HOUR)
    with pytest.raises(ValueError, match="MFU"):
        project(1e18, 0.0, 4, 1e14, 3.0)


def test_projection_of_a_72_hour_v100_job_ranks_the_a100_cheaper_with_the_tables_prices() -> None:
    table = load_price_table()
    mfu = 0.3
    v100_peak = peak_flops("V100 SXM2", "fp16")
    total = 72 * HOUR * 4 * v100_peak * mfu  # the job: 72 h on 4 V100 at 30% MFU
    rows, skipped = project_across(table, total, mfu, 4, "fp16")
    assert rows == sorted(rows, key=lambda p: p.dollars)
    for p in rows:  # consistent with FLOPs and price
        assert p.hours == pytest.approx(total / (4 * p.peak_flops * mfu) / HOUR)
        assert p.dollars == pytest.approx(p.hours * 4 * p.rate_per_gpu_hour)
    v100 = [p for p in rows if p.gpu == "V100 SXM2"]
    a100 = [p for p in rows if p.gpu == "A100"]
    assert v100 and a100
    assert all(p.hours == pytest.approx(72) for p in v100)
    assert all(p.hours == pytest.approx(72 * 125 / 312) for p in a100)
    assert min(p.dollars for p in a100) < min(p.dollars for p in v100)
    aws = {p.gpu: p for p in rows if p.cloud == "AWS" and p.gpu in ("A100", "V100 SXM2")}
    assert aws["A100"].dollars < aws["V100 SXM2"].dollars  # same cloud: dearer per hour, cheaper per run
    assert "A6000" in skipped  # GPUs without a curated peak are reported, not guessed


# ---- the callback --------------------------------------------------------------------------------
def test_cpu_run_with_a_rate_reports_exact_dollars_and_a_projection(tmp_path, capsys) -> None:
    out = ct.fit_cost(str(tmp_path), 4, devices=1,
                      cost_kwargs=dict(rate_per_gpu_hour=36.0, assumed_mfu=0.4, gpu="A100", projection_gpus=8))
    r = out["report"]
    assert r["devices"] == 1 and r["rate_per_gpu_hour"] == 36.0 and r["rate_note"] == "user rate"
    assert r["usd_total"] == pytest.approx(dollars(36.0, 1, r["seconds"]), rel=1e-12)
    assert r["gpu_hours"] == pytest.approx(r["seconds"] / HOUR, rel=1e-12)
    assert r["usd_projected_run"] == pytest.approx(r["usd_total"], rel=1e-9)  # max_steps reached: nothing left
    logged = [row for _, row in out["rows"] if "cost/usd_total" in row]
    assert len(logged) == 4 and all(row["cost/usd_per_step"] > 0 for row in logged)
    assert [row["cost/usd_total"] for row in logged] == sorted(row["cost/usd_total"] for row in logged)
    # Projection: the tiny GPT on 8 GPUs of every priced type; it fits everywhere.
    rows = r["projection"]["rows"]
    assert rows and rows == sorted(rows, key=lambda p: p["dollars"]) and all(p["fits"] is True for p in rows)
    assert "assumed MFU 40%" in r["projection"]["assumption"]
    assert r["prices"]["date"] and (tmp_path / "cost_report.json").is_file()
    assert out["png"] and open(out["png"], "rb").read(4) == b"\x89PNG"
    text = capsys.readouterr().out
    assert "CostReporter" in text and r["prices"]["date"] in text


def test_cpu_run_without_a_rate_warns_and_reports_no_dollars(tmp_path) -> None:
    with pytest.warns(UserWarning) as caught:
        out = ct.fit_cost(str(tmp_path), 2, devices=1)
    messages = " ".join(str(w.message) for w in caught)
    assert "without a rate" in messages and "rate_per_gpu_hour" in messages
    assert "projection across GPUs is omitted" in messages and "assumed_mfu" in messages  # no MFU on CPU
    assert out["report"]["usd_total"] is None and not [row for _, row in out["rows"] if "cost/usd_total" in row]
    assert out["report"]["projection"]["rows"] == []


def test_a_gpu_missing_from_the_table_warns(tmp_path) -> None:
    with pytest.warns(UserWarning, match="no on-demand price for H100 PCIe .*on AWS"):
        out = ct.fit_cost(str(tmp_path), 1, devices=1, cost_kwargs=dict(gpu="H100 PCIe", cloud="AWS", print_table=False))
    assert out["report"]["rate_per_gpu_hour"] is None


def test_table_rate_for_a_named_gpu_is_the_median_offer(tmp_path) -> None:
    import statistics

    out = ct.fit_cost(str(tmp_path), 1, devices=1, cost_kwargs=dict(gpu="A100", gpu_memory_gb=80, print_table=False))
    offers = [o.on_demand_per_gpu_hour for o in load_price_table().rates("A100", memory_gb=80)]
    assert out["report"]["rate_per_gpu_hour"] == statistics.median(offers)
    assert f"median of {len(offers)} offers" in out["report"]["rate_note"]


def _resume_part_two(run_dir: str, ckpt: str) -> dict:
    return ct.fit_cost(run_dir, 6, ckpt_path=ckpt, cost_kwargs=dict(rate_per_gpu_hour=36.0, print_table=False),
                       strategy="ddp")


def test_resume_keeps_the_cumulative_cost_across_a_change_of_device_count(tmp_path) -> None:
    ckpt = str(tmp_path / "part1.ckpt")
    first = ct.fit_cost(str(tmp_path / "a"), 3, devices=1, save_to=ckpt,
                        cost_kwargs=dict(rate_per_gpu_hour=36.0, print_table=False))
    results = run_distributed(_resume_part_two, 2, str(tmp_path / "b"), ckpt, init_process_group=False, timeout=240)
    for res in results:
        segs = res["segments"]
        assert [s["devices"] for s in segs] == [1, 2]
        assert segs[0]["usd"] == pytest.approx(first["report"]["usd_total"], rel=1e-6)
        assert segs[1]["usd"] == pytest.approx(dollars(36.0, 2, segs[1]["seconds"]), rel=1e-12)
    r = results[0]["report"]
    assert r["usd_total"] == pytest.approx(segs[0]["usd"] + results[0]["segments"][1]["usd"], rel=1e-9)
    assert r["global_step"] == 6 and r["devices"] == 2


def test_an_unreadable_cost_state_gives_a_clear_error() -> None:
    from lightning_scale.callbacks import CostReporter

    with pytest.raises(ValueError, match="cost state is not readable"):
        CostReporter().load_state_dict({"usd": "x"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(rate_per_gpu_hour=-1), "rate_per_gpu_hour"),
    (dict(assumed_mfu=1.5), "assumed_mfu"),
    (dict(projection_gpus=0), "projection_gpus"),
    (dict(log_every_n_steps=0), "log_every_n_steps"),
    (dict(prices=[{"cloud": "X", "gpu": "A100", "memory_gb": 80}]), "on_demand_per_gpu_hour"),
])
def test_bad_arguments_name_the_fix(kwargs: dict, match: str) -> None:
    from lightning_scale.callbacks import CostReporter

    with pytest.raises(ValueError, match=match):
        CostReporter(**kwargs)


# -- what the projection shows (pure) -------------------------------------------------------------
def _projection(gpu: str, fits, usd: float):
    from lightning_scale.core.cost import Projection

    return Projection(gpu, 80.0, "cloud", "inst", 8, 2.0, 1e15, 1.0, usd, fits)


def test_unknown_fit_is_its_own_state_in_the_plot_and_the_table() -> None:
    from lightning_scale.callbacks.cost import FIT_LABELS, legend_entries, projection_notes

    unknown = [_projection("H100 SXM", None, 3.0), _projection("A100", None, 2.0)]
    assert legend_entries(unknown) == [("fit unknown (no planner model for this module)", "#9a9a9a")]
    assert FIT_LABELS[None] == "unknown"
    assert "fits: unknown for every GPU" in projection_notes(unknown, [], "fp32")[0]
    mixed = [_projection("H100 SXM", True, 3.0), _projection("A100", False, 2.0)]
    assert [label for label, _ in legend_entries(mixed)] == ["fits (memory planner)", "does not fit (memory planner)"]
    assert projection_notes(mixed, [], "fp32") == []


def test_gpus_without_a_peak_are_named_in_the_printed_notes() -> None:
    from lightning_scale.callbacks.cost import projection_notes

    notes = projection_notes([_projection("H100 SXM", True, 3.0)], ["A10G", "L4", "T4"], "fp32")
    assert notes == ["not projected (no dense fp32 peak in the peak-FLOPs table for this precision): A10G, L4, T4"]


def test_dollars_are_printed_with_the_digits_a_reader_needs(tmp_path) -> None:
    from lightning_scale.callbacks.cost import format_usd, plot_projection

    assert [format_usd(v) for v in (1234.5, 12.34, 0.04213, 0.00031, 3.1e-6)] == [
        "$1,234", "$12.3", "$0.0421", "$0.00031", "$3.1e-06"]
    png = plot_projection([_projection("H100 SXM", None, 3e-6), _projection("A100", True, 2e-6)], tmp_path / "p.png",
                          mfu=0.35, dtype="fp32", prices_date="2026-05-20")
    assert png.is_file() and png.stat().st_size > 1000
