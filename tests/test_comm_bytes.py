"""Communication payload bytes (``lightning_scale.core.comm_bytes``), counted at the calls, by
group name: each collective's payload as the module docstring defines it, on 2 gloo ranks."""

from __future__ import annotations

import _comm_bytes_targets as targets
from lightning_scale.testing import run_distributed


def test_each_collective_counts_its_payload_under_its_group() -> None:
    results = run_distributed(targets.payloads, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["all_reduce"] == {"dp": 40}
        assert res["gather_scatter_async"] == {"dp": 16 + 16, "world": 24}  # asynchronous launches count too
        assert res["gather_scatter_kinds"] == {"all_gather": 16, "reduce_scatter": 16, "all_reduce": 24}
        assert res["p2p_objects"] == {"dp": 32, "objects": 0}  # 8 floats sent; the receive counts 0
        assert res["dtensor"] == {"tp": 96 + 12, "dp": 20}  # named by the (mesh, dim) each call runs on
        assert res["dtensor_kinds"] == {"all_gather": 96, "all_reduce": 12 + 20}
