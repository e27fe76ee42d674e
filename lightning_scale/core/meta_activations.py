"""Activation memory of any network, from one training forward on the ``meta`` device. Torch only.

For models without a closed-form inventory (the suite's ResNet: convolutions, BatchNorm,
projection shortcuts, resolutions that halve per stage), the planner does not enumerate ops by
hand: it runs the forward and the loss on the ``meta`` device (shapes and dtypes only, no data,
no memory) and counts what :class:`~lightning_scale.core.activation_memory.HeldActivationMeter`
counts on a real device: the storages the forward creates that are still alive after it
(whatever keeps them: autograd's saved tensors, a checkpointed block's inputs, a selective
checkpoint's cache), each storage once, the parameters, buffers, batch, logits and loss left
out. Meta tensors have storages with sizes (and distinct identities), so the same count works:
the tests compare it, in fp32, with the CPU measurement of the real model to the byte.

``HeldActivationMeter`` itself skips meta tensors; :class:`MetaHeldMeter` is the same count for
them. Activation checkpointing is applied to the meta network with the strategies' own function
(:func:`~lightning_scale.core.activation_checkpointing.apply_activation_checkpointing`), so the
checkpointed modules are exactly those a run checkpoints.

**Recomputation peak.** Under ``full`` / ``every_k`` / ``selective`` checkpointing the backward
re-runs one checkpointed module at a time; its recomputed saved tensors exist next to the held
ones. :func:`measure_activations` reports the largest checkpointed module's saved bytes in a
forward without checkpointing, its own input left out (the checkpoint already holds it): exact
for ``full`` (torch recomputes the whole module forward), an upper bound for ``selective``
(which keeps part of that).

**Mixed precision.** Autocast does not act on meta tensors: torch dispatches it by device
(``AutocastCPU`` / ``AutocastCUDA`` keys; the meta device has none). ``bf16-mixed`` /
``16-mixed`` are therefore emulated by :class:`CudaAutocastEmulation`, a ``TorchFunctionMode``
that casts the floating-point arguments of the functions CUDA autocast runs in lower precision
(convolutions, linear, matmuls, attention) to bf16 / fp16 and those of the functions it runs in
fp32 (norms, softmax, losses, ...) to fp32, caching the casts of leaf parameters as autocast
does. The lists are torch's (``torch.amp`` documentation, "CUDA Ops that can autocast to
float16 / float32"; ``aten/src/ATen/autocast_mode.h``). That is an estimate of a GPU run (the
GPU's kernels are not run here); on the ResNet it equals CPU autocast's measurement, whose lists
agree with CUDA's for the ops that network uses (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from lightning_scale.core.activation_memory import HeldActivationMeter

__all__ = [
    "CudaAutocastEmulation",
    "MetaActivations",
    "MetaHeldMeter",
    "compute_dtype",
    "measure_activations",
]


def _keys(tensors: Iterable[Any]) -> set[int]:
    return {t.untyped_storage()._cdata for t in tree_leaves(list(tensors)) if isinstance(t, torch.Tensor)}


class MetaHeldMeter(HeldActivationMeter):
    """:class:`~lightning_scale.core.activation_memory.HeldActivationMeter`'s count (the same
    storage tracking), on any device including ``meta``: after the forward it wraps, :meth:`held`
    = bytes of the storages created inside it that are still alive (each storage once, its full
    size even when only a view is kept), summed over devices.

    Args:
        exclude: tensors (or nested containers of them) whose storage is not an activation
            (parameters, buffers, the batch).
    """

    count_meta = True

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        super().__init__(tree_leaves(list(exclude)))

    def held(self, exclude: Iterable[Any] = ()) -> int:  # type: ignore[override]
        """Bytes still alive, leaving out ``exclude`` (e.g. the logits and the loss)."""
        return sum(super().held(exclude).values())


# ----------------------------------------------------------------------------------------------
# bf16-mixed / 16-mixed on meta tensors
# ----------------------------------------------------------------------------------------------
#: Functions CUDA autocast runs in the lower precision (torch.amp docs, "CUDA Ops that can
#: autocast to float16"; plus scaled_dot_product_attention and einsum of autocast_mode.h).
LOWER_PRECISION_OPS = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul",
    "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "linear", "matmul", "mm", "mv", "prelu", "einsum", "scaled_dot_product_attention",
})
#: Functions CUDA autocast runs in fp32 (torch.amp docs, "CUDA Ops that can autocast to float32").
FP32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss",
})


class CudaAutocastEmulation(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` semantics for tensors on any device (the planner's meta
    forward). Only out-of-place calls are cast, as autocast does; float64 and non-floating
    tensors are left alone; casts of leaf tensors that require grad (parameters) are cached for
    the duration of the mode, like autocast's weight-cast cache."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, cache: bool = True) -> None:
        super().__init__()
        self.dtype = dtype
        self.cache = cache
        self._cache: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _cast(self, value: Any, to: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype in (to, torch.float64):
            return value
        if self.cache and value.is_leaf and value.requires_grad:
            key = (id(value), to)
            if key not in self._cache:
                self._cache[key] = value.to(to)
            return self._cache[key]
        return value.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is torch.Tensor.backward:
            return self._backward(*args, **kwargs)
        if func is torch.autograd.backward:  # (tensors, grad_tensors=None, retain_graph=None, create_graph=False, ...)
            tensors = args[0] if args else kwargs.pop("tensors")
            grads = args[1] if len(args) > 1 else kwargs.pop("grad_tensors", None)
            tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
            grads = (grads,) if grads is None or isinstance(grads, torch.Tensor) else tuple(grads)
            grads = grads * len(tensors) if grads == (None,) else grads
            return self._backward(tensors, grads, *args[2:], **kwargs)
        inplace = name.endswith("_") and not name.startswith("__")  # add_ (not __matmul__)
        if "out" not in kwargs and not inplace:
            to = self.dtype if name in LOWER_PRECISION_OPS else torch.float32 if name in FP32_OPS else None
            if to is not None:
                args = tree_map(lambda v: self._cast(v, to), args)
                kwargs = tree_map(lambda v: self._cast(v, to), kwargs)
        return func(*args, **kwargs)

    def _backward(self, tensor: torch.Tensor | tuple[torch.Tensor, ...], gradient: Any = None,
                  retain_graph: bool | None = None, create_graph: bool = False, inputs: Any = None,
                  grad_variables: Any = None) -> None:
        """``tensor.backward()`` or ``torch.autograd.backward(tensors, grads)`` with this mode on.
        A mode is off while its own __torch_function__ runs, and both come through it, so
        checkpointed blocks would be recomputed without the casts their forward had (autocast is
        re-entered by the checkpoint for its recomputation). Run torch's autograd engine directly
        (``_engine_run_backward``, what ``torch.autograd.backward`` calls), with an emulation
        pushed again."""
        from torch.autograd.graph import _engine_run_backward

        tensors = tensor if isinstance(tensor, tuple) else (tensor,)
        grads = gradient if isinstance(gradient, tuple) else (gradient,)
        grads = tuple(g if g is not None else torch.ones_like(t) for t, g in zip(tensors, grads))
        inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        # Without the weight-cast cache: autocast re-entered for one block's recomputation caches
        # its casts for that block only; one cache for the whole backward would keep every cast.
        with CudaAutocastEmulation(self.dtype, cache=False):
            _engine_run_backward(tensors, grads, bool(retain_graph or create_graph), create_graph, inputs,
                                 allow_unreachable=True, accumulate_grad=True)

    def __exit__(self, *exc: Any) -> Any:
        self._cache.clear()
        return super().__exit__(*exc)


def compute_dtype(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) of a Lightning ``precision`` string (plus
    ``"mixed"``, the ZeRO paper's 16-bit weights with an fp32 master, which computes like 16-true)."""
    p = str(precision)
    table: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
        "32-true": (torch.float32, None), "32": (torch.float32, None), "64-true": (torch.float64, None),
        "bf16-mixed": (torch.float32, torch.bfloat16), "16-mixed": (torch.float32, torch.float16),
        "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None), "mixed": (torch.float16, None),
    }
    if p not in table:
        raise ValueError(f"unknown precision {precision!r}; use 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true")
    return table[p]


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------
@dataclass
class MetaActivations:
    """Bytes of one microbatch's forward (see the module docstring)."""

    held: int  # kept from the forward for the backward (the logits and loss left out)
    recompute_peak: int = 0  # the largest checkpointed module's recomputed saved tensors
    checkpointed: dict[str, str] = field(default_factory=dict)  # module path -> "full" / "selective"
    # module path -> bytes it saves for the backward without checkpointing (its own inputs left out)
    saved_by_module: dict[str, int] = field(default_factory=dict)


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # As ImageClassificationTask.loss_fn: cross-entropy on fp32 logits.
    return F.cross_entropy(logits.float(), labels)


