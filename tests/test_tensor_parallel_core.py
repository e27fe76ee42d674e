"""Tensor / sequence parallelism core (``lightning_scale.core.tensor_parallel``) and the DTensor
branches of ``lightning_scale.core.grads``: parity with a single-process reference on real gloo
ranks, and errors that name the fix.

Tolerances (fp32, CPU): forward max abs diff <= 1e-6, per-step loss relative diff <= 1e-5,
final weights (``DTensor.full_tensor()``) max abs diff <= 1e-5, gradient norms relative 1e-6.
Rank targets live in ``_tp_core_targets.py``; each rank computes the reference itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

import _tp_core_targets as targets
from lightning_scale.core.pipeline import PipelineConfig, plan_pipeline, view_of
from lightning_scale.core.tensor_parallel import check_plan, gpt_tp_plan, resolve_plan, validate_tp, vit_tp_plan
from lightning_scale.models import GPT, GPTConfig, ViTConfig
from lightning_scale.testing import RankFailedError, run_distributed

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
FORWARD_ATOL = 1e-6
NORM_RTOL = 1e-6
# A tighter bound (2e-6 on every weight but the attention key bias) held on earlier machines but
# not on an AMD EPYC host with OpenBLAS's Haswell kernels (2026-12-02: blocks.0.mlp.down_proj.weight
# 2.2e-6 to 2.7e-6 off after the first AdamW step and flat afterwards, identically on the unchanged
# code): AdamW's first step turns reduction-order noise of near-zero gradient elements into
# weight differences (the key bias, whose gradient is mathematically zero, is the extreme case).
# It is not a property of the code, so the weights are held to the project standard WEIGHT_ATOL.
TIGHT_WEIGHT_ATOL = WEIGHT_ATOL


def _assert_training_parity(results: list[dict], steps: int) -> None:
    tp = 2
    for rank, res in enumerate(results):
        assert len(res["losses"]) == len(res["ref_losses"]) == steps
        for step, (a, b) in enumerate(zip(res["losses"], res["ref_losses"])):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"rank {rank} step {step}: loss {a} vs reference {b}"
        assert res["max_weight_diff"] <= WEIGHT_ATOL, f"rank {rank} {res['worst']}: {res['max_weight_diff']}"
        for name, diff in res["weight_diffs"].items():
            if not name.endswith("attn.k_proj.bias"):
                assert diff <= TIGHT_WEIGHT_ATOL, f"rank {rank} {name}: max abs diff {diff}"
        # TP really ran: attention sees n_head / tp local heads, q_proj holds n_embd / tp rows.
        assert res["q_local_shape"] == (32 // tp, 32) and res["q_placements"] == ["S(0)"]
        assert res["local_heads"] == 4 // tp
        assert res["tied"], "the GPT head must stay tied to the token embedding"
    # Every rank of a TP group logs the same losses.
    assert all(r["losses"] == results[0]["losses"] for r in results)


@pytest.mark.parametrize(
    "sequence_parallel, shard_vocab, replicate_rest, steps",
    [(False, False, False, 20), (True, False, False, 20), (True, True, True, 5)],
    ids=["tp", "tp+sp", "tp+sp+vocab+all-dtensor"],
)
def test_tp2_gpt_training_matches_single_process(
    sequence_parallel: bool, shard_vocab: bool, replicate_rest: bool, steps: int
) -> None:
    # The last case makes every parameter a DTensor (replicate_rest) so that AdamW(foreach=True),
    # torch's default on CUDA, runs; with plain tensors left in the list it raises.
    results = run_distributed(
        targets.gpt_train_parity, 2, sequence_parallel, steps=steps, shard_vocab=shard_vocab,
        replicate_rest=replicate_rest, foreach=replicate_rest, timeout=120,
    )
    _assert_training_parity(results, steps)
    for res in results:
        # Sequence parallel: the residual stream between blocks is the local (B, T/2, D) shard and
        # the LayerNorm weights are Replicate DTensors; plain TP keeps (B, T, D) and plain norms.
        assert res["residual_shape"] == ((4, 8, 32) if sequence_parallel else (4, 16, 32))
        assert res["ln_is_dtensor"] is (sequence_parallel or replicate_rest)
        assert res["tok_emb_is_dtensor"] is (shard_vocab or replicate_rest)
        assert (res["n_plain_params"] == 0) is replicate_rest


def test_tp2_times_dp2_training_with_clipping_matches_single_process() -> None:
    # Mesh (pp=1, dp=2, tp=2) on 4 ranks: each dp replica trains on half of the global batch, DTensor
    # gradients are averaged over dp, then clipped by the global norm (small max_norm: always active).
    steps = 8
    results = run_distributed(targets.gpt_train_parity, 4, False, steps=steps, batch=2, clip=0.05, timeout=180)
    _assert_training_parity(results, steps)
    for rank, res in enumerate(results):
        assert len(res["norms"]) == steps
        for step, (a, b) in enumerate(zip(res["norms"], res["ref_norms"])):
            assert abs(a - b) <= NORM_RTOL * abs(b), f"rank {rank} step {step}: grad norm {a} vs reference {b}"
        assert res["ref_norms"][0] > 0.05  # clipping was active


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_global_grad_norm_and_clipping_match_torch(sequence_parallel: bool) -> None:
    results = run_distributed(targets.grad_norm_parity, 2, sequence_parallel, timeout=120)
    for res in results:
        assert res["norm"] == pytest.approx(res["ref_norm"], rel=NORM_RTOL)
        assert res["inf"] == pytest.approx(res["ref_inf"], rel=NORM_RTOL)
        assert res["clipped_grad_diff"] <= 1e-8, res["worst"]
        # Summing every rank's local squares would count replicated gradients twice: the test
        # distinguishes that mistake from the right answer.
        assert res["naive_norm"] > res["ref_norm"] * 1.01
        assert "(Replicate(),)" in res["grad_placements"] and "(Shard(dim=0),)" in res["grad_placements"]
        if sequence_parallel:  # LayerNorm weights fed by sequence shards: Partial grads, reduced for the norm
            assert "(Partial(sum),)" in res["grad_placements"]


@pytest.mark.parametrize(
    "sequence_parallel, replicate_rest", [(False, False), (True, True)], ids=["tp", "tp+sp+all-dtensor"]
)
def test_vit_tp2_forward_matches_single_process(sequence_parallel: bool, replicate_rest: bool) -> None:
    for res in run_distributed(targets.vit_forward_parity, 2, sequence_parallel, replicate_rest, timeout=120):
        assert res["out_diff"] <= FORWARD_ATOL
        assert res["grad_diff"] <= 1e-6
        assert res["q_local_shape"] == (16, 32)
        assert (res["n_plain_params"] == 0) is replicate_rest


@pytest.mark.parametrize(
    "sequence_parallel, shard_vocab", [(False, False), (True, True)], ids=["tp", "tp+sp+vocab"]
)
def test_tp_on_pipeline_stage_views_composes_to_the_full_model(sequence_parallel: bool, shard_vocab: bool) -> None:
    for res in run_distributed(targets.stage_view_parity, 2, sequence_parallel, shard_vocab, timeout=120):
        assert res["first_blocks"] == ["0", "1"] and res["last_blocks"] == ["2", "3"]
        assert res["out_diff"] <= FORWARD_ATOL
        assert res["grad_diff"] <= 1e-6, res["worst"]
        # Between stages travels the local sequence shard under SP.
        assert res["hidden_shape"] == ((2, 8, 32) if sequence_parallel else (2, 16, 32))


def test_bad_plan_fails_on_every_rank_before_any_collective() -> None:
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.bad_plan_fails_before_collectives, 2, "blocks.*.q_proj", timeout=60)
    message = str(info.value)
    assert "'blocks.*.q_proj' matches no module" in message
    assert "rank 0" in message and "rank 1" in message  # both raised, nobody hung


# ---- pure checks (no processes) --------------------------------------------------------------


def test_heads_not_divisible_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"n_head=3 is not divisible by tp=2.*use tp in \[1, 3\]"):
        validate_tp(GPTConfig(n_head=3, n_embd=48), 2)
    validate_tp(GPTConfig(n_head=3, n_embd=48), 3)  # fine


def test_hidden_size_not_divisible_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"n_embd=30 is not divisible by tp=4: choose n_embd as a multiple of 4"):
        validate_tp(GPTConfig(n_head=5, n_embd=30), 4)


def test_mlp_size_not_divisible_is_found_on_a_model() -> None:
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    model.blocks["0"].mlp.up_proj = type(model.blocks["0"].mlp.up_proj)(32, 66)  # F = 66, not % 4
    with pytest.raises(ValueError, match=r"MLP hidden size 66 is not divisible by tp=4"):
        validate_tp(model.blocks, 4)  # inspects the modules (no config)
    validate_tp(model, 2)  # the model's config is used when it has one


def test_sequence_length_not_divisible_with_sequence_parallel_names_the_fix() -> None:
    cfg = GPTConfig(n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=r"sequence length 15 is not divisible by tp=2 .* \(e\.g\. 16.*sequence_parallel=False"):
        validate_tp(cfg, 2, 15, sequence_parallel=True)
    validate_tp(cfg, 2, 15, sequence_parallel=False)  # only SP shards the sequence
    with pytest.raises(ValueError, match="sequence length 17"):  # ViT digits: 16 patches + [CLS]
        validate_tp(ViTConfig(), 2, None, sequence_parallel=True)


def test_vocab_not_divisible_only_matters_when_sharded() -> None:
    cfg = GPTConfig(vocab_size=65, n_head=4, n_embd=32)
    validate_tp(cfg, 2)
    with pytest.raises(ValueError, match=r"vocab_size=65 .* pad the vocabulary to 66 .* or set shard_vocab=False"):
        validate_tp(cfg, 2, shard_vocab=True)


def _tiny_gpt(**kw) -> GPT:
    return GPT(targets.tiny_gpt_config(**kw))


def test_pattern_that_matches_nothing_names_the_fix() -> None:
    model = _tiny_gpt()
    # '*' matches one path component: blocks.*.q_proj does not reach blocks.0.attn.q_proj.
    with pytest.raises(ValueError, match=r"pattern 'blocks\.\*\.q_proj' matches no module of GPT; fix the pattern"):
        resolve_plan(model, {"blocks.*.q_proj": ColwiseParallel()})
    assert resolve_plan(model, {"blocks.*.q_proj": ColwiseParallel()}, strict=False) == {}


def test_module_matched_by_two_patterns_is_rejected() -> None:
    with pytest.raises(ValueError, match="matched by TP plan patterns 'blocks.*.attn.q_proj' and 'blocks.0.attn.*'"):
        resolve_plan(_tiny_gpt(), {"blocks.*.attn.q_proj": ColwiseParallel(), "blocks.0.attn.*": RowwiseParallel()})


def test_heads_and_module_types_are_checked_against_the_plan() -> None:
    with pytest.raises(ValueError, match=r"2 attention heads cannot be split over tp=4 ranks"):
        check_plan(_tiny_gpt(n_head=2), gpt_tp_plan(), 4)
    with pytest.raises(ValueError, match=r"ColwiseParallel supports nn.Linear and nn.Embedding, not LayerNorm"):
        check_plan(_tiny_gpt(), {"blocks.*.ln_1": ColwiseParallel()}, 2)
    assert len(check_plan(_tiny_gpt(), gpt_tp_plan(True, shard_vocab=True), 2)) == 4 * 10 + 4


def test_tied_head_and_embedding_must_be_sharded_alike() -> None:
    with pytest.raises(ValueError, match=r"tied parameters would get different tensor-parallel layouts.*shard_vocab=True"):
        check_plan(_tiny_gpt(), {"head": ColwiseParallel(output_layouts=Replicate())}, 2)
    # Both sharded on the vocabulary (Shard(0) for the Embedding rows and the Linear's out rows): fine.
    check_plan(_tiny_gpt(), gpt_tp_plan(shard_vocab=True), 2)
    # An untied head may be sharded alone.
    check_plan(_tiny_gpt(tie_weights=False), {"head": ColwiseParallel(output_layouts=Replicate())}, 2)


class _Mixed(nn.Module):
    """Its own parameter next to a tensor-parallel child: cannot be wrapped whole."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)) * self.gain


