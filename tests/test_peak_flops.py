"""The peak-FLOPs table's rows (exact names only) and the warnings that name an unknown device's fix.

No GPU is needed: the callbacks' lookup helpers are called with a fake trainer whose root device
is ``cuda:0`` (a ``torch.device`` needs no GPU) and a patched ``torch.cuda.get_device_name``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from lightning_scale.callbacks import CostReporter, ScaleProfiler
from lightning_scale.core.peak_flops import PEAKS, known_devices, lookup, peak_flops


@pytest.mark.parametrize("name, device, dtype, tflops", [
    ("NVIDIA H100 NVL", "H100 NVL", "bf16", 835.5), ("NVIDIA H100 NVL", "H100 NVL", "tf32", 417.5),
    ("NVIDIA H100 NVL", "H100 NVL", "fp32", 60.0), ("NVIDIA H100 NVL", "H100 NVL", "fp8", 1670.5),
    ("NVIDIA GH200 480GB", "GH200", "bf16", 989.5), ("NVIDIA GH200 144G HBM3e", "GH200", "tf32", 494.5),
    ("NVIDIA GH200 480GB", "GH200", "fp32", 67.0),
    ("NVIDIA B200", "B200", "bf16", 2250.0), ("NVIDIA B200", "B200", "fp16", 2250.0),
    ("NVIDIA B200", "B200", "tf32", 1100.0), ("NVIDIA B200", "B200", "fp8", 4500.0), ("NVIDIA B200", "B200", "fp32", 75.0),
    ("NVIDIA H200", "H200 SXM", "tf32", 494.5), ("NVIDIA H200", "H200 SXM", "fp32", 67.0),
    ("NVIDIA H200", "H200 SXM", "fp8", 1979.0),
    ("NVIDIA L4", "L4", "tf32", 60.0), ("NVIDIA L4", "L4", "fp32", 30.3),
    ("NVIDIA L40S", "L40S", "tf32", 183.0), ("NVIDIA L40S", "L40S", "fp32", 91.6),
])
def test_new_rows_are_found_by_their_exact_names(name: str, device: str, dtype: str, tflops: float) -> None:
    assert lookup(name).device == device
    assert lookup(device).device == device  # the canonical name too
    assert peak_flops(name, dtype) == tflops * 1e12


def test_tf32_follows_allow_tf32_on_the_new_columns() -> None:
    assert peak_flops("NVIDIA L40S", torch.float32) == 91.6e12
    assert peak_flops("NVIDIA L40S", torch.float32, allow_tf32=True) == 183e12


@pytest.mark.parametrize("name", [
    "NVIDIA H100", "NVIDIA H100 NVL 94GB", "nvidia h100 nvl", "H100", "NVIDIA H200 NVL", "NVIDIA L40",
    "NVIDIA GH200", "GH200 480GB", "NVIDIA B200 NVL", "NVIDIA GB200", "B100", " NVIDIA B200",
])
def test_no_substring_or_prefix_matching(name: str) -> None:
    # Each of these contains (or is contained in) a known name; none may resolve to a row.
    assert lookup(name) is None and peak_flops(name, "bf16") is None


def test_h100_variants_resolve_to_their_own_rows() -> None:
    assert lookup("NVIDIA H100 NVL").device == "H100 NVL"
    assert lookup("NVIDIA H100 80GB HBM3").device == "H100 SXM"
    assert lookup("NVIDIA H100 PCIe").device == "H100 PCIe"
    assert lookup("NVIDIA L40S").device == "L40S" and lookup("NVIDIA L4").device == "L4"


def test_table_is_one_row_per_device_with_unambiguous_names_and_sources() -> None:
    devices = [row.device for row in PEAKS]
    names = [name for row in PEAKS for name in row.names]
    assert list(known_devices()) == devices and len(set(devices)) == len(devices)
    assert len(set(names)) == len(names)  # no reported name on two rows
    assert not set(names) & set(devices)  # a canonical name is never another row's reported name
    for row in PEAKS:
        assert row.source and row.memory_gb and all(v > 0 for v in row.tflops.values())
        # all dense: bf16 is twice tf32 on every generation here (one sparse figure would make it 1x or 4x)
        if "bf16" in row.tflops and "tf32" in row.tflops:
            assert row.tflops["bf16"] == pytest.approx(2 * row.tflops["tf32"], rel=0.05)


def test_new_rows_work_in_the_planner_and_the_price_table() -> None:
    from lightning_scale.core.cost import project_across
    from lightning_scale.core.planner import Hardware
    from lightning_scale.core.prices import load_price_table

    assert Hardware.named("H100 NVL", 8).memory_gb == 94
    assert Hardware.named("GH200-144GB", 4).memory_gb == 144 and Hardware.named("B200-180GB", 8).memory_gb == 180
    assert Hardware.named("H100", 8).name == "H100 SXM"  # the NVL row does not take over a plain "H100"
    with pytest.raises(ValueError, match="GH200 comes with"):
        Hardware.named("GH200", 4)
    rows, skipped = project_across(load_price_table(), 1e21, 0.4, 1, "bf16")
    assert "GH200" not in skipped and any(p.gpu == "GH200" and p.memory_gb == 96 for p in rows)


# ---- the callbacks' unknown-device warnings ----------------------------------------------------------
def _trainer(rank: int = 0, precision: str = "bf16-mixed", callbacks: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision=precision,
                           is_global_zero=rank == 0, global_rank=rank, world_size=2, callbacks=callbacks or [])


@pytest.fixture
def reported(monkeypatch):
    """Make torch.cuda report a device name (and 95 GB) without a GPU."""
    def use(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=95e9))
    return use


def test_profiler_warns_once_on_rank_zero_with_the_device_name_and_the_fix(reported) -> None:
    reported("NVIDIA H100 NVL (unreleased)")
    prof = ScaleProfiler()
    with pytest.warns(UserWarning) as caught:
        assert prof._peak(_trainer()) is None
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "'NVIDIA H100 NVL (unreleased)'" in text and "MFU is omitted" in text
    assert "ScaleProfiler(device=" in text and "peak_tflops=" in text
    assert all(repr(d) in text for d in known_devices())  # lists the table's names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prof._peak(_trainer()) is None  # once
        assert ScaleProfiler()._peak(_trainer(rank=1)) is None  # rank 0 only


def test_profiler_device_option_names_the_row(reported) -> None:
    reported("NVIDIA Something New")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ScaleProfiler(device="H100 NVL")._peak(_trainer()) == 835.5e12
        assert ScaleProfiler(device="NVIDIA GH200 480GB")._peak(_trainer(precision="16-mixed")) == 989.5e12
    reported("NVIDIA B200")
    assert ScaleProfiler()._peak(_trainer()) == 2250e12  # detected by its exact name
    with pytest.warns(UserWarning, match="no bf16 column for T4"):
        ScaleProfiler(device="T4")._peak(_trainer())


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="H100"), "device must be a device of the peak-FLOPs table"),
    (dict(device="NVIDIA L40"), "H100 NVL"),  # the message lists the known names
    (dict(device=3), "device must be"),
    (dict(device="B200", peak_tflops=2000.0), "not both"),
])
def test_profiler_device_option_is_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScaleProfiler(**kwargs)


def test_cost_reporter_warns_on_rank_zero_with_the_device_name_and_the_fix(reported) -> None:
    reported("NVIDIA RTX PRO 6000 Blackwell")
    cost = CostReporter(print_table=False, plot=False)
    with pytest.warns(UserWarning) as caught:
        cost._resolve_rate(_trainer())
    assert len(caught) == 1 and cost.rate is None
    text = str(caught[0].message)
    assert "'NVIDIA RTX PRO 6000 Blackwell'" in text and "dollars are not reported" in text
    assert "CostReporter(gpu=" in text and "rate_per_gpu_hour=" in text and "ScaleProfiler(device=" in text
    assert "'B200'" in text and "'A6000'" in text  # peak-table and price-table names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CostReporter(print_table=False, plot=False)._resolve_rate(_trainer(rank=1))  # rank 0 only


def test_cost_reporter_detects_a_new_row_and_prices_it(reported) -> None:
    reported("NVIDIA GH200 480GB")
    cost = CostReporter(print_table=False, plot=False)
    cost._resolve_rate(_trainer())
    assert cost.rate == 0.88 and "GH200" in cost.rate_note  # the table's one GH200 96 GB offer (95 GB -> 96)


def test_cost_projection_note_names_the_device_and_the_profiler_option(reported) -> None:
    reported("NVIDIA Something New")
    note = CostReporter._unknown_device_note(_trainer())
    assert "'NVIDIA Something New'" in note and "ScaleProfiler(device=" in note and "'GH200'" in note
    assert CostReporter._unknown_device_note(_trainer(callbacks=[ScaleProfiler(device="B200")])) == ""
    reported("NVIDIA H100 NVL")
    assert CostReporter._unknown_device_note(_trainer()) == ""  # a known device: nothing to name
