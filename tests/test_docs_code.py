"""The docs keep themselves true: every ```python block of README.md and docs/ is a complete
program that runs (in one subprocess, each block in a fresh namespace, in a scratch directory,
W&B disabled), or is marked ``<!-- fragment: why -->`` on the line before its fence and then only
has to compile."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)

RUNNER = r"""
import json, sys, traceback, warnings
warnings.simplefilter("ignore")
blocks = json.load(open(sys.argv[1]))
failures = []
for where, code in blocks:
    try:
        exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    except BaseException as err:  # noqa: BLE001 - reported per block
        failures.append([where, f"{type(err).__name__}: {err}"[:500]])
json.dump(failures, open(sys.argv[2], "w"))
"""


def _blocks() -> list[tuple[str, str, str | None]]:
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text[: m.start("code")].count("\n") + 1
            marker = re.match(r"\s*<!--\s*fragment:\s*(.+?)\s*-->", m.group("before"))
            out.append((f"{path.relative_to(REPO)}:{line}", m.group("code"), marker.group(1) if marker else None))
    return out


def test_docs_have_python_blocks_and_every_fragment_says_why() -> None:
    blocks = _blocks()
    assert len(blocks) >= 15
    for where, code, why in blocks:
        compile(code, where, "exec")  # every block, fragments included, is valid Python
        assert why is None or len(why) > 10, f"{where}: a fragment marker must say why it cannot run"


def test_every_complete_program_in_the_docs_runs(tmp_path: Path) -> None:
    programs = [(where, code) for where, code, why in _blocks() if why is None]
    (tmp_path / "blocks.json").write_text(json.dumps(programs))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "runner.py", "blocks.json", "failures.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert failures == [], "\n".join(f"{where}: {error}" for where, error in failures)
