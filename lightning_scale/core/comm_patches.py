"""What :mod:`.comm_timer` and :mod:`.comm_bytes` share: wrapping ``torch.distributed`` functions
in place (and restoring them), naming process groups after mesh dimensions, and counting a
nested call once (for the outermost). Torch only."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from typing import Any

#: Where torch.distributed's functions live: code that calls one through the other module
#: (``broadcast_object_list`` -> ``broadcast``) is seen in both.
NAMESPACES = ("torch.distributed", "torch.distributed.distributed_c10d")


class CommPatches:
    """Base of the process-wide communication meters: patch bookkeeping and group names."""

    def __init__(self) -> None:
        self.active = False
        self._names: dict[int, str] = {}  # id(ProcessGroup) -> mesh dimension name
        self._world = "other"  # name of calls without a group argument (the default group)
        self._local = threading.local()  # nesting depth per thread (autograd may use other threads)
        self._lock = threading.Lock()
        self._originals: dict[tuple[str, str], Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def uninstall(self) -> None:
        """Restore every patched attribute."""
        for (namespace, attr), fn in self._originals.items():
            setattr(importlib.import_module(namespace), attr, fn)
        self._originals.clear()

    def _patch(self, module: Any, namespace: str, attr: str, wrapper: Callable[..., Any]) -> None:
        self._originals[(namespace, attr)] = getattr(module, attr)
        setattr(module, attr, wrapper)

    def _nested(self) -> bool:
        return bool(getattr(self._local, "depth", 0))

    def name_groups(self, groups: Iterable[tuple[str, Any]], world: str | None = None) -> None:
        """Attribute calls on these process groups to these names: ``[(name, group), ...]``, e.g.
        mesh dimensions; several groups may share a name. ``world``: the name of calls without a
        group argument (the default group)."""
        self._names = {id(g): name for name, g in groups if g is not None}
        self._world = world or "other"

    def _name(self, group: Any) -> str:
        return self._names.get(id(group), "other") if group is not None else self._world
