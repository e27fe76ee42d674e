"""Where a run computes, and every copy and collective that crosses host and device. Torch only.

One home for the decisions that differ between CPU and CUDA runs, so that the rest of the suite
never asks "is there a GPU on this machine?" (``torch.cuda.is_available()``): whether a run is on
CUDA is its root device's type (the strategy's ``root_device``), and this module is the only one
allowed to look at the machine itself (:func:`machine_has_cuda`, for the test harness).

What lives here:

* **Device facts**: :func:`is_cuda`, :func:`pin_host_memory`, :func:`synchronize`.
* **Process-group backends** (design guide section 9): :func:`default_backend` chooses ``gloo``
  on CPU, ``nccl`` on CUDA, and the mixed ``"cuda:nccl,cpu:gloo"`` when host tensors must be
  communicated (CPU offload, as torchtitan does); :func:`backend_has_nccl` and
  :func:`backend_takes_host` read a backend string, mixed ones included (a mixed string never
  equals ``"nccl"``).
* **The transfer helper**: :func:`copy_`, :func:`to_host`, :func:`to_device`. Each returns a
  :class:`Transfer` handle; the destination may be read only after ``handle.wait()``. On CUDA a
  copy between pinned host memory and the device is ``non_blocking`` and the handle waits on a
  CUDA event recorded after it; on CPU the copy is done when the call returns.
* **Host-resident tensors**: code that keeps tensors on the host *by design* (offloaded optimizer
  state, gradient chunks, activations) allocates them with :func:`host_empty` or registers them
  with :func:`register_host`. :func:`is_host_resident` answers for a tensor's storage.
* **CPU doubles of GPU behaviour** (for tests, see :func:`gpu_semantics`):

  - *deferred copies*: a copy made through the helper leaves its destination filled with garbage
    (NaN, or the dtype's minimum for integers) until its handle is waited on, as a
    ``non_blocking`` device-to-host copy does on a GPU. Code that reads before it waits computes
    on garbage, and a parity test fails.
  - *collective audit*: every ``torch.distributed`` collective call is recorded (function, the
    group's backend on a GPU, each tensor's device and host residency) and a host-resident tensor
    sent to a group whose GPU backend is NCCL-only raises :class:`HostTensorCollectiveError`
    there and then. Host residency propagates from registered storages through every aten op
    (a norm computed from offloaded gradients is on the host too) by a dispatch mode, except
    through the transfer helper, which is how code moves a tensor to the device.

* **Device timing**: :class:`DeviceClock` marks points of a stream of work: CUDA events on a
  CUDA device (kernels, not launches), ``time.perf_counter`` on CPU.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "DeviceClock",
    "HostTensorCollectiveError",
    "Transfer",
    "audit_log",
    "backend_has_nccl",
    "backend_takes_host",
    "copy_",
    "default_backend",
    "gpu_semantics",
    "host_empty",
    "is_cuda",
    "is_host_resident",
    "machine_has_cuda",
    "pin_host_memory",
    "register_host",
    "set_local_device",
    "set_gpu_backend",
    "synchronize",
    "to_device",
    "to_host",
]

HOST = torch.device("cpu")
CUDA = torch.device("cuda")  # the current CUDA device (for "what would this be on a GPU?")
MIXED_BACKEND = "cuda:nccl,cpu:gloo"


# ----------------------------------------------------------------------------------------------
# Device facts
# ----------------------------------------------------------------------------------------------
def as_device(device: torch.device | str | None) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device or "cpu")


def is_cuda(device: torch.device | str | None) -> bool:
    """Whether ``device`` (a run's root device, or a tensor's) is a CUDA device."""
    return as_device(device).type == "cuda"


def pin_host_memory(device: torch.device | str | None) -> bool:
    """Pin host buffers that exchange data with ``device``: only for CUDA (pinning needs an
    accelerator; pinned memory is what makes a host<->device copy ``non_blocking``)."""
    return is_cuda(device)


def machine_has_cuda() -> bool:
    """Whether this *machine* has a usable CUDA device. Only the test harness and the GPU check
    ask this; a run asks its root device (:func:`is_cuda`)."""
    return torch.cuda.is_available()


def set_local_device(local_rank: int) -> torch.device | None:
    """On a machine with CUDA, make ``cuda:<local_rank mod devices>`` this process's current
    device (before its process group starts) and return it; None elsewhere."""
    if not machine_has_cuda():
        return None
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(as_device(device))


# ----------------------------------------------------------------------------------------------
# Process-group backends
# ----------------------------------------------------------------------------------------------
def default_backend(device: torch.device | str | None, host_collectives: bool = False) -> str:
    """The process-group backend for a run on ``device``: ``"gloo"`` on CPU; on CUDA ``"nccl"``,
    or ``"cuda:nccl,cpu:gloo"`` when ``host_collectives`` (some collectives carry host tensors,
    e.g. offloaded optimizer state: NCCL takes device tensors only)."""
    if not is_cuda(device):
        return "gloo"
    return MIXED_BACKEND if host_collectives else "nccl"


def _parts(backend: str | None) -> list[str]:
    """``"cuda:nccl,cpu:gloo"`` -> ["nccl", "gloo"]; ``"nccl"`` -> ["nccl"]."""
    return [p.split(":")[-1].strip().lower() for p in str(backend or "").split(",") if p.strip()]


def backend_has_nccl(backend: str | None) -> bool:
    """Whether a backend string (plain or mixed) uses NCCL for device tensors."""
    return "nccl" in _parts(backend)


def backend_takes_host(backend: str | None) -> bool:
    """Whether collectives of a group with this backend accept host (CPU) tensors."""
    parts = _parts(backend)
    return bool(parts) and any(p != "nccl" for p in parts)


# ----------------------------------------------------------------------------------------------
# Host-resident tensors
# ----------------------------------------------------------------------------------------------
class _HostRegistry:
    """Storages that live on the host by design, keyed by the storage, held weakly."""

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}
        self._limit = 4096
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._refs)

    @staticmethod
    def _storage(t: torch.Tensor) -> Any | None:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            t = t._local_tensor
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # meta, fake or sparse tensors: never host-resident

    def add(self, t: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = self._storage(t)
        if storage is None or storage.device.type != "cpu":
            return
        with self._lock:
            self._refs[storage._cdata] = StorageWeakRef(storage)
            if len(self._refs) > self._limit:  # drop freed storages now and then (amortised)
                self._refs = {k: r for k, r in self._refs.items() if not r.expired()}
                self._limit = max(4096, 2 * len(self._refs))

    def discard(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        if storage is not None:
            with self._lock:
                self._refs.pop(storage._cdata, None)

    def __contains__(self, t: torch.Tensor) -> bool:
        if not self._refs:
            return False
        storage = self._storage(t)
        if storage is None:
            return False
        ref = self._refs.get(storage._cdata)
        return ref is not None and not ref.expired()


_HOST_STORAGES = _HostRegistry()


def register_host(*tensors: torch.Tensor | None) -> None:
    """Declare that ``tensors`` live on the host by design (offloaded state). Only CPU storages
    are recorded; a device tensor (on a GPU run) is ignored."""
    for t in tensors:
        if t is not None:
            _HOST_STORAGES.add(t)


def is_host_resident(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage was registered (or derived, under the audit) as host-resident."""
    return t in _HOST_STORAGES


