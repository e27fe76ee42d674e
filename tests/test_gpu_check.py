"""``python -m lightning_scale.gpu_check`` on a machine without CUDA (this project's CPU machines),
and how its report reads a run the timeout cut short."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_scale import gpu_check
from lightning_scale.core.device import machine_has_cuda

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"  # tests/test_cuda.py's skip reason


def _lane_test_functions() -> list[str]:
    tree = ast.parse((REPO_ROOT / "tests" / "test_cuda.py").read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


@pytest.mark.skipif(machine_has_cuda(), reason="this machine has a CUDA device: the lane would run for minutes")
@pytest.mark.timeout(120)
def test_without_cuda_the_report_says_so_and_lists_every_check_as_skipped(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lightning_scale.gpu_check", "--out", str(tmp_path), "--timeout", "100"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=115)
    assert done.returncode == 0, done.stdout + done.stderr
    markdown = (tmp_path / "gpu_check.md").read_text()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gpu_check.NO_CUDA_LINE in done.stdout and f"**{gpu_check.NO_CUDA_LINE}**" in markdown
    assert report["summary"]["verdict"] == gpu_check.NO_CUDA_LINE and report["summary"]["ok"]
    assert report["environment"]["cuda_available"] is False and report["environment"]["devices"] == []
    assert report["environment"]["torch"] and report["environment"]["lightning"]
    checks = report["checks"]
    # Every test function of the lane is there (parametrized ones once per case), each skipped for the one reason.
    names = {c["name"].split("[")[0] for c in checks}
    assert names == set(_lane_test_functions()), names
    assert len(checks) >= 20
    for c in checks:
        assert c["id"].startswith("tests/test_cuda.py::"), c
        assert (c["result"], c["reason"]) == ("skipped", NO_CUDA), c
        assert f"| `{c['name']}` | skipped: {NO_CUDA} |" in markdown
    assert (tmp_path / "junit.xml").is_file() and (tmp_path / "progress.jsonl").is_file()


def test_a_run_cut_by_the_timeout_reports_what_finished_what_was_running_and_what_never_ran(tmp_path: Path) -> None:
    progress, figures = tmp_path / "progress.jsonl", tmp_path / "figures.jsonl"
    ids = [f"tests/test_cuda.py::test_{n}" for n in ("a", "b[x]", "c", "d")]
    progress.write_text("\n".join(json.dumps(r) for r in [
        {"collected": ids},
        {"nodeid": ids[0], "when": "call", "outcome": "passed", "duration_s": 3.5, "reason": None},
        {"nodeid": ids[1], "when": "call", "outcome": "failed", "duration_s": 1.0, "reason": None},
    ]) + "\n{\"nodeid\": \"tests/test_cu")  # the last line cut by the kill
    figures.write_text(json.dumps({"check": ids[1], "figures": {"max_loss_rel_diff": 0.5}}) + "\n"
                       + json.dumps({"check": ids[1], "figures": {"backend": "nccl"}}) + "\n")
    checks = gpu_check.collect_checks(tmp_path / "missing.xml", progress, figures, timed_out=True)
    assert [(c["name"], c["result"]) for c in checks] == [
        ("test_a", "passed"), ("test_b[x]", "failed"), ("test_c", "interrupted (timeout)"), ("test_d", "not run (timeout)")]
    assert checks[0]["duration_s"] == 3.5
    assert checks[1]["figures"] == {"max_loss_rel_diff": 0.5, "backend": "nccl"}  # a test's records merged
    env = {"cuda_available": True, "devices": [{"index": 0, "name": "NVIDIA H200", "memory_gib": 139.8,
                                                "capability": "9.0"}], "missing_required": []}
    summary = gpu_check.summarize(env, checks, {"timed_out": True, "returncode": -2})
    assert not summary["ok"] and summary["verdict"].endswith("TIMED OUT")
    assert summary["counts"] == {"passed": 1, "failed": 1, "interrupted (timeout)": 1, "not run (timeout)": 1}
    text = gpu_check.render_markdown({"environment": env, "pytest": {"wall_s": 490.0, "returncode": -2, "timed_out": True},
                                      "summary": summary, "checks": checks, "date": "2026-12-02", "command": ["x"],
                                      "world": 2, "timeout_s": 480.0})
    assert "cuda:0 NVIDIA H200 (139.8 GiB, sm 9.0)" in text and "| `test_b[x]` | failed |" in text
    assert "max_loss_rel_diff=0.5; backend=nccl" in text
