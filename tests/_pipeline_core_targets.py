"""Rank functions for core pipeline tests (no Lightning): each rank also computes the
single-process reference itself, so no extra process is needed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_scale.core.grads import allreduce_gradients
from lightning_scale.core.mesh import ParallelDims
from lightning_scale.core.pipeline import PipelineConfig, PipelineRuntime, plan_pipeline
from lightning_scale.models import GPT, GPTConfig


def _loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _batches(cfg: GPTConfig, steps: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g), torch.randint(0, cfg.vocab_size, (batch, seq), generator=g))
        for _ in range(steps)
    ]


def _reference(cfg, batches, lr, chunks):
    """Single process, the global batch as ``chunks`` equal microbatches (gradient accumulation)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        total = 0.0
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            loss = _loss(model(xc), yc) / chunks
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, model.state_dict()


def pipeline_parity(schedule: str, stages: int, steps: int = 6, microbatches: int = 4, virtual: int | None = None, lr: float = 1e-3):
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(pp=stages, dp=-1).resolve(world)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=2, n_embd=32)
    per_replica_batch = 8
    batches = _batches(cfg, steps, per_replica_batch * dims.dp, 16)
    ref_losses, ref_state = _reference(cfg, batches, lr, microbatches * dims.dp)

    from lightning_scale.core.mesh import build_device_mesh

    mesh = build_device_mesh(dims, "cpu")
    coords = dims.coordinates(rank)
    torch.manual_seed(0)
    model = GPT(cfg)
    pcfg = PipelineConfig(stages=stages, schedule=schedule, microbatches=microbatches, virtual_stages=virtual)
    plan = plan_pipeline(model, pcfg)
    rt = PipelineRuntime(
        model, plan, pcfg, coords["pp"], mesh["pp"].get_group(), dims.ranks_along("pp", rank), torch.device("cpu"), _loss
    )
    tied_groups = []
    for holders, name in rt.tied:
        for dp in range(dims.dp):
            ranks = [pp * dims.dp + dp for pp in holders]
            g = dist.new_group(ranks)
            if rank in ranks:
                tied_groups.append((g, name))
    local = rt.local_module
    opt = torch.optim.AdamW(local.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        lo, hi = coords["dp"] * per_replica_batch, (coords["dp"] + 1) * per_replica_batch
        opt.zero_grad()
        loss = rt.train_step((x[lo:hi],), y[lo:hi])
        for g, name in tied_groups:
            allreduce_gradients([local.get_parameter(name)], g, average=False)
        allreduce_gradients(local.parameters(), mesh["dp"].get_group())
        opt.step()
        loss_t = loss.clone()
        dist.all_reduce(loss_t, group=mesh["dp"].get_group())
        losses.append(loss_t.item() / dims.dp)
    diffs = {k: (local.state_dict()[k] - ref_state[k]).abs().max().item() for k in local.state_dict()}
    max_diff = max(diffs.values())
    return {"ref": ref_losses, "pp": losses, "max_weight_diff": max_diff, "n_local": len(local.state_dict()), "plan": plan.describe(), "diffs": sorted(diffs.items(), key=lambda kv: -kv[1])[:4]}
