"""Run a function on N gloo ranks, each a real separate CPU process.

This is the engine under every multi-rank test of the project. It imports torch, never
lightning (lightning, and the suite's own strategies and callbacks, are only *preloaded* into
the fork server by name, when installed).

How ranks are started
---------------------
Importing torch and lightning costs several seconds per process, which would dominate a suite
of hundreds of multi-rank tests on a 2-core machine. Ranks are therefore forked from a
``multiprocessing`` *forkserver* whose server process imports the heavy modules once
(:data:`SETTINGS` ``.preload``). Every call of :func:`run_distributed` gets *fresh* rank
processes forked from that already-warm server: no state, process group or thread leaks from
one test into the next, and a failed or hung test needs no pool rebuild.

Measured on the 2-core CPU box (torch 2.13, lightning 2.6.6), per call including
``init_process_group``: 2 ranks ~0.12 s, 4 ranks ~0.27 s, a 2-rank Lightning ``ddp`` fit of
2 steps ~0.36 s; with ``start_method="spawn"`` the same calls take ~4.2 s, ~7.4 s and ~9 s.
The server's own start (importing torch + lightning) is ~6-10 s, once per test session. A
pool of long-lived workers could at best save the ~0.1 s fork, at the price of state leaking
between tests and a rebuild after every failure, so it is not used.

The server is started with ``OMP_NUM_THREADS=1`` (and the MKL/OpenBLAS equivalents) so the
libraries it preloads never start a thread pool before forking: forking a process whose OpenMP
pool is live is the classic way to deadlock a child.

Failure handling
----------------
* a rank raising -> :class:`RankFailedError` (rank, exception and, for an exception raised
  ``from`` another, its root cause; remote traceback, output tail);
  the other ranks get :attr:`HarnessSettings.failure_grace_s` seconds to finish or fail, then
  are killed, so a test never waits for the whole timeout because a peer died;
* a rank dying without a report (segfault, ``os._exit``, SIGKILL) -> :class:`RankFailedError`
  with its exit code or signal;
* a hang -> after ``timeout`` seconds every unfinished rank dumps its Python stacks
  (``faulthandler`` on SIGUSR1), is SIGKILLed with its process tree, and
  :class:`DistributedTimeoutError` names it and shows the stacks.

Each rank calls ``gc.freeze()`` first: it is forked with the server's whole heap (torch,
lightning, ...), which lives as long as the rank, so full garbage collections skip it.

Each rank is its own process-group leader and watches its parent: if the test process dies
(even by SIGKILL) the ranks kill themselves, so no orphan survives a test run.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedHarnessError",
    "DistributedTimeoutError",
    "HarnessSettings",
    "RankFailedError",
    "RankFailure",
    "SETTINGS",
    "find_free_port",
    "run_distributed",
    "warm_up",
]

_PRELOAD_ENV = "LIGHTNING_SCALE_TEST_PRELOAD"
_START_METHOD_ENV = "LIGHTNING_SCALE_TEST_START_METHOD"
_DEFAULT_PRELOAD = (
    "torch", "torch.distributed", "lightning",
    # What nearly every rank of the suite's tests and benchmarks imports on top: about 0.6 s of
    # import time per rank (measured once on a 2-core machine), paid once here instead. None of them starts a thread
    # at import (checked). Modules that are not installed are skipped (:func:`_importable`).
    "torch.distributed.checkpoint", "torch.distributed.pipelining", "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel", "torchmetrics", "fairscale.nn", "fairscale.optim",
    "lightning_scale.strategies", "lightning_scale.callbacks", "lightning_scale.tasks", "lightning_scale.data",
    "lightning_scale.core.planner", "lightning_scale.core.activation_checkpointing",
)
# Thread-pool sizes forced on the fork server (and so on every rank forked from it).
_SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# Substrings of a rank error that mean "MASTER_PORT was taken by someone else": worth a retry.
_PORT_CLASH_MARKERS = ("EADDRINUSE", "address already in use")
_PORT_RETRIES = 2
# The process group's collective timeout is the harness timeout plus this many seconds, so a
# hang is always caught by the harness (which dumps stacks) rather than by a gloo timeout.
_PG_TIMEOUT_MARGIN_S = 60.0
# A silent death is noticed after the fact (the fork server reaps the rank, then notifies us);
# its true time is taken as this many seconds before we noticed, so it sorts before the
# "connection closed" errors it causes in the other ranks.
_DEATH_NOTICE_LATENCY_S = 0.5
# First message of every rank: it is running the harness's code (empty = never a pickle).
_READY = b""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def _default_preload() -> list[str]:
    """Modules the fork server imports once; ``LIGHTNING_SCALE_TEST_PRELOAD`` overrides.

    The variable is a comma-separated list of module names (empty string = preload nothing).
    ``pytest`` is added when the test process already imported it, because rank processes
    import the test module a target function lives in, and that module imports pytest.
    """
    raw = os.environ.get(_PRELOAD_ENV)
    if raw is not None:
        return [name.strip() for name in raw.split(",") if name.strip()]
    names = list(_DEFAULT_PRELOAD)
    if "pytest" in sys.modules:
        names.append("pytest")
    names.append(__name__)
    return names


@dataclass
class HarnessSettings:
    """Process-wide knobs of the harness; change the fields of :data:`SETTINGS` to tune them.

    Fields are read when used, except ``start_method``/``preload`` which are read when the
    fork server starts (the first :func:`run_distributed` or :func:`warm_up` call).
    """

    start_method: str = field(default_factory=lambda: os.environ.get(_START_METHOD_ENV, "forkserver"))
    """``"forkserver"`` (default, fast) or ``"spawn"`` (every rank imports everything itself)."""
    preload: list[str] = field(default_factory=_default_preload)
    """Module names imported once by the fork server; missing ones are skipped."""
    startup_timeout_s: float = 120.0
    """Seconds ranks get to start (reach the harness's code) before the ``timeout`` of a call
    starts counting; only matters for ``"spawn"``, where each rank first imports torch."""
    failure_grace_s: float = 3.0
    """Seconds the other ranks get to finish after the first rank failed, before being killed."""
    stack_dump_wait_s: float = 1.0
    """Upper bound, in seconds, to wait for hung ranks to write their stacks before SIGKILL."""
    output_tail_lines: int = 50
    """Lines of a failing rank's captured stdout/stderr quoted in the error."""
    gpu_semantics: bool = False
    """Default of :func:`run_distributed`'s ``gpu_semantics`` (the test suite's conftest turns it on)."""
    forward_output: bool = True
    """After a successful call, copy the ranks' captured output to this process's stdout
    (pytest captures it and shows it only if the test then fails)."""


SETTINGS = HarnessSettings()
"""The settings every :func:`run_distributed` call reads."""


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
@dataclass
class RankFailure:
    """What one rank left behind when it failed.

    ``kind`` is ``"raised"`` (the target raised), ``"died"`` (the process ended without a
    report; see ``exitcode``: negative = killed by that signal) or ``"killed"`` (still running
    after the grace period that followed another rank's failure).
    """

    rank: int
    kind: str
    summary: str
    traceback: str = ""
    exitcode: int | None = None
    stack: str = ""
    output_tail: str = ""
    time_s: float = 0.0
    """Wall-clock time (``time.time()``, seconds) the failure was seen; orders the report."""

    def describe(self) -> str:
        """Multi-line human-readable description (summary, traceback, stack, output tail)."""
        parts = [f"[rank {self.rank}] {self.summary}"]
        if self.traceback:
            parts.append(_indent("Remote traceback:\n" + self.traceback.rstrip()))
        if self.stack:
            parts.append(_indent("Python stacks when killed:\n" + self.stack.rstrip()))
        if self.output_tail:
            parts.append(_indent("Output (stdout+stderr, tail):\n" + self.output_tail.rstrip()))
        return "\n".join(parts)


class DistributedHarnessError(Exception):
    """Base class of the harness's errors. ``pids`` maps rank -> OS process id."""

    def __init__(self, message: str, pids: Mapping[int, int]) -> None:
        super().__init__(message)
        self.pids = dict(pids)


class RankFailedError(DistributedHarnessError):
    """One or more ranks raised or died; ``failures`` lists them, the first failure first."""

    def __init__(self, message: str, pids: Mapping[int, int], failures: Sequence[RankFailure]) -> None:
        super().__init__(message, pids)
        self.failures = list(failures)

    @property
    def failed_ranks(self) -> list[int]:
        """Ranks that raised or died (not those killed after the grace period)."""
        return [f.rank for f in self.failures if f.kind != "killed"]


class DistributedTimeoutError(DistributedHarnessError):
    """Some ranks did not finish within the timeout; ``hung_ranks`` names them, ``stacks``
    maps each to the Python stack text it dumped before being killed."""

    def __init__(
        self, message: str, pids: Mapping[int, int], hung_ranks: Sequence[int], stacks: Mapping[int, str]
    ) -> None:
        super().__init__(message, pids)
        self.hung_ranks = list(hung_ranks)
        self.stacks = dict(stacks)


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------
_handed_out_ports: set[int] = set()
_port_lock = threading.Lock()


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free now and was never returned before in this
    process (so two consecutive tests never share a port that may still be in TIME_WAIT)."""
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise RuntimeError("could not find a TCP port not handed out before in 100 attempts")


# --------------------------------------------------------------------------------------------
# Process context / fork server
# --------------------------------------------------------------------------------------------
_server_lock = threading.Lock()


@contextlib.contextmanager
def _patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables of this process (restored on exit)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _get_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context ranks start from; (re)starts the fork server if needed."""
    method = SETTINGS.start_method
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {method!r}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        with _server_lock:
            preload = [name for name in SETTINGS.preload if _importable(name)]
            ctx.set_forkserver_preload(preload)
            with _patched_environ(_SINGLE_THREAD_ENV):
                multiprocessing.forkserver.ensure_running()
    return ctx


def _importable(module: str) -> bool:
    """True when ``module`` can be found without importing it."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _noop() -> None:
    """Target of :func:`warm_up`."""


def warm_up() -> float:
    """Start the fork server and wait until its preloads are imported.

    Optional: the first :func:`run_distributed` does it anyway. Returns the seconds it took.
    """
    start = time.monotonic()
    process = _get_context().Process(target=_noop, daemon=True)
    process.start()
    process.join()
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------
@dataclass
class _RankSpec:
    """Everything a rank process needs (pickled to it by multiprocessing)."""

    rank: int
    world_size: int
    payload: bytes  # pickle of (fn, args, kwargs)
    env: dict[str, str | None]
    backend: str
    init_process_group: bool
    timeout_s: float
    output_path: str
    stack_path: str
    gpu_semantics: bool = False


@dataclass
class _Report:
    """What a rank sends back: a result, or an exception description."""

    ok: bool
    value: Any = None
    summary: str = ""
    traceback: str = ""
    time_s: float = 0.0


def _rank_main(spec: _RankSpec, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a rank process: isolate, configure, run the target, report, exit."""
    # The fork server's preloaded heap (torch, lightning, ...) lives as long as the rank: move it
    # out of the garbage collector's view, so that full collections walk only the rank's objects.
    gc.freeze()
    _become_group_leader()
    _capture_output(spec.output_path)
    _watch_parent()
    stack_file = open(spec.stack_path, "w")  # noqa: SIM115 - lives until os._exit
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
    conn.send_bytes(_READY)  # from here on SIGUSR1 dumps stacks instead of killing
    _apply_env(spec.env)
    _sync_lightning_rank(spec.rank)
    torch.set_num_threads(1)
    report = _run_target(spec)
    if report.ok:
        _destroy_process_group()
        _send(conn, report)
    else:  # report first: the parent's grace period starts from the first failure
        _send(conn, report)
        _destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if report.ok else 1)  # skip interpreter teardown (non-daemon threads, atexit)


