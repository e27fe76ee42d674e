"""Time a rank spends blocked in communication, by mesh dimension. Torch only.

What is measured: host wall-clock seconds inside the calls where a rank *waits* for other ranks
(its exposed communication; communication that overlaps compute costs nothing and is not seen):

==========================================  =====================================================
call (patched while installed)              who makes it here
==========================================  =====================================================
synchronous ``torch.distributed``           FSDP2 all-gather / reduce-scatter (ZeRO-3), the
collectives (``async_op=False``):           suite's data-parallel gradient all-reduce, ZeRO-1/2
``all_reduce``, ``all_gather_single`` ...   parameter all-gather, clipping norms, loss broadcast
``_functional_collectives.wait_tensor``     DTensor: tensor- and sequence-parallel collectives
                                            (launched asynchronously, waited here)
``pipelining.schedules._wait_batch_p2p``    pipeline stage-to-stage send/recv waits
:func:`section` (explicit)                  waits the suite's own code knows about (ZeRO-2's
                                            asynchronous reduce-scatters)
==========================================  =====================================================

Each second is attributed to a name: the mesh dimension whose process group the call used
(:meth:`CommTimer.name_groups`, e.g. ``"dp"``, ``"tp"``, ``"pp"``), ``"tp"`` for DTensor waits,
``"pp"`` for pipeline p2p waits, else ``"other"``. Nested calls (``broadcast_object_list``
calling ``broadcast``) count once, for the outermost.

Not measured: asynchronous calls' ``Work.wait()`` made by third-party code (a C++ method: it
cannot be wrapped), e.g. FSDP2 with explicit prefetching, or the all-reduce of Lightning's
``ddp``, which DDP's C++ reducer launches and waits (overlapped with the backward; its exposed
tail lands in the backward phase). On CUDA with NCCL the host returns before the transfer ends,
so host timers do not measure communication: ScaleProfiler does not use this class there.

Overhead while installed and inactive: one attribute check per patched call. While active: two
``time.perf_counter`` calls per communication call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from lightning_scale.core.comm_patches import NAMESPACES, CommPatches

# torch.distributed collectives that block when called with async_op=False. Patched in both
# namespaces (``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X``): code that
# calls one of them through the other module (``broadcast_object_list`` -> ``broadcast``) is seen.
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
    "all_to_all_single", "barrier", "send", "recv", "all_gather_object", "broadcast_object_list",
    "gather", "scatter",
)
_NAMESPACES = NAMESPACES
# (module, attribute, fixed name): third-party blocking waits that carry no group argument.
_WAITS = (
    ("torch.distributed._functional_collectives", "wait_tensor", "tp"),
    ("torch.distributed.pipelining.schedules", "_wait_batch_p2p", "pp"),
)


class CommTimer(CommPatches):
    """Process-wide accumulator of blocked-in-communication seconds (one per process).

    Usage::

        timer = CommTimer.get()
        timer.install()                       # once; patches the calls in the module docstring
        timer.name_groups([("dp", dp_group), ("tp", tp_group)])
        timer.start()                         # the steps to measure
        ...
        seconds = timer.stop()                # {"dp": 0.012, "tp": 0.034}
    """

    _instance: CommTimer | None = None

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @classmethod
    def get(cls) -> CommTimer:
        if cls._instance is None:
            cls._instance = CommTimer()
        return cls._instance

    # -- patches ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap the calls listed in the module docstring (idempotent; missing ones are skipped,
        so an older or newer torch without one of them still works)."""
        if self.installed:
            return
        for namespace in _NAMESPACES:
            module = importlib.import_module(namespace)
            for attr in _COLLECTIVES:
                fn = getattr(module, attr, None)
                if callable(fn):
                    self._patch(module, namespace, attr, self._wrap_collective(fn))
        for namespace, attr, name in _WAITS:
            try:
                module = importlib.import_module(namespace)
            except ImportError:
                continue
            fn = getattr(module, attr, None)
            if callable(fn):
                self._patch(module, namespace, attr, self._wrap_fixed(fn, name))

    def _wrap_collective(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active or kwargs.get("async_op", False):
                return fn(*args, **kwargs)  # asynchronous: the launch is not a wait
            return self._timed(self._name(kwargs.get("group")), fn, args, kwargs)

        return timed

    def _wrap_fixed(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            return self._timed(name, fn, args, kwargs)

        return timed

    def _timed(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with self.section(name):
            return fn(*args, **kwargs)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Count the enclosed block as communication of ``name`` (while active; inside another
        counted call it is not counted again: the outermost call counts)."""
        if not self.active or getattr(self._local, "depth", 0):
            yield
            return
        self._local.depth = 1
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._local.depth = 0
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
                self.calls[name] = self.calls.get(name, 0) + 1

    # -- measuring -------------------------------------------------------------------------------
    def start(self) -> None:
        """Zero the counters and start timing."""
        with self._lock:
            self.seconds, self.calls = {}, {}
        self.active = True

    def stop(self) -> dict[str, float]:
        """Stop timing; returns {name: seconds} since :meth:`start` (call counts stay in ``calls``)."""
        self.active = False
        return dict(self.seconds)


def section(name: str) -> contextlib.AbstractContextManager[None]:
    """``with section("dp"):`` around a wait the suite's own code makes (no-op unless timing)."""
    return CommTimer.get().section(name)
