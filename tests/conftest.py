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
# Every multi-rank test runs under the CPU doubles of GPU behaviour (lightning_scale.core.device
# .gpu_semantics): host<->device copies made through the transfer helper hold garbage until
# waited on, and a host-resident tensor sent to a group that would be NCCL-only on a GPU fails
# the test. Compiled code opts out per call (gpu_semantics=False): the audit's dispatch mode
# keeps Dynamo eager.
from lightning_scale.testing import SETTINGS as _HARNESS  # noqa: E402

_HARNESS.gpu_semantics = True


@pytest.fixture(scope="session")
def run_distributed() -> Callable[..., list[Any]]:
    """:func:`lightning_scale.testing.run_distributed`, after starting the fork server once
    (its preload of torch, lightning and the suite's modules takes several seconds, paid once per session)."""
    from lightning_scale.testing import run_distributed as run, warm_up

    warm_up()
    return run


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