def _become_group_leader() -> None:
    """Make this rank its own process group so the parent can SIGKILL its whole tree."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _capture_output(path: str) -> None:
    """Send fds 1 and 2 (so C++ and Python output alike) to ``path``, line-buffered."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    faulthandler.enable(file=sys.stderr, all_threads=True)  # segfault stacks land in the output


def _watch_parent() -> None:
    """Start a daemon thread that kills this rank's process group if the parent dies."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def _exit_when_parent_dies() -> None:
        multiprocessing.connection.wait([sentinel])
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=_exit_when_parent_dies, name="harness-parent-watchdog", daemon=True).start()


def _apply_env(env: Mapping[str, str | None]) -> None:
    """Set (or, for ``None`` values, unset) environment variables of this rank."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _sync_lightning_rank(rank: int) -> None:
    """Correct ``rank_zero_only.rank``, which lightning computed from the *server's*
    environment (rank 0) when it was preloaded. Touches only already-imported modules."""
    module = sys.modules.get("lightning_utilities.core.rank_zero")
    if module is not None:
        module.rank_zero_only.rank = rank  # type: ignore[attr-defined]


def _run_target(spec: _RankSpec) -> _Report:
    """Unpickle and run the target, wrapping any exception into a report."""
    try:
        from lightning_scale.core import device

        fn, args, kwargs = pickle.loads(spec.payload)
        if spec.init_process_group:
            pg_timeout = datetime.timedelta(seconds=spec.timeout_s + _PG_TIMEOUT_MARGIN_S)
            # A rank that will use CUDA sets its device from LOCAL_RANK before its group starts.
            local = device.set_local_device(spec.rank) if device.backend_has_nccl(spec.backend) else None
            dist.init_process_group(spec.backend, timeout=pg_timeout, device_id=local)
        doubles = device.gpu_semantics() if spec.gpu_semantics else contextlib.nullcontext()
        with doubles:
            value = fn(*args, **kwargs)
        return _Report(ok=True, value=value)
    except BaseException as exc:  # noqa: BLE001 - everything, incl. SystemExit, is a failure
        return _Report(
            ok=False,
            summary=_summarize(exc),
            traceback=traceback.format_exc(),
            time_s=time.time(),
        )


