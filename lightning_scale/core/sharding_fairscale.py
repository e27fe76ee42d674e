"""The fairscale backend of ZeRO stages 1 and 2: ``fairscale.optim.OSS`` (+ ``ShardedDataParallel``).

OSS partitions whole parameters over the ranks (greedily, by size), so each rank keeps the
optimizer state of its parameters only; after its step each rank broadcasts the parameters it
owns. Stage 1 averages full gradients with an all-reduce beforehand; stage 2 wraps the module in
``ShardedDataParallel``, which reduces each gradient to its owner during backward and frees it
elsewhere. Torch + fairscale only.

Known trap (fairscale 0.4.13 with torch 2.x on gloo, design guide section 5):
``ShardedDataParallel`` gives silently wrong losses from the third step when gradients are
cleared with ``zero_grad(set_to_none=True)`` (torch's default since 2.0, and what Lightning
calls). :class:`ZeroOSS` therefore always zeroes gradients in place;
``tests/test_zero.py::test_fairscale_parity`` fails without it.

Checkpoints use the suite's name-keyed format (``state.<param>.<key>``): OSS's consolidated,
index-keyed state dict is mapped to parameter names on rank 0 at save; at load every rank reads
the full state and OSS keeps its part.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from fairscale.optim import OSS
from torch import nn


class ZeroOSS(OSS):
    """``fairscale.optim.OSS`` whose ``zero_grad`` never sets gradients to None (see module doc)."""

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - the argument is overridden on purpose
        super().zero_grad(set_to_none=False)


def make_oss(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None) -> ZeroOSS:
    """An OSS optimizer equivalent to ``optimizer`` (same class, options and param-group dicts).

    The param-group dicts are the very objects of ``optimizer``: an LR scheduler built on
    ``optimizer`` keeps changing the learning rate OSS uses (OSS copies the options to its
    shard's optimizer at every step).
    """
    if optimizer.state:
        raise ValueError("the fairscale backend must wrap an optimizer that has not stepped yet")
    # Only the options the class's constructor takes (torch's AdamW keeps "decoupled_weight_decay"
    # in its defaults but does not accept it).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return ZeroOSS(optimizer.param_groups, optim=type(optimizer), group=group, **defaults)


def _index_to_name(oss: OSS, module: nn.Module) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for p in chain.from_iterable(g["params"] for g in oss.param_groups)]


def oss_state_by_name(oss: OSS, module: nn.Module, rank: int) -> dict[str, Any]:
    """Name-keyed optimizer state (``state.<param>.<key>``, ``param_groups.<param>.<option>``).

    Collective (OSS consolidates the shards on rank 0). Rank 0 returns the state of every
    parameter; other ranks return only the param-group options (DCP writes each key once).
    """
    oss.consolidate_state_dict(recipient_rank=0)
    names = _index_to_name(oss, module)
    out: dict[str, Any] = {}
    for group in oss.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            name = names[oss._param_to_index[id(p)]]
            for k, v in options.items():
                out[f"param_groups.{name}.{k}"] = v
    if rank == 0:
        consolidated = oss.state_dict()
        for index, state in consolidated["state"].items():
            for key, value in state.items():
                out[f"state.{names[index]}.{key}"] = value.detach().clone() if torch.is_tensor(value) else value
    return out


def load_oss_state_by_name(oss: OSS, module: nn.Module, flat: Mapping[str, Any]) -> None:
    """Restore OSS from a full name-keyed state (every parameter's ``state.<param>.<key>``)."""
    names = _index_to_name(oss, module)
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        prefix = f"state.{name}."
        entries = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if entries:
            state[index] = entries
    groups = []
    for group in oss.param_groups:
        saved = dict(group)
        indices = [oss._param_to_index[id(p)] for p in group["params"]]
        first = names[indices[0]] if indices else None
        for k in list(saved):
            value = flat.get(f"param_groups.{first}.{k}") if first else None
            if k != "params" and value is not None:
                saved[k] = value
        saved["params"] = indices
        groups.append(saved)
    originals = list(oss.param_groups)
    oss.load_state_dict({"state": state, "param_groups": groups})
    # torch's load_state_dict installs new param-group dicts; put the original dicts (shared with
    # the optimizer an LR scheduler was built on, see make_oss) back, with the loaded options.
    for original, loaded in zip(originals, oss.param_groups):
        for key, value in loaded.items():
            original[key] = value
    oss.param_groups = originals
