"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), with resharding and consolidation.

Layout of a checkpoint directory::

    <path>/               DCP shards: "state_dict" (model, by parameter name) and
                          "optimizer_<i>" (by parameter name, via DCP's state_dict API)
    <path>/meta.pt        everything else of Lightning's checkpoint dict (loops, schedulers,
                          callbacks, hyper-parameters), written by global rank 0

Because tensors are keyed by parameter name, a rank loads exactly the names its modules hold:
the same checkpoint loads into 1, 2 or 4 pipeline stages, or into a single process. Loading
uses ``weights_only=True``; no pickled code is ever executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

META_FILE = "meta.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or from another model)."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def save_sharded(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any], is_rank_zero: bool) -> None:
    """Write ``tensors`` (nested dicts of tensors, the same keys on replicas) with DCP, and ``meta``.

    Every rank must call this (DCP coordinates the write); replicated entries are written once.
    """
    path = Path(path)
    if path.is_file():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, checkpoint_id=path)
    if is_rank_zero:
        torch.save(meta, path / META_FILE)


def load_meta(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Read ``meta.pt`` with ``weights_only=True`` (or full unpickling if ``trust``)."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE}: it is not a lightning_scale checkpoint or it is incomplete")
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{file} is corrupt or truncated (not a torch.save file: {str(err).splitlines()[-1]})") from err
        raise CheckpointError(
            f"{file} holds objects that weights_only loading refuses ({err}). If you trust this file, register "
            f"the classes with torch.serialization.add_safe_globals([...]) or pass trust_checkpoint=True to the strategy"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{file} is corrupt or truncated ({type(err).__name__}: {err})") from err


def load_sharded(path: str | Path, tensors: dict[str, Any]) -> None:
    """Fill ``tensors`` in place from a DCP checkpoint (only the keys asked for are read).

    Errors are re-raised as :class:`CheckpointError` naming the path and, for a key the
    checkpoint does not have, the key (a checkpoint of another model, or a missing shard).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded (DCP) checkpoint directory: no .metadata file")
    try:
        dcp.load(tensors, checkpoint_id=path)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        text = str(err)
        hint = ""
        if "Missing key" in text or "missing" in text.lower():
            hint = " (the checkpoint lacks tensors this model needs: saved from another model or config?)"
        elif "size" in text.lower() and "mismatch" in text.lower():
            hint = " (tensor shapes differ: saved from a model of another shape?)"
        raise CheckpointError(f"could not load checkpoint {path}{hint}: {type(err).__name__}: {text[:2000]}") from err


def read_metadata(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """Every key a DCP checkpoint holds (nested keys joined by "."): its tensor shape, or None
    for a non-tensor value. Reads only the ``.metadata`` file."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded (DCP) checkpoint directory: no .metadata file")
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"could not read the metadata of checkpoint {path}: {type(err).__name__}: {err}") from err
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
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded (DCP) checkpoint directory: no .metadata file")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(path, flat)
            full: dict[str, Any] = torch.load(flat, map_location="cpu", weights_only=True)
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"could not read the shards of {path}: {type(err).__name__}: {err}") from err
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