def _summarize(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, plus its root cause when it was raised ``from`` another
    exception (a wrapper such as torch's "[Stage 1] failed to run forward" hides the real error,
    e.g. a peer's closed connection, in its ``__cause__``)."""
    text = f"{_type_name(exc)}: {exc}"
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    if root is not exc:
        text += f"\n(root cause) {_type_name(root)}: {root}"
    return text


def _type_name(exc: BaseException) -> str:
    """``ValueError`` for builtins, ``package.module.Error`` otherwise."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _send(conn: multiprocessing.connection.Connection, report: _Report) -> None:
    """Send ``report`` as plain pickle bytes (tensors by value, no fd sharing, which would
    break once this process exits); an unpicklable result becomes a failure report."""
    try:
        data = pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        data = pickle.dumps(
            _Report(ok=False, summary=f"result is not picklable: {exc!r}", time_s=time.time())
        )
    conn.send_bytes(data)
    conn.close()


def _destroy_process_group() -> None:
    """Destroy the default process group if one is still initialised."""
    with contextlib.suppress(Exception):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
@dataclass
class _Rank:
    """Parent-side handle of one rank process."""

    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    spec: _RankSpec
    report: _Report | None = None
    ready: bool = False
    exited: bool = False
    first_seen_failed_s: float = 0.0

    @property
    def pid(self) -> int:
        """OS process id of the rank."""
        assert self.process.pid is not None
        return self.process.pid


_live_processes: dict[int, multiprocessing.process.BaseProcess] = {}


def _kill_leftovers_at_exit() -> None:
    """Last-resort cleanup of ranks still alive when the test process exits."""
    for pid in list(_live_processes):
        _kill_tree(pid)


atexit.register(_kill_leftovers_at_exit)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    init_process_group: bool = True,
    env: Mapping[str, str | None] | None = None,
    gpu_semantics: bool | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh rank processes; return their results.

    Args:
        fn: a module-level function (pickled by reference, so it must be importable by its
            module name); ``args``, ``kwargs`` and its return value must be picklable
            (CPU tensors are fine: they travel by value).
        world_size: number of ranks (processes), >= 1.
        timeout: seconds the ranks get, counted from when all of them are running (process
            start-up is bounded separately by ``SETTINGS.startup_timeout_s``). On expiry
            :class:`DistributedTimeoutError`. The process group made here gets a longer
            collective timeout, so that the harness, which dumps stacks, fires first.
        backend: ``torch.distributed`` backend for ``init_process_group``.
        init_process_group: if True, each rank calls
            ``torch.distributed.init_process_group(backend, timeout=...)`` (env:// init from
            the variables below) before ``fn``; if False ``fn`` does it (e.g. a Lightning
            ``Trainer``, which sees ``LOCAL_RANK`` etc. and joins as an externally launched
            process). Any group still initialised when ``fn`` returns is destroyed.
        gpu_semantics: run ``fn`` under :func:`lightning_scale.core.device.gpu_semantics`: the
            CPU doubles of GPU behaviour (deferred host<->device copies, which hold garbage until
            waited on, and the collective audit, which fails a host-resident tensor sent to a
            group that would be NCCL on a GPU). Not for compiled code (the audit's dispatch mode
            keeps Dynamo eager). None: ``SETTINGS.gpu_semantics``.
        env: extra environment variables of every rank, applied after the harness's own
            (``None`` unsets one). Thread-pool variables of libraries the fork server
            preloaded (e.g. ``OMP_NUM_THREADS``) are read at import and so do not apply.

    Every rank sees ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` (a free port), ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK=0``, ``GROUP_RANK=0``,
    ``OMP_NUM_THREADS=1`` and runs with ``torch.set_num_threads(1)``.

    As with any non-fork ``multiprocessing`` start, a *script* calling this must guard its
    entry point with ``if __name__ == "__main__":`` (ranks import the main module).

    Returns:
        The per-rank return values; index = rank.

    Raises:
        RankFailedError: a rank raised or died (message: rank, exception, remote traceback,
            output tail; all failed ranks, first failure first).
        DistributedTimeoutError: ranks still running after ``timeout`` seconds (message:
            their ranks and Python stacks).
        TypeError: ``fn``/arguments cannot be pickled.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    payload = _pickle_payload(fn, args, kwargs)
    if gpu_semantics is None:
        gpu_semantics = SETTINGS.gpu_semantics
    # Retry only when MASTER_PORT was grabbed by another process between our pick and rank 0's
    # bind (it fails at process-group set-up); the next attempt gets fresh ranks and a new port.
    for attempt in range(_PORT_RETRIES + 1):
        try:
            return _run_once(fn, payload, world_size, timeout, backend, init_process_group, env or {}, gpu_semantics)
        except RankFailedError as err:
            if attempt == _PORT_RETRIES or not _is_port_clash(err):
                raise
    raise AssertionError("unreachable")


def _pickle_payload(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle the call once in the parent; explain the usual mistake if it fails."""
    try:
        return pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"cannot send {getattr(fn, '__qualname__', fn)!r} and its arguments to the ranks: {exc}. "
            "The target must be a module-level function of an importable module (no lambda or "
            "nested function) and its arguments must be picklable."
        ) from exc


def _is_port_clash(err: RankFailedError) -> bool:
    """True when a rank failed because MASTER_PORT was already taken."""
    text = " ".join(f.summary + f.traceback for f in err.failures).lower()
    return any(marker.lower() in text for marker in _PORT_CLASH_MARKERS)


def _rank_env(
    rank: int, world_size: int, port: int, extra: Mapping[str, str | None]
) -> dict[str, str | None]:
    """The environment variables of one rank (harness defaults, then ``extra``)."""
    env: dict[str, str | None] = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "NODE_RANK": "0",
        "GROUP_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


def _run_once(
    fn: Callable[..., Any],
    payload: bytes,
    world_size: int,
    timeout: float,
    backend: str,
    init_process_group: bool,
    env: Mapping[str, str | None],
    gpu_semantics: bool = False,
) -> list[Any]:
    """One attempt of :func:`run_distributed` with a fresh port and fresh processes."""
    ctx = _get_context()
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="lightning-scale-ranks-") as tmp:
        specs = [
            _RankSpec(
                rank=rank,
                world_size=world_size,
                payload=payload,
                env=_rank_env(rank, world_size, port, env),
                backend=backend,
                init_process_group=init_process_group,
                gpu_semantics=gpu_semantics,
                timeout_s=timeout,
                output_path=str(Path(tmp) / f"rank{rank}.out"),
                stack_path=str(Path(tmp) / f"rank{rank}.stack"),
            )
            for rank in range(world_size)
        ]
        ranks: list[_Rank] = []
        try:
            for spec in specs:
                ranks.append(_start_rank(ctx, spec))
            expired = _wait(ranks, timeout)
            return _conclude(fn, ranks, expired, timeout)
        finally:
            for handle in ranks:
                _stop(handle)


