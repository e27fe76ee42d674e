"""Finding blocks the way users build models (lightning_scale/core/blocks.py), and the one name
per concept across strategies (old spellings warn). Pure: no processes."""

from __future__ import annotations

import pytest
from torch import nn

import zoo
from lightning_scale.core.blocks import BlockFinder


def _names(blocks):
    return [name for name, _ in blocks]


def test_the_largest_container_anywhere_is_found() -> None:
    assert _names(BlockFinder().find(zoo.LayersOnModule(), "X")) == [f"blocks.{i}" for i in range(4)]
    assert _names(BlockFinder().find(zoo.BlocksInDict(), "X")) == [f"stages.stage{i}" for i in range(4)]
    assert _names(BlockFinder().find(zoo.CustomModelLoop(), "X")) == [f"model.layers.{i}" for i in range(4)]
    # A network that is itself a Sequential: its children.
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert _names(BlockFinder().find(seq, "X")) == ["0", "1", "2"]


def test_block_class_by_type_name_or_predicate_takes_the_outermost_matches() -> None:
    lm = zoo.MHATransformer()
    by_type = _names(BlockFinder(block_class=zoo.AttentionBlock).find(lm, "X"))
    assert by_type == ["layers.0", "layers.1"]
    assert _names(BlockFinder(block_class="AttentionBlock").find(lm, "X")) == by_type
    assert _names(BlockFinder(block_class=["AttentionBlock", "Linear"]).find(lm, "X")) == by_type + ["lm_head"]
    assert _names(BlockFinder(block_class=lambda m: isinstance(m, nn.LayerNorm)).find(lm, "X")) == [
        "layers.0.ln1", "layers.0.ln2", "layers.1.ln1", "layers.1.ln2", "ln_f"]


def test_errors_name_the_strategy_and_its_options() -> None:
    with pytest.raises(ValueError, match=r"ZeroStrategy\(stage=3\): no module of MHATransformer matches block_class=Nope"):
        BlockFinder(block_class="Nope").find(zoo.MHATransformer(), "ZeroStrategy(stage=3)")
    flat = nn.Module()
    flat.fc = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"MeshStrategy: Module has no block container .* pass block_container= or block_class="):
        BlockFinder().find(flat, "MeshStrategy")
    with pytest.raises(ValueError, match=r"PipelineStrategy: block container 'fc' is a Linear"):
        BlockFinder(container="fc").find(flat, "PipelineStrategy")


def test_pipeline_needs_the_class_blocks_in_one_container() -> None:
    lm = zoo.MHATransformer()
    assert BlockFinder(block_class="AttentionBlock").container_path(lm, "PipelineStrategy") == "layers"
    with pytest.raises(ValueError, match=r"are not the children of one ModuleList/ModuleDict/Sequential"):
        BlockFinder(block_class=nn.LayerNorm).container_path(lm, "PipelineStrategy")


def test_old_spellings_warn_and_map_to_the_one_name() -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel

    from lightning_scale.strategies import PipelineStrategy, TensorParallelStrategy

    with pytest.warns(DeprecationWarning, match=r"plan=\.\.\.\) is deprecated; use tp_plan="):
        tp = TensorParallelStrategy(plan={"fc": ColwiseParallel()})
    assert list(tp.tp_plan) == ["fc"]
    with pytest.warns(DeprecationWarning, match=r"container=\.\.\.\) is deprecated; use block_container="):
        pp = PipelineStrategy(container="blocks")
    assert pp.pipeline_config.block_container == "blocks" and pp.block_finder.container == "blocks"
