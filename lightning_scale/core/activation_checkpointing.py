"""Activation checkpointing (recompute activations in backward instead of keeping them). Torch only.

Not to be confused with saving training checkpoints (:mod:`lightning_scale.core.checkpoint`).

A policy says which tensors a network keeps between its forward and its backward:

==============  ============================================================================
policy          what each transformer block keeps for backward (per layer, Korthikanti et
                al., arXiv 2205.05198, 16-bit: none = sbh(34 + 5as/h) bytes)
==============  ============================================================================
``none``        everything autograd saves (nothing recomputed)
``full``        only the block's input (2sbh bytes in 16-bit); the forward runs twice
``every_k``     ``full`` on blocks 0, k, 2k, ... (``every``), ``none`` on the rest
``classes``     ``full`` on every submodule whose class name is listed (e.g. ``["MLP"]``)
``selective``   op level (torch's selective checkpoint contexts): outputs of fused attention,
                collectives and non-widening linear layers are kept; the MLP up-projection,
                the unfused attention core and elementwise ops are recomputed
                (:func:`selective_policy`)
==============  ============================================================================

``offload=True`` moves what the non-checkpointed blocks save to CPU memory during forward and
back in backward (saved-tensor hooks like ``torch.autograd.graph.save_on_cpu``, whose copies go
through :mod:`lightning_scale.core.device`'s transfer helper: pinned and ``non_blocking`` when the
tensors are on CUDA, each waited on before it is read); it combines with ``none`` and ``every_k``.

``compile=True`` compiles each block (each chosen module for ``classes``) with ``torch.compile``
after its checkpoint wrapper is installed. In eager mode torch's selective checkpoint contexts
are a ``TorchDispatchMode``: every op of the forward and of the recompute passes through Python,
a fixed cost per op that the benchmark measured at +21% of the step on GPT nano (hidden 128) and
+1-3% at hidden 256-512. Compiled, the policy is applied once, when the graph is partitioned into
forward and backward, and the recompute runs as compiled kernels. What the policy marks as saved is
saved; of the rest the partitioner may keep less than eager does (the benchmark's compiled
selective: 61% saved against 55% eager). It combines with every policy except ``none`` and ``offload`` (whose
offload hooks this suite has not verified under compilation).

How it is applied: each chosen module's ``forward`` is replaced, on the instance, by one that
runs the original under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Module
paths and parameter names do not change (no wrapper module), so TP plans, pipeline splits,
FSDP2 sharding and name-keyed checkpoints see the same model. Non-reentrant checkpointing
restores the RNG state for the recompute (dropout draws the same mask) and the autocast state
(bf16 autocast recomputes in bf16).

Order in the strategies (design guide): pipeline split -> tensor parallelism -> activation
checkpointing -> data-parallel sharding (FSDP2's hooks run outside the checkpointed forward,
so the recompute sees unsharded parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_scale.core.blocks import BlockFinder
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lightning_scale.core import device as dev

POLICIES = ("none", "full", "every_k", "classes", "selective")
_ATTR = "_lightning_scale_ac"  # set on a module whose forward this module replaced
_COMPILED = "_lightning_scale_ac_compiled"  # set on a module this module compiled


def _ops(namespace: Any, names: Sequence[str]) -> frozenset:
    return frozenset(getattr(namespace, n).default for n in names if namespace is not None and hasattr(namespace, n))


# Fused attention kernels: their output is small (no s x s matrix) and expensive to recompute.
_ATTENTION_OPS = _ops(torch.ops.aten, [
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
])
# Collectives (tensor parallelism): recomputing one would repeat the communication.
_COLLECTIVE_OPS = _ops(getattr(torch.ops, "_c10d_functional", None),
                       ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"])
_MATMUL_OPS = _ops(torch.ops.aten, ["mm", "addmm"])


def _matmul_widens(op: Any, args: tuple) -> bool:
    """Whether a 2-D matmul's output has more columns than its input (an MLP up-projection)."""
    a, b = (args[1], args[2]) if op is torch.ops.aten.addmm.default else (args[0], args[1])
    return b.shape[-1] > a.shape[-1]


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """``create_selective_checkpoint_contexts`` policy of ``policy="selective"``.

    Keeps: fused attention outputs, collectives, and the outputs of linear layers that do not
    widen (q/k/v, attention output and MLP down projections: about sbh each). Recomputes: the
    widening MLP up-projection (4sbh, about a third of a block's matmul FLOPs), the unfused
    attention core (``bmm``/softmax/dropout, the s x s term Megatron's selective recompute drops)
    and every elementwise op (layer norms, GELU, dropout, residual adds).
    """
    if op in _ATTENTION_OPS or op in _COLLECTIVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMUL_OPS and not _matmul_widens(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@dataclass(frozen=True)
class ACConfig:
    """Which activations to recompute.

    Args:
        policy: one of :data:`POLICIES` (see the module docstring).
        every: ``every_k``: checkpoint block i when ``i % every == 0`` (every=2: blocks 0, 2, 4 ...);
            i is the block's key in the container when it is an integer (so a pipeline stage
            holding blocks 3-5 checkpoints block 4), else its position.
        classes: ``classes``: class names (``"MLP"``) or qualified names (``"my_pkg.models.MLP"``)
            of the submodules to checkpoint; a match inside an already matched module is skipped.
        offload: keep the tensors saved by non-checkpointed blocks on CPU (``none``, ``every_k``).
        container: path of the block container in the network; default: the largest
            ModuleList/ModuleDict/Sequential (the blocks of a transformer).
        compile: compile every block (``classes``: every chosen module) with
            ``Module.compile()`` after the checkpoint wrapper (see the module docstring); the
            first step then includes the compilation.
    """

    policy: str = "full"
    every: int = 2
    classes: tuple[str, ...] = field(default_factory=tuple)
    offload: bool = False
    container: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"activation checkpointing policy must be one of {POLICIES}; got {self.policy!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"ACConfig.every must be an integer >= 1 (checkpoint every k-th block); got {self.every!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.policy == "classes" and not self.classes:
            raise ValueError("policy='classes' needs classes=[...], the class names of the modules to checkpoint")
        if self.policy != "classes" and self.classes:
            raise ValueError(f"classes= is only used with policy='classes' (got policy={self.policy!r})")
        if self.offload and self.policy not in ("none", "every_k"):
            raise ValueError(
                f"offload=True moves the activations of non-checkpointed blocks to CPU; it combines with policy='none' "
                f"or 'every_k', not {self.policy!r} (whose blocks keep only their inputs or their matmul outputs)"
            )
        if not isinstance(self.compile, bool):
            raise ValueError(f"ACConfig.compile must be True or False; got {self.compile!r}")
        if self.compile and self.offload:
            raise ValueError("compile=True does not combine with offload=True (the offload hooks are not verified under "
                             "torch.compile here); drop one of them")
        if self.compile and self.policy == "none":
            raise ValueError("compile=True compiles the checkpointed blocks, and policy='none' checkpoints none; pick a "
                             "policy ('full', 'selective', 'every_k', 'classes') or compile the model yourself")

    @property
    def enabled(self) -> bool:
        return self.policy != "none" or self.offload


def as_ac_config(value: ACConfig | Mapping[str, Any] | str | None) -> ACConfig | None:
    """Accept what a strategy's ``activation_checkpointing=`` argument takes.

    ``None`` or ``"none"``: off; ``"full"``, ``"selective"``; ``"every_<k>"`` (``"every_2"``);
    ``"offload"`` (policy none + offload); a dict of :class:`ACConfig` fields (YAML); an ACConfig.
    """
    if value is None or isinstance(value, ACConfig):
        return value if value is None or value.enabled else None
    if isinstance(value, Mapping):
        config = ACConfig(**value)
    elif isinstance(value, str):
        if value in ("none", ""):
            return None
        if value == "offload":
            config = ACConfig(policy="none", offload=True)
        elif value.startswith("every_") and value[len("every_"):].isdigit():
            config = ACConfig(policy="every_k", every=int(value[len("every_"):]))
        elif value in ("full", "selective"):
            config = ACConfig(policy=value)
        else:
            raise ValueError(
                f"activation_checkpointing={value!r} is not a policy; use 'full', 'selective', 'every_<k>' (e.g. "
                f"'every_2'), 'offload', or a dict such as {{'policy': 'classes', 'classes': ['MLP']}} or "
                f"{{'policy': 'selective', 'compile': True}}"
            )
    else:
        raise TypeError(f"activation_checkpointing takes a str, a dict or an ACConfig; got {type(value).__name__}")
    return config if config.enabled else None


def _checkpointed_forward(forward: Callable[..., Any], selective: bool) -> Callable[..., Any]:
    context_fn = partial(create_selective_checkpoint_contexts, selective_policy) if selective else None

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # evaluation: nothing is saved, nothing to recompute
        if context_fn is not None:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _pack_to_host(t: torch.Tensor) -> Any:
    """Saved-tensor pack hook of the offload policy: a host copy (pinned when ``t`` is on CUDA,
    started ``non_blocking`` there) through the transfer helper."""
    if t.layout != torch.strided or t.is_nested:
        return t  # kept as it is: only dense tensors are offloaded
    host, transfer = dev.to_host(t, like=t.device)
    return t.device, host, transfer


def _unpack_to_device(packed: Any) -> torch.Tensor:
    """Unpack hook: wait for the host copy to land, copy back to the device, wait for that."""
    if isinstance(packed, torch.Tensor):
        return packed
    device, host, transfer = packed
    transfer.wait()
    out, back = dev.to_device(host, device)
    back.wait()
    return out


def _offloaded_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    # torch.autograd.graph.save_on_cpu does the same with its own copies; these hooks route them
    # through lightning_scale.core.device so that pinning follows the tensors' device (not the
    # machine) and the deferred-copy double of the tests sees them.
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(_pack_to_host, _unpack_to_device):
            return forward(*args, **kwargs)

    return run


def _replace_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]], kind: str) -> None:
    original = module.forward  # bound method (or an earlier instance override)
    module.forward = make(original)  # type: ignore[method-assign]
    setattr(module, _ATTR, (original, kind))


