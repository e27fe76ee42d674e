"""Activation checkpointing: exact gradients, measured saved bytes per policy, and parity of every
strategy with AC on against the single-process reference (AC off), on real gloo ranks.

Gradients are compared with ``torch.equal``: recomputation runs the same kernels on the same
inputs (and restores the RNG state), so fp32 results are bitwise identical on CPU.
"""

from __future__ import annotations

import pytest
import torch

import _pipeline_targets as targets
from _parity import STEPS
from _parity import assert_parity as _assert_parity
from lightning_scale.core.activation_checkpointing import (
    ACConfig,
    apply_activation_checkpointing,
    as_ac_config,
    checkpointed_modules,
    remove_activation_checkpointing,
)
from lightning_scale.core.activation_memory import AllocationMeter, HeldActivationMeter, SavedTensorMeter
from lightning_scale.models import GPT, GPTConfig
from lightning_scale.testing import RankFailedError, run_distributed

POLICIES = ["full", "every_2", "selective", "offload", {"policy": "classes", "classes": ["MLP"]},
            {"policy": "every_k", "every": 3, "offload": True}]
N_LAYER, BATCH, SEQ, HIDDEN = 4, 2, 32, 64


def _net(dropout: float) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, block_size=SEQ, n_layer=N_LAYER, n_head=4, n_embd=HIDDEN, dropout=dropout))


