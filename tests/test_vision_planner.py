"""The memory planner on the suite's vision models (ViT, ResNet): exact model states, activations
against the CPU measurement, and the errors that name the fix.

Activations are compared with :class:`HeldActivationMeter` (the bytes a real forward + loss on
CPU leaves alive, parameters, buffers, batch, logits and loss left out):

* ViT, fp32: the Korthikanti-style inventory with s = patches + 1 tokens plus the ViT's own outer
  items is the model's list of saved tensors, so it is **exact** (tolerance 0 bytes);
* ResNet, fp32: the planner runs the same forward on the ``meta`` device and counts the same
  storages, so it is **exact** too (0 bytes), under every checkpointing policy;
* bf16-mixed: the planner models CUDA autocast (the ViT inventory with autocast's copies; the
  ResNet's meta forward under an emulation of CUDA autocast's op lists). CPU autocast agrees with
  CUDA's lists for every op these networks call (convolutions, linear layers and attention in
  bf16; LayerNorm on the fp32 residual stream in fp32; BatchNorm, GELU, ReLU, the adds and the
  mean unlisted; the loss casts to fp32 itself), so the CPU measurement must be matched exactly
  too (0 bytes). What the GPU's own kernels keep besides (cuDNN workspaces) is not measured here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_scale.core.planner import Hardware, Layout, ModelSpec, Workload, plan_memory
from lightning_scale.models import ResNet, ResNetConfig, ViT, ViTConfig

# Tiny shapes: a (8/2)^2 + 1 = 17-token ViT with 2 blocks; a ResNet-8 of widths 8/16/32 (one
# identity-shortcut block, two with a 1x1 projection). ResNet cases share b = 2 so the planner's
# meta measurement of the no-checkpointing forward (each policy's baseline) is reused.
VIT = ViTConfig(image_size=8, patch_size=2, in_channels=3, num_classes=10, n_layer=2, n_head=2, n_embd=16)
RESNET = ResNetConfig(in_channels=3, num_classes=10, width=8, blocks_per_stage=1)
RESNET_IMAGE = 16  # px
B = 2  # ResNet microbatch (images)
ONE_DEVICE = Hardware(gpus=1, memory_gb=80)


def _spec(cfg) -> ModelSpec:
    return ModelSpec.from_config(cfg)


def _workload(cfg, b: int, precision: str = "32-true") -> Workload:
    if isinstance(cfg, ViTConfig):
        return Workload(b, cfg.seq_len, precision, image_size=cfg.image_size)
    return Workload(b, 1, precision, image_size=RESNET_IMAGE)


def _images(cfg, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    side = cfg.image_size if isinstance(cfg, ViTConfig) else RESNET_IMAGE
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, cfg.in_channels, side, side, generator=g)  # (B, C, S, S)
    return images, torch.randint(0, cfg.num_classes, (b,), generator=g)  # labels (B,)


def _network(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return (ViT(cfg) if isinstance(cfg, ViTConfig) else ResNet(cfg)).train()


# ---- model states: the planner's bytes equal the real tensors after an AdamW step --------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_model_states_equal_the_tensors_after_an_adamw_step(cfg, precision: str) -> None:
    from lightning_scale.core.memory import model_state_bytes
    from lightning_scale.core.optim import param_groups

    net = _network(cfg)
    if precision == "bf16-true":
        net = net.to(torch.bfloat16)  # as Lightning's bf16-true: parameters and AdamW moments in bf16
    opt = torch.optim.AdamW(param_groups(net, 0.05), lr=1e-3)
    x, y = _images(cfg, B)
    F.cross_entropy(net(x.to(next(net.parameters()).dtype)).float(), y).backward()
    opt.step()
    counted = {c: sum(by_device.values()) for c, by_device in model_state_bytes(net, [opt]).items()}
    rank = plan_memory(_spec(cfg), _workload(cfg, B, precision), Layout(ddp_buckets=False), ONE_DEVICE).ranks[0]
    assert counted == {"params": rank.params, "grads": rank.grads, "optimizer": rank.optimizer}
    # The ResNet's BatchNorm running statistics are reported (as all-step buffers), not hidden.
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    assert rank.detail.get("model buffers (BatchNorm running statistics, all step)", 0) == buffers


@pytest.fixture
def fake_two_rank_group():
    """A two-rank process group in this process (torch's ``fake`` backend: collectives do nothing),
    so that ZeRO's engines shard and pad exactly as on rank ``r`` of 2 without starting processes.
    The byte counts depend on shapes only, not on the values the collectives would carry."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")

    def join(rank: int) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("cfg, stages", [(VIT, (2, 3)), (RESNET, (2,))], ids=["vit", "resnet"])
