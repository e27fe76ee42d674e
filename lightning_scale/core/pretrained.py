"""Pretrained weights straight into a split or sharded model: each rank reads only its part.
Torch only (``safetensors`` when a safetensors file is given).

Sources (:func:`open_weights`), all read lazily, tensor by tensor:

* a torch file (``torch.save`` of a state dict, or a Lightning checkpoint: its ``state_dict``),
  opened with ``torch.load(mmap=True, weights_only=True)``: the file is mapped, and only the
  pages of the slices this rank copies are read from disk;
* a safetensors file, or a Hugging Face model directory (``model.safetensors``, or shards listed
  in ``model.safetensors.index.json``): ``safe_open(...).get_slice(name)[index]`` reads only
  the requested slice.

:func:`load_into` fills a model whose parameters may be meta (a deferred model: they are
allocated here, on the device, at their local size only), plain, or DTensors (TP / FSDP2 shards:
only the local slice is read). Names are matched as they are in the model, or with the model's
own prefix removed (a LightningModule's ``model.`` in front of a Hugging Face checkpoint's
names).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_scale.core import device as dev
from lightning_scale.core.blocks import tied_parameter_groups

__all__ = ["LoadStats", "WeightSource", "load_into", "open_weights"]


class WeightSource:
    """Named tensors read on demand: :meth:`read` returns ``name``'s slice ``index`` (a tuple of
    slices, or None for the whole tensor) as a host tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.elements_read = 0  # elements handed out by read(): what this rank copied

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        t = self._read(name, index)
        self.elements_read += t.numel()
        return t


