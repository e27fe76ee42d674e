"""GPU semantics on CPU: the device helper (lightning_scale.core.device), its doubles of GPU
behaviour (deferred copies, the collective audit), and the CUDA/NCCL defects they guard against.

Every multi-rank test of the suite runs under these doubles (tests/conftest.py); the tests here
check that the doubles themselves can fail, and the cases the parity tests cannot reach.
"""

from __future__ import annotations

import math

import pytest
import torch

import _gpu_semantics_targets as targets
from lightning_scale.core import device as dev
from lightning_scale.testing import run_distributed


# -- backends ------------------------------------------------------------------------------------
def test_default_backend_follows_the_root_device_and_host_collectives() -> None:
    assert dev.default_backend(torch.device("cpu")) == "gloo"
    assert dev.default_backend(torch.device("cpu"), host_collectives=True) == "gloo"
    assert dev.default_backend(torch.device("cuda", 3)) == "nccl"
    assert dev.default_backend("cuda", host_collectives=True) == "cuda:nccl,cpu:gloo"


@pytest.mark.parametrize(("backend", "nccl", "host"), [
    ("nccl", True, False), ("gloo", False, True), ("cuda:nccl,cpu:gloo", True, True), ("cpu:gloo,cuda:nccl", True, True),
    ("NCCL", True, False), ("", False, False),
])
def test_backend_strings_mixed_included(backend: str, nccl: bool, host: bool) -> None:
    # A mixed string never equals "nccl": the old `get_backend() == "nccl"` checks missed it.
    assert dev.backend_has_nccl(backend) is nccl
    assert dev.backend_takes_host(backend) is host


def test_mixed_backend_sub_groups_get_the_timeout() -> None:
    """The mesh's sub-groups get options carrying the timeout for every backend string that names
    a backend with options (gloo here; NCCL's options need a CUDA build of torch)."""
    from datetime import timedelta

    from lightning_scale.core.mesh import _options_with_timeout

    assert _options_with_timeout("gloo", timedelta(seconds=7))._timeout == timedelta(seconds=7)
    if torch.distributed.is_nccl_available():
        for backend in ("nccl", "cuda:nccl,cpu:gloo"):
            assert _options_with_timeout(backend, timedelta(seconds=7))._timeout == timedelta(seconds=7)


def test_is_cuda_reads_the_device_not_the_machine() -> None:
    assert dev.is_cuda(torch.device("cuda", 0)) and dev.is_cuda("cuda:1")
    assert not dev.is_cuda(torch.device("cpu")) and not dev.is_cuda(None) and not dev.is_cuda("meta")
    assert dev.pin_host_memory("cuda") and not dev.pin_host_memory("cpu")


# -- the transfer helper and the deferred-copy double ------------------------------------------------
def test_deferred_copy_holds_garbage_until_waited_on() -> None:
    src = torch.arange(6, dtype=torch.float32)
    ints = torch.arange(4)
    with dev.gpu_semantics(deferred_copies=True, audit_collectives=False):
        dst = torch.zeros(6)
        transfer = dev.copy_(dst, src)
        assert torch.isnan(dst).all()  # what a host read before the copy lands may see
        src.fill_(-1.0)  # the copy took the source as it was when it was issued
        transfer.wait()
        assert torch.equal(dst, torch.arange(6, dtype=torch.float32))
        host, t2 = dev.to_host(ints)
        assert (host == torch.iinfo(torch.int64).min).all()
        t2.wait()
        assert torch.equal(host, ints)
    # Outside the double the copy is done when the call returns.
    dst = torch.zeros(6)
    dev.copy_(dst, src)
    assert torch.equal(dst, src)


def test_host_residency_registration_propagation_and_transfer() -> None:
    plain = torch.ones(4)
    host = dev.host_empty(4, torch.float32, "cpu", zero=True)
    assert dev.is_host_resident(host) and not dev.is_host_resident(plain)
    assert dev.is_host_resident(host[1:3])  # a view shares the storage
    with dev.gpu_semantics(deferred_copies=False, audit_collectives=True):
        norm = host.norm()
        assert dev.is_host_resident(norm)  # computed on the host
        assert dev.is_host_resident(norm + torch.zeros(()))  # 0-dim: stays on the host
        assert not dev.is_host_resident(plain * 2)
        assert not dev.is_host_resident(host + plain)  # a device operand: the result is on the device
        moved, transfer = dev.to_device(norm, "cpu")
        transfer.wait()
        assert not dev.is_host_resident(moved) and moved is not norm and float(moved) == float(norm)
        same, _ = dev.to_device(plain, "cpu")
        assert same is plain  # already on the device: no copy
    del host
    assert not dev.is_host_resident(torch.ones(4))


