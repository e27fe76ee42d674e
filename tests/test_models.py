"""Model shapes, closed-form parameter counts and config validation."""

from __future__ import annotations

import pytest
import torch

from lightning_scale.models import (
    GPT,
    GPT_PRESETS,
    RESNET_PRESETS,
    VIT_PRESETS,
    GPTConfig,
    ResNet,
    ResNetConfig,
    ViT,
    ViTConfig,
    gpt_param_count,
    resnet_param_count,
    vit_param_count,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


# Published counts: GPT-2 family as released (tied head, learned positions), ViT-B/16 and
# ViT-L/16 at 224 px with 1000 classes (timm reports the same), ResNet-20/56 (He et al.: 0.27M, 0.85M).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gpt2_presets_have_the_published_parameter_count(name: str) -> None:
    assert gpt_param_count(GPT_PRESETS[name]) == PUBLISHED[name]


def test_gpt2_124m_instantiated_count_equals_the_published_count() -> None:
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = GPT(GPT_PRESETS["gpt2"])
    assert n_params(model) == 124_439_808


@pytest.mark.parametrize("name", ["tiny", "nano", "micro", "milli"])
def test_small_gpt_presets_match_the_closed_form(name: str) -> None:
    cfg = GPT_PRESETS[name]
    assert n_params(GPT(cfg)) == gpt_param_count(cfg)


@pytest.mark.parametrize("tie, bias, ratio", [(False, True, 4), (True, False, 4), (False, False, 2)])
def test_gpt_closed_form_covers_untied_and_biasless(tie: bool, bias: bool, ratio: int) -> None:
    cfg = GPTConfig(n_layer=3, n_head=2, n_embd=48, tie_weights=tie, bias=bias, mlp_ratio=ratio)
    assert n_params(GPT(cfg)) == gpt_param_count(cfg)


def test_nano_is_about_one_million_parameters() -> None:
    assert 0.5e6 < gpt_param_count(GPT_PRESETS["nano"]) < 1.5e6


def test_gpt_shapes_and_causality() -> None:
    torch.manual_seed(0)
    cfg = GPT_PRESETS["tiny"]
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, cfg.vocab_size)
    # Changing a later token must not change earlier logits (causal attention).
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(idx2)[:, :10], logits[:, :10])
    assert not torch.allclose(model(idx2)[:, 10:], logits[:, 10:])


def test_gpt_weight_tying_shares_storage() -> None:
    model = GPT(GPTConfig(tie_weights=True))
    assert model.head.weight is model.tok_emb.weight
    untied = GPT(GPTConfig(tie_weights=False))
    assert untied.head.weight is not untied.tok_emb.weight


def test_gpt_parameter_names_are_stable_after_deleting_blocks() -> None:
    model = GPT(GPT_PRESETS["tiny"])
    before = {n for n in model.state_dict() if n.startswith("blocks.3.")}
    del model.blocks["0"], model.blocks["1"]
    after = {n for n in model.state_dict() if n.startswith("blocks.")}
    assert before <= after and not any(n.startswith("blocks.0.") for n in after)


def test_gpt_stage_without_embeddings_or_head_passes_hidden_states() -> None:
    cfg = GPT_PRESETS["tiny"]
    full = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    first, last = GPT(cfg).eval(), GPT(cfg).eval()
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    for k in ("2", "3"):
        del first.blocks[k]
    for k in ("0", "1"):
        del last.blocks[k]
    first.ln_f = first.head = None
    last.tok_emb = last.pos_emb = None
    hidden = first(idx)
    assert hidden.shape == (2, 8, cfg.n_embd)
    torch.testing.assert_close(last(hidden), full(idx))


def test_gpt_generate_extends_the_sequence() -> None:
    model = GPT(GPT_PRESETS["tiny"]).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8)


def test_gpt_rejects_sequences_longer_than_block_size() -> None:
    cfg = GPT_PRESETS["tiny"]
    with pytest.raises(ValueError, match="block_size"):
        GPT(cfg)(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=100, n_head=3), "divisible by n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
        (dict(vocab_size=-1), "vocab_size"),
    ],
)
def test_bad_gpt_configs_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="gpt2-xl"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_vit_presets_match_the_closed_form(name: str) -> None:
    cfg = VIT_PRESETS[name]
    with torch.device("meta"):
        model = ViT(cfg)
    assert n_params(model) == vit_param_count(cfg)


def test_vit_b16_has_the_published_parameter_count() -> None:
    assert vit_param_count(VIT_PRESETS["vit-b16"]) == 86_567_656


def test_vit_shapes() -> None:
    cfg = VIT_PRESETS["digits"]
    out = ViT(cfg)(torch.randn(5, cfg.in_channels, cfg.image_size, cfg.image_size))
    assert out.shape == (5, cfg.num_classes)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(image_size=8, patch_size=3), "patch_size"), (dict(n_embd=30, n_head=4), "divisible by n_head")],
)
def test_bad_vit_configs_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViTConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(RESNET_PRESETS))
def test_resnet_presets_match_the_closed_form(name: str) -> None:
    cfg = RESNET_PRESETS[name]
    assert n_params(ResNet(cfg)) == resnet_param_count(cfg)


def test_resnet20_and_56_are_the_paper_sizes() -> None:
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    # The paper truncates to two decimals.
    assert 0.27e6 <= resnet_param_count(RESNET_PRESETS["resnet20"]) < 0.28e6
    assert 0.85e6 <= resnet_param_count(RESNET_PRESETS["resnet56"]) < 0.86e6


def test_resnet_shapes() -> None:
    out = ResNet(ResNetConfig(in_channels=3))(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        ResNetConfig(width=0)
