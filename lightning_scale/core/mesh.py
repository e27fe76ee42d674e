"""Parallel dimensions -> one DeviceMesh with named dims ``("pp", "dp", "tp")``. Torch only.

Rank layout: ``tp`` is the innermost (fastest-varying) dimension so the ranks of a
tensor-parallel group are adjacent (same node, fastest links); ``pp`` is the outermost. With
world size 8 and ``pp=2, dp=2, tp=2``::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
    pp=0: dp=0 -> ranks 0,1 (tp)   dp=1 -> ranks 2,3
    pp=1: dp=0 -> ranks 4,5        dp=1 -> ranks 6,7

Everything here except :func:`build_device_mesh` is pure arithmetic, so a layout is validated
on every rank before the first collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

MESH_DIM_NAMES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of pipeline (pp), data (dp) and tensor (tp) parallelism.

    One degree may be ``-1``, meaning "the world size divided by the others".
    """

    pp: int = 1  # pipeline stages (one rank per stage per replica)
    dp: int = -1  # data-parallel replicas (or ZeRO shards)
    tp: int = 1  # tensor-parallel ranks per layer

    def __post_init__(self) -> None:
        values = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        for name, value in values.items():
            if not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(f"parallel degree {name} must be a positive integer or -1 (= the rest), got {value!r}")
        if sum(v == -1 for v in values.values()) > 1:
            raise ValueError(
                f"at most one of pp/dp/tp may be -1 (= the rest of the world size), got {values}; "
                f"give explicit sizes for the others"
            )

    def resolve(self, world_size: int) -> ParallelDims:
        """Replace -1 by the remaining factor and check that pp * dp * tp == world_size."""
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        values = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        known = 1
        for v in values.values():
            if v != -1:
                known *= v
        for name, v in values.items():
            if v == -1:
                if world_size % known != 0:
                    raise ValueError(
                        f"world size {world_size} is not divisible by the product of the given parallel "
                        f"degrees ({' x '.join(f'{k}={x}' for k, x in values.items() if x != -1)} = {known}); "
                        f"launch a multiple of {known} processes or change the degrees"
                    )
                values[name] = world_size // known
        product = values["pp"] * values["dp"] * values["tp"]
        if product != world_size:
            raise ValueError(
                f"pp x dp x tp = {values['pp']} x {values['dp']} x {values['tp']} = {product} does not equal the "
                f"world size {world_size} (devices x nodes); change the degrees or set one of them to -1"
            )
        return ParallelDims(**values)

    @property
    def world_size(self) -> int:
        if -1 in (self.pp, self.dp, self.tp):
            raise ValueError("call resolve(world_size) first: a degree is still -1")
        return self.pp * self.dp * self.tp

    def coordinates(self, rank: int) -> dict[str, int]:
        """The (pp, dp, tp) coordinates of a global rank in the mesh."""
        size = self.world_size
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside the mesh of {size} ranks")
        return {"pp": rank // (self.dp * self.tp), "dp": (rank // self.tp) % self.dp, "tp": rank % self.tp}

    def ranks_along(self, dim: str, rank: int) -> list[int]:
        """Global ranks that share every coordinate of ``rank`` except ``dim`` (its group along dim)."""
        c = self.coordinates(rank)
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        out = []
        for i in range(sizes[dim]):
            cc = dict(c, **{dim: i})
            out.append(cc["pp"] * self.dp * self.tp + cc["dp"] * self.tp + cc["tp"])
        return out


def build_device_mesh(
    dims: ParallelDims, device_type: str, timeout: timedelta | None = None
) -> torch.distributed.device_mesh.DeviceMesh:
    """Create the global mesh (a collective: every rank must call it with the same dims).

    ``timeout``: collective timeout of the mesh's groups. DeviceMesh otherwise creates its
    sub-groups with torch's default (30 minutes), not the default group's timeout, and a rank
    waiting on a hung peer in a pp/dp/tp group (a collective or a pipeline send/recv) would wait
    that long. The timeout is given at creation: gloo's send/recv keep the one they were made with."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    override = None
    options = None
    if timeout is not None and dist.is_initialized():
        options = _options_with_timeout(dist.get_backend(), timeout)
    sizes = dict(zip(MESH_DIM_NAMES, (dims.pp, dims.dp, dims.tp)))
    if options is not None:  # dims spanning the world reuse the default group, which has the timeout
        override = {name: (dist.get_backend(), options) for name, size in sizes.items() if 1 < size < dims.world_size}
    return init_device_mesh(
        device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIM_NAMES, backend_override=override
    )


def _options_with_timeout(backend: str, timeout: timedelta):
    """Process-group options of ``backend`` carrying ``timeout``; None for backends without options.

    ``"gloo"``: gloo's options. ``"nccl"`` and mixed strings with NCCL (``"cuda:nccl,cpu:gloo"``):
    NCCL's options; torch's group creation gives their timeout to the gloo side of a mixed group
    too (a mixed string never equals ``"nccl"``: compare with ``backend_has_nccl``)."""
    import torch.distributed as dist

    from lightning_scale.core.device import backend_has_nccl

    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend_has_nccl(backend) and dist.is_nccl_available():
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timeout
    return options


def sharded_over(p: torch.Tensor, dim: str) -> bool:
    """Whether ``p`` is a DTensor on a mesh with dimension ``dim`` (e.g. FSDP2 parameters on "dp")."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and dim in (p.device_mesh.mesh_dim_names or ())