def _blocks(network: nn.Module, container: str | None, finder: BlockFinder | None, owner: str) -> list[tuple[str, nn.Module]]:
    if container is not None or finder is None:
        finder = BlockFinder(container=container)
    return finder.find(network, owner, fix="pass the blocks' class (block_class=), or use policy='classes'")


def _matches(module: nn.Module, classes: Sequence[str]) -> bool:
    cls = type(module)
    return cls.__name__ in classes or f"{cls.__module__}.{cls.__qualname__}" in classes


def apply_activation_checkpointing(network: nn.Module, config: ACConfig, finder: BlockFinder | None = None,
                                   owner: str = "activation checkpointing") -> dict[str, str]:
    """Replace the forward of the modules ``config`` selects; returns ``{module path: kind}``
    with kind ``"full"``, ``"selective"`` or ``"offload"``. With ``config.compile`` every block
    (``classes``: every chosen module) is then compiled. Calling it again first undoes the
    previous application, so the last config wins.

    Blocks: ``config.container`` when set, else ``finder`` (the strategy's ``block_container`` /
    ``block_class``), else the default container (:mod:`lightning_scale.core.blocks`); ``owner``
    names the strategy in errors."""
    remove_activation_checkpointing(network)
    chosen: dict[str, tuple[nn.Module, str]] = {}
    blocks: list[nn.Module] = []
    if config.policy == "classes":
        for name, module in network.named_modules():
            if _matches(module, config.classes) and not any(name.startswith(p + ".") for p in chosen):
                chosen[name] = (module, "full")
        if not chosen:
            present = sorted({type(m).__name__ for m in network.modules()})
            raise ValueError(f"{owner}: no module of {type(network).__name__} has a class in {list(config.classes)}; "
                             f"classes here: {present}")
    else:
        for i, (name, block) in enumerate(_blocks(network, config.container, finder, owner)):
            blocks.append(block)
            # A pipeline stage's view keeps the full model's keys ("blocks.4"): count k from those.
            key = name.rsplit(".", 1)[-1]
            i = int(key) if key.isdigit() else i
            if config.policy in ("full", "selective"):
                chosen[name] = (block, config.policy)
            elif config.policy == "every_k" and i % config.every == 0:
                chosen[name] = (block, "full")
            elif config.offload:
                chosen[name] = (block, "offload")
    for name, (module, kind) in chosen.items():
        if kind == "offload":
            _replace_forward(module, _offloaded_forward, kind)
        else:
            _replace_forward(module, partial(_checkpointed_forward, selective=kind == "selective"), kind)
    if chosen:
        _disable_generation_cache(network)
    if config.compile:
        # Module.compile() compiles the module's call (hooks included) in place: names and
        # parameters stay; the instance forward installed above is what Dynamo traces.
        for module in blocks or [m for m, _ in chosen.values()]:
            module.compile()
            setattr(module, _COMPILED, True)
    return {name: kind for name, (_, kind) in chosen.items()}


