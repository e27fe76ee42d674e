"""Exact byte counts of the model states a rank holds (parameters, gradients, optimizer state).

Counted from the tensors themselves, by device, each storage once (a view, such as a parameter
living inside a ZeRO bucket, adds nothing beyond its bucket), in the order parameters ->
gradients -> optimizer state: a storage already counted in an earlier category is not counted
again. DTensors (tensor parallel, FSDP2) count their local shard's storage, which includes any
padding the sharding keeps. Torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

CATEGORIES = ("params", "grads", "optimizer")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def model_state_breakdown(
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    extra: Mapping[str, Iterable[torch.Tensor]] | None = None,
) -> dict[str, dict[tuple[str, str], int]]:
    """``{category: {(device, dtype): bytes}}`` for ``params``, ``grads`` and ``optimizer``.

    * params: ``module``'s parameters;
    * grads: their ``.grad`` and the ``.grad`` of the optimizers' parameters, plus ``extra["grads"]``
      (buffers a sharding engine holds between steps);
    * optimizer: the optimizers' state tensors and their parameters not already counted (e.g.
      fp32 master copies on CPU), plus ``extra["optimizer"]``.

    A storage's dtype is that of the first tensor seen on it (``float32``, ``bfloat16``, ...).
    """
    extra = extra or {}
    optimizers = list(optimizers)
    seen: set[tuple[str, int]] = set()
    out: dict[str, dict[tuple[str, str], int]] = {c: {} for c in CATEGORIES}

    def add(category: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            t = _local(t)
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            slot = (str(t.device), str(t.dtype).removeprefix("torch."))
            out[category][slot] = out[category].get(slot, 0) + storage.nbytes()

    opt_params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
    add("params", module.parameters())
    add("grads", [p.grad for p in list(module.parameters()) + opt_params if p.grad is not None])
    add("grads", extra.get("grads", ()))
    add("optimizer", [t for o in optimizers for state in o.state.values() for t in _tensors_in(state)])
    add("optimizer", opt_params)
    add("optimizer", extra.get("optimizer", ()))
    return out


def model_state_bytes(
    module: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    extra: Mapping[str, Iterable[torch.Tensor]] | None = None,
) -> dict[str, dict[str, int]]:
    """``{category: {device: bytes}}``: :func:`model_state_breakdown` summed over dtypes."""
    out: dict[str, dict[str, int]] = {}
    for category, by_slot in model_state_breakdown(module, optimizers, extra).items():
        out[category] = {}
        for (device, _), nbytes in by_slot.items():
            out[category][device] = out[category].get(device, 0) + nbytes
    return out


def zero_state_bytes(psi: int, world: int, stage: int, *, offload: bool = False, step_tensors: int = 0) -> dict[str, int]:
    """Per-rank bytes of model states for fp32 AdamW under DDP (``stage=0``) or ZeRO stage 1-3.

    fp32 Adam holds 4 bytes of parameter, 4 of gradient and 8 of moments per element (design
    guide section 6; Rajbhandari et al., arXiv 1910.02054, with K = 8 and no fp16 copies):

    * DDP: 4 Psi + 4 Psi + 8 Psi;
    * stage 1: 4 Psi + 4 Psi + 8 Psi / N; stage 2: 4 Psi + 4 Psi / N + 8 Psi / N;
    * stage 3: (4 + 4 + 8) Psi / N;
    * ``offload`` (stages 1/2, :mod:`lightning_scale.core.sharding`): the optimizer part gains the
      fp32 master chunk (12 Psi / N, the paper's K = 12) and the gradients a CPU chunk of 4 Psi / N
      (stage 1 keeps its full device buffers too; stage 2 keeps only the CPU chunk).

    ``psi`` must already include the sharding's padding (a multiple of ``world``);
    ``step_tensors`` counts Adam's 4-byte ``step`` tensors (one per stepped tensor).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0 (DDP), 1, 2 or 3; got {stage}")
    n = world
    if stage == 0:
        params, grads, optimizer = 4 * psi, 4 * psi, 8 * psi
    elif stage == 3:
        params, grads, optimizer = 4 * psi // n, 4 * psi // n, 8 * psi // n
    else:
        params = 4 * psi
        grads = (4 * psi if stage == 1 else 0) + (4 * psi // n if stage == 2 or offload else 0)
        optimizer = (12 if offload else 8) * psi // n
    return {"params": params, "grads": grads, "optimizer": optimizer + 4 * step_tensors}
