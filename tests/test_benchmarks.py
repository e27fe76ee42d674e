"""The benchmark scripts still run (smoke configuration) and write the JSON their docs describe.

No timing is asserted (benchmarks measure; tests check behaviour): each script runs with
``--quick`` in a subprocess and the test checks the summary rows it wrote. Marked ``slow``
(30-50 s each): run with ``-m slow``, as CI does after the default suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--quick", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_benchmark_smoke(tmp_path) -> None:
    result = _run("pipeline", tmp_path, "--no-plots")
    rows = result["summary"]
    assert {r["schedule"] for r in rows} >= {"gpipe", "1f1b"} and {r["m"] for r in rows} == {2, 8}
    measured = [r for r in rows if "skipped" not in r]
    assert {(r["schedule"], r["m"]) for r in measured} >= {("gpipe", 2), ("gpipe", 8), ("1f1b", 2), ("1f1b", 8)}
    for r in measured:
        # The timeline's idle fraction is a fraction; the stages' compute is a positive time.
        assert 0 <= r["bubble"]["median"] < 1 and r["single_compute_s"]["median"] > 0, r


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_tensor_parallel_benchmark_smoke(tmp_path) -> None:
    rows = _run("tensor_parallel", tmp_path)["summary"]
    assert [r["hidden"] for r in rows] == [128, 256]
    assert all(0 < r["comm_share"]["median"] < 1 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_zero_benchmark_smoke(tmp_path) -> None:
    rows = _run("zero", tmp_path)["summary"]
    by_variant = {r["variant"]: r for r in rows}
    # The native stages and FSDP2 hold exactly the formula's bytes (see docs/strategies/zero.md).
    for variant in ("ddp", "zero1", "zero2", "zero3", "lightning_fsdp2"):
        assert by_variant[variant]["at_formula"] is True, by_variant[variant]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_activation_checkpointing_benchmark_smoke(tmp_path) -> None:
    rows = {r["policy"]: r for r in _run("activation_checkpointing", tmp_path)["summary"]}
    assert list(rows) == ["none", "full", "every_2", "selective", "offload"]
    # Bytes are exact (not timings): every policy keeps less on the compute device than none.
    assert rows["none"]["saving"] == 0
    assert rows["full"]["saving"] > rows["selective"]["saving"] > 0 and rows["every_2"]["saving"] > 0
    assert rows["offload"]["activation_bytes_on_device"] < rows["full"]["activation_bytes_on_device"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_profiler_benchmark_smoke(tmp_path) -> None:
    rows = {r["variant"]: r for r in _run("profiler", tmp_path)["summary"]}
    assert list(rows) == ["off", "default", "every_step"] and rows["off"]["overhead"] == 0
    assert rows["default"]["target_met"] in (True, False) and all(r["step_s"]["median"] > 0 for r in rows.values())
