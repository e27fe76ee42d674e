"""Rank functions of ``tests/test_comm_bytes.py``."""

from __future__ import annotations

import torch
import torch.distributed as dist


def payloads() -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from lightning_scale.core.comm_bytes import CommBytes

    rank = dist.get_rank()
    dp = dist.new_group([0, 1])
    counter = CommBytes.get()
    counter.install()
    counter.name_groups([("dp", dp)], world="world")
    out = {}
    try:
        counter.start()
        dist.all_reduce(torch.ones(10), group=dp)  # 40 B
        counter.stop()
        out["all_reduce"] = dict(counter.bytes)
        counter.start()
        dist.all_gather_into_tensor(torch.empty(4), torch.ones(2), group=dp)  # gathered: 16 B
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(4), group=dp)  # reduced: 16 B
        work = dist.all_reduce(torch.ones(3, dtype=torch.float64), async_op=True)  # default group: 24 B
        work.wait()
        counter.stop()
        out["gather_scatter_async"] = dict(counter.bytes)
        out["gather_scatter_kinds"] = dict(counter.kinds)
        counter.start()
        peer = 1 - rank
        buf = torch.empty(8)
        ops = [dist.P2POp(dist.isend, torch.ones(8), peer, group=dp), dist.P2POp(dist.irecv, buf, peer, group=dp)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        dist.broadcast_object_list([{"a": 1}], src=0)
        counter.stop()
        out["p2p_objects"] = dict(counter.bytes)
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        # a second mesh over the group named "dp": DTensor's collectives on it must be named by the
        # group DTensor passes, (mesh, dim), not by a fixed name
        mesh_dp = DeviceMesh.from_group(dp, "cpu", mesh_dim_names=("dp",))
        counter.name_groups([("dp", dp), ("tp", mesh.get_group())], world="world")
        counter.start()
        sharded = DTensor.from_local(torch.ones(2, 6), mesh, [Shard(0)])
        sharded.redistribute(mesh, [Replicate()]).to_local()  # all-gather of the whole (4, 6): 96 B
        partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
        partial.redistribute(mesh, [Replicate()]).to_local()  # all-reduce of (3,): 12 B
        on_dp = DTensor.from_local(torch.ones(5), mesh_dp, [Partial()])
        on_dp.redistribute(mesh_dp, [Replicate()]).to_local()  # all-reduce on "dp": 20 B
        counter.stop()
        out["dtensor"] = dict(counter.bytes)
        out["dtensor_kinds"] = dict(counter.kinds)
    finally:
        counter.uninstall()
    return out