def _start_rank(ctx: multiprocessing.context.BaseContext, spec: _RankSpec) -> _Rank:
    """Start one rank process."""
    recv_end, send_end = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_rank_main, args=(spec, send_end), name=f"rank{spec.rank}", daemon=True
    )
    process.start()
    send_end.close()
    assert process.pid is not None
    _live_processes[process.pid] = process
    return _Rank(rank=spec.rank, process=process, conn=recv_end, spec=spec)


def _wait(ranks: list[_Rank], timeout: float) -> str | None:
    """Collect reports and exits until every rank exited or a deadline passed.

    Deadlines: ``SETTINGS.startup_timeout_s`` for all ranks to be ready, then ``timeout``
    seconds for them to finish, cut short to ``SETTINGS.failure_grace_s`` seconds after the
    first failure. Returns None when all ranks exited, else the deadline that expired:
    ``"startup"``, ``"run"`` or ``"grace"``.
    """
    phase, deadline = "startup", time.monotonic() + SETTINGS.startup_timeout_s
    grace_deadline = float("inf")
    while not all(r.exited for r in ranks):
        if phase == "startup" and all(r.ready or r.exited for r in ranks):
            phase, deadline = "run", time.monotonic() + timeout
        remaining = min(deadline, grace_deadline) - time.monotonic()
        if remaining <= 0:
            return "grace" if grace_deadline < deadline else phase
        _collect_ready(ranks, remaining)
        if grace_deadline == float("inf") and any(_failed(r) for r in ranks):
            grace_deadline = time.monotonic() + SETTINGS.failure_grace_s
    return None