def _forward(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if autocast is None:
        logits = network(inputs)
        return logits, loss_fn(logits, labels)
    with CudaAutocastEmulation(autocast):
        logits = network(inputs)
        return logits, loss_fn(logits, labels)


def _instrumented_forward(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: Callable,
                         autocast: torch.dtype | None, exclude: list[Any],
                         paths: list[str]) -> tuple[int, dict[str, int]]:
    """One forward + loss: (bytes held after it, bytes each module in ``paths`` saves for the
    backward, its own inputs left out, each storage once per module)."""
    skip = _keys(exclude)
    current: list[tuple[str, set[int]]] = []  # (path, the module's input storages) of the running module
    seen: dict[str, dict[int, int]] = {p: {} for p in paths}

    def pre(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            current.append((path, _keys(args)))
        return hook

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current:
            path, own_inputs = current[-1]
            key = t.untyped_storage()._cdata
            if key not in skip and key not in own_inputs:
                seen[path][key] = t.untyped_storage().nbytes()
        return t

    handles = []
    for path in paths:
        module = network.get_submodule(path)
        handles += [module.register_forward_pre_hook(pre(path)), module.register_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MetaHeldMeter(exclude) as meter:
            logits, loss = _forward(network, inputs, labels, loss_fn, autocast)
        held = meter.held([logits, loss])
    finally:
        for h in handles:
            h.remove()
    return held, {p: sum(v.values()) for p, v in seen.items()}


def measure_activations(
    network: nn.Module,
    input_shape: tuple[int, ...],
    *,
    precision: str = "32-true",
    policy: str = "none",
    every: int = 2,
    labels_shape: tuple[int, ...] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    baseline: MetaActivations | None = None,
) -> MetaActivations:
    """Activation bytes of one training forward + loss of ``network`` on a float batch of
    ``input_shape`` (e.g. images (B, C, H, W)) with int64 class labels of ``labels_shape``
    (default ``(B,)``), under a Lightning ``precision`` and an activation-checkpointing ``policy``
    (``none``, ``full``, ``selective``, ``every_k`` with ``every``).

    ``network`` should live on the ``meta`` device (a real one works too, and allocates); it is
    put in training mode, and its checkpointing is applied and removed again here. Under a
    ``*-true`` 16-bit precision pass a network already converted to that dtype (as Lightning
    converts it); the batch is converted here. ``loss_fn(logits, labels)`` defaults to
    cross-entropy on fp32 logits (:class:`~lightning_scale.tasks.ImageClassificationTask`).

    The ``none`` measurement also records what every block of the block container saves
    (``saved_by_module``); pass it as ``baseline`` to measure other policies of the same
    network and shapes with one forward each instead of two.
    """
    from lightning_scale.core.activation_checkpointing import (
        apply_activation_checkpointing,
        as_ac_config,
        remove_activation_checkpointing,
    )
    from lightning_scale.core.blocks import BlockFinder

    param_dtype, autocast = compute_dtype(precision)
    loss_fn = loss_fn or _classification_loss
    device = next(network.parameters()).device
    network.train()
    input_dtype = param_dtype if autocast is None else torch.float32  # Lightning's *-true converts the batch
    inputs = torch.empty(input_shape, dtype=input_dtype, device=device)
    labels = torch.zeros(labels_shape or input_shape[:1], dtype=torch.long, device=device)
    exclude = [*network.parameters(), *network.buffers(), inputs, labels]

    name = f"every_{every}" if policy == "every_k" else policy
    config = as_ac_config(name)
    if config is not None and config.offload:
        raise ValueError("measure_activations counts device memory; for policy 'offload' measure 'none' "
                         "(those bytes move to the host)")
    remove_activation_checkpointing(network)
    if config is None or baseline is None:
        blocks = [name for name, _ in BlockFinder().find(network, "measure_activations")]
        held, saved = _instrumented_forward(network, inputs, labels, loss_fn, autocast, exclude, blocks)
        if config is None:
            return MetaActivations(held=held, saved_by_module=saved)
        baseline = MetaActivations(held=held, saved_by_module=saved)
    chosen = apply_activation_checkpointing(network, config)
    try:
        missing = [p for p in chosen if p not in baseline.saved_by_module]
        saved = dict(baseline.saved_by_module)
        if missing:  # checkpointed modules outside the block container
            remove_activation_checkpointing(network)
            saved.update(_instrumented_forward(network, inputs, labels, loss_fn, autocast, exclude, missing)[1])
            apply_activation_checkpointing(network, config)
        with MetaHeldMeter(exclude) as meter:
            logits, loss = _forward(network, inputs, labels, loss_fn, autocast)
        held = meter.held([logits, loss])
    finally:
        remove_activation_checkpointing(network)
    return MetaActivations(held=held, recompute_peak=max((saved[p] for p in chosen), default=0), checkpointed=chosen,
                           saved_by_module={p: saved[p] for p in chosen})