def test_zero2_and_zero3_model_states_of_each_rank_equal_the_planner(cfg, stages, fake_two_rank_group) -> None:
    # ZeRO-2: the suite's bucketed engine (each bucket padded to a multiple of 2). ZeRO-3: FSDP2 as
    # ZeroStrategy applies it, which pads dim 0 of every parameter to a multiple of 2 for the
    # parameter and gradient shards but sizes the AdamW state like the unpadded shard: rank 1 holds
    # no state for the ViT's (1, 1, D) [CLS] token and (1, s, D) positions, so its optimizer bytes
    # are smaller than rank 0's. Both ranks are checked, to the byte. (The ResNet's dims 0 all divide
    # by 2, the GPT's case, which tests/test_zero.py covers; its ZeRO-3 run is left out for time.)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_scale.core.memory import model_state_bytes
    from lightning_scale.core.optim import param_groups
    from lightning_scale.core.blocks import BlockFinder
    from lightning_scale.core.fsdp import fully_shard_blocks
    from lightning_scale.core.sharding import ZeroConfig, ZeroOptimizer

    for rank in (0, 1):
        fake_two_rank_group(rank)
        for stage in stages:
            net = _network(cfg)
            if stage == 3:
                fully_shard_blocks([b for _, b in BlockFinder().find(net, "test")], [net], init_device_mesh("cpu", (2,)))
            opt = torch.optim.AdamW(param_groups(net, 0.05), lr=1e-3)
            engine = ZeroOptimizer(net, opt, dist.group.WORLD, ZeroConfig(stage=2)) if stage == 2 else None
            x, y = _images(cfg, 4)
            F.cross_entropy(net(x).float(), y).backward()
            if engine is not None:
                engine.reduce_gradients()
            opt.step()
            if engine is not None:
                engine.after_step()
            counts = model_state_bytes(net, [opt], engine.held_tensors() if engine is not None else None)
            counted = {c: sum(by_device.values()) for c, by_device in counts.items()}
            planned = plan_memory(_spec(cfg), _workload(cfg, 2 * B), Layout(zero_stage=stage, ddp_buckets=False),
                                  Hardware(gpus=2, memory_gb=80), dp_rank=rank).ranks[0]
            assert counted == {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}, \
                (rank, stage)
            if stage == 3 and isinstance(cfg, ViTConfig) and rank == 1:
                rank0 = plan_memory(_spec(cfg), _workload(cfg, 2 * B), Layout(zero_stage=3, ddp_buckets=False),
                                    Hardware(gpus=2, memory_gb=80)).ranks[0]
                assert planned.optimizer < rank0.optimizer  # the default (rank 0) is the worst case