def _collect_ready(ranks: list[_Rank], wait_s: float) -> None:
    """Wait up to ``wait_s`` seconds for messages or exits of the ranks and record them."""
    by_conn = {r.conn: r for r in ranks if r.report is None and not r.conn.closed}
    by_sentinel = {r.process.sentinel: r for r in ranks if not r.exited}
    ready = multiprocessing.connection.wait([*by_conn, *by_sentinel], timeout=wait_s)
    for obj in ready:  # messages before exits, so an exit is never mistaken for a silent death
        if obj in by_conn:
            _drain(by_conn[obj])
    for obj in ready:
        if obj in by_sentinel:
            handle = by_sentinel[obj]
            handle.process.join(timeout=5)
            handle.exited = handle.process.exitcode is not None
            _drain(handle)
            if _failed(handle) and not handle.first_seen_failed_s:
                handle.first_seen_failed_s = time.time() - _DEATH_NOTICE_LATENCY_S


def _drain(handle: _Rank) -> None:
    """Read every message a rank has sent so far (ready marker, report); EOF = it died."""
    while handle.report is None and not handle.conn.closed and handle.conn.poll():
        try:
            data = handle.conn.recv_bytes()
        except (EOFError, OSError):
            handle.conn.close()
            return
        if data == _READY:
            handle.ready = True
            continue
        handle.report = pickle.loads(data)
        if not handle.report.ok:
            handle.first_seen_failed_s = handle.report.time_s or time.time()