class _RootOwned(nn.Module):
    """A root that owns parameters directly (as e.g. a Hugging Face model with a ``logit_scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.8, 1.2, 8))
        self.shift = nn.Parameter(torch.full((8,), 0.1))
        self.emb = nn.Linear(4, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.block = _Mixed()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) * self.scale
        h = h + self.down(torch.relu(self.up(h))) + self.shift
        return self.head(self.block(h))


def _root_owned_plan() -> dict:
    # block.proj: all-gathered output (the LayerNorm after it needs all 8 features).
    return {"up": ColwiseParallel(), "down": RowwiseParallel(), "block.proj": ColwiseParallel(output_layouts=Replicate())}


def root_owned_parameters_train(steps: int = 6) -> dict:
    """TP=2 with replicate_rest=True on :class:`_RootOwned` vs one process, AdamW(foreach=True)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lightning_scale.core.mesh import ParallelDims, build_device_mesh
    from lightning_scale.core.tensor_parallel import apply_tp

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(steps)]

    def train(model: nn.Module) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)  # rejects a DTensor/plain mix
        losses = []
        for x, y in batches:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    torch.manual_seed(0)
    ref = _RootOwned()
    ref_losses = train(ref)
    mesh = build_device_mesh(ParallelDims(pp=1, dp=1, tp=dist.get_world_size()), "cpu")
    torch.manual_seed(0)
    model = apply_tp(_RootOwned(), mesh["tp"], _root_owned_plan(), replicate_rest=True)
    losses = train(model)
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
    ref_state = ref.state_dict()
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "keys_equal": list(state) == list(ref_state),
        "weight_diff": max((state[k] - ref_state[k]).abs().max().item() for k in ref_state),
        "plain": [n for n, p in model.named_parameters() if not isinstance(p, DTensor)],
        "placements": {n: str(p.placements) for n, p in model.named_parameters() if n in ("scale", "block.gain")},
        "grad_placements": str(model.scale.grad.placements),
        # After the forward the attribute is the parameter again, not a leftover local view.
        "attributes_are_parameters": model.scale is model._parameters["scale"] and model.block.gain is model.block._parameters["gain"],
    }


