"""Rank functions for the tensor-parallel core tests (no Lightning).

Every rank also computes the single-process reference itself (same seed, same data), so no
extra process is needed; the functions return plain numbers for the test to assert on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lightning_scale.core.grads import allreduce_gradients, clip_grad_norm_, global_grad_norm
from lightning_scale.core.mesh import ParallelDims, build_device_mesh
from lightning_scale.core.pipeline import PipelineConfig, plan_pipeline, view_of
from lightning_scale.core.tensor_parallel import apply_tp, gpt_tp_plan, local_heads, validate_tp, vit_tp_plan
from lightning_scale.models import GPT, GPTConfig, ViT, ViTConfig


def tiny_gpt_config(**overrides: Any) -> GPTConfig:
    """vocab 64, D 32, 4 heads, 4 layers, no dropout."""
    return GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32, dropout=0.0), **overrides})


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B, T, V), (B, T)


def _batches(cfg: GPTConfig, steps: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g), torch.randint(0, cfg.vocab_size, (batch, seq), generator=g))
        for _ in range(steps)
    ]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: _full(v).detach().clone() for k, v in model.state_dict().items()}


def _diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(a) == set(b), set(a) ^ set(b)
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    diffs = _diffs(a, b)
    worst = max(diffs, key=diffs.__getitem__)
    return diffs[worst], worst


def _reference(cfg: GPTConfig, batches, lr: float, clip: float | None, foreach: bool = False) -> dict[str, Any]:
    """Single process, full global batches."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=foreach)
    losses, norms = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "state": _full_state(model)}


