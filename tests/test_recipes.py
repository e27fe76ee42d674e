"""Every CPU recipe in ``recipes/`` trains end-to-end through the real ``lightning-scale`` CLI.

Each recipe asks for ``devices: 2`` and one of the suite's strategies (the GPT recipe: pipeline,
2 stages; the vision recipe: its strategy), so it runs on two real processes. They
are started by :func:`lightning_scale.testing.run_distributed` with ``init_process_group=False``:
every rank calls :func:`lightning_scale.cli.main` with the recipe and a few overrides, sees
``LOCAL_RANK``/``WORLD_SIZE`` set by the harness, and so *joins* as an externally launched
process (Lightning launches nothing). Why this rather than the console script in a subprocess,
which lets Lightning re-launch itself for rank 1: the harness forks both ranks from a server
that has already imported torch and lightning (a cold start of the console script costs ~10 s
per process on this 2-core machine, paid twice sequentially per recipe), and it bounds every
run with a timeout that kills both ranks and shows their stacks, and reports any rank's
exception with its traceback instead of a hang.

What is asserted is read back from what the run wrote: the W&B offline run's history (the
``train/loss`` rows of the requested steps and the ``val/loss`` rows) and the checkpoint
(``global_step``). Everything is written under ``tmp_path``; nothing lands in the repository.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_scale.testing import SETTINGS as HARNESS_SETTINGS
from lightning_scale.testing import run_distributed
from lightning_scale.utils.wandb_offline import find_offline_runs, read_history

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
#: Recipes that run on this machine (CPU, gloo). GPU recipes are named ``*gpu`` (see the end of this file).
CPU_RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "cpu" in p.stem)

WORLD_SIZE = 2
SMOKE_STEPS = 3


# --------------------------------------------------------------------------------------------
# Rank target (module level: the ranks import it by name)
# --------------------------------------------------------------------------------------------
def _run_cli(argv: list[str]) -> dict[str, Any]:
    """Run ``lightning-scale <argv>`` in this rank and close the W&B run so its log is complete.

    The harness ends a rank with ``os._exit`` (no atexit hooks), so ``wandb.finish()`` is called
    here: without it the offline ``.wandb`` file may miss its last records.
    """
    from lightning_scale.cli import main

    sys.argv = ["lightning-scale"]  # argv comes from `args`; pytest's own argv would only warn
    start = time.monotonic()
    main(argv)
    seconds = time.monotonic() - start
    import wandb

    if wandb.run is not None:
        wandb.finish()
    return {"rank": int(os.environ["RANK"]), "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a finished 2-process CLI run left behind."""

    root: Path
    history: list[dict[str, Any]]
    checkpoints: list[Path]
    seconds: float

    def values(self, key: str) -> list[tuple[int, float]]:
        """``(trainer/global_step, value)`` of every history row that has ``key``, in order."""
        return [(int(row.get("trainer/global_step", -1)), float(row[key])) for row in self.history if key in row]