def test_a_running_vision_trainer_is_read_as_the_planner_inputs() -> None:
    # What MemoryAccountant and CostReporter ask: the run's model, batch shape and layout.
    from types import SimpleNamespace

    from lightning_scale.callbacks._run_layout import plan_inputs, predict_run
    from lightning_scale.strategies import ZeroStrategy

    for cfg in (VIT, RESNET):
        net = _network(cfg)
        trainer = SimpleNamespace(strategy=ZeroStrategy(stage=2), world_size=2, global_rank=0, precision="bf16-mixed",
                                  optimizers=[torch.optim.AdamW(net.parameters())])
        batch = _images(cfg, B)  # this rank's (B, C, S, S) images and labels
        model, workload, layout, pp_rank = plan_inputs(trainer, SimpleNamespace(model=net), batch)
        side = cfg.image_size if isinstance(cfg, ViTConfig) else RESNET_IMAGE
        assert model.config == cfg and pp_rank == 0 and layout.zero_stage == 2
        assert (workload.batch_size, workload.image_size, workload.precision) == (2 * B, side, "bf16-mixed")
        assert workload.seq_len == (cfg.seq_len if isinstance(cfg, ViTConfig) else 1)
        predicted = predict_run(trainer, SimpleNamespace(model=net), batch)
        planned = plan_memory(model, workload, layout, Hardware(gpus=2, memory_gb=1)).ranks[0]
        assert predicted["activations"] == planned.activations > 0
    # Non-square images are not modelled: no prediction rather than a guess.
    trainer = SimpleNamespace(strategy=ZeroStrategy(stage=2), world_size=2, global_rank=0, precision="32-true",
                              optimizers=[torch.optim.AdamW(_network(RESNET).parameters())])
    assert plan_inputs(trainer, SimpleNamespace(model=_network(RESNET)), (torch.zeros(2, 3, 16, 8),)) is None


# ---- activations: the planner vs the CPU measurement -------------------------------------------
def _measured(cfg, b: int, policy: str, precision: str = "32-true") -> int:
    from lightning_scale.core.activation_checkpointing import apply_activation_checkpointing, as_ac_config
    from lightning_scale.core.activation_memory import HeldActivationMeter

    net = _network(cfg)
    if policy != "none":
        apply_activation_checkpointing(net, as_ac_config(policy))
    x, y = _images(cfg, b)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with HeldActivationMeter([*net.parameters(), *net.buffers(), x, y]) as meter, autocast:
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y)  # as ImageClassificationTask.loss_fn
    held = sum(meter.held([logits, loss]).values())
    loss.backward()  # the saved tensors were usable
    return held


def _predicted(cfg, b: int, policy: str, precision: str = "32-true"):
    every = int(policy.split("_")[1]) if policy.startswith("every_") else 2
    layout = Layout(ac="every_k" if policy.startswith("every_") else policy, ac_every=every, ddp_buckets=False)
    return plan_memory(_spec(cfg), _workload(cfg, b, precision), layout, ONE_DEVICE).ranks[0]


@pytest.mark.parametrize("cfg, b, policy", [
    (VIT, 3, "none"), (VIT, 4, "full"), (VIT, 2, "selective"), (VIT, 3, "every_2"),
    (RESNET, B, "none"), (RESNET, B, "full"), (RESNET, B, "selective"), (RESNET, B, "every_2"),
], ids=lambda v: v if isinstance(v, (str, int)) else type(v).__name__)
def test_activation_prediction_equals_the_cpu_measurement_fp32(cfg, b: int, policy: str) -> None:
    # Exact (see the module docstring): both sides count the same storages, loss and logits left out.
    assert _predicted(cfg, b, policy).activations == _measured(cfg, b, policy)


@pytest.mark.parametrize("cfg, b, policy", [(VIT, 4, "none"), (VIT, 3, "full"), (RESNET, B, "none"), (RESNET, B, "full")],
                         ids=["vit-none", "vit-full", "resnet-none", "resnet-full"])
def test_activation_prediction_under_bf16_autocast_equals_cpu_autocast(cfg, b: int, policy: str) -> None:
    # The ViT's exactness rests on counting what autocast copies: the bf16 weight copies, the
    # images' copy for the patch convolution, the [CLS] row's copy for the head, and one bf16
    # copy of the fp32 ln_1 output per q/k/v projection (autocast caches casts of parameters only).
    assert _predicted(cfg, b, policy, "bf16-mixed").activations == _measured(cfg, b, policy, "bf16-mixed")


