"""ZeRO-3 on FSDP2 as the anchors configure it (``lightning_scale.core.fsdp``): under bf16-mixed
the parameters are all-gathered and used in bf16 and the gradients reduced in fp32, while the
sharded fp32 parameters stay what the optimizer steps; under a pipeline the gathered parameters
stay gathered from forward to backward. (Training under the policy: ``tests/test_zero.py``,
``test_bf16_trains_close_to_fp32[bf16-mixed-zero3]``.)"""

from __future__ import annotations

import pytest
import torch

import _fsdp_targets as targets
from lightning_scale.core.fsdp import mixed_precision_policy
from lightning_scale.testing import run_distributed


def test_the_policy_follows_lightnings_precision() -> None:
    bf16 = mixed_precision_policy("bf16-mixed")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy("16-mixed").param_dtype == torch.float16
    for precision in ("32-true", "bf16-true", "16-true", None):
        assert mixed_precision_policy(precision) is None  # nothing to cast


@pytest.mark.parametrize(("precision", "reshard"), [("bf16-mixed", True), ("32-true", False)])
def test_blocks_compute_in_the_policys_dtype_and_reshard_as_asked(precision, reshard) -> None:
    results = run_distributed(targets.policy_and_resharding, 2, precision, reshard, timeout=120)
    for res in results:
        assert res["compute_dtype"] == ("torch.bfloat16" if precision == "bf16-mixed" else "torch.float32")
        assert res["param_dtypes"] == ["torch.float32"] and res["grad_dtypes"] == ["torch.float32"]
        assert res["gathered_after_forward"] == (not reshard)
