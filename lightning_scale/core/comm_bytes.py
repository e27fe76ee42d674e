"""Bytes a rank hands to communication, by mesh dimension. Torch only.

Counted where the suite's communication happens (the same calls :mod:`.comm_timer` times, plus
their asynchronous launches): ``torch.distributed`` collectives and point-to-point calls (FSDP2's
all-gathers and reduce-scatters, the suite's gradient all-reduces, ZeRO-1/2's collectives, the
pipeline's ``batch_isend_irecv``) and the functional collectives DTensor launches for tensor and
sequence parallelism (``torch.distributed._functional_collectives``).

The unit is the **payload** of each call, in bytes, per rank, a definition that does not depend on
the algorithm the backend picks:

=================================================  ==============================================
call                                               payload
=================================================  ==============================================
``all_reduce(t)``, ``broadcast(t)``                ``t.nbytes``
all-gather (``all_gather_into_tensor`` /           the gathered (output) tensor's bytes
``all_gather_single`` / ``all_gather``)
reduce-scatter (``reduce_scatter_tensor`` /        the reduced (input) tensor's bytes
``reduce_scatter_single`` / ``reduce_scatter``)
``send`` / ``isend`` / ``batch_isend_irecv``       the bytes this rank sends (receives count 0)
``all_to_all_single``                              the input's bytes
=================================================  ==============================================

With N ranks in the group, a ring algorithm moves ``payload x (N - 1) / N`` bytes out of each rank
for an all-gather or a reduce-scatter and twice that for an all-reduce. Object collectives
(``broadcast_object_list``, ``all_gather_object``) pickle: they are counted under ``"objects"``
by call, not by bytes. Nested calls count once, for the outermost. A call whose payload cannot be
read (an unexpected argument form) is counted under ``"unmeasured"`` with 0 bytes: the meter
never stops the collective it measures.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from lightning_scale.core.comm_patches import NAMESPACES as _NAMESPACES
from lightning_scale.core.comm_patches import CommPatches


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _first(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


# name -> payload(args, kwargs) of a torch.distributed call
_PAYLOAD: dict[str, Callable[[tuple, dict], int]] = {
    "all_reduce": lambda a, k: _nbytes(_first(a, k, 0, "tensor")),
    "broadcast": lambda a, k: _nbytes(_first(a, k, 0, "tensor")),
    "reduce": lambda a, k: _nbytes(_first(a, k, 0, "tensor")),
    "all_gather_into_tensor": lambda a, k: _nbytes(_first(a, k, 0, "output_tensor")),
    "all_gather_single": lambda a, k: _nbytes(_first(a, k, 0, "output_tensor")),
    "all_gather": lambda a, k: sum(_nbytes(t) for t in (_first(a, k, 0, "tensor_list") or [])),
    "reduce_scatter_tensor": lambda a, k: _nbytes(_first(a, k, 1, "input")),
    "reduce_scatter_single": lambda a, k: _nbytes(_first(a, k, 1, "input")),
    "reduce_scatter": lambda a, k: sum(_nbytes(t) for t in (_first(a, k, 1, "input_list") or [])),
    "all_to_all_single": lambda a, k: _nbytes(_first(a, k, 1, "input")),
    "send": lambda a, k: _nbytes(_first(a, k, 0, "tensor")),
    "isend": lambda a, k: _nbytes(_first(a, k, 0, "tensor")),
    "recv": lambda a, k: 0,
    "irecv": lambda a, k: 0,
}
# One wrapper object per function, set in both namespaces: P2POp checks its op by identity
# against torch.distributed.distributed_c10d.isend / irecv, and the pipeline schedules compare
# op types with torch.distributed.isend.
_OBJECTS = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


class CommBytes(CommPatches):
    """Process-wide payload counter (one per process), by name (mesh dimension).

    Usage::

        counter = CommBytes.get()
        counter.install()
        counter.name_groups([("dp", dp_group), ("tp", tp_group)])
        counter.start()
        ...
        counted = counter.stop()      # {"dp": 1234567, "tp": 89012}
        counter.kinds                 # the same bytes by collective: {"all_gather": ..., "reduce_scatter": ...}
    """

    _instance: CommBytes | None = None

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}  # group name -> payload bytes
        self.kinds: dict[str, int] = {}  # collective kind ("all_gather", "reduce_scatter", ...) -> payload bytes

    @classmethod
    def get(cls) -> CommBytes:
        if cls._instance is None:
            cls._instance = CommBytes()
        return cls._instance

    def install(self) -> None:
        """Wrap the calls of the module docstring (idempotent; a call a torch version lacks is skipped)."""
        if self.installed:
            return
        wrappers: dict[int, Callable[..., Any]] = {}  # one wrapper per function, in both namespaces
        for namespace in _NAMESPACES:
            module = importlib.import_module(namespace)
            for attr in [*_PAYLOAD, *_OBJECTS, "batch_isend_irecv"]:
                fn = getattr(module, attr, None)
                if callable(fn):
                    wrapper = wrappers.setdefault(id(fn), self._wrap(attr, fn))
                    self._patch(module, namespace, attr, wrapper)
        funcol = importlib.import_module("torch.distributed._functional_collectives")
        # name -> (payload, position of the ``group`` argument) of a functional collective
        gathered = lambda a, k: _nbytes(_first(a, k, 0, "self")) * _group_size(_first(a, k, 2, "group"))  # noqa: E731
        own = lambda a, k: _nbytes(_first(a, k, 0, "self"))  # noqa: E731
        for attr, payload, group_at in (
            ("all_reduce", own, 2),
            ("all_gather_tensor", gathered, 2),
            ("all_gather_single", gathered, 2),
            ("all_gather_single_autograd", gathered, 2),
            ("reduce_scatter_tensor", own, 3),
            ("reduce_scatter_single", own, 3),
            ("reduce_scatter_single_autograd", own, 3),
            ("all_to_all_single", own, 3),
        ):
            fn = getattr(funcol, attr, None)
            if callable(fn):
                self._patch(funcol, funcol.__name__, attr, self._wrap_functional(fn, payload, group_at))

    def _wrap(self, attr: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.active or getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            try:  # a meter must never break the collective it measures
                if attr == "batch_isend_irecv":
                    ops = _first(args, kwargs, 0, "p2p_op_list") or []
                    for op in ops:
                        sends = getattr(op.op, "__name__", "") in ("isend", "send")
                        self._add(self._name(op.group), _nbytes(op.tensor) if sends else 0, "send" if sends else "recv")
                elif attr in _OBJECTS:
                    self._add("objects", 0, "objects")
                else:
                    self._add(self._name(kwargs.get("group")), _PAYLOAD[attr](args, kwargs), _kind(attr))
            except Exception:  # noqa: BLE001
                self._add("unmeasured", 0)
            self._local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0

        return counted

    def _wrap_functional(
        self, fn: Callable[..., Any], payload: Callable[[tuple, dict], int], group_at: int
    ) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.active or getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            try:  # DTensor's collectives: tensor / sequence parallelism (or any named mesh dimension)
                group = _process_group(_first(args, kwargs, group_at, "group"))
                self._add(self._name(group) if group is not None else "other", payload(args, kwargs), _kind(fn.__name__))
            except Exception:  # noqa: BLE001 - a meter must never break the collective it measures
                self._add("unmeasured", 0)
            self._local.depth = 1  # one functional collective may call another (an _autograd variant)
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0

        return counted

    def _add(self, name: str, nbytes: int, kind: str = "other") -> None:
        with self._lock:
            self.bytes[name] = self.bytes.get(name, 0) + int(nbytes)
            self.kinds[kind] = self.kinds.get(kind, 0) + int(nbytes)

    def start(self) -> None:
        with self._lock:
            self.bytes, self.kinds = {}, {}
        self.active = True

    def stop(self) -> dict[str, int]:
        self.active = False
        return dict(self.bytes)


def _kind(name: str) -> str:
    """The collective kind of a call name: ``all_gather_into_tensor`` -> ``"all_gather"``, ``isend`` -> ``"send"``."""
    for kind in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "reduce"):
        if name.startswith(kind):
            return kind
    return {"send": "send", "isend": "send", "recv": "recv", "irecv": "recv"}.get(name, "other")


def _process_group(group: Any) -> Any:
    """The ProcessGroup of a functional collective's ``group`` argument (a ProcessGroup, a 1-D
    DeviceMesh, a ``(mesh, dim)`` pair as DTensor passes it, or a group name); None for a list of
    ranks, which names no group."""
    from torch.distributed import ProcessGroup

    if isinstance(group, ProcessGroup):
        return group
    if isinstance(group, tuple) and len(group) == 2 and hasattr(group[0], "get_group"):  # (DeviceMesh, dim)
        return group[0].get_group(group[1])
    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a 1-D DeviceMesh
        return group.get_group()
    if isinstance(group, str):  # a registered group name
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group)
    return None


def _group_size(group: Any) -> int:
    """Ranks in a functional collective's group (a ProcessGroup, a 1-D DeviceMesh, a (mesh, dim)
    pair or a list of ranks)."""
    import torch.distributed as dist

    if isinstance(group, (list, tuple)) and group and isinstance(group[0], int):
        return len(group)
    if isinstance(group, tuple) and len(group) == 2:  # (DeviceMesh, dim)
        mesh, dim = group
        return mesh.size(dim) if isinstance(dim, int) else mesh[dim].size()
    if hasattr(group, "size") and hasattr(group, "mesh"):  # a DeviceMesh
        return group.size()
    return dist.get_world_size(group)
