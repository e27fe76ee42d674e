"""Test utilities of lightning_scale: run a function on N real gloo ranks on CPU.

Usage in a test::

    from lightning_scale.testing import run_distributed

    def _target(x):          # module-level, so ranks can import it by name
        ...

    def test_something():
        results = run_distributed(_target, 2, 3.0, timeout=60)   # one entry per rank
"""

from lightning_scale.testing.multiprocess import (
    SETTINGS,
    DistributedHarnessError,
    DistributedTimeoutError,
    HarnessSettings,
    RankFailedError,
    RankFailure,
    find_free_port,
    run_distributed,
    warm_up,
)

__all__ = [
    "SETTINGS",
    "DistributedHarnessError",
    "DistributedTimeoutError",
    "HarnessSettings",
    "RankFailedError",
    "RankFailure",
    "find_free_port",
    "run_distributed",
    "warm_up",
]