def host_empty(shape: int | Sequence[int], dtype: torch.dtype, device: torch.device | str | None,
               zero: bool = False) -> torch.Tensor:
    """A host buffer that exchanges data with ``device`` (the run's root device): pinned when
    ``device`` is CUDA, registered as host-resident. ``zero=True`` fills it with zeros."""
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    out = torch.empty(size, dtype=dtype, device=HOST, pin_memory=pin_host_memory(device))
    if zero:
        out.zero_()
    register_host(out)
    return out


# ----------------------------------------------------------------------------------------------
# The transfer helper
# ----------------------------------------------------------------------------------------------
@dataclass
class Transfer:
    """A host<->device copy in flight. :meth:`wait` before reading the destination (host or
    device side) and before writing the source again."""

    event: Any = None  # torch.cuda.Event recorded after a non_blocking copy
    deferred: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU double: (destination, data)
    done: bool = False

    def wait(self) -> None:
        if self.done:
            return
        if self.event is not None:
            self.event.synchronize()
        if self.deferred is not None:
            dst, data = self.deferred
            with _no_propagation():
                dst.copy_(data)
            self.deferred = None
        self.done = True


def wait_all(transfers: Sequence[Transfer]) -> None:
    for t in transfers:
        t.wait()


DONE = Transfer(done=True)


