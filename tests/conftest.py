"""Shared pytest configuration of lightning_scale's tests.

Multi-rank tests run a module-level function on N real gloo ranks on CPU::

    from lightning_scale.testing import run_distributed

    results = run_distributed(my_target, 2, arg, timeout=60)   # list, index = rank

or request the session fixture ``run_distributed`` (the same function, with the fork server
already warm). Targets must be importable by name: define them at module level, e.g. in a
``tests/_*_targets.py`` helper module. Bound each call with its own ``timeout`` (seconds); no
global pytest-timeout is set here, so the harness's timeout (which kills the ranks and reports
their stacks) is always the one that fires. Knobs: ``lightning_scale.testing.SETTINGS`` and the
environment variables ``LIGHTNING_SCALE_TEST_START_METHOD`` / ``LIGHTNING_SCALE_TEST_PRELOAD``.

Add new fixtures in their own section below.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# ---------------------------------------------------------------------------------------------
# Import path: make the repository importable when the package is not installed (`pytest` run
# from anywhere, not only `python -m pytest` from the repository root).
# ---------------------------------------------------------------------------------------------
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


# ---------------------------------------------------------------------------------------------
# Multi-process harness
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def run_distributed() -> Callable[..., list[Any]]:
    """:func:`lightning_scale.testing.run_distributed`, after starting the fork server once
    (its preload of torch + lightning takes several seconds, paid once per session)."""
    from lightning_scale.testing import run_distributed as run, warm_up

    warm_up()
    return run


def pytest_configure(config) -> None:
    """Before any test (and so before the fork server starts, whichever test starts it): modules
    nearly every rank imports are imported once in the fork server instead of once per rank
    (~0.5 s of CPU per rank on a 2-core machine). None of them starts a thread pool at import."""
    from lightning_scale.testing import SETTINGS

    for name in ("lightning_scale", "lightning_scale.strategies", "lightning_scale.callbacks", "lightning_scale.tasks",
                 "lightning_scale.data", "torch.distributed.checkpoint", "torch.distributed.pipelining",
                 "torch.distributed.fsdp", "torch.distributed.tensor.parallel", "torchmetrics", "fairscale"):
        if name not in SETTINGS.preload:
            SETTINGS.preload.append(name)


# ---------------------------------------------------------------------------------------------
# Environment isolation: tests that run the CLI in-process call seed_everything, which sets
# PL_GLOBAL_SEED (read by Lightning's DistributedSampler) and other variables; restore the
# environment after every test so no test depends on the order of the others.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _restore_environment():
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
