"""The zoo (tests/zoo.py): LightningModules written the way users write them, trained under a
strategy given by its registered name alone, ``Trainer(strategy="zero2_offload")``, against one
process of plain PyTorch (per-step loss rel <= 1e-5 over 20 steps, weights <= 1e-5, fp32).

Covered here: the strategy families that need nothing from a module's structure beyond finding
its blocks (ZeRO-2 with offload, ZeRO-3 with offload on FSDP2, data parallel with activation
checkpointing), with the layers on the LightningModule itself when it has no ``self.model``.
Lightning's own ``ddp`` checks the reference itself. Tensor and pipeline parallelism for these
modules are issue 21's next steps.
"""

from __future__ import annotations

import pytest

import _zoo_targets as targets
import zoo
from _parity import STEPS, assert_parity
from lightning_scale.testing import run_distributed

BATCH = 4  # per data-parallel replica
CASES = [(shape, strategy) for strategy in ("zero2_offload", "zero3_offload", "ddp_ac") for shape in zoo.SHAPES]
CASES += [("layers_on_module", "ddp"), ("cnn", "ddp")]  # Lightning's DDP: the reference is right


@pytest.mark.parametrize(("shape", "strategy"), CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_user_module_trains_with_one_argument(shape: str, strategy: str) -> None:
    results = run_distributed(targets.fit, 2, shape, strategy, STEPS, BATCH, init_process_group=False, timeout=180)
    assert_parity(results, targets.reference(shape, STEPS, BATCH, replicas=2))
