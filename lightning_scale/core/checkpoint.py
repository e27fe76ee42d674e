"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), with resharding and consolidation.

Layout of a checkpoint directory::

    <path>/               DCP shards: "state_dict" (model, by parameter name) and
                          "optimizer_<i>" (by parameter name, via DCP's state_dict API)
    <path>/.metadata      DCP's index: every key, its shape and the shard file holding it
    <path>/meta.pt        everything else of Lightning's checkpoint dict (loops, schedulers,
                          callbacks, hyper-parameters), written by global rank 0

Because tensors are keyed by parameter name, a rank loads exactly the names its modules hold:
the same checkpoint loads into 1, 2 or 4 pipeline stages, or into a single process.

Safety: no pickled code is ever executed. ``meta.pt`` and single-file checkpoints are read with
``weights_only=True`` (unless the user passes ``trust``); DCP's own ``.metadata`` (a plain
pickle, which ``torch.distributed.checkpoint`` unpickles without restriction) is read here with
an unpickler that resolves only DCP's metadata classes; DCP's non-tensor values (optimizer
hyper-parameters), which DCP's default planner loads with ``weights_only=False``, are loaded
with ``weights_only=True``.

Errors: every problem is a :class:`CheckpointError` naming the file and the fix, raised on every
rank. Checks that read only files (``.metadata``, the shard files' presence and sizes,
``meta.pt``) give the same result on every rank; the comparison of a rank's own tensors with the
checkpoint runs inside DCP's planning step, whose failures DCP sends to every rank. Loading never
writes to the checkpoint.
"""

from __future__ import annotations

import io
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from lightning_scale.core import device as dev

META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or from another model)."""


_RESTORE_HINT = "restore it from a good copy, or resume from an earlier checkpoint"
_TRUST_HINT = (
    "If you trust this file (you or your team wrote it), register the classes with "
    "torch.serialization.add_safe_globals([...]) or pass trust_checkpoint=True to the strategy; never do that "
    "for a file from someone else"
)