def test_replicate_rest_replicates_own_parameters_of_the_root_and_of_mixed_modules() -> None:
    from lightning_scale.core.tensor_parallel import _replication_plan

    model = nn.Sequential(_Mixed())
    plan = {"0.proj": ColwiseParallel()}
    check_plan(model, plan, 2, replicate_rest=True)  # no longer refused
    # "0" holds a TP child: only its own gain is replicated; its LayerNorm is wrapped whole.
    assert _replication_plan(model, plan) == (["0.norm"], ["0"])
    assert _replication_plan(_RootOwned(), _root_owned_plan()) == (["block.norm", "emb", "head"], ["", "block"])
    wrapped, own = _replication_plan(_tiny_gpt(), resolve_plan(_tiny_gpt(), gpt_tp_plan(True)))
    assert own == [] and "tok_emb" in wrapped  # the suite's GPT: whole modules only


def test_replicate_rest_trains_a_model_whose_root_owns_parameters() -> None:
    # The root's and a mixed module's own parameters: Replicate DTensors (same names, so the
    # same checkpoint keys), local tensors inside their forward; AdamW(foreach=True) runs.
    for rank, res in enumerate(run_distributed(root_owned_parameters_train, 2, timeout=120)):
        for step, (a, b) in enumerate(zip(res["losses"], res["ref_losses"])):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"rank {rank} step {step}: loss {a} vs reference {b}"
        assert res["weight_diff"] <= WEIGHT_ATOL, (rank, res["weight_diff"])
        assert res["keys_equal"] and res["plain"] == [], res
        assert res["placements"] == {"scale": "(Replicate(),)", "block.gain": "(Replicate(),)"}
        assert res["grad_placements"] == "(Replicate(),)"
        assert res["attributes_are_parameters"]