def test_resnet_recompute_transient_is_the_largest_blocks_saved_tensors() -> None:
    # Under full checkpointing the backward re-runs one block at a time: the planner's transient is
    # the largest block's saved tensors, its own input left out (the checkpoint holds it already),
    # measured here on the real blocks with saved_tensors_hooks.
    from lightning_scale.core.activation_memory import SavedTensorMeter

    net = _network(RESNET)
    x, _ = _images(RESNET, B)
    inputs: dict[str, torch.Tensor] = {}
    for key, block in net.blocks.items():
        block.register_forward_pre_hook(lambda m, args, key=key: inputs.__setitem__(key, args[0]))
    net(x)
    saved = []
    for key, block in net.blocks.items():
        block_input = inputs[key].detach().requires_grad_()
        with SavedTensorMeter([*block.parameters(), *block.buffers(), block_input]) as meter:
            block(block_input)
        saved.append(meter.total)
    assert _predicted(RESNET, B, "full").detail["one recomputed layer"] == max(saved)
    assert "one recomputed layer" not in _predicted(RESNET, B, "none").detail


# ---- inputs the planner refuses, naming the fix ------------------------------------------------
@pytest.mark.parametrize("model, workload, layout, match", [
    (ModelSpec.from_resnet(RESNET), Workload(8, 1), Layout(), "image_size"),
    (ModelSpec.from_resnet(RESNET), Workload(8, 1, image_size=16), Layout(tp=2), "no tensor-parallel plan"),
    (ModelSpec.from_resnet(RESNET), Workload(8, 1, image_size=16), Layout(pp=2), "use pp=1"),
    (ModelSpec.from_vit(VIT), Workload(8, 64), Layout(), "give seq_len=17"),
    (ModelSpec.from_vit(VIT), Workload(8, 17, image_size=32), Layout(), "set the model's image_size to 32"),
])
def test_vision_inputs_the_planner_cannot_model_raise_naming_the_fix(model, workload, layout, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_memory(model, workload, layout, Hardware(gpus=4, memory_gb=80))


def test_plan_cli_vision_presets_and_errors(tmp_path) -> None:
    import json

    from lightning_scale.plan_cli import main

    with pytest.raises(SystemExit, match="--image-size"):
        main(["--model", "resnet8-digits", "--batch-size", "64", "--gpus", "2", "--gpu", "L4"])
    out = tmp_path / "plan.json"
    assert main(["--model", "resnet8-digits", "--image-size", "8", "--batch-size", "64", "--gpus", "2", "--gpu", "L4",
                 "--precision", "32-true", "--json", str(out)]) == 0
    asked = json.loads(out.read_text())["asked"]
    assert asked["dp"] == 2 and asked["microbatch_size"] == 32 and asked["exact_states"] is True
    direct = plan_memory(ModelSpec.from_resnet("resnet8-digits"), Workload(64, 1, "32-true", image_size=8), Layout(),
                         Hardware.named("L4", gpus=2))
    assert asked["ranks"][0]["peak"] == direct.worst.peak
    # A ViT's tokens come from its config; a different --seq-len is refused with the right number.
    with pytest.raises(SystemExit, match="give seq_len=65"):
        main(["--model", "cifar-small", "--seq-len", "64", "--batch-size", "64", "--gpus", "2", "--gpu", "L4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  class_path: lightning_scale.tasks.ImageClassificationTask\n  init_args:\n"
                      "    model:\n      class_path: torch.nn.Linear\n      init_args: {}\n")
    with pytest.raises(SystemExit, match="GPTConfig, ViTConfig and ResNetConfig"):
        main(["--recipe", str(recipe), "--gpu", "L4"])


def test_meta_measurement_refuses_offload_and_is_a_real_forward_of_the_shapes() -> None:
    from lightning_scale.core.meta_activations import measure_activations

    with torch.device("meta"):
        net = ResNet(RESNET)
    with pytest.raises(ValueError, match="measure 'none'"):
        measure_activations(net, (2, 3, RESNET_IMAGE, RESNET_IMAGE), policy="offload")
    # The held bytes scale with the batch exactly (every saved activation is per image) up to the
    # per-channel BatchNorm statistics and the 4-byte loss weight, which do not.
    one = measure_activations(net, (1, 3, RESNET_IMAGE, RESNET_IMAGE)).held
    two = measure_activations(net, (2, 3, RESNET_IMAGE, RESNET_IMAGE)).held
    fixed = 2 * one - two
    stats = sum(2 * 4 * m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert fixed == stats + 4, (one, two, stats)
    assert math.isclose(two / one, 2, rel_tol=0.01)
