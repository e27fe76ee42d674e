"""Validators of the strategies' constructor options: each raises a ``ValueError`` that names the
option and the fix, in ``__init__``, on every rank, before any process group exists."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def check_bool(owner: str, name: str, value: Any) -> None:
    """A clear error for a non-bool flag (``"yes"``, ``1``): raised in ``__init__``, before any collective."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be True or False")


def check_attribute_name(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"{owner}({name}={value!r}): {name} must be the name of an attribute of your LightningModule, "
                         f"e.g. 'model'")


def check_module_path(owner: str, name: str, value: Any) -> None:
    """None or a dotted module path inside the network, e.g. ``"blocks"`` or ``"transformer.h"``."""
    if value is not None and (not isinstance(value, str) or not all(part.isidentifier() or part.isdigit()
                                                                   for part in value.split("."))):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be None (found automatically) or a dotted path of a "
                         f"module inside the network, e.g. 'blocks' or 'transformer.h'")


def renamed_option(owner: str, old: str, new: str, old_value: Any, new_value: Any, default: Any = None) -> Any:
    """The value of option ``new``, accepting its old spelling ``old`` with a DeprecationWarning."""
    if old_value is None:
        return new_value
    if new_value is not default:
        raise ValueError(f"{owner}: {old}= is the old name of {new}=; pass only {new}=")
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}= (the same option under its one name across strategies)",
                  DeprecationWarning, stacklevel=3)
    return old_value


def check_tp_plan(owner: str, name: str, plan: Any) -> None:
    """None or ``{module-path pattern: ParallelStyle}``."""
    if plan is None:
        return
    from torch.distributed.tensor.parallel import ParallelStyle

    if not isinstance(plan, Mapping) or not all(isinstance(k, str) and isinstance(v, ParallelStyle) for k, v in plan.items()):
        raise ValueError(f"{owner}({name}=...): {name} must be a dict {{'module pattern': ParallelStyle}}, e.g. "
                         f"{{'blocks.*.attn.q_proj': ColwiseParallel()}}, or None for the built-in plan; got "
                         f"{type(plan).__name__} {plan!r:.120}")


def check_sequence_parallel_plan(owner: str, sequence_parallel: bool, plan: Any) -> None:
    """``sequence_parallel=True`` with a user ``tp_plan``: the plan must shard the sequence itself
    (the suite adds its SequenceParallel entries to its built-in plans only), else SP would be
    reported on while it is off."""
    if not sequence_parallel or plan is None:
        return
    from torch.distributed.tensor.parallel import SequenceParallel

    if not any(isinstance(style, SequenceParallel) for style in plan.values()):
        raise ValueError(
            f"{owner}(sequence_parallel=True, tp_plan=...): your tp_plan has no SequenceParallel() entry, so the "
            f"sequence would not be sharded (the suite adds those entries to its built-in GPT/ViT plans only). Add "
            f"SequenceParallel() for the norms (e.g. 'blocks.*.ln_1': SequenceParallel()) with the matching "
            f"input/output layouts on the projections (ColwiseParallel(input_layouts=Shard(1)), "
            f"RowwiseParallel(output_layouts=Shard(1))), or use sequence_parallel=False"
        )


def check_mesh_options(owner: str, process_group_backend: Any, timeout: Any, trust_checkpoint: Any, module_name: Any) -> None:
    if process_group_backend is not None:
        known = sorted(b for b in dist.Backend.backend_list if b not in ("undefined", "fake")) if dist.is_available() else []
        parts = [p.split(":")[-1] for p in process_group_backend.split(",")] if isinstance(process_group_backend, str) else None
        if not parts or any(p.strip().lower() not in known for p in parts):
            raise ValueError(f"{owner}(process_group_backend={process_group_backend!r}): not a torch.distributed backend; "
                             f"use one of {known} (or 'cpu:gloo,cuda:nccl'), or None for nccl on CUDA and gloo on CPU")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise ValueError(f"{owner}(timeout={timeout!r}): timeout must be a datetime.timedelta, e.g. "
                         f"timedelta(minutes=10), or None for torch's default")
    if isinstance(timeout, timedelta) and timeout.total_seconds() <= 0:
        raise ValueError(f"{owner}(timeout={timeout!r}): timeout must be positive, e.g. timedelta(minutes=10)")
    check_bool(owner, "trust_checkpoint", trust_checkpoint)
    check_attribute_name(owner, "module_name", module_name)