@dataclass
class _Doubles:
    deferred: bool = False
    audit: bool = False
    gpu_backend: str = "nccl"  # what the run's groups would use on a GPU (set by the strategy)
    log: list[dict[str, Any]] = field(default_factory=list)


_DOUBLES = _Doubles()


def _garbage(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min)


def copy_(dst: torch.Tensor, src: torch.Tensor) -> Transfer:
    """``dst.copy_(src)`` between host and device; returns the handle to wait on.

    ``non_blocking`` where it is real (CUDA with a pinned host side); under the deferred-copy
    double the data lands in ``dst`` only at ``wait()``."""
    with torch.no_grad(), _no_propagation():
        if _DOUBLES.deferred:
            data = src.detach().to(dst.dtype).clone()
            _garbage(dst)
            return Transfer(deferred=(dst, data))
        cuda_side = dst if is_cuda(dst.device) else src if is_cuda(src.device) else None
        host_side = src if cuda_side is dst else dst
        async_ok = cuda_side is not None and host_side.device.type == "cpu" and host_side.is_pinned()
        dst.copy_(src, non_blocking=async_ok)
        if async_ok:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cuda_side.device))
            return Transfer(event=event)
        return Transfer(done=True)


def to_host(src: torch.Tensor, dtype: torch.dtype | None = None, like: torch.device | str | None = None
            ) -> tuple[torch.Tensor, Transfer]:
    """A new host-resident copy of ``src`` (pinned when it comes from CUDA), and its handle."""
    device = like if like is not None else src.device
    out = host_empty(src.shape, dtype or src.dtype, device)
    return out, copy_(out, src)


def to_device(src: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, Transfer]:
    """``src`` on the compute ``device`` (a new tensor unless it is there already and not
    host-resident), and the handle to wait on before reading it or writing ``src``."""
    device = as_device(device)
    dtype = dtype or src.dtype
    with torch.no_grad(), _no_propagation():
        if src.device == device and src.dtype == dtype and not is_host_resident(src):
            return src, DONE
        out = torch.empty(src.shape, dtype=dtype, device=device)
        _HOST_STORAGES.discard(out)  # a fresh device buffer, whatever address it got
    return out, copy_(out, src)


# ----------------------------------------------------------------------------------------------
# The collective audit (a CPU double of NCCL's "device tensors only")
# ----------------------------------------------------------------------------------------------
class HostTensorCollectiveError(RuntimeError):
    """A host-resident tensor went to a collective that NCCL would carry on a GPU."""


def set_gpu_backend(backend: str) -> None:
    """The backend the run's process groups would have on a GPU (the strategy says; the audit
    checks collectives against it)."""
    _DOUBLES.gpu_backend = backend


def audit_log() -> list[dict[str, Any]]:
    """The audited collective calls of this process: ``{"fn", "backend", "tensors": [(device, host)]}``."""
    return _DOUBLES.log


# isend / irecv stay unpatched: torch's P2POp accepts exactly those two functions as its op, and
# pipelining sends its P2POps through batch_isend_irecv, which is audited.
_AUDITED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "send", "recv",
    "all_to_all", "all_to_all_single", "gather", "scatter", "batch_isend_irecv",
)


