"""``TensorParallelStrategy``: Megatron-style tensor (and sequence) parallelism on DTensor,
with data parallelism over the remaining ranks.

The network in ``module_name`` is parallelized in place with
:func:`lightning_scale.core.tensor_parallel.apply_tp` over the ``tp`` sub-mesh: the built-in plan
of the suite's GPT / ViT, a Hugging Face model's own plan or GPT-2's Conv1D plan, or a user plan
(``{module-path pattern: ParallelStyle}``). Every
parameter of the network becomes a DTensor (those the plan leaves alone ``Replicate``), on every
device: the layout tested on CPU is the layout a GPU runs (:func:`parallelize_network`). The
training step is the module's own (every TP rank computes the same loss on the same batch);
gradients are averaged over ``dp`` once per optimizer step and clipped by the global norm
computed across TP shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_scale.adapters.huggingface import gpt2_attention_paths, gpt2_tp_plan, is_hugging_face
from lightning_scale.core.mesh import ParallelDims
from lightning_scale.core.tensor_parallel import apply_tp, gpt_tp_plan, validate_tp, vit_tp_plan
from lightning_scale.strategies.base import MeshStrategy
from lightning_scale.strategies.options import check_sequence_parallel_plan, check_bool, check_tp_plan, renamed_option


def builtin_plan(network: nn.Module, sequence_parallel: bool, shard_vocab: bool = False) -> dict[str, ParallelStyle]:
    """The suite's plan for its own models (GPT, ViT); a clear error for any other model."""
    from lightning_scale.models import GPT, ViT

    if isinstance(network, GPT):
        return gpt_tp_plan(sequence_parallel, shard_vocab=shard_vocab)
    if isinstance(network, ViT):
        return vit_tp_plan(sequence_parallel)
    if getattr(getattr(network, "config", None), "base_model_tp_plan", None):
        return _hugging_face_plan(network, sequence_parallel)
    if _is_gpt2(network):
        return gpt2_tp_plan(network, sequence_parallel)
    _refuse_conv1d(network, None)
    if is_hugging_face(network):
        raise ValueError(
            f"{type(network).__name__}'s config declares no tensor-parallel plan (transformers' base_model_tp_plan, "
            f"model_type {network.config.model_type!r}); give tp_plan={{'module path pattern': ParallelStyle}} for its "
            f"projections (ColwiseParallel on q/k/v and the MLP's first layer, RowwiseParallel on the attention output "
            f"and the MLP's last), or train it with ZeroStrategy(stage=3) or the pipeline"
        )
    raise ValueError(
        f"there is no built-in tensor-parallel plan for {type(network).__name__}; pass tp_plan={{'module path pattern': "
        f"ParallelStyle}}, e.g. {{'fc1': ColwiseParallel(), 'fc2': RowwiseParallel()}}, with paths relative to the "
        f"LightningModule (or to its module_name network), or tp_plan={{}} to replicate every layer (see "
        f"docs/strategies/tensor_parallel.md)"
    )


def _plan_source(network: nn.Module, user_plan: Mapping[str, ParallelStyle] | None) -> str:
    """Where the plan in use came from, for the start-up line."""
    from lightning_scale.models import GPT, ViT

    if user_plan is not None:
        return "your tp_plan"
    if isinstance(network, (GPT, ViT)):
        return f"the suite's {type(network).__name__} plan"
    if getattr(getattr(network, "config", None), "base_model_tp_plan", None):
        return "the model's own plan: config.base_model_tp_plan"
    return "GPT-2's built-in Conv1D plan"


def _is_gpt2(network: nn.Module) -> bool:
    """A ``transformers`` GPT-2 (``model_type`` "gpt2") with GPT-2's attention: the built-in plan's
    model. Look-alikes (ImageGPT, DecisionTransformer) are not tested with it and get no plan."""
    return (is_hugging_face(network) and network.config.model_type == "gpt2"
            and bool(gpt2_attention_paths(network)))