def _fit(recipe: Path, root: Path, *overrides: str, timeout: float) -> RunResult:
    """``lightning-scale fit --config <recipe> <overrides>`` on 2 ranks, logging under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [
        "fit",
        "--config",
        str(recipe),
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
    }
    results = run_distributed(_run_cli, WORLD_SIZE, argv, timeout=timeout, init_process_group=False, env=env)
    assert [r["rank"] for r in results] == list(range(WORLD_SIZE))
    runs = find_offline_runs(root)
    assert len(runs) == 1, f"expected one W&B offline run under {root}, found {runs}"
    return RunResult(
        root=root,
        history=read_history(runs[0]),
        checkpoints=sorted(root.rglob("*.ckpt")),
        seconds=max(r["seconds"] for r in results),
    )


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_cpu_recipes_are_found() -> None:
    names = {p.relative_to(RECIPES_DIR).as_posix() for p in CPU_RECIPES}
    assert {"gpt/nano-cpu.yaml", "vision/vit-digits-cpu.yaml"} <= names


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_recipe_trains_end_to_end(recipe: Path, tmp_path: Path) -> None:
    run = _fit(
        recipe,
        tmp_path / "run",
        f"--trainer.max_steps={SMOKE_STEPS}",
        f"--trainer.val_check_interval={SMOKE_STEPS}",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        timeout=240,
    )
    # Training ran exactly the requested optimizer steps, each logging a finite train/loss.
    train = run.values("train/loss")
    assert [step for step, _ in train] == list(range(SMOKE_STEPS)), run.history
    assert all(math.isfinite(v) for _, v in train)
    # Validation ran once, after the last step, and its loss was logged (Lightning stamps the
    # row with the index of the last optimizer step, SMOKE_STEPS - 1).
    val = run.values("val/loss")
    assert len(val) == 1 and val[0][0] in (SMOKE_STEPS - 1, SMOKE_STEPS), val
    assert math.isfinite(val[0][1])
    # A checkpoint of the final step was written and holds the trained step count.
    assert run.checkpoints, f"no checkpoint under {run.root}"
    last = run.checkpoints[-1]
    if last.is_dir():  # the suite's strategies save a sharded (DCP) directory: read it in one process
        from lightning_scale.core.checkpoint import consolidate

        ckpt = consolidate(last)
    else:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == SMOKE_STEPS
    assert ckpt["state_dict"], "empty state_dict in the checkpoint"


@pytest.mark.slow
def test_gpt_recipe_validation_loss_falls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job's evidence, shortened: 45 steps of the GPT recipe on the real corpus.

    Takes ~1-1.5 min on 2 cores, so it is excluded from the default run (README: ``-m "not
    slow"``); ``python -m pytest -q -m slow`` or ``.ci/run`` runs it.
    """
    # Only this test's summary line is printed on success (``-rP``), not the ranks' logs; a
    # failing rank's output is still quoted in the harness's error.
    monkeypatch.setattr(HARNESS_SETTINGS, "forward_output", False)
    steps, every = 45, 15
    run = _fit(
        RECIPES_DIR / "gpt" / "nano-cpu.yaml",
        tmp_path / "run",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={every}",
        "--trainer.limit_val_batches=16",
        "--trainer.enable_checkpointing=false",
        timeout=600,
    )
    val = run.values("val/loss")
    assert len(val) == steps // every, val
    first, last = val[0][1], val[-1][1]
    print(f"GPT recipe, {steps} steps on 2 ranks in {run.seconds:.1f} s: val/loss {[round(v, 3) for _, v in val]}")
    assert last < first, f"validation loss did not fall: {val}"
    # A byte-level model starts at ln(256) = 5.55 nats; after 45 steps it must have learned
    # something well beyond the unigram statistics of the first few steps.
    assert last < 0.8 * math.log(256), val


# --------------------------------------------------------------------------------------------
# GPU recipes: never run here (no GPU), but parsed by the CLI and checked by the memory planner
# --------------------------------------------------------------------------------------------
GPU_RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "gpu" in p.stem)


def test_gpu_recipes_are_found() -> None:
    assert len(GPU_RECIPES) >= 3, GPU_RECIPES


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_gpu_recipe_fits_as_its_header_says(recipe: Path, tmp_path: Path) -> None:
    # (That the CLI parses every recipe is tests/test_cli.py::test_recipe_print_config_parses.)
    import json
    import re

    from lightning_scale.plan_cli import main as plan

    # The planner, on the GPU named in the header, says it fits, with the peak the header states.
    header = recipe.read_text()
    plan_args = re.search(r"^# plan:(.*)$", header, re.M).group(1).split()
    stated_peak = float(re.search(r"= peak ([0-9.]+) GB", header).group(1))
    assert plan(["--recipe", str(recipe), *plan_args, "--json", str(tmp_path / "plan.json")]) == 0
    asked = json.loads((tmp_path / "plan.json").read_text())["asked"]
    assert asked["fits"] is True
    assert round(max(r["peak"] for r in asked["ranks"]) / 1e9, 2) == stated_peak
