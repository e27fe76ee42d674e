"""The traced pipeline frontend's pieces (lightning_scale/core/pipeline_trace.py), in one
process: the meta copy, the trace and its errors, binding this rank's tensors, pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from lightning_scale.core.pipeline_trace import TraceError, TracedSplit, meta_copy, prune_to


def test_meta_copy_holds_no_bytes_and_keeps_ties_and_the_original() -> None:
    net = zoo.MHATransformer()
    net.lm_head.weight = net.tok.weight  # tie
    copy = meta_copy(net)
    assert all(p.device.type == "meta" for p in copy.parameters())
    assert copy.lm_head.weight is copy.tok.weight
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_the_meta_copy_of_a_deferred_model_leaves_its_record_to_the_original() -> None:
    from lightning_scale.core.deferred_init import is_deferred, materialize, record_init

    net = record_init(zoo.MHATransformer)
    copy = meta_copy(net)
    assert is_deferred(net) and not any(is_deferred(m) for m in copy.modules())
    materialize(net, "cpu")  # the record is then dropped: nothing keeps its ops and constants alive
    assert not is_deferred(net)


@pytest.mark.parametrize(("shape", "split"), [("layers_on_module", "blocks.2"), ("mha_transformer", "layers.1"),
                                              ("cnn", "features.2"), ("blocks_in_dict", "stages.stage2")])
def test_traced_stages_on_this_ranks_tensors_compute_the_unsplit_forward(shape: str, split: str) -> None:
    # The stages are traced on meta for microbatches of 2 rows and run on the real modules and
    # tensors; chained, they give the model's own output exactly, for 4 rows too (the modules
    # called whole run their own Python forward, shapes are not fixed by the trace).
    model = zoo.SHAPES[shape]()
    x, _ = zoo.batches(shape, 4)
    first, last = TracedSplit(model, [split]).stage_modules((x[:2],), [0, 1], model, torch.device("cpu"))
    held = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert all(id(t) in held for stage in (first, last) for t in list(stage.parameters()) + list(stage.buffers()))
    for rows in (x[:2], x):
        h = first(rows)
        torch.testing.assert_close(last(*(h if isinstance(h, tuple) else (h,))), model(rows), rtol=0, atol=0)


def test_placement_names_tensors_on_two_stages_and_on_none() -> None:
    model = zoo.FunctionalTie()
    x, _ = zoo.batches("functional_tie", 2)
    where = TracedSplit(model, ["blocks.2"]).placement((x,))
    assert where["embed.weight"] == {0, 1} and where["scale"] == {0, 1}  # used on both stages
    assert where["blocks.0.fc1.weight"] == {0} and where["blocks.3.fc1.weight"] == {1}
    assert where["head.weight"] == set()  # not used by forward


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if x.sum() > 0 else -block(x)  # Python branch on a tensor value: not exportable
        return x


def test_a_forward_export_cannot_trace_is_refused_naming_the_reason_and_the_other_path() -> None:
    with pytest.raises(TraceError, match=r"torch.export could not trace _Branchy.forward .*frontend='views'"):
        TracedSplit(_Branchy(), ["blocks.1"]).trace((torch.ones(2, 4),))


def test_a_split_point_off_the_forward_path_is_refused() -> None:
    model = zoo.LayersOnModule()
    model.unused = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    x, _ = zoo.batches("layers_on_module", 2)
    with pytest.raises(TraceError, match=r"split into 1 stages, not 2: a split point \['unused.1'\] is not called on the "
                                          r"forward's main path; give split_points="):
        TracedSplit(model, ["unused.1"]).trace((x,))


def test_pruning_keeps_names_and_drops_whole_modules() -> None:
    model = zoo.LayersOnModule()
    keep = {n for n, _ in model.named_parameters() if n.startswith(("embed", "blocks.0", "blocks.1"))}
    prune_to(model, keep)
    assert {n for n, _ in model.named_parameters()} == keep
    assert model.blocks[2] is None and model.head is None  # a stage view's shape: not owned = None
    assert set(model.state_dict()) == keep
