"""A real pipeline run measured, for the traced planner's pipeline simulation
(tests/test_traced_memory.py): torch's own ``PipelineStage`` and schedule on gloo, real tensors,
no suite code. Memory is read from the torch profiler's allocation events (every CPU tensor
allocation and free since the model was built): live bytes = their running sum."""

from __future__ import annotations

import torch
from torch import nn

CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, attn_implementation="eager", tie_word_embeddings=False,
              architectures=["LlamaForCausalLM"])
ROWS, SEQ, MICROBATCHES = 8, 64, 4


def config():
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIG)


class _Stage(nn.Module):
    """Stage 0: embeddings and layers 0-1; stage 1: layers 2-3, norm, head (written here, by hand)."""

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.config = model.config
        self.embed = model.model.embed_tokens if stage == 0 else None
        self.layers = nn.ModuleList(model.model.layers[:2] if stage == 0 else model.model.layers[2:])
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm if stage == 1 else None
        self.head = model.lm_head if stage == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rotary = self.rotary(h, position_ids=positions)
        from transformers.masking_utils import create_causal_mask  # the mask LlamaModel.forward builds

        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=positions)
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h)) if self.head is not None else h


def measured_pipeline_peak(schedule: str, zero3: bool = False) -> int:
    """This rank's peak of live tensor bytes in the second training step of a 2-stage pipeline
    (``schedule``: ``"GPipe"`` or ``"1F1B"``, ``MICROBATCHES`` microbatches of ``ROWS / MICROBATCHES``
    rows x ``SEQ`` tokens, AdamW foreach). ``zero3``: 4 ranks, 2 stages x 2 replicas with FSDP2 on
    each stage's replicas (torch's schedule runs its no-sync backwards and the final reduction)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import LlamaForCausalLM

    rank = dist.get_rank()
    group = None
    if zero3:  # 4 ranks: pp x dp = 2 x 2 (rank = 2 pp + dp), FSDP2 over each stage's dp pair
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        group = mesh["pp"].get_group()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        pp_rank = rank // 2 if zero3 else rank
        stage = _Stage(LlamaForCausalLM(config()), pp_rank)
        if zero3:  # each layer, then the stage, kept gathered from forward to backward (as under a schedule)
            from torch.distributed.fsdp import fully_shard

            for layer in stage.layers:
                fully_shard(layer, mesh=mesh["dp"], reshard_after_forward=False)
            fully_shard(stage, mesh=mesh["dp"], reshard_after_forward=False)
        rank = pp_rank
        pipe = PipelineStage(stage, rank, 2, torch.device("cpu"), group=group)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

        sched = get_schedule_class(schedule)(pipe, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-4, foreach=True)
        for step in range(2):
            with record_function(f"step{step}"):
                ids = torch.randint(0, CONFIG["vocab_size"], (ROWS, SEQ))
                if rank == 0:
                    sched.step(ids, return_outputs=False)
                else:
                    sched.step(target=ids, return_outputs=False)  # as the suite runs it
                opt.step()
                opt.zero_grad(set_to_none=True)
                del ids
    from torch._C._profiler import _EventType

    nodes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children)
    allocations = sorted((n for n in nodes if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    window = next(n for n in nodes if n.name == "step1")
    live, peak = 0, 0
    for event in allocations:  # alloc_size: + bytes allocated, - bytes freed
        live += event.extra_fields.alloc_size
        if window.start_time_ns <= event.start_time_ns <= window.end_time_ns:
            peak = max(peak, live)
    return peak