def _tensors_of(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif isinstance(leaf, dist.P2POp):  # batch_isend_irecv's operations
            out.append(leaf.tensor)
    return out


def _check_collective(name: str, tensors: list[torch.Tensor]) -> None:
    backend = _DOUBLES.gpu_backend
    record = {"fn": name, "backend": backend,
              "tensors": [(str(t.device), is_host_resident(t)) for t in tensors]}
    _DOUBLES.log.append(record)
    if not backend_takes_host(backend):
        for t in tensors:
            if is_host_resident(t):
                raise HostTensorCollectiveError(
                    f"torch.distributed.{name} got a host-resident tensor (shape {tuple(t.shape)}, {t.dtype}) on a "
                    f"group whose backend on a GPU would be {backend!r}, which takes device tensors only. Move it to "
                    f"the root device with lightning_scale.core.device.to_device, or run the groups with the mixed "
                    f"backend {MIXED_BACKEND!r} (default_backend(..., host_collectives=True))"
                )


@contextlib.contextmanager
def _audit_patches() -> Iterator[None]:
    saved = {}
    for name in _AUDITED:
        original = getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = original

        def audited(*args: Any, __name: str = name, __original: Any = original, **kwargs: Any) -> Any:
            _check_collective(__name, _tensors_of(args, kwargs))
            return __original(*args, **kwargs)

        audited.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(dist, name, audited)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


_PROPAGATE = threading.local()


@contextlib.contextmanager
def _no_propagation() -> Iterator[None]:
    previous = getattr(_PROPAGATE, "off", False)
    _PROPAGATE.off = True
    try:
        yield
    finally:
        _PROPAGATE.off = previous


class _HostPropagation(TorchDispatchMode):
    """Marks the outputs of an aten op host-resident when its inputs decide a host result, as
    torch's device rules would on a GPU run: every input with dimensions is host-resident (or,
    for 0-dim inputs only, any of them is: a scalar computed on the host stays there). In-place
    ops keep their destination's residency; the transfer helper moves tensors explicitly."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not _HOST_STORAGES or getattr(_PROPAGATE, "off", False) or func._schema.is_mutable:
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not inputs:
            return out
        host = [is_host_resident(t) for t in inputs]
        if not any(host):
            return out
        shaped = [h for h, t in zip(host, inputs) if t.dim() > 0]
        if all(shaped) if shaped else any(host):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    _HOST_STORAGES.add(t)
        return out


@contextlib.contextmanager
def gpu_semantics(deferred_copies: bool = True, audit_collectives: bool = True) -> Iterator[None]:
    """Run the enclosed code with the CPU doubles of GPU behaviour (see the module docstring).

    The test harness turns it on per call (``run_distributed(..., gpu_semantics=True)``). Not for
    compiled code: a dispatch mode makes Dynamo fall back to eager."""
    previous = (_DOUBLES.deferred, _DOUBLES.audit)
    _DOUBLES.deferred, _DOUBLES.audit = deferred_copies, audit_collectives
    _DOUBLES.log.clear()
    try:
        with contextlib.ExitStack() as stack:
            if audit_collectives:
                stack.enter_context(_audit_patches())
                stack.enter_context(_HostPropagation())
            yield
    finally:
        _DOUBLES.deferred, _DOUBLES.audit = previous


# ----------------------------------------------------------------------------------------------
# Device timing
# ----------------------------------------------------------------------------------------------
class DeviceClock:
    """Marks on a device's stream of work, read later as seconds.

    On CUDA each :meth:`mark` records a CUDA event on the current stream (so intervals measure
    kernels, not their launches) and :meth:`seconds` synchronises on the later event once; on CPU
    a mark is ``time.perf_counter()``. Keep marks and read them after the measured work, so the
    measurement adds no synchronisation inside it."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.cuda = is_cuda(device)
        self.device = as_device(device)

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from mark ``start`` to mark ``end``."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start
