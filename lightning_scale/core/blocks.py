"""Finding a model's repeated blocks: the units of ZeRO-3 sharding, activation checkpointing and
pipeline splitting, found the way users build models. Torch only.

Two ways, one for every strategy:

* **a block container**: an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict`` anywhere in
  the network (``block_container="layers"``, ``"model.layers"``, or ``""`` for a network that *is*
  a Sequential). Its children are the blocks. Default: the container with the most parameters
  among those with 2+ children (the root itself when it is the only one).
* **a block class** (``block_class=``), as Lightning's and FSDP's wrap policies take it: a class,
  a class name (``"Block"``) or qualified name (``"my_pkg.model.Block"``), a list of those, or a
  predicate ``fn(module) -> bool``. The blocks are the outermost matching modules, wherever they
  sit; a match inside a match is part of the outer block.

The caller names itself (``owner``, e.g. ``"ZeroStrategy(stage=3)"``) so that every error speaks
of the strategy the user chose and of the options it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)

#: What ``block_class=`` takes.
BlockClass = Union[str, type, Sequence[Union[str, type]], Callable[[nn.Module], bool]]


def check_block_class(owner: str, value: Any) -> None:
    """Raise a clear error for a malformed ``block_class`` (None is fine): at construction, every rank."""
    if value is None or isinstance(value, (str, type)) or (callable(value) and not isinstance(value, (list, tuple))):
        if isinstance(value, str) and not value:
            raise ValueError(f"{owner}(block_class=''): give a class name such as 'Block', or None")
        return
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, (str, type)) and v for v in value):
        return
    raise ValueError(
        f"{owner}(block_class={value!r}): block_class must be a module class, a class name ('Block' or "
        f"'my_pkg.model.Block'), a list of those, or a function module -> bool (an FSDP-style wrap policy); or None"
    )


def _matcher(block_class: BlockClass) -> Callable[[nn.Module], bool]:
    if callable(block_class) and not isinstance(block_class, type):
        return block_class  # a predicate
    wanted = [block_class] if isinstance(block_class, (str, type)) else list(block_class)
    names = {w for w in wanted if isinstance(w, str)}
    types = tuple(w for w in wanted if isinstance(w, type))

    def match(module: nn.Module) -> bool:
        cls = type(module)
        return (bool(types) and isinstance(module, types)) or cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names

    return match


def describe_block_class(block_class: BlockClass) -> str:
    if isinstance(block_class, type):
        return block_class.__name__
    if isinstance(block_class, str):
        return block_class
    if callable(block_class):
        return getattr(block_class, "__name__", "a predicate")
    return "[" + ", ".join(b.__name__ if isinstance(b, type) else b for b in block_class) + "]"


def blocks_by_class(network: nn.Module, block_class: BlockClass, owner: str) -> list[tuple[str, nn.Module]]:
    """The outermost modules of ``network`` that ``block_class`` matches, as (path, module), in
    registration order (the network itself is never a block)."""
    match = _matcher(block_class)
    found: list[tuple[str, nn.Module]] = []
    for name, module in network.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if match(module):
            found.append((name, module))
    if not found:
        present = sorted({type(m).__name__ for m in network.modules()})
        raise ValueError(
            f"{owner}: no module of {type(network).__name__} matches block_class={describe_block_class(block_class)}; "
            f"module classes here: {present}"
        )
    return found


def find_block_container(network: nn.Module, path: str | None, owner: str, fix: str) -> str:
    """Path of the block container: ``path`` checked, or the one with most parameters.

    ``fix`` names what the caller's user can pass instead (e.g. "block_container= or block_class=")."""
    if path is not None:
        try:
            module = network.get_submodule(path)
        except AttributeError as err:
            raise ValueError(
                f"{owner}: block container {path!r} not found in {type(network).__name__}; give the path of the "
                f"ModuleList/ModuleDict/Sequential holding the blocks (e.g. 'blocks' or 'model.layers')"
            ) from err
        if not isinstance(module, CONTAINERS):
            raise ValueError(
                f"{owner}: block container {path!r} is a {type(module).__name__}, not a ModuleList/ModuleDict/"
                f"Sequential; give the container's path, or the blocks' class with block_class="
            )
        return path
    best, best_params = None, -1
    for name, module in network.named_modules():
        if isinstance(module, CONTAINERS) and len(module) > 1 and (name or best is None):
            n = sum(p.numel() for p in module.parameters())
            if n > best_params or (best == "" and name):
                best, best_params = name, n
    if best is None:
        raise ValueError(
            f"{owner}: {type(network).__name__} has no block container (an nn.Sequential, ModuleList or ModuleDict "
            f"of 2+ modules) to find its blocks in; {fix}"
        )
    return best


@dataclass(frozen=True)
class BlockFinder:
    """How a strategy finds blocks: a container path, a block class, or neither (the default container)."""

    container: str | None = None
    block_class: BlockClass | None = None

    def find(self, network: nn.Module, owner: str, fix: str = "pass block_container= or block_class=") -> list[tuple[str, nn.Module]]:
        """Blocks of ``network`` as (path in the network, module), in order."""
        if self.block_class is not None:
            return blocks_by_class(network, self.block_class, owner)
        path = find_block_container(network, self.container, owner, fix)
        holder = network.get_submodule(path)
        prefix = f"{path}." if path else ""
        return [(f"{prefix}{key}", block) for key, block in holder._modules.items() if block is not None]

    def container_path(self, network: nn.Module, owner: str, fix: str = "pass block_container= or block_class=") -> str:
        """The one container holding every block (pipeline splitting needs the blocks to be
        consecutive children of one container)."""
        if self.block_class is None:
            return find_block_container(network, self.container, owner, fix)
        blocks = blocks_by_class(network, self.block_class, owner)
        parents = {name.rpartition(".")[0] for name, _ in blocks}
        if len(parents) == 1:
            parent = parents.pop()
            holder = network.get_submodule(parent)
            if isinstance(holder, CONTAINERS):
                return parent
        raise ValueError(
            f"{owner}: the {describe_block_class(self.block_class)} blocks of {type(network).__name__} are not the "
            f"children of one ModuleList/ModuleDict/Sequential ({sorted({n for n, _ in blocks})[:4]} ...); pipeline "
            f"stages are cut between consecutive blocks of one container: put them in one, or give split_points="
        )


def tied_parameter_groups(network: nn.Module) -> list[list[str]]:
    """Groups of parameter names that refer to one tensor (e.g. ['tok_emb.weight', 'head.weight']):
    what pipeline splitting, tensor parallelism and sharding must keep tied."""
    by_id: dict[int, list[str]] = {}
    for name, p in network.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
