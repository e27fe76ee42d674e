"""The examples under ``examples/`` run as written: each family x strategy of
``examples/huggingface/train.py`` as a user runs it (``python train.py --family F --strategy S``,
Lightning launching the ranks as real processes on CPU/gloo). One per family is in the default
suite; the rest of the matrix is marked slow. Correctness (20-step parity with one process) is
tested for the same families and strategies in ``test_pipeline_hf.py`` and
``test_gpt2_tensor_parallel.py``; this checks the example files themselves."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "huggingface" / "train.py"
DEFAULT = {("gpt2", "tp_sp"), ("llama", "tp"), ("vit", "pipeline"), ("bert", "zero3")}


def _matrix() -> list:
    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train
    finally:
        sys.path.pop(0)
    cases = []
    for family, (_, _, strategies) in sorted(train.FAMILIES.items()):
        for strategy in strategies:
            marks = [] if (family, strategy) in DEFAULT else [pytest.mark.slow]
            cases.append(pytest.param(family, strategy, train.STRATEGIES[strategy][1], marks=marks,
                                      id=f"{family}-{strategy}"))
    return cases


CLASSES = {"pipeline": "PipelineStrategy", "tp": "TensorParallelStrategy", "tp_sp": "TensorParallelStrategy",
           "zero3": "ZeroStrategy", "zero2_offload": "ZeroStrategy", "3d": "Parallel3DStrategy"}


@pytest.mark.parametrize("family, strategy, ranks", _matrix())
def test_hugging_face_example_runs_as_written(tmp_path, family, strategy, ranks) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(TRAIN), "--family", family, "--strategy", strategy, "--steps", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    line = re.search(rf"example {family} {strategy}: (\w+) on (\d+) ranks, losses (.*)", done.stdout)
    assert line, done.stdout[-2000:]
    assert line.group(1) == CLASSES[strategy] and int(line.group(2)) == ranks
    losses = [float(x) for x in line.group(3).split()]
    assert len(losses) == 4 and all(math.isfinite(x) and 0 < x < 10 for x in losses)