class _TorchFile(WeightSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: not a state dict (name -> tensor) nor a Lightning checkpoint with one")
        self._tensors: dict[str, torch.Tensor] = obj

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def _read(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        t = self._tensors[name]
        return t if index is None else t[index]


class _Safetensors(WeightSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from safetensors import safe_open

        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            elif (path / "model.safetensors").is_file():
                files = ["model.safetensors"]
            else:
                raise ValueError(f"{path}: no model.safetensors nor model.safetensors.index.json in this directory")
            base = path
        else:
            files, base = [path.name], path.parent
        self._handles = {f: safe_open(str(base / f), framework="pt", device="cpu") for f in files}
        self._where = {name: f for f, h in self._handles.items() for name in h.keys()}

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def _read(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        handle = self._handles[self._where[name]]
        if index is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[index]


def open_weights(path: str | Path) -> WeightSource:
    """A lazily read source of named tensors (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {path} do not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        return _Safetensors(path)
    return _TorchFile(path)


@dataclass
class LoadStats:
    """What one :func:`load_into` did on this rank."""

    tensors: int = 0  # parameters and buffers filled
    elements_read: int = 0  # elements read from the source (this rank's slices only)
    missing_buffers: list[str] = field(default_factory=list)  # buffers the source lacks, left as they were


def _slices_of(dest: torch.Tensor) -> tuple[list[tuple[slice, ...] | None], int]:
    """The pieces of ``dest``'s global tensor that make its local part, and the dimension they are
    concatenated along: ``[None]`` for a plain tensor (the whole), one index for a contiguous
    shard, ``fused`` indices for a strided one (a q|k|v projection split per block:
    ``core.conv1d_parallel``), each this rank's columns of one block."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from lightning_scale.core.conv1d_parallel import is_strided

    if not isinstance(dest, DTensor):
        return [None], 0
    placements = list(dest.placements)
    strided = [i for i, p in enumerate(placements) if is_strided(p)]
    if len(strided) > 1:
        raise ValueError(f"a tensor strided over {len(strided)} mesh dimensions cannot be read in slices")
    contiguous = [Replicate() if is_strided(p) else p for p in placements]
    shape, offset = compute_local_shape_and_global_offset(dest.shape, dest.device_mesh, contiguous)
    index = [slice(o, o + n) for o, n in zip(offset, shape)]
    if not strided:
        return [tuple(index)], 0
    mesh_dim = strided[0]
    dim, blocks = placements[mesh_dim].dim, placements[mesh_dim].split_factor
    if any(p.is_shard(dim) for i, p in enumerate(placements) if i != mesh_dim):
        raise ValueError(f"a tensor strided and also sharded on dimension {dim} ({placements}) cannot be read in slices")
    n, c = dest.device_mesh.size(mesh_dim), dest.device_mesh.get_local_rank(mesh_dim)
    block = dest.shape[dim] // blocks  # one of the fused blocks (q, k or v), cut into n equal parts
    pieces = []
    for j in range(blocks):
        start = j * block + c * (block // n)
        pieces.append(tuple(slice(start, start + block // n) if d == dim else index[d] for d in range(len(index))))
    return pieces, dim


def load_into(module: nn.Module, source: WeightSource | str | Path, device: torch.device | str,
              prefix: str = "", strip_prefix: str | None = None) -> LoadStats:
    """Fill ``module``'s parameters and buffers from ``source``, each rank reading only the slices
    it holds; meta tensors are first allocated on ``device`` (at their local size). Every tensor
    parameter of the module must be in the source (by ``prefix`` + its name, e.g. ``"blocks.1."``
    for one block of a model, or that without ``strip_prefix``, e.g. a LightningModule's
    ``"model."``; a tied parameter by any of its names, as checkpoints keep one), with the same
    global shape, else a ``ValueError`` names the first that is not. Buffers the source lacks
    (non-persistent ones: rotary tables, masks) are left as they were, meta ones still meta, and
    listed in :attr:`LoadStats.missing_buffers` (a deferred model's replay fills them)."""
    from torch.distributed.tensor import DTensor

    source = open_weights(source) if not isinstance(source, WeightSource) else source
    device = dev.as_device(device)
    available = set(source.keys())
    entries = [*module.named_parameters(remove_duplicate=False),
               *((n, b) for n, b in module.named_buffers(remove_duplicate=False))]
    buffers = {n for n, _ in module.named_buffers(remove_duplicate=False)}

    def direct_key(name: str) -> str | None:
        name = prefix + name
        for candidate in (name, name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else None):
            if candidate is not None and candidate in available:
                return candidate
        return None

    tie_of = {name: group for group in tied_parameter_groups(module) for name in group}

    def key_of(name: str) -> str | None:
        for candidate in tie_of.get(name, [name]):  # a tied parameter: any of its names
            key = direct_key(candidate)
            if key is not None:
                return key
        return None

    problems = []
    missing_buffers = []
    for name, t in entries:
        key = key_of(name)
        if key is None:
            if name in buffers:
                missing_buffers.append(name)
                continue
            problems.append(f"{name!r} is not in {source.path}")
        elif source.shape(key) != tuple(t.shape):
            problems.append(f"{name!r} has shape {tuple(t.shape)}, {source.path} has {source.shape(key)}")
    if problems:
        raise ValueError(f"cannot load {source.path} into {type(module).__name__}: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    ties = tied_parameter_groups(module)
    left_meta = {name for name in missing_buffers if module.get_buffer(name).is_meta}
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for name in left_meta:  # nothing to read them from: meta again, for whoever gives them values
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        sub._buffers[leaf] = torch.empty_like(sub._buffers[leaf], device="meta")
    for names in ties:
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, first)
    stats = LoadStats(missing_buffers=missing_buffers)
    done: set[int] = set()
    with torch.no_grad():
        for name, t in [*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False)]:
            key = key_of(name)
            if key is None or id(t) in done:
                continue
            done.add(id(t))
            pieces, dim = _slices_of(t)
            parts = [source.read(key, index) for index in pieces]
            part = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
            local = t.to_local() if isinstance(t, DTensor) else t
            dev.copy_(local, part).wait()
            stats.tensors += 1
    stats.elements_read = source.elements_read
    return stats
