"""Deferred initialization (``lightning_scale.core.deferred_init``): a model built on the meta
device and materialized later has exactly the values eager construction gives with the same seed,
for the suite's models and for modules written the way users write them, whole or split or
sharded, with host memory near the largest tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import _deferred_targets as targets
import zoo
from lightning_scale.core.blocks import tied_parameter_groups
from lightning_scale.core.deferred_init import DeferredInitError, is_deferred, materialize, record_init
from lightning_scale.models import GPT, GPTConfig, ResNet, ViT, ViTConfig
from lightning_scale.models.resnet import RESNET_PRESETS
from lightning_scale.testing import run_distributed

class Reseeds(nn.Module):
    """Re-seeds the default generator in the middle of its construction (as zoo.ConfigureModel does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(5)
        self.b = nn.Linear(4, 4)


class FactoryDraws(nn.Module):
    """torch.randn without a generator argument (aten.randn has none), a draw whose parameters
    are tensors, a re-seed to the seed already in force, then more layers."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.02)  # the ViT class-token idiom
        self.noise = nn.Parameter(torch.normal(torch.zeros(4), torch.full((4,), 0.5)))
        self.a = nn.Linear(8, 8)
        torch.manual_seed(0)  # the seed the test set before construction: must still be seen
        self.b = nn.Linear(8, 8)


class OwnGenerator(nn.Module):
    """Draws from a generator of its own (``generator=g``), several times, re-seeding it to the
    seed it started from half-way: each draw must see the state eager construction gives it."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(7)
        self.a = nn.Linear(8, 8)
        nn.init.normal_(self.a.weight, generator=g)
        nn.init.normal_(self.a.bias, generator=g)
        self.b = nn.Parameter(torch.randn(8, generator=g))
        g.manual_seed(7)
        self.c = nn.Parameter(torch.empty(4).uniform_(generator=g))
        self.d = nn.Linear(8, 8)  # the default generator, between the explicit draws


BUILDS = {
    "own-generator": (OwnGenerator, ()),
    "reseeds-mid-construction": (Reseeds, ()),
    "factory-draws": (FactoryDraws, ()),
    **{f"zoo-{name}": (cls, ()) for name, cls in zoo.ALL.items()},
    "gpt-default": (GPT, (GPTConfig(),)),
    "gpt-16-layers": (GPT, (GPTConfig(vocab_size=256, block_size=64, n_layer=16, n_head=4, n_embd=128),)),
    "vit": (ViT, (ViTConfig(),)),
    "resnet20": (ResNet, (RESNET_PRESETS["resnet20"],)),
}


def _storages(module: nn.Module) -> list[torch.Tensor]:
    return list({t.untyped_storage()._cdata: t for t in [*module.parameters(), *module.buffers()]}.values())


@pytest.mark.parametrize("name", list(BUILDS))
def test_materialized_values_equal_eager_construction_bit_for_bit(name) -> None:
    cls, args = BUILDS[name]
    torch.manual_seed(0)
    eager = cls(*args)
    after_eager = torch.rand(4)  # the global generator continues where eager construction left it
    torch.manual_seed(0)
    model = record_init(cls, *args)
    assert is_deferred(model) and all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    stats = materialize(model, "cpu")
    assert not is_deferred(model)
    assert torch.equal(torch.rand(4), after_eager)
    expected, got = eager.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
    assert tied_parameter_groups(model) == tied_parameter_groups(eager)  # ties survive to_empty
    # Host memory of the replay: about the largest tensor, not the model (exact count of the
    # storages the replay held at once).
    sizes = [t.untyped_storage().nbytes() for t in _storages(eager)]
    if sizes:
        assert stats.peak_host_bytes <= 2 * max(sizes) + 64 * 1024, (stats.peak_host_bytes, max(sizes), sum(sizes))
    if name == "gpt-16-layers":
        assert stats.peak_host_bytes < 0.05 * sum(sizes)


def test_only_the_local_part_is_materialized() -> None:
    # A pipeline rank's part: one block of the model, named as in the whole model.
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32)
    torch.manual_seed(0)
    eager = GPT(cfg)
    torch.manual_seed(0)
    model = record_init(GPT, cfg)
    stats = materialize(model.blocks["1"], "cpu", root=model, prefix="blocks.1.")
    assert stats.tensors == len(list(eager.blocks["1"].parameters()))
    for name, p in model.blocks["1"].named_parameters():
        assert torch.equal(p, eager.blocks["1"].get_parameter(name)), name
    assert all(p.is_meta for name, p in model.named_parameters() if not name.startswith("blocks.1."))


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_sharded_while_meta_then_each_rank_materializes_its_shards(layout) -> None:
    results = run_distributed(targets.sharded_materialize, 2, layout, timeout=120)
    for res in results:
        assert res["mismatched"] == [] and res["all_dtensors"]
        assert res["local_numel"] < res["total_numel"]  # each rank holds only its shards
    if layout == "fsdp2":  # FSDP2 splits every parameter in two: the ranks' parts add up to the model
        assert sum(r["local_numel"] for r in results) == results[0]["total_numel"]


class ReadsAValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.scale = float(self.weight.abs().max())  # data-dependent: meta tensors have no values


class ParameterAddedLater(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)


def test_a_construction_that_reads_values_is_refused_with_the_fix() -> None:
    with pytest.raises(DeferredInitError, match=r"ReadsAValue cannot be built on the meta device.*reads tensor values"
                       r".*build it eagerly"):
        record_init(ReadsAValue)


def test_a_parameter_made_after_the_recording_is_named() -> None:
    model = record_init(ParameterAddedLater)
    with torch.device("meta"):
        model.extra = nn.Parameter(torch.empty(3))
    with pytest.raises(DeferredInitError, match=r"got no value from the recorded construction \(e\.g\. 'extra'\)"):
        materialize(model, "cpu")
    with pytest.raises(DeferredInitError, match="was not built with record_init"):
        materialize(nn.Linear(2, 2), "cpu")


# -- under the strategies: deferred construction trains exactly like eager construction ------------
# configure_model under deferred_init=True (Lightning's convention), or a module built in __init__
# with lightning_scale.deferred(MyModule): the model is split / sharded while meta, each rank
# materializes its part, and training matches one process of eager PyTorch (the zoo's reference).
DEFERRED = [("configure_model", s, {"deferred_init": True}, 2, False)
            for s in ("zero1", "zero2_offload", "zero3_offload", "ddp_ac")]
DEFERRED += [("configure_model", "tensor_parallel", {"deferred_init": True, "tp_plan": {}}, 1, False),
             ("configure_model", "pipeline", {"deferred_init": True}, 1, False),
             ("layers_on_module", "zero3_offload", None, 2, True),
             ("layers_on_module", "pipeline", None, 1, True),
             ("blocks_in_dict", "zero2", None, 2, True)]


@pytest.mark.parametrize(("shape", "strategy", "kwargs", "replicas", "built_deferred"), DEFERRED,
                         ids=[f"{s}-{t}" + ("-deferred()" if d else "") for s, t, _, _, d in DEFERRED])
def test_deferred_construction_trains_like_eager_construction(shape, strategy, kwargs, replicas, built_deferred) -> None:
    import _zoo_targets as zoo_targets
    from _parity import STEPS, assert_parity

    batch = 4
    results = run_distributed(zoo_targets.fit, 2, shape, strategy, STEPS, batch, kwargs, deferred=built_deferred,
                              init_process_group=False, timeout=180)
    assert all(r["deferring"] for r in results)  # the model was meta until this rank's part was materialized
    assert_parity(results, zoo_targets.reference(shape, STEPS, batch, replicas=replicas, samples=STEPS * batch * 2))


def test_deferred_construction_trains_like_eager_construction_under_3d_on_4_ranks() -> None:
    # pp 2 x tp 2: the meta module is traced into stages, each stage's layers parallelized by the
    # plan, and only then is each rank's part (its stage's column / row shards) materialized.
    import _zoo_targets as zoo_targets
    from _parity import STEPS, assert_parity
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    batch, plan = 4, {"blocks.*.fc1": ColwiseParallel(), "blocks.*.fc2": RowwiseParallel()}
    results = run_distributed(zoo_targets.fit, 4, "layers_on_module", "parallel_3d", STEPS, batch, {"tp_plan": plan},
                              deferred=True, init_process_group=False, timeout=300)
    assert all(r["deferring"] for r in results)
    assert_parity(results, zoo_targets.reference("layers_on_module", STEPS, batch, replicas=1, samples=STEPS * batch * 4))


def test_a_configure_model_that_cannot_be_deferred_fails_on_every_rank_naming_the_fix() -> None:
    from lightning_scale.testing import RankFailedError

    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fit_unbuildable, 2, "zero3", init_process_group=False, timeout=120)
    message = str(info.value)
    assert "2 of 2 ranks failed" in message  # every rank, at configure_model: before any collective of the step
    assert "Unbuildable (built in configure_model) cannot be built on the meta device" in message
    assert "deferred_init=False" in message


# -- pretrained weights straight into the split / sharded model ------------------------------------
def _saved_gpt(tmp_path, kind: str) -> str:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = {k: v.clone() for k, v in GPT(targets.CFG).state_dict().items()}  # clone: save ties as two tensors
    if kind == "torch":
        torch.save(state, tmp_path / "gpt.pt")
        return str(tmp_path / "gpt.pt")
    if kind == "lightning":
        torch.save({"state_dict": state, "epoch": 0}, tmp_path / "gpt.ckpt")
        return str(tmp_path / "gpt.ckpt")
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))  # a Hugging Face model directory
    return str(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["torch", "lightning", "safetensors-dir"])
