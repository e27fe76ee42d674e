"""Checkpoints of the suite's strategies: sharded ``torch.distributed.checkpoint`` (DCP) directories
keyed by parameter name, so a checkpoint saved under one layout loads into another; Lightning's
single-file checkpoints loaded by name; errors raised on every rank.

:class:`DistributedCheckpointing` is a mixin of
:class:`~lightning_scale.strategies.base.MeshStrategy`: it overrides Lightning's checkpoint hooks
of ``Strategy`` and uses the strategy's ``lightning_module``, ``optimizers``, ``broadcast``,
``barrier``, ``is_global_zero``, ``resolved_dims`` and ``trust_checkpoint``. The file format and
its errors are in :mod:`lightning_scale.core.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from torch.optim import Optimizer

from lightning_scale.core import checkpoint as ckpt
from lightning_scale.core.mesh import sharded_over
from lightning_scale.strategies.loader_state import saved_data_parallel_degree, saved_loader_states
from lightning_scale.strategies.optimizers import unwrap_optimizer


def _optim_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Flat, name-keyed optimizer state ("state.<param>.exp_avg", "param_groups.<param>.lr"): a
    # list-indexed param_groups entry would hold different parameters on different pipeline
    # stages under the same key, and DCP keeps one copy of each key.
    return StateDictOptions(flatten_optimizer_state_dict=True)


_OPTIM_OPTIONS = _optim_options()


def _rename_params(flat_optim_state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Rename parameters in a flattened optimizer state dict ("state.<param>.<key>",
    "param_groups.<param>.<key>")."""
    if not names:
        return flat_optim_state
    out = {}
    for key, value in flat_optim_state.items():
        section, _, rest = key.partition(".")
        for old, new in names.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        out[f"{section}.{rest}"] = value
    return out


class DistributedCheckpointing:
    """Lightning's checkpoint hooks for a strategy whose model is split or sharded (see module docstring)."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the split/sharded model, after the optimizers exist

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores optimizer states itself, by parameter name

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = unwrap_optimizer(optimizer)
        assert self.lightning_module is not None
        return get_optimizer_state_dict(self.lightning_module, optimizer, options=_OPTIM_OPTIONS)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        tensors = {"state_dict": checkpoint.pop("state_dict")}
        for i, state in enumerate(checkpoint.pop("optimizer_states", [])):
            tensors[f"optimizer_{i}"] = state
        checkpoint["lightning_scale_layout"] = {"dims": vars(self.resolved_dims) if self.resolved_dims else None}
        ckpt.save_sharded(path, tensors, checkpoint, self.is_global_zero, barrier=self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = self._load_checkpoint_files(checkpoint_path)
        # Kept to re-apply at on_train_start (Lightning issue #20550; see loader_state.py).
        self._saved_loader_states = saved_loader_states(checkpoint)
        self._saved_dp = saved_data_parallel_degree(checkpoint)  # a mid-epoch resume needs the same dp
        return checkpoint

    def _load_checkpoint_files(self, checkpoint_path) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        assert self.lightning_module is not None
        module = self.lightning_module
        if not path.exists():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist; check ckpt_path")
        if path.is_file():
            return self._load_full_checkpoint(path)
        ckpt.read_dcp_metadata(path)  # a directory: DCP's index first (names a missing or corrupt .metadata)
        meta = ckpt.load_meta(path, trust=self.trust_checkpoint)
        model_state = {"state_dict": get_model_state_dict(module)}
        ckpt.load_sharded(path, model_state)
        set_model_state_dict(module, model_state["state_dict"], options=StateDictOptions(strict=module.strict_loading))
        self._load_optimizer_states(path)
        return meta

    def _load_optimizer_states(self, path: Path) -> None:
        """Restore every optimizer's state from the name-keyed entries of a DCP checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        module = self.lightning_module
        assert module is not None
        aliases = self.optimizer_state_aliases()
        for i, optimizer in enumerate(self.optimizers):
            flat = _rename_params(get_optimizer_state_dict(module, optimizer, options=_OPTIM_OPTIONS), aliases)
            state = {f"optimizer_{i}": flat}
            ckpt.load_sharded(path, state)
            restored = _rename_params(state[f"optimizer_{i}"], {v: k for k, v in aliases.items()})
            set_optimizer_state_dict(module, optimizer, optim_state_dict=restored, options=_OPTIM_OPTIONS)

    def optimizer_state_aliases(self) -> dict[str, str]:
        """Parameter names whose optimizer state is read under another name (tied copies)."""
        return {}

    def _load_full_checkpoint(self, path: Path) -> dict[str, Any]:
        """A single-file (consolidated) checkpoint: each rank takes the names its modules hold.

        Read with ``weights_only=True`` (unless ``trust_checkpoint``); a file that cannot be read,
        or that lacks (or has other shapes for) a tensor some rank holds, raises the same
        :class:`~lightning_scale.core.checkpoint.CheckpointError` on every rank."""
        assert self.lightning_module is not None
        checkpoint = ckpt.load_file(path, trust=self.trust_checkpoint)  # the same file, the same outcome on every rank
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ckpt.CheckpointError(
                f"checkpoint {path} has no 'state_dict' entry ({type(checkpoint).__name__}"
                + (f" with keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else "")
                + "): it is not a Lightning checkpoint; save one with trainer.save_checkpoint or ModelCheckpoint"
            )
        own = self.lightning_module.state_dict()
        self._raise_on_any_rank(ckpt.state_dict_mismatch(path, own, checkpoint["state_dict"]))
        full = {k: checkpoint["state_dict"][k] for k in own}
        if any(sharded_over(v, "dp") or sharded_over(v, "tp") for v in own.values()):
            # DTensor parameters (ZeRO-3 / FSDP2, TP) take full tensors through DCP's state-dict API.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.lightning_module, full, options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            self.lightning_module.load_state_dict(full, strict=True)
        if checkpoint.pop("optimizer_states", None):  # index-keyed states cannot be mapped to a new layout
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{type(self).__name__}: {path} is a single-file checkpoint; its optimizer state is keyed by "
                f"parameter index and is NOT restored (the optimizer restarts from zero state, so the resumed "
                f"losses differ from an uninterrupted run). For an exact resume, resume from a checkpoint this "
                f"strategy saved (a DCP directory)."
            )
        return checkpoint

    def _raise_on_any_rank(self, problem: str | None) -> None:
        """Raise ``problem`` (a rank's own finding, or None) on every rank if any rank has one: the
        ranks of a split model check different tensors, and a rank that raised alone would leave
        the others waiting in their next collective."""
        problems = [problem]
        if _distributed_is_initialized() and dist.get_world_size() > 1:
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
        found = [(rank, p) for rank, p in enumerate(problems) if p]
        if found:
            ranks = [rank for rank, _ in found]
            where = "" if len(problems) == 1 else f" (found on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            raise ckpt.CheckpointError(found[0][1] + where)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # done in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # done in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            import shutil

            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
