"""The documentation site builds without a warning (broken links, missing API objects)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path: Path) -> None:
    # mkdocs + mkdocstrings are dev dependencies (pip install -e ".[dev]"); the API page imports
    # nothing (griffe reads the sources), so the build is quick.
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("PipelineStrategy", "ZeroStrategy", "CostReporter", "MemoryAccountant", "plan_memory"):
        assert name in api, f"{name} missing from the API reference"