def test_device_clock_on_cpu() -> None:
    clock = dev.DeviceClock("cpu")
    a = clock.mark()
    sum(range(10000))
    b = clock.mark()
    assert clock.seconds(a, b) >= 0 and not clock.cuda


def test_collective_audit_fails_a_host_tensor_on_an_nccl_only_group() -> None:
    nccl, mixed = run_distributed(targets.audit_host_tensor, 2, "nccl", timeout=60)[0], \
        run_distributed(targets.audit_host_tensor, 2, "cuda:nccl,cpu:gloo", timeout=60)[0]
    assert nccl["derived_host"]
    assert "host-resident tensor" in nccl["raw"] and "'nccl'" in nccl["raw"] and "to_device" in nccl["raw"]
    assert mixed["raw"] == "passed"  # the mixed backend carries host tensors on gloo
    assert nccl["moved"] == pytest.approx(2 * math.sqrt(8))  # each rank's norm of eight ones, summed
    assert mixed["moved"] == pytest.approx(4 * math.sqrt(8))  # there the raw all-reduce had summed it once already
    assert ("all_reduce", "nccl", [("cpu", False)]) in nccl["log"]


# -- the defects ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_runs_on_the_mixed_backend_and_its_host_collectives_pass_the_audit(stage: int, tmp_path) -> None:
    """Offload (ZeRO-2 optimizer, ZeRO-3 parameters): clipping and a checkpoint save under the
    audit. The strategy asks for "cuda:nccl,cpu:gloo"; host tensors do reach collectives (the
    optimizer state all-gather of the checkpoint) and are allowed there."""
    results = run_distributed(targets.zero_offload_audit, 2, stage, False, str(tmp_path), init_process_group=False,
                              timeout=180)
    for r in results:
        assert r["error"] is None and r["backend"] == "cuda:nccl,cpu:gloo" and r["calls"] > 0
    if stage == 2:
        assert all(r["host_calls"] > 0 for r in results)


def test_zero2_offload_on_an_nccl_only_backend_is_caught_by_the_audit(tmp_path) -> None:
    """Before the fix every CUDA run of ZeRO-1/2 offload was NCCL-only: the checkpoint's all-gather
    of the host optimizer state is then refused by the audit, with the fix named. (Clipping passes:
    its norm is now reduced on the root device.)"""
    results = run_distributed(targets.zero_offload_audit, 2, 2, True, str(tmp_path), init_process_group=False,
                              timeout=180)
    for r in results:
        assert r["backend"] == "nccl"
        assert r["error"] is not None and "all_gather" in r["error"] and "cuda:nccl,cpu:gloo" in r["error"], r


def test_second_setup_does_not_move_offloaded_shards() -> None:
    results = run_distributed(targets.second_setup_keeps_offloaded_shards, 2, init_process_group=False, timeout=180)
    for r in results:
        assert r["validated"] and r["moved"] == [], r


# -- the architecture rule -----------------------------------------------------------------------------
def test_no_machine_cuda_checks_or_hard_coded_cuda_devices_outside_the_device_helper() -> None:
    """Whether a run is on CUDA is its root device's call, made through lightning_scale.core.device."""
    import re
    from pathlib import Path

    root = Path(dev.__file__).resolve().parents[1]
    patterns = {
        "torch.cuda.is_available()": re.compile(r"cuda\.is_available\(\)"),
        "a device-type comparison (use device.is_cuda)": re.compile(r"""\.type\s*[!=]=\s*["']cuda"""),
        "a hard-coded 'cuda' device": re.compile(
            r"""(torch\.device\(|device\s*=\s*|\.to\(|init_device_mesh\(|backend\()\s*["']cuda|\.cuda\("""),
        "non_blocking copies outside the transfer helper": re.compile(r"non_blocking\s*="),
    }
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(dev.__file__).resolve():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in patterns.items():
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(root.parent)}:{n}: {what}: {line.strip()}")
    assert not offenders, "use lightning_scale.core.device (is_cuda, to_device, ...):\n" + "\n".join(offenders)
