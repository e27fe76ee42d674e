"""Deprecated module path: ``MeshStrategy`` now lives in :mod:`lightning_scale.strategies.base`, its
option validators in :mod:`lightning_scale.strategies.options` and its checkpoint hooks in
:mod:`lightning_scale.strategies.checkpointing`. Importing a name from here still works, with a
``DeprecationWarning``, for one release."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "MeshStrategy": "lightning_scale.strategies.base",
    "check_bool": "lightning_scale.strategies.options",
    "check_attribute_name": "lightning_scale.strategies.options",
    "check_module_path": "lightning_scale.strategies.options",
    "renamed_option": "lightning_scale.strategies.options",
    "check_plan": "lightning_scale.strategies.options:check_tp_plan",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, _, new_name = _MOVED[name].partition(":")
    new_name = new_name or name
    warnings.warn(f"lightning_scale.strategies.mesh.{name} is deprecated; import {new_name} from {module}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new_name)
