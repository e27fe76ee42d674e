"""Rank functions for the planner tests (run by lightning_scale.testing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_scale.models import GPT, GPTConfig


def measured_activations(cfg: GPTConfig, b: int, s: int, policy: str = "none", tp: int = 1, sp: bool = False,
                         precision: str = "32-true") -> int:
    """Bytes the forward + loss of the suite's GPT leave for the backward on this rank (the logits,
    which only the caller holds, excluded). ``tp > 1``: run on a gloo TP mesh of ``tp`` ranks."""
    from lightning_scale.core.activation_checkpointing import apply_activation_checkpointing, as_ac_config
    from lightning_scale.core.activation_memory import HeldActivationMeter

    torch.manual_seed(0)
    model = GPT(cfg).train()
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from lightning_scale.strategies.tensor_parallel import parallelize_network

        parallelize_network(model, init_device_mesh("cpu", (tp,)), None, sp)
    if policy != "none":
        apply_activation_checkpointing(model, as_ac_config(policy))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    y = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    exclude = [*model.parameters(), *model.buffers(), x, y]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with HeldActivationMeter(exclude) as meter, autocast:
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    if tp > 1:
        torch.distributed.barrier()  # every collective of the forward has finished
    held = sum(meter.held([logits], settle=2.0 if tp > 1 else 0.0).values())
    loss.backward()  # the saved tensors were usable (and are freed now)
    return held