def _grads(net: GPT, x: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = net(x).float().pow(2).mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_are_identical_with_and_without_checkpointing(policy, dropout: float) -> None:
    net = _net(dropout)
    x = torch.randint(0, 128, (BATCH, SEQ))
    loss_ref, ref = _grads(net, x)
    applied = apply_activation_checkpointing(net, as_ac_config(policy))
    assert applied == checkpointed_modules(net) and applied
    loss, grads = _grads(net, x)
    assert torch.equal(loss, loss_ref)
    assert torch.equal(grads, ref)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_bf16_autocast_recomputes_in_bf16(policy: str) -> None:
    net = _net(0.1)
    x = torch.randint(0, 128, (BATCH, SEQ))
    loss_ref, ref = _grads(net, x, autocast=True)
    apply_activation_checkpointing(net, as_ac_config(policy))
    loss, grads = _grads(net, x, autocast=True)
    assert torch.equal(loss, loss_ref) and torch.equal(grads, ref)


def test_remove_restores_the_class_forward_and_parameter_names_do_not_change() -> None:
    net = _net(0.0)
    names = [n for n, _ in net.named_parameters()]
    apply_activation_checkpointing(net, ACConfig(policy="full"))
    assert all("forward" in b.__dict__ for b in net.blocks.values())
    assert [n for n, _ in net.named_parameters()] == names
    apply_activation_checkpointing(net, ACConfig(policy="every_k", every=2))  # re-applying replaces
    assert sorted(checkpointed_modules(net)) == ["blocks.0", "blocks.2"]
    remove_activation_checkpointing(net)
    assert checkpointed_modules(net) == {} and not any("forward" in m.__dict__ for m in net.modules())


def _measure(net: GPT, x: torch.Tensor) -> dict:
    """Saved-tensor bytes seen outside the blocks (``outer``) and by a meter inside each block
    (``inner[i]``: what block i saves itself), plus the held-storage total (``held``)."""
    exclude = [*net.parameters(), *net.buffers(), x]
    inner: list[SavedTensorMeter] = []
    originals = {}
    for key, block in net.blocks.items():
        meter = SavedTensorMeter(exclude)
        inner.append(meter)
        forward = block.forward
        originals[key] = block.__dict__.get("forward")

        def metered(*args, _forward=forward, _meter=meter, **kwargs):
            with _meter:
                return _forward(*args, **kwargs)

        block.forward = metered
    try:
        with HeldActivationMeter(exclude) as held, SavedTensorMeter(exclude) as outer:
            out = net(x)
        result = {"outer": outer.total, "inner": [m.total for m in inner], "held": sum(held.held([out]).values())}
    finally:
        for key, block in net.blocks.items():
            if originals[key] is None:
                del block.forward
            else:
                block.forward = originals[key]
    return result


def test_saved_bytes_drop_as_each_policy_predicts() -> None:
    net = _net(0.0)
    x = torch.randint(0, 128, (BATCH, SEQ))
    block_input = BATCH * SEQ * HIDDEN * 4  # bytes of one block's fp32 input (b, s, h)
    none = _measure(net, x)
    # Without AC every block saves its own tensors; the outer meter sees only the rest of the
    # network (embeddings, final norm, head): "outside".
    per_block = none["inner"]
    assert len(set(per_block)) == 1 and per_block[0] > 10 * block_input
    outside = none["outer"]
    assert none["held"] == outside + sum(per_block)

    results = {}
    for name, policy in [("full", "full"), ("every_2", "every_2"), ("selective", "selective"),
                         ("offload", "offload"), ("mlp", {"policy": "classes", "classes": ["MLP"]})]:
        apply_activation_checkpointing(net, as_ac_config(policy))
        results[name] = _measure(net, x)
    remove_activation_checkpointing(net)

    def saved(r: dict) -> int:
        return r["outer"] + sum(r["inner"])

    # full: each block keeps only its input (saved through the checkpoint).
    full = results["full"]
    assert full["inner"] == [block_input] * N_LAYER
    assert saved(full) == outside + N_LAYER * block_input == full["held"]
    # every_2: blocks 0 and 2 keep their input, blocks 1 and 3 everything.
    every = results["every_2"]
    assert every["inner"] == [block_input, per_block[1], block_input, per_block[3]]
    assert saved(every) == every["held"]
    # selective: between full and none, and at most half of none (matmul outputs kept, the
    # widening MLP projection and elementwise ops recomputed).
    sel = results["selective"]["held"]
    assert full["held"] < sel <= 0.5 * none["held"]
    # classes=[MLP]: less than none, more than full.
    assert full["held"] < results["mlp"]["held"] < none["held"]
    # offload: nothing a block saves reaches autograd's saved tensors on the compute device
    # (save_on_cpu's hooks are innermost and hold CPU copies); only the outside tensors remain.
    off = results["offload"]
    assert off["inner"] == [0] * N_LAYER and off["outer"] == outside


def _allocated(net: GPT, x: torch.Tensor) -> int:
    """Bytes a training forward leaves allocated, from the allocator's events, minus the logits."""
    with AllocationMeter() as meter:
        out = net(x)
    return meter.total - out.untyped_storage().nbytes()


def test_allocation_meter_counts_what_the_held_meter_counts() -> None:
    net = _net(0.1)
    x = torch.randint(0, 128, (BATCH, SEQ))
    with HeldActivationMeter([*net.parameters(), *net.buffers(), x]) as held:
        out = net(x)
    assert _allocated(net, x) == sum(held.held([out]).values()) > 10 * BATCH * SEQ * HIDDEN * 4


def test_compiled_checkpointing_is_exact_and_keeps_no_more_than_eager() -> None:
    """compile=True, with dropout: bitwise the gradients of the same blocks compiled without AC
    (compiled kernels draw their own dropout masks, so eager is not the reference); after the
    forward the allocator holds for full no more than eager full, and for selective more than
    full and at most half of the compiled blocks without AC (with dropout, compiled none keeps
    less than eager none, so compiled none is the reference)."""
    from torch._dynamo.utils import counters

    x = torch.randint(0, 128, (BATCH, SEQ))
    net, eager, eager_held = _net(0.1), {}, {}
    eager["none"] = _allocated(net, x)
    for policy in ("full", "selective"):
        apply_activation_checkpointing(net, as_ac_config(policy))
        eager[policy] = _allocated(net, x)
        with HeldActivationMeter([*net.parameters(), x]) as held:
            out = net(x)
        eager_held[policy] = sum(held.held([out]).values())
        del out
    assert eager["full"] < eager["selective"] <= 0.5 * eager["none"]

    reference = _net(0.1)
    for block in reference.blocks.values():
        block.compile()
    loss_ref, ref = _grads(reference, x)
    compiled = {"none": _allocated(reference, x)}
    graphs = counters["stats"]["unique_graphs"]
    for policy in ("full", "selective"):
        net = _net(0.1)
        apply_activation_checkpointing(net, ACConfig(policy=policy, compile=True))
        loss, grads = _grads(net, x)
        assert torch.equal(loss, loss_ref) and torch.equal(grads, ref), policy
        compiled[policy] = _allocated(net, x)
        # The suite's dispatch-mode meters run compiled blocks eagerly, and leave them compiled.
        from lightning_scale.core.flops import measure_training_flops

        with HeldActivationMeter([*net.parameters(), x]) as held:
            out = net(x)
        assert sum(held.held([out]).values()) == eager_held[policy]  # the eager twin's bytes
        del out
        assert measure_training_flops(net, x, lambda logits: logits.float().pow(2).mean()) > 0
        assert _allocated(net, x) == compiled[policy] != eager[policy]  # compiled again (else eager's bytes)
        remove_activation_checkpointing(net)
        assert all(b._compiled_call_impl is None and "forward" not in b.__dict__ for b in net.blocks.values())
    assert counters["stats"]["unique_graphs"] >= graphs + 2  # each policy ran as its own compiled graph
    assert compiled["full"] <= eager["full"], (compiled, eager)
    assert compiled["full"] < compiled["selective"] <= 0.5 * compiled["none"], compiled


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="one of"):
        ACConfig(policy="some")
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        ACConfig(policy="every_k", every=0)
    with pytest.raises(ValueError, match="needs classes"):
        ACConfig(policy="classes")
    with pytest.raises(ValueError, match="only used with policy='classes'"):
        ACConfig(policy="full", classes=("MLP",))
    with pytest.raises(ValueError, match="combines with policy='none'"):
        ACConfig(policy="full", offload=True)
    with pytest.raises(ValueError, match="does not combine with offload=True"):
        ACConfig(policy="every_k", offload=True, compile=True)
    with pytest.raises(ValueError, match="pick a policy"):
        ACConfig(policy="none", compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ACConfig(policy="full", compile=1)
    with pytest.raises(ValueError, match="every_<k>"):
        as_ac_config("sometimes")
    assert as_ac_config({"policy": "selective", "compile": True}) == ACConfig(policy="selective", compile=True)
    assert as_ac_config("none") is None and as_ac_config(None) is None
    assert as_ac_config("every_3") == ACConfig(policy="every_k", every=3)
    with pytest.raises(ValueError, match="no module of GPT has a class in"):
        apply_activation_checkpointing(_net(0.0), ACConfig(policy="classes", classes=("Mlp",)))
    with pytest.raises(ValueError, match="container 'layers' not found"):
        apply_activation_checkpointing(_net(0.0), ACConfig(policy="full", container="layers"))


# -- every strategy with AC on matches the single-process reference (AC off) ----------------------
COMPILED = {"policy": "selective", "compile": True}
STRATEGIES = {
    "ddp_ac": (2, dict(mesh=True, activation_checkpointing="full"), 4, dict(replicas=2, microbatches=1)),
    "pipeline_1f1b_selective": (2, dict(stages=2, schedule="1f1b", microbatches=4, activation_checkpointing="selective"),
                                8, dict(replicas=1, microbatches=4)),
    "tp_sp_every_2": (2, dict(tensor=True, tensor_parallel_size=2, sequence_parallel=True,
                              activation_checkpointing="every_2"), 8, dict(replicas=1, microbatches=1)),
    # 3D (pp2 x tp2) with full checkpointing: tests/test_parallel3d.py::test_pp2_tp2_parity[True].
    "zero2_offload_ac": (2, dict(zero=True, stage=2, activation_checkpointing="offload"), 4,
                         dict(replicas=2, microbatches=1)),
    "ddp_ac_offload": (2, dict(mesh=True, activation_checkpointing="offload"), 4, dict(replicas=2, microbatches=1)),
    "zero3_selective": (2, dict(zero=True, stage=3, activation_checkpointing="selective"), 4,
                        dict(replicas=2, microbatches=1)),
    # compile=True: compiled blocks against the eager single-process reference (fp32, the same tolerances).
    "ddp_ac_selective_compiled": (2, dict(mesh=True, activation_checkpointing=COMPILED), 4, dict(replicas=2, microbatches=1)),
    "pipeline_1f1b_selective_compiled": (2, dict(stages=2, schedule="1f1b", microbatches=4,
                                                 activation_checkpointing=COMPILED), 8, dict(replicas=1, microbatches=4)),
    "tp_sp_selective_compiled": (2, dict(tensor=True, tensor_parallel_size=2, sequence_parallel=True,
                                         activation_checkpointing=COMPILED), 8, dict(replicas=1, microbatches=1)),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_with_activation_checkpointing_matches_the_reference(name: str) -> None:
    world, kwargs, batch, ref = STRATEGIES[name]
    # Compiled runs without the CPU doubles of GPU behaviour: their dispatch mode would keep Dynamo eager.
    results = run_distributed(targets.fit, world, dict(kwargs), STEPS, batch, init_process_group=False, timeout=300,
                              gpu_semantics=not name.endswith("_compiled"))
    _assert_parity(results, targets.reference(STEPS, batch, **ref))
    # AC is bitwise exact, so parity alone would pass without it: every rank must have applied it.
    for rank, r in enumerate(results):
        assert r["checkpointed"] and all(k.startswith("blocks.") for k in r["checkpointed"]), (rank, r["checkpointed"])
        # ... and, with compile=True, must have run its blocks as compiled graphs.
        assert (r["compiled_graphs"] > 0) == name.endswith("_compiled"), (rank, r["compiled_graphs"])


def test_unknown_class_fails_on_every_rank_with_the_fix() -> None:
    kwargs = dict(mesh=True, activation_checkpointing={"policy": "classes", "classes": ["Nope"]})
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fit, 2, kwargs, 2, 4, init_process_group=False, timeout=120)
    assert str(info.value).count("has a class in ['Nope']") >= 2


def test_selective_under_a_split_backward_schedule_names_the_fix() -> None:
    from lightning_scale.strategies import PipelineStrategy

    with pytest.raises(ValueError, match="use activation_checkpointing='full'"):
        PipelineStrategy(schedule="zbv_zero_bubble", virtual_stages=2, activation_checkpointing="selective")
    with pytest.raises(ValueError, match="drop compile"):  # a compiled block's backward runs once
        PipelineStrategy(schedule="zbv_zero_bubble", virtual_stages=2, activation_checkpointing={"policy": "full", "compile": True})
    PipelineStrategy(schedule="zbv_zero_bubble", virtual_stages=2, activation_checkpointing="full")  # works (tested in parity)


def test_full_checkpointing_under_the_zero_bubble_schedule_matches_the_reference() -> None:
    kwargs = dict(stages=2, schedule="zbv_zero_bubble", microbatches=4, virtual_stages=2, activation_checkpointing="full")
    results = run_distributed(targets.fit, 2, kwargs, STEPS, 8, init_process_group=False, timeout=240)
    _assert_parity(results, targets.reference(STEPS, 8, replicas=1, microbatches=4))


def test_every_k_counts_the_full_models_block_keys_in_a_stage_view() -> None:
    # A pipeline stage holding blocks 1-3 of a 4-block GPT: every_2 checkpoints blocks 2 (key), not its 1st and 3rd.
    from lightning_scale.core.pipeline import PipelineConfig, plan_pipeline, view_of

    net = _net(0.0)
    plan = plan_pipeline(net, PipelineConfig(stages=2, split_points=["blocks.1"]))
    stage1 = view_of(net, plan, [1])
    applied = apply_activation_checkpointing(stage1, ACConfig(policy="every_k", every=2))
    assert sorted(applied) == ["blocks.2"]