def _refuse_conv1d(network: nn.Module, plan: dict | None) -> None:
    """``transformers``' ``Conv1D`` layers (weight (in, out)) take the Conv1D styles, never torch's
    ``ColwiseParallel``/``RowwiseParallel`` (which split ``nn.Linear``'s (out, in) weight and raise
    from inside torch on anything else). Without a plan, a Conv1D model that is not GPT-2-shaped
    (the built-in plan) is refused. Named, at setup, on every rank."""
    import fnmatch

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lightning_scale.core.conv1d_parallel import is_transposed_linear

    found = [name for name, module in network.named_modules() if is_transposed_linear(module)]
    if not found:
        return
    if plan is None:
        hit = found
    else:
        hit = [n for n in found if any(fnmatch.fnmatchcase(n, pat) and isinstance(style, (ColwiseParallel, RowwiseParallel))
                                       for pat, style in plan.items())]
    if not hit:
        return
    listed = f"{', '.join(hit[:3])}{', ...' if len(hit) > 3 else ''}"
    styles = ("lightning_scale.core.conv1d_parallel's Conv1DColwiseParallel (fused=3 for a q|k|v projection such as "
              "c_attn, whose attention must then split at the local width: adapters.huggingface.GPT2AttentionHeads for "
              "GPT-2's) and Conv1DRowwiseParallel")
    if plan is None:
        raise ValueError(
            f"{type(network).__name__} projects with transformers' Conv1D ({listed}) and has no built-in tensor-parallel "
            f"plan (the suite ships one for GPT-2-style attention: split_size, num_heads). Give tp_plan= with {styles}, "
            f"or train it with ZeroStrategy(stage=3) or the pipeline"
        )
    raise ValueError(
        f"{type(network).__name__} projects with transformers' Conv1D ({listed}), whose weight is (in, out): torch's "
        f"ColwiseParallel/RowwiseParallel cannot split it. Use {styles} in tp_plan, or train it with "
        f"ZeroStrategy(stage=3) or the pipeline"
    )


def _hugging_face_plan(network: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """A ``transformers`` model's own plan (``config.base_model_tp_plan``), translated; its head
    counts checked against tp on every rank before any collective (in :func:`parallelize_network`)."""
    from lightning_scale.adapters.huggingface import hf_tp_plan

    if sequence_parallel:
        raise ValueError(
            f"sequence_parallel=True with {type(network).__name__}'s own Hugging Face plan: the suite does not add the "
            f"SequenceParallel entries to that plan; use sequence_parallel=False, or give tp_plan= with "
            f"SequenceParallel() on its norms"
        )
    return hf_tp_plan(network)


def _check_hugging_face_heads(config: object, tp: int) -> None:
    for field in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {field}={value}: use a "
                             f"tensor_parallel_size that divides it")