def _failed(handle: _Rank) -> bool:
    """True when the rank reported an exception or exited without a successful report."""
    if handle.report is not None:
        return not handle.report.ok
    return handle.exited


def _conclude(fn: Callable[..., Any], ranks: list[_Rank], expired: str | None, timeout: float) -> list[Any]:
    """Turn the collected state into results or the right exception."""
    unfinished = [r for r in ranks if not r.exited]
    failures = sorted((_failure(r) for r in ranks if _failed(r)), key=lambda f: f.time_s)
    stacks = _dump_stacks(unfinished)
    for handle in unfinished:
        _stop(handle)
    pids = {r.rank: r.pid for r in ranks}
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    if failures:
        killed = [_killed_failure(r, stacks.get(r.rank, "")) for r in unfinished]
        message = _failure_message(name, len(ranks), failures, killed)
        raise RankFailedError(message, pids, [*failures, *killed])
    if expired or unfinished:
        raise DistributedTimeoutError(
            _timeout_message(name, ranks, unfinished, stacks, timeout, expired == "startup"),
            pids,
            [r.rank for r in unfinished],
            stacks,
        )
    if SETTINGS.forward_output:
        _forward_output(ranks)
    return [r.report.value for r in ranks]  # type: ignore[union-attr]


def _failure(handle: _Rank) -> RankFailure:
    """Describe a rank that raised or died."""
    tail = _tail(handle.spec.output_path, SETTINGS.output_tail_lines)
    report = handle.report
    if report is not None:
        return RankFailure(
            rank=handle.rank,
            kind="raised",
            summary=report.summary,
            traceback=report.traceback,
            exitcode=handle.process.exitcode,
            output_tail=tail,
            time_s=handle.first_seen_failed_s,
        )
    code = handle.process.exitcode
    return RankFailure(
        rank=handle.rank,
        kind="died",
        summary=f"died without reporting a result: {_describe_exitcode(code)}",
        exitcode=code,
        output_tail=tail,
        time_s=handle.first_seen_failed_s,
    )