def gpt_train_parity(
    sequence_parallel: bool,
    *,
    tp: int = 2,
    steps: int = 20,
    n_layer: int = 2,
    batch: int = 4,
    seq: int = 16,
    lr: float = 1e-3,
    shard_vocab: bool = False,
    clip: float | None = None,
    replicate_rest: bool = False,
    foreach: bool = False,
) -> dict[str, Any]:
    """TP (x DP over the rest of the world) GPT training vs the single-process reference.

    Each data-parallel replica trains on its slice of the global batch; gradients are averaged
    over the dp group with :func:`allreduce_gradients` (DTensor grads: local shards) and
    optionally clipped with :func:`clip_grad_norm_` (DTensor-aware global norm).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_gpt_config(n_layer=n_layer)
    validate_tp(cfg, tp, seq, sequence_parallel, shard_vocab=shard_vocab)  # before any collective
    dims = ParallelDims(pp=1, dp=-1, tp=tp).resolve(world)
    batches = _batches(cfg, steps, batch * dims.dp, seq)
    ref = _reference(cfg, batches, lr, clip, foreach)

    mesh = build_device_mesh(dims, "cpu")
    tp_mesh, dp_group = mesh["tp"], mesh["dp"].get_group()
    dp_rank = dims.coordinates(rank)["dp"]
    torch.manual_seed(0)
    plan = gpt_tp_plan(sequence_parallel, shard_vocab=shard_vocab)
    model = apply_tp(GPT(cfg), tp_mesh, plan, replicate_rest=replicate_rest)

    # Evidence that the layout is really applied: local shapes, and the residual-stream shape.
    q = model.blocks["0"].attn.q_proj.weight
    seen: list[tuple[int, ...]] = []
    hook = model.blocks["1"].register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    # foreach=True (torch's CUDA default) rejects a mix of DTensor and plain parameters.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=foreach)
    losses, norms = [], []
    params = list(model.parameters())
    for x, y in batches:
        lo, hi = dp_rank * batch, (dp_rank + 1) * batch
        opt.zero_grad()
        loss = _loss(model(x[lo:hi]), y[lo:hi])
        loss.backward()
        allreduce_gradients(params, dp_group)
        if clip is not None:
            norms.append(clip_grad_norm_(params, params, clip).item())
        opt.step()
        loss_t = loss.detach().clone()
        dist.all_reduce(loss_t, group=dp_group)
        losses.append(loss_t.item() / dims.dp)
    hook.remove()
    diffs = _diffs(_full_state(model), ref["state"])
    worst = max(diffs, key=diffs.__getitem__)
    return {
        "weight_diffs": diffs,
        "losses": losses,
        "ref_losses": ref["losses"],
        "norms": norms,
        "ref_norms": ref["norms"],
        "max_weight_diff": diffs[worst],
        "worst": worst,
        "q_local_shape": tuple(q.to_local().shape),
        "q_placements": [str(p) for p in q.placements],
        "local_heads": local_heads(model.blocks["0"].attn),
        "residual_shape": seen[0],
        "ln_is_dtensor": isinstance(model.blocks["0"].ln_1.weight, DTensor),
        "tok_emb_is_dtensor": isinstance(model.tok_emb.weight, DTensor),
        "tied": model.head.weight is model.tok_emb.weight,
        "n_plain_params": sum(not isinstance(p, DTensor) for p in params),
    }


def grad_norm_parity(sequence_parallel: bool, clip: float = 0.05) -> dict[str, Any]:
    """One backward on TP=2 and on the reference: 2-norm, inf-norm and clipped gradients."""
    cfg = tiny_gpt_config(n_layer=2)
    (x, y), = _batches(cfg, 1, 4, 16)
    torch.manual_seed(0)
    ref = GPT(cfg)
    _loss(ref(x), y).backward()
    ref_inf = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()], norm_type=float("inf")).item()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item()

    mesh = build_device_mesh(ParallelDims(pp=1, dp=1, tp=dist.get_world_size()), "cpu")
    torch.manual_seed(0)
    model = apply_tp(GPT(cfg), mesh["tp"], gpt_tp_plan(sequence_parallel))
    _loss(model(x), y).backward()
    params = list(model.parameters())
    placements = sorted({str(p.grad.placements) for p in params if isinstance(p.grad, DTensor)})
    naive = _naive_norm_sum(params)
    inf = global_grad_norm(params, norm_type=float("inf")).item()
    norm = clip_grad_norm_(params, params, clip).item()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    grad_diff, worst = _max_diff(grads, ref_grads)
    return {
        "norm": norm,
        "ref_norm": ref_norm,
        "inf": inf,
        "ref_inf": ref_inf,
        "clipped_grad_diff": grad_diff,
        "worst": worst,
        "grad_placements": placements,
        "naive_norm": naive,
    }


def _naive_norm_sum(params: list[torch.nn.Parameter]) -> float:
    """What a DTensor-unaware norm gets by summing every rank's local squares over tp: it counts
    each replicated gradient tp times (shows the test can tell the two apart)."""
    local = sum(float(p.grad.to_local().float().norm() ** 2) if isinstance(p.grad, DTensor) else float(p.grad.norm() ** 2) for p in params)
    t = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.sqrt())


def vit_forward_parity(sequence_parallel: bool, replicate_rest: bool = False) -> dict[str, Any]:
    """ViT TP=2 forward (and gradient) vs the reference; SP needs (S/P)^2 + 1 divisible by 2."""
    cfg = ViTConfig(image_size=12, patch_size=4, n_layer=2, n_head=4, n_embd=32)  # 9 patches + [CLS] = 10 tokens
    validate_tp(cfg, dist.get_world_size(), None, sequence_parallel)
    images = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 7, 3])
    torch.manual_seed(0)
    ref = ViT(cfg)
    ref_out = ref(images)
    F.cross_entropy(ref_out, labels).backward()
    mesh = build_device_mesh(ParallelDims(pp=1, dp=1, tp=dist.get_world_size()), "cpu")
    torch.manual_seed(0)
    model = apply_tp(ViT(cfg), mesh["tp"], vit_tp_plan(sequence_parallel), replicate_rest=replicate_rest)
    out = model(images)
    F.cross_entropy(out, labels).backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    grad_diff, _ = _max_diff(grads, {n: p.grad for n, p in ref.named_parameters()})
    return {
        "out_diff": (out - ref_out).abs().max().item(),
        "grad_diff": grad_diff,
        "q_local_shape": tuple(model.blocks["0"].attn.q_proj.weight.to_local().shape),
        "n_plain_params": sum(not isinstance(p, DTensor) for p in model.parameters()),
    }


def stage_view_parity(sequence_parallel: bool, shard_vocab: bool) -> dict[str, Any]:
    """TP applied to each stage view of a 2-stage pipeline split (as the strategy will do after
    splitting); the two stages composed on one TP group give the full model's forward/backward."""
    cfg = tiny_gpt_config()
    (x, y), = _batches(cfg, 1, 2, 16)
    torch.manual_seed(0)
    ref = GPT(cfg)
    ref_out = ref(x)
    _loss(ref_out, y).backward()

    mesh = build_device_mesh(ParallelDims(pp=1, dp=1, tp=dist.get_world_size()), "cpu")
    torch.manual_seed(0)
    model = GPT(cfg)
    plan = plan_pipeline(model, PipelineConfig(stages=2, microbatches=2, split_points=["blocks.2"]))
    first, last = view_of(model, plan, [0]), view_of(model, plan, [1])
    tp_plan = gpt_tp_plan(sequence_parallel, shard_vocab=shard_vocab)
    apply_tp(first, mesh["tp"], tp_plan)  # head / ln_f are None here: their patterns are skipped
    apply_tp(last, mesh["tp"], tp_plan)  # tok_emb is None; the shared `drop` is not hooked twice
    hidden = first(x)  # what stage 0 would send: (B, T/t, D) with SP, (B, T, D) without
    out = last(hidden)
    _loss(out, y).backward()
    grads, seen = {}, set()
    for view in (first, last):
        for n, p in view.named_parameters():
            if id(p) not in seen:  # the replicated tie is one Parameter shared by both views
                seen.add(id(p))
                grads[n] = _full(p.grad)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    if shard_vocab:  # each view sharded its own copy of the tied weight: sum the grads, as PP does
        grads["tok_emb.weight"] = grads["tok_emb.weight"] + grads.pop("head.weight")
    grad_diff, worst = _max_diff(grads, ref_grads)
    return {
        "out_diff": (out - ref_out).abs().max().item(),
        "grad_diff": grad_diff,
        "worst": worst,
        "hidden_shape": tuple(hidden.shape),
        "first_blocks": sorted(first.blocks.keys()),
        "last_blocks": sorted(last.blocks.keys()),
    }


def bad_plan_fails_before_collectives(pattern: str) -> None:
    """Every rank must raise the plan error itself (no rank may hang in a collective)."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    mesh = build_device_mesh(ParallelDims(pp=1, dp=1, tp=dist.get_world_size()), "cpu")
    apply_tp(GPT(tiny_gpt_config()), mesh["tp"], {pattern: ColwiseParallel()})