def _disable_generation_cache(network: nn.Module) -> None:
    """Hugging Face models run with ``config.use_cache=True`` keep every layer's keys and values
    in a generation cache during a training forward, out of the checkpoint's reach: with full
    checkpointing of a 8-layer Llama (hidden 512, batch 4 x 1024, fp32) the step peaked at 1066 MB
    with the cache and 659 MB without (traced with torch's MemTracker,
    ``tests/test_traced_memory.py``). ``transformers``' own gradient checkpointing turns the cache
    off for the same reason; so does this, with a warning (generation can pass ``use_cache=True``)."""
    import warnings

    for module in network.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True:
            config.use_cache = False
            warnings.warn(
                f"activation checkpointing: {type(module).__name__}.config.use_cache set to False: a training "
                f"forward would otherwise keep every layer's keys and values in a generation cache that "
                f"checkpointing cannot free (Hugging Face's own gradient checkpointing does the same; pass "
                f"use_cache=True to generate)", stacklevel=3)


def remove_activation_checkpointing(network: nn.Module) -> None:
    """Restore the forward of every module :func:`apply_activation_checkpointing` changed (and
    undo its compilation)."""
    for module in network.modules():
        if module.__dict__.pop(_COMPILED, False):
            module.__dict__.pop("_compiled_call_impl", None)
        saved = module.__dict__.pop(_ATTR, None)
        if saved is None:
            continue
        original, _ = saved
        if getattr(original, "__self__", None) is module and original.__func__ is type(module).forward:
            module.__dict__.pop("forward", None)  # back to the class's forward
        else:
            module.forward = original  # type: ignore[method-assign]


def checkpointed_modules(network: nn.Module) -> dict[str, str]:
    """``{module path: kind}`` of the modules whose forward is currently replaced."""
    return {name: m.__dict__[_ATTR][1] for name, m in network.named_modules() if _ATTR in m.__dict__}