def _matches_some_module(network: nn.Module, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    parts = pattern.split(".")
    for name, _ in network.named_modules():
        components = name.split(".") if name else []
        if len(components) == len(parts) and all(fnmatchcase(c, p) for c, p in zip(components, parts)):
            return True
    return False


def relative_plan(plan: Mapping[str, ParallelStyle] | None, module_name: str | None,
                  network: nn.Module | None = None) -> dict[str, ParallelStyle] | None:
    """``plan`` with paths relative to the network: a pattern written from the LightningModule
    (``"model.blocks.*.fc1"``) loses its ``module_name`` prefix when the network is that attribute
    and the pattern does not already name a module of the network (a Hugging Face model held in
    ``self.model`` has its own ``model.layers``). ``module_name`` None: the network is the
    LightningModule, paths are already relative."""
    if plan is None or module_name is None:
        return None if plan is None else dict(plan)
    prefix = module_name + "."
    out = {}
    for key, style in plan.items():
        if key.startswith(prefix) and (network is None or not _matches_some_module(network, key)):
            key = key[len(prefix):]
        out[key] = style
    return out


def parallelize_network(
    network: nn.Module,
    tp_mesh: Any,
    plan: Mapping[str, ParallelStyle] | None,
    sequence_parallel: bool,
    shard_vocab: bool = False,
    src_data_rank: int | None = 0,
) -> dict[str, ParallelStyle]:
    """Apply ``plan`` (default: the built-in plan) to ``network`` over ``tp_mesh``; returns the plan.

    Shared by :class:`TensorParallelStrategy` and the 3D strategy (on its stage view)."""
    tp = tp_mesh.size()
    fused = [name for name, m in network.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if fused:
        raise ValueError(
            f"tensor parallelism cannot run {type(network).__name__}: nn.MultiheadAttention ({fused[0]}) computes with "
            f"its fused in_proj weight in one functional call that DTensor cannot mix with plain activations, sharded "
            f"or replicated. Use strategy='zero2' / 'zero3' / 'ddp_ac' / 'pipeline' for this module, or write the "
            f"attention with nn.Linear q/k/v projections and shard those with tp_plan="
        )
    config = getattr(network, "config", None)
    if plan is None and (getattr(config, "base_model_tp_plan", None) or _is_gpt2(network)):
        _check_hugging_face_heads(config, tp)
    elif plan is None and config is not None and not is_hugging_face(network):
        # The suite's models: heads, hidden, MLP (and vocab) against tp, named by config field,
        # raised on every rank. (A transformers model without a plan is refused by builtin_plan.)
        validate_tp(config, tp, None, sequence_parallel, shard_vocab=shard_vocab)
    if plan is not None:
        _refuse_conv1d(network, plan)  # (builtin_plan refuses a model made of them itself)
    plan = dict(plan) if plan is not None else builtin_plan(network, sequence_parallel, shard_vocab)
    # One layout on every device: every parameter a DTensor (the ones the plan leaves alone
    # Replicate), so the layout tested on CPU is the layout a GPU runs. CUDA needs it anyway:
    # torch's default foreach/fused optimizers reject a mix of DTensors and plain tensors.
    # src_data_rank=None on a deferred (meta) model: each rank keeps its own slice, no broadcast of
    # values that do not exist yet (materialization gives every rank the same eager values).
    apply_tp(network, tp_mesh, plan, replicate_rest=True, src_data_rank=src_data_rank)
    return plan


class TensorParallelStrategy(MeshStrategy):
    """Tensor parallelism over ``tensor_parallel_size`` ranks; data parallel over the rest.

    Args:
        tensor_parallel_size: ranks that share each layer (the "tp" mesh dimension).
        sequence_parallel: also shard LayerNorm/dropout activations on the sequence dimension
            (the sequence length must be divisible by ``tensor_parallel_size``).
        tp_plan: ``{module-path pattern: ParallelStyle}``, paths relative to the network (or to the
            LightningModule, ``"model.blocks.*.fc1"``); default: the built-in plan for the suite's
            GPT/ViT, a ``transformers`` model's own plan (``config.base_model_tp_plan``), or
            GPT-2's Conv1D plan (``adapters.huggingface.gpt2_tp_plan``). ``plan=`` is its
            deprecated spelling.
        shard_vocab: with the built-in GPT plan, shard the token embedding and head on the vocabulary.
        module_name: attribute of the LightningModule that holds the network.
    """

    strategy_name = "tensor_parallel"

    def __init__(
        self,
        tensor_parallel_size: int = 2,
        sequence_parallel: bool = False,
        tp_plan: Mapping[str, ParallelStyle] | None = None,
        shard_vocab: bool = False,
        module_name: str = "model",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        trust_checkpoint: bool = False,
        plan: Mapping[str, ParallelStyle] | None = None,
        **kwargs: Any,
    ) -> None:
        # Validated here, on every rank, before any process group exists.
        owner = type(self).__name__
        plan = renamed_option(owner, "plan", "tp_plan", plan, tp_plan)
        check_bool(owner, "sequence_parallel", sequence_parallel)
        check_bool(owner, "shard_vocab", shard_vocab)
        check_tp_plan(owner, "tp_plan", plan)
        check_sequence_parallel_plan(owner, sequence_parallel, plan)
        super().__init__(
            dims=ParallelDims(pp=1, dp=-1, tp=tensor_parallel_size),
            process_group_backend=process_group_backend,
            timeout=timeout,
            trust_checkpoint=trust_checkpoint,
            module_name=module_name,
            **kwargs,
        )
        self.sequence_parallel = sequence_parallel
        self.tp_plan = dict(plan) if plan is not None else None
        self.shard_vocab = shard_vocab

    @property
    def tp(self) -> int:
        return self.dims.tp

    def apply_tensor_parallel(self, local: nn.Module) -> None:
        network = local
        user_plan = relative_plan(self.tp_plan, None if network is self.lightning_module else self.module_name, network)
        plan = parallelize_network(network, self.device_mesh["tp"], user_plan, self.sequence_parallel, self.shard_vocab,
                                   src_data_rank=None if self.deferring else 0)
        rank_zero_info(f"TensorParallelStrategy: tp={self.tp}, sequence_parallel={self.sequence_parallel}, {len(plan)} plan "
                       f"entries ({_plan_source(network, user_plan)})")

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.sequence_parallel:
            self._check_sequence_length(args)
        return super().training_step(*args, **kwargs)

    def _check_sequence_length(self, args: tuple) -> None:
        batch = args[0] if args else None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] % self.tp != 0:
            raise ValueError(
                f"sequence parallelism shards the sequence over tensor_parallel_size={self.tp} ranks, but the batch has "
                f"sequence length {x.shape[1]}; use a length divisible by {self.tp} or sequence_parallel=False"
            )