def test_pretrained_weights_load_into_fsdp2_shards_each_rank_reading_its_part(tmp_path, kind) -> None:
    path = _saved_gpt(tmp_path, kind)
    results = run_distributed(targets.load_sharded, 2, path, timeout=120)
    for res in results:
        assert res["mismatched"] == []
        assert res["elements_read"] == res["local"]  # this rank's shards (and buffers), not the model
    total = sum(p.numel() for p in GPT(targets.CFG).parameters())
    assert sum(r["elements_read"] for r in results) < 1.1 * total


def test_pretrained_weights_load_into_one_pipeline_stage_and_name_what_is_missing(tmp_path) -> None:
    from lightning_scale.core.pretrained import load_into

    path = _saved_gpt(tmp_path, "torch")
    saved = torch.load(path, weights_only=True)
    with torch.device("meta"):
        model = GPT(targets.CFG)
    stats = load_into(model.blocks["1"], path, "cpu", prefix="blocks.1.")
    assert stats.tensors == len(list(model.blocks["1"].parameters()))
    assert stats.elements_read == sum(p.numel() for p in model.blocks["1"].parameters())
    assert all(torch.equal(p, saved[f"blocks.1.{n}"]) for n, p in model.blocks["1"].named_parameters())
    assert all(p.is_meta for n, p in model.named_parameters() if not n.startswith("blocks.1."))
    del saved["blocks.0.ln_1.weight"]
    torch.save(saved, tmp_path / "partial.pt")
    with torch.device("meta"):
        model = GPT(targets.CFG)
    with pytest.raises(ValueError, match=r"'blocks\.0\.ln_1\.weight' is not in .*partial\.pt"):
        load_into(model, tmp_path / "partial.pt", "cpu")


@pytest.mark.parametrize("strategy", ["zero3", "pipeline"])
def test_strategy_weights_from_fills_a_deferred_model_with_the_files_values(tmp_path, strategy) -> None:
    # Values the module's own construction cannot give: they must come from the file.
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in zoo.ALL["layers_on_module"]().state_dict().items()}
    torch.save(state, tmp_path / "weights.pt")
    results = run_distributed(targets.fit_from_weights, 2, strategy, str(tmp_path / "weights.pt"), "layers_on_module",
                              init_process_group=False, timeout=120)
    for res in results:
        assert res["mismatched"] == [] and res["meta"] == [] and res["held"] > 0
    if strategy == "pipeline":  # each stage holds its part only
        assert results[0]["held"] + results[1]["held"] >= len(zoo.ALL["layers_on_module"]().state_dict()) - 1



def test_a_generator_passed_in_ends_where_eager_construction_leaves_it() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    eager = OwnGenerator(g)
    after_eager = torch.rand(4, generator=g)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = record_init(OwnGenerator, g)
    materialize(model, "cpu")
    assert torch.equal(torch.rand(4, generator=g), after_eager)
    expected, got = eager.state_dict(), model.state_dict()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_two_deferred_modules_in_a_row_draw_what_eager_construction_draws() -> None:
    # Recording consumes no random numbers; the generator must still end where eager construction
    # leaves it, so the second module (and anything built eagerly after) gets eager's values.
    torch.manual_seed(0)
    eager_a, eager_b, eager_c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    torch.manual_seed(0)
    a, b = record_init(nn.Linear, 8, 8), record_init(nn.Linear, 8, 8)
    c = nn.Linear(8, 8)  # built eagerly after two deferred ones
    materialize(a, "cpu")
    materialize(b, "cpu")
    for got, expected in ((a, eager_a), (b, eager_b), (c, eager_c)):
        assert torch.equal(got.weight, expected.weight) and torch.equal(got.bias, expected.bias)


class WithMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)), persistent=False)  # in no checkpoint


def test_a_checkpoint_without_tied_copies_or_non_persistent_buffers_loads(tmp_path) -> None:
    from safetensors.torch import save_file

    from lightning_scale.core.pretrained import load_into

    # Hugging Face-style: one name per tied tensor (no head.weight), no non-persistent buffers.
    torch.manual_seed(3)
    state = GPT(targets.CFG).state_dict()
    del state["head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "gpt.safetensors"))
    with torch.device("meta"):
        model = GPT(targets.CFG)
    load_into(model, tmp_path / "gpt.safetensors", "cpu")
    assert model.head.weight is model.tok_emb.weight and torch.equal(model.head.weight, state["tok_emb.weight"])
    # The mask is in no file: left meta by the load, then given its eager value by the replay.
    torch.manual_seed(0)
    eager = WithMask()
    torch.save({"linear.weight": eager.linear.weight + 1, "linear.bias": eager.linear.bias}, tmp_path / "m.pt")
    torch.manual_seed(0)
    model = record_init(WithMask)
    stats = load_into(model, tmp_path / "m.pt", "cpu")
    assert stats.missing_buffers == ["mask"] and model.mask.is_meta
    materialize(model, "cpu")
    assert torch.equal(model.mask, eager.mask) and torch.equal(model.linear.weight, eager.linear.weight + 1)