# -- single files (torch.save) ------------------------------------------------------------------------
def _short(err: BaseException) -> str:
    """The informative line of an error (torch's weights_only errors open with a long preamble)."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6",
            "(1) In PyTorch 2.6", "Re-running `torch.load`", "(2) Alternatively", "WeightsUnpickler error")
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(skip)]
    return (lines[0] if lines else str(err))[:300]


def _refused_global(err: BaseException) -> str | None:
    """The global a weights_only load refused, from torch's message (None: another error, such
    as the "Unsupported operand" of a file that is not a pickle at all)."""
    import re

    match = re.search(r"[Uu]nsupported (?:global:\s+)?GLOBAL\s+([\w.]+)", str(err))
    return f"it names the global {match.group(1)}" if match else None


def load_file(path: str | Path, *, trust: bool = False, what: str = "checkpoint file") -> Any:
    """``torch.load`` one file on CPU with ``weights_only=True`` (full unpickling only with
    ``trust``); any failure becomes a :class:`CheckpointError` naming the file and the fix."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{what} {file} does not exist; check the path (ckpt_path=...)")
    if not file.is_file():
        raise CheckpointError(f"{what} {file} is not a file")
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {file} is empty (0 bytes): it was not written completely; {_RESTORE_HINT}")
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        refused = _refused_global(err)
        if refused is not None:
            raise CheckpointError(
                f"{what} {file} holds objects that weights_only loading refuses ({refused}); it was not loaded and no "
                f"code in it ran. {_TRUST_HINT}"
            ) from err
        raise CheckpointError(f"{what} {file} is corrupt or truncated ({size} bytes; UnpicklingError: {_short(err)}); it "
                              f"is not a complete torch.save file: {_RESTORE_HINT}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError, AttributeError, IndexError,
            TypeError) as err:
        raise CheckpointError(
            f"{what} {file} is corrupt or truncated ({size} bytes; {type(err).__name__}: {_short(err)}); it is not a "
            f"complete torch.save file: {_RESTORE_HINT}"
        ) from err


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def state_dict_mismatch(path: str | Path, own: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why ``saved`` (the checkpoint's name -> tensor, or -> shape tuple / None) cannot fill
    ``own`` (this rank's name -> tensor or value), naming missing keys and shape mismatches; None
    when every key is there with its shape."""
    def shape(value: Any) -> tuple[int, ...] | None:
        return tuple(value) if isinstance(value, (tuple, torch.Size)) else _shape(value)

    missing = [k for k in own if k not in saved]
    shapes = [
        (k, shape(saved[k]), _shape(v))
        for k, v in own.items()
        if k in saved and _shape(v) is not None and shape(saved[k]) is not None and shape(saved[k]) != _shape(v)
    ]
    if not missing and not shapes:
        return None
    if not shapes and all(k.startswith("optimizer_") for k in missing):
        return (f"checkpoint {path} holds no optimizer state for {len(missing)} entries this run needs, e.g. "
                f"{missing[:3]} (saved with save_weights_only=True, or with other optimizers?); resume from a full "
                f"checkpoint, or load only the weights (LightningModule.load_from_checkpoint / consolidate) and start a "
                f"new run")
    parts = []
    if missing:
        extra = [k for k in saved if k not in own and not k.startswith("optimizer_")]
        parts.append(f"{len(missing)} tensors of this model are not in the checkpoint, e.g. {missing[:3]}"
                     + (f" (it has others, e.g. {extra[:3]})" if extra else ""))
    if shapes:
        listed = "; ".join(f"{k}: checkpoint {s} vs model {m}" for k, s, m in shapes[:3])
        parts.append(f"{len(shapes)} tensors have other shapes, e.g. {listed}")
    return (f"checkpoint {path} was saved from another model or configuration: {'; '.join(parts)}. Load it into "
            f"the model it was saved from (same config), or start without ckpt_path")


def load_meta(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Read ``meta.pt`` with ``weights_only=True`` (or full unpickling if ``trust``)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE}: it is not a lightning_scale checkpoint, or it is "
                              f"incomplete (its writing was interrupted, or it was copied without every file): resume "
                              f"from an earlier checkpoint, or copy the whole directory if it is complete where it was "
                              f"saved")
    meta = load_file(file, trust=trust, what="checkpoint metadata file")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds a {type(meta).__name__}, not the dict a lightning_scale checkpoint writes")
    return meta


# -- DCP directories ----------------------------------------------------------------------------------
def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA_FILE).is_file()


def incomplete_path(path: str | Path) -> Path:
    """Where a checkpoint is written before it is complete: a hidden sibling, ``.<name>.incomplete``
    (not a ``*.ckpt`` name, so nothing that looks for checkpoints picks it up)."""
    path = Path(path)
    return path.with_name(f".{path.name}.incomplete")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_sharded(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any], is_rank_zero: bool,
                 barrier: Any = None) -> None:
    """Write ``tensors`` (nested dicts of tensors, the same keys on replicas) with DCP, and ``meta``,
    atomically: into :func:`incomplete_path` first, renamed to ``path`` by rank 0 once every rank
    has written (a rank killed while saving leaves the hidden directory, never a ``path`` that
    looks complete; the next save of that name clears it). An existing ``path`` (``last.ckpt``) is
    replaced only after the new one is complete.

    Every rank must call this with the same ``path`` (DCP coordinates the write; replicated
    entries are written once). ``barrier``: the strategy's barrier (None: one process)."""
    path = Path(path)
    wait = barrier or (lambda: None)
    tmp = incomplete_path(path)
    if is_rank_zero:
        _remove(tmp)
        tmp.mkdir(parents=True)
    wait()
    resync_replicated(tensors)
    dcp.save(_gather_strided(tensors), checkpoint_id=tmp)
    if is_rank_zero:
        torch.save(meta, tmp / META_FILE)
    wait()  # every rank's shard files are written
    if is_rank_zero:
        old = path.with_name(f".{path.name}.replaced")
        _remove(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _remove(old)
    wait()


def resync_replicated(tree: Any) -> int:
    """Copy mesh coordinate 0's value of every ``Replicate`` DTensor in ``tree`` (parameters and
    optimizer states of tensor-parallel runs, nested dicts / lists) to the other ranks of its
    mesh, in place; returns the elements broadcast by this rank.

    Why: a parameter the TP plan leaves replicated (embeddings, norms, a tied head) is updated
    on every TP rank from a gradient each rank computes itself. Identical inputs give identical
    gradients only when every rank's kernels compute alike: ranks with different CPU thread
    counts (measured: up to 1.2e-7 after 4 steps, GPT-2 at TP = 2, 1 thread on rank 0 and 2 on
    rank 1, which the strategies now prevent) or GPU kernels with atomics let the replicas drift
    apart by rounding. DCP writes each
    replicated tensor once, from whichever rank its planner picks, so drifted replicas could
    put a tied embedding and head into the checkpoint from different ranks. At every save they
    are made equal again. Collective on every rank of each mesh (the same keys, in order)."""
    from torch.distributed.tensor import DTensor

    done = 0
    items = sorted(tree.items(), key=lambda kv: str(kv[0])) if isinstance(tree, dict) else \
        enumerate(tree) if isinstance(tree, list) else ()
    for _, value in items:
        if isinstance(value, (dict, list)):
            done += resync_replicated(value)
        elif (isinstance(value, DTensor) and value.device_mesh.size() > 1
              and all(p.is_replicate() for p in value.placements)):
            mesh = value.device_mesh
            for dim in range(mesh.ndim):  # from coordinate 0 along each dimension in turn
                if mesh.size(dim) > 1:
                    with torch.no_grad():
                        dist.broadcast(value.to_local(), group=mesh.get_group(dim), group_src=0)
            done += value.to_local().numel()
    return done


def _strided_entries(tree: Any) -> list[tuple[Any, Any, Any]]:
    """(container, key, DTensor) for every DTensor in ``tree`` (nested dicts / lists) with a
    strided shard (a fused q|k|v projection split per block: ``core.conv1d_parallel``)."""
    from torch.distributed.tensor import DTensor

    from lightning_scale.core.conv1d_parallel import is_strided

    found = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, DTensor) and any(is_strided(p) for p in value.placements):
            found.append((tree, key, value))
        elif isinstance(value, (dict, list)):
            found.extend(_strided_entries(value))
    return found


def _unstrided(t: Any) -> Any:
    """``t`` with its strided mesh dimensions replicated (an all-gather over them): the whole
    tensor, in the model's own layout, which DCP can store (it stores one contiguous block per
    rank; a strided shard is ``fused`` blocks)."""
    from torch.distributed.tensor import Replicate

    from lightning_scale.core.conv1d_parallel import is_strided

    return t.redistribute(t.device_mesh, [Replicate() if is_strided(p) else p for p in t.placements])


def _gather_strided(tree: Any) -> Any:
    """``tree`` (nested dicts / lists, containers copied) with strided DTensors gathered (see
    :func:`_unstrided`): the checkpoint holds the same keys and global shapes either way."""
    from torch.distributed.tensor import DTensor

    from lightning_scale.core.conv1d_parallel import is_strided

    if isinstance(tree, dict):
        return {k: _gather_strided(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_gather_strided(v) for v in tree]
    if isinstance(tree, DTensor) and any(is_strided(p) for p in tree.placements):
        gathered = _unstrided(tree)
        if all(p.is_replicate() for p in gathered.placements):
            # The whole tensor on every rank: moved to host one tensor at a time, so a save holds at
            # most one gathered tensor on the device (fused weights and their Adam moments would
            # otherwise all be gathered at once). DCP writes a plain tensor that every rank holds
            # under the same key once.
            host, transfer = dev.to_host(gathered.to_local())
            transfer.wait()
            return host
        return gathered  # also sharded over another mesh dimension (ZeRO-3's dp): stays a DTensor
    return tree


def _load_strided(tensors: dict[str, Any], load: Any) -> None:
    """Run ``load(tensors)`` (DCP's in-place load) with every strided DTensor read whole into a
    replicated buffer, then sliced into the strided shard it stands for (no communication)."""
    from torch.distributed.tensor import Replicate, distribute_tensor, empty

    from lightning_scale.core.conv1d_parallel import is_strided

    entries = _strided_entries(tensors)
    buffers = []
    for container, key, value in entries:  # empty buffers in the gathered layout: DCP fills them
        placements = [Replicate() if is_strided(p) else p for p in value.placements]
        buffers.append(empty(value.shape, dtype=value.dtype, device_mesh=value.device_mesh, placements=placements))
        container[key] = buffers[-1]
    try:
        load(tensors)
    finally:
        for (container, key, value), _ in zip(entries, buffers):
            container[key] = value
    for (_, _, value), buffer in zip(entries, buffers):
        # The whole tensor: no communication on a tensor-parallel mesh (the buffer is replicated
        # there), an all-gather over any other sharded dimension (ZeRO-3's dp).
        full = buffer.full_tensor()
        value.to_local().copy_(distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None).to_local())


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """The only globals a DCP ``.metadata`` pickle may name: DCP's metadata classes, torch.Size,
    dtypes, layouts and paths (written as StorageMeta.checkpoint_id)."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {
        (md.__name__, name): obj for name, obj in vars(md).items() if isinstance(obj, type) and obj.__module__ == md.__name__
    }
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("torch", name): obj for name, obj in vars(torch).items() if isinstance(obj, torch.dtype)})
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _metadata_globals()
        found = _MetadataUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a DCP .metadata file names only "
                                         f"torch.distributed.checkpoint metadata classes)")
        return found


def read_dcp_metadata(path: str | Path) -> Metadata:
    """DCP's ``.metadata`` of checkpoint directory ``path``, unpickled with only DCP's metadata
    classes allowed (DCP itself unpickles it without restriction)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (ckpt_path=...)")
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded (DCP) checkpoint directory: no {DCP_METADATA_FILE} file (copy "
                              f"the whole directory, or give the path of a checkpoint file)")
    file = path / DCP_METADATA_FILE
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        if "refusing to load global" in str(err):
            raise CheckpointError(f"{file} names objects a DCP metadata file never holds ({err}); it was not loaded "
                                  f"and no code in it ran. It is not a checkpoint this library wrote") from err
        raise CheckpointError(f"{file} is corrupt or truncated (UnpicklingError: {err}); {_RESTORE_HINT}") from err
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is a corrupt file
        raise CheckpointError(f"{file} is corrupt or truncated ({type(err).__name__}: {err}); {_RESTORE_HINT}") from err
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP metadata with storage data; "
                              f"{_RESTORE_HINT}")
    return metadata


def check_shard_files(path: str | Path, metadata: Metadata) -> None:
    """Every shard file the metadata points to exists and is long enough (a missing or truncated
    shard is named before any read)."""
    path = Path(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name in sorted(needed):
        file = path / name
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete: shard file {file} is missing (each rank writes its own "
                f"__<rank>_<n>.distcp file). If its writing was interrupted (a rank stopped while saving), resume "
                f"from an earlier checkpoint; if it was copied without every file, copy the whole directory from "
                f"where it was saved"
            )
        size = file.stat().st_size
        if size < needed[name]:
            raise CheckpointError(
                f"checkpoint {path} is truncated: shard file {file} has {size} bytes, its metadata needs at least "
                f"{needed[name]}; {_RESTORE_HINT}"
            )


class _WeightsOnlyBytes:
    """DCP's non-tensor values (e.g. optimizer hyper-parameters) loaded with ``weights_only=True``
    (DCP's default planner uses ``weights_only=False``)."""

    _checkpoint_path: Path

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"checkpoint {self._checkpoint_path}: value {fqn!r} holds objects that weights_only loading refuses "
                f"({_refused_global(err) or err}); it was not loaded and no code in it ran. It is not a checkpoint "
                f"this library wrote, or it is corrupt"
            ) from err
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self._checkpoint_path}: value {fqn!r} is corrupt ({type(err).__name__}: "
                                  f"{err}); {_RESTORE_HINT}") from err
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[fqn] = obj  # type: ignore[attr-defined]


class _SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """DCP's default planner, which first compares this rank's keys and shapes with the
    checkpoint's (raised inside DCP's planning step, so every rank gets the error)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._checkpoint_path = path

    def create_local_plan(self) -> Any:
        saved = {
            key: tuple(item.size) if isinstance(item, TensorStorageMetadata) else None
            for key, item in self.metadata.state_dict_metadata.items()
        }
        problem = state_dict_mismatch(self._checkpoint_path, dict(self.state_dict), saved)
        if problem is not None:
            raise CheckpointError(problem)
        return super().create_local_plan()


class _SafeEmptyPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._checkpoint_path = path


class _SafeReader(FileSystemReader):
    """DCP's file reader with the restricted ``.metadata`` unpickler and shard errors naming the
    checkpoint. ``read_metadata`` takes no ``rank`` keyword, so DCP does not look for per-rank
    metadata files after a failure."""

    def __init__(self, path: Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._checkpoint_path = Path(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = self._metadata if self._metadata is not None else read_dcp_metadata(self._checkpoint_path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {self._checkpoint_path}: a shard file (*.distcp) could not be read ({type(err).__name__}: "
                f"{str(err)[:300]}); it is corrupt: {_RESTORE_HINT}"
            ) from err


def _unwrap(path: Path, err: BaseException) -> CheckpointError:
    """One CheckpointError from DCP's CheckpointException (a failure per rank)."""
    if isinstance(err, CheckpointError):
        return err
    failures = getattr(err, "failures", None) or {}
    ours = {rank: exc for rank, (exc, _trace) in sorted(failures.items()) if isinstance(exc, CheckpointError)}
    if ours:
        first_rank, first = next(iter(ours.items()))
        ranks = sorted(ours)
        where = f" (rank {ranks[0]})" if len(ranks) == 1 else f" (ranks {ranks}; rank {first_rank}'s error shown)"
        return CheckpointError(f"{first}{where}")
    if failures:
        rank, (exc, _trace) = sorted(failures.items())[0]
        detail = f"rank {rank}: {type(exc).__name__}: {str(exc)[:1500]}"
    else:
        detail = f"{type(err).__name__}: {str(err)[:1500]}"
    return CheckpointError(f"could not load checkpoint {path}: {detail}")


def load_sharded(path: str | Path, tensors: dict[str, Any]) -> None:
    """Fill ``tensors`` in place from a DCP checkpoint (only the keys asked for are read).

    Errors are re-raised as :class:`CheckpointError` naming the path and, for a checkpoint of
    another model, the keys and shapes that differ; a missing or truncated shard file is named.
    """
    path = Path(path)
    metadata = read_dcp_metadata(path)
    check_shard_files(path, metadata)
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            _load_strided(tensors, lambda t: dcp.load(t, storage_reader=_SafeReader(path, metadata),
                                                      planner=_SafeLoadPlanner(path), no_dist=no_dist))
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        raise _unwrap(path, err) from err


def read_metadata(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """Every key a DCP checkpoint holds (nested keys joined by "."): its tensor shape, or None
    for a non-tensor value. Reads only the ``.metadata`` file."""
    metadata = read_dcp_metadata(path)
    return {
        key: tuple(item.size) if isinstance(item, TensorStorageMetadata) else None
        for key, item in metadata.state_dict_metadata.items()
    }


def consolidate(path: str | Path, out_file: str | Path | None = None, *, trust: bool = False) -> dict[str, Any]:
    """Turn a sharded checkpoint into a plain Lightning checkpoint dict (full ``state_dict``).

    Runs in one process, no process group needed. Returns the dict and, with ``out_file``,
    saves it with ``torch.save`` so ``LightningModule.load_from_checkpoint(out_file)`` or
    ``Trainer(ckpt_path=out_file)`` with a single-device strategy can use it.
    """
    path = Path(path)
    try:
        metadata = read_dcp_metadata(path)
        check_shard_files(path, metadata)
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        full: dict[str, Any] = {}  # filled from the metadata by the planner (what dcp_to_torch_save does)
        _load_state_dict(full, storage_reader=_SafeReader(path, metadata), planner=_SafeEmptyPlanner(path), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"could not read the shards of {path}: {_unwrap(path, err)}") from err
    checkpoint = load_meta(path, trust=trust)
    checkpoint["state_dict"] = full.get("state_dict", {})
    optimizer_states = [full[k] for k in sorted(full) if k.startswith("optimizer_")]
    if optimizer_states:
        checkpoint["optimizer_states_by_name"] = optimizer_states
    if out_file is not None:
        torch.save(checkpoint, out_file)
    return checkpoint


def model_tensors(module: nn.Module) -> dict[str, Any]:
    """Parameter/buffer name -> tensor of a (possibly partial) module, for DCP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)