def _killed_failure(handle: _Rank, stack: str) -> RankFailure:
    """Describe a rank killed because it was still running after the grace period."""
    return RankFailure(
        rank=handle.rank,
        kind="killed",
        summary=f"still running {SETTINGS.failure_grace_s:g} s after the first failure; killed",
        stack=stack,
        output_tail=_tail(handle.spec.output_path, SETTINGS.output_tail_lines),
        time_s=time.time(),
    )


def _describe_exitcode(code: int | None) -> str:
    """'exit code N' or 'killed by signal SIGXXX (-N)'."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        return f"killed by signal {-code} (exit code {code})"
    return f"exit code {code}"


def _failure_message(
    name: str, world_size: int, failures: list[RankFailure], killed: list[RankFailure]
) -> str:
    """Message of :class:`RankFailedError`."""
    ranks = ", ".join(str(f.rank) for f in failures)
    header = (
        f"{len(failures)} of {world_size} ranks failed running {name} (rank {ranks}; first failure first)"
    )
    return "\n\n".join([header, *(f.describe() for f in [*failures, *killed])])


def _timeout_message(
    name: str,
    ranks: list[_Rank],
    unfinished: list[_Rank],
    stacks: Mapping[int, str],
    timeout: float,
    at_startup: bool,
) -> str:
    """Message of :class:`DistributedTimeoutError`."""
    hung = ", ".join(str(r.rank) for r in unfinished)
    if at_startup:
        late = ", ".join(str(r.rank) for r in ranks if not r.ready)
        what = f"rank(s) {late} did not start within {SETTINGS.startup_timeout_s:g} s"
    else:
        what = f"timed out after {timeout:g} s"
    lines = [f"{name} on {len(ranks)} ranks: {what}; rank(s) {hung} did not finish"]
    for handle in unfinished:
        stack = stacks.get(handle.rank, "").rstrip() or "(no stack dumped)"
        tail = _tail(handle.spec.output_path, SETTINGS.output_tail_lines).rstrip()
        block = f"[rank {handle.rank}] Python stacks at timeout:\n{_indent(stack)}"
        if tail:
            block += f"\n{_indent('Output (stdout+stderr, tail):' + chr(10) + tail)}"
        lines.append(block)
    return "\n\n".join(lines)


def _dump_stacks(handles: list[_Rank]) -> dict[int, str]:
    """Ask each still-running rank to write its Python stacks (SIGUSR1 -> faulthandler) and
    return them, waiting at most ``SETTINGS.stack_dump_wait_s`` seconds in total."""
    handles = [h for h in handles if h.ready]  # before that SIGUSR1 would just kill the rank
    if not handles:
        return {}
    for handle in handles:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGUSR1)
    deadline = time.monotonic() + SETTINGS.stack_dump_wait_s
    sizes: dict[int, int] = {}
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = {h.rank: _file_size(h.spec.stack_path) for h in handles}
        if all(now.values()) and now == sizes:  # every rank wrote, and nothing grew for 50 ms
            break
        sizes = now
    return {h.rank: _read_text(h.spec.stack_path) for h in handles}


def _stop(handle: _Rank) -> None:
    """Kill a rank's process tree if it is still running and release its resources."""
    if handle.process.exitcode is None:
        _kill_tree(handle.pid)
        handle.process.join(timeout=10)
    handle.exited = handle.process.exitcode is not None
    handle.conn.close()
    _live_processes.pop(handle.pid, None)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group (if it leads one) and all its descendants."""
    victims = [pid, *_descendants(pid)]
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (from /proc; empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, []):
            found.append(child)
            frontier.append(child)
    return found


def _forward_output(ranks: list[_Rank]) -> None:
    """Copy each rank's captured output to this process's stdout, with a header per rank."""
    for handle in ranks:
        text = _read_text(handle.spec.output_path)
        if text.strip():
            sys.stdout.write(f"----- rank {handle.rank} output -----\n{text.rstrip()}\n")


def _tail(path: str, lines: int, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a text file (reading at most ``max_bytes`` bytes)."""
    text = _read_text(path, max_bytes)
    return "\n".join(text.splitlines()[-lines:])


def _read_text(path: str, max_bytes: int | None = None) -> str:
    """The file's text (its last ``max_bytes`` bytes if given); '' if it does not exist."""
    try:
        with open(path, "rb") as handle:
            if max_bytes is not None:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _file_size(path: str) -> int:
    """Size of a file in bytes, 0 if missing."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _indent(text: str, prefix: str = "    ") -> str:
    """Indent every line of ``text``."""
    return "\n".join(prefix + line for line in text.splitlines())