def test_patterns_match_what_a_pipeline_stage_view_holds() -> None:
    model = _tiny_gpt()
    plan = plan_pipeline(model, PipelineConfig(stages=2, microbatches=2, split_points=["blocks.2"]))
    first, last = view_of(model, plan, [0]), view_of(model, plan, [1])
    tp_plan = gpt_tp_plan(True, shard_vocab=True)
    in_first, in_last = resolve_plan(first, tp_plan), resolve_plan(last, tp_plan)
    assert "tok_emb" in in_first and "head" not in in_first and "ln_f" not in in_first
    assert "tok_emb" not in in_last and "head" in in_last and "ln_f" in in_last
    assert {p.split(".")[1] for p in in_first if p.startswith("blocks.")} == {"0", "1"}
    assert {p.split(".")[1] for p in in_last if p.startswith("blocks.")} == {"2", "3"}
    # An explicit path to a block this stage does not hold is still a typo-class error...
    with pytest.raises(ValueError, match="matches no module"):
        resolve_plan(first, {"blocks.3.attn.q_proj": ColwiseParallel()})
    # ...unless strict=False.
    assert resolve_plan(first, {"blocks.3.attn.q_proj": ColwiseParallel()}, strict=False) == {}


def test_builtin_plans_have_the_documented_layouts() -> None:
    plain = gpt_tp_plan(False)
    assert set(plain) == {f"blocks.*.{m}" for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.up_proj", "mlp.down_proj")}
    for key in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up_proj"):
        assert isinstance(plain[f"blocks.*.{key}"], ColwiseParallel)
    for key in ("attn.out_proj", "mlp.down_proj"):
        assert isinstance(plain[f"blocks.*.{key}"], RowwiseParallel)
    sp = gpt_tp_plan(True)
    for key in ("blocks.*.ln_1", "blocks.*.ln_2", "ln_f"):
        assert isinstance(sp[key], SequenceParallel)
    for key in ("blocks.*.attn", "blocks.*.mlp"):  # the colwise layers get their input gathered from Shard(1)
        assert isinstance(sp[key], PrepareModuleInput)
        assert sp[key].input_layouts == (Shard(1),) and sp[key].desired_input_layouts == (Replicate(),)
    assert sp["blocks.*.attn.out_proj"].output_layouts == (Shard(1),)
    assert sp["blocks.*.mlp.down_proj"].output_layouts == (Shard(1),)
    assert sp["drop"].desired_input_layouts == (Shard(1),)
    assert "tok_emb" not in sp and isinstance(sp["head"], PrepareModuleInput)  # replicated by default
    assert isinstance(vit_tp_plan(True)["embed.drop"], PrepareModuleInput)
