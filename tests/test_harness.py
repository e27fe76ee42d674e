"""Tests of the multi-process test harness (``lightning_scale.testing``) itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from pathlib import Path

import _harness_targets as targets
import pytest
import torch

from lightning_scale.testing import (
    DistributedTimeoutError,
    RankFailedError,
    find_free_port,
    run_distributed,
)

# A generous bound for "did not wait for the whole 60 s timeout": a correctness property (no
# hang after a peer failed), not a speed target.
_NO_HANG_BOUND_S = 40.0


def _assert_all_gone(pids: Mapping[int, int]) -> None:
    """Every rank process has ended (no process, or at most an unreaped zombie)."""
    for rank, pid in pids.items():
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists():
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            assert state == "Z", f"rank {rank} (pid {pid}) is still alive, state {state}"


def test_results_come_back_per_rank_in_order() -> None:
    results = run_distributed(targets.rank_info, 3, 10, scale=2, timeout=60)
    assert results == [(0, 3, 20), (1, 3, 22), (2, 3, 24)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sums_over_all_ranks(world_size: int) -> None:
    results = run_distributed(targets.all_reduce_sum, world_size, timeout=60)
    expected = torch.full((3,), world_size * (world_size + 1) / 2)
    assert len(results) == world_size
    for tensor in results:
        torch.testing.assert_close(tensor, expected)


def test_environment_of_each_rank() -> None:
    results = run_distributed(
        targets.report_environment, 2, timeout=60, init_process_group=False, env={"EXTRA_TEST_VAR": "hello"}
    )
    assert results[0]["MASTER_PORT"] == results[1]["MASTER_PORT"]
    assert int(results[0]["MASTER_PORT"]) > 0
    for rank, values in enumerate(results):
        assert values["MASTER_ADDR"] == "127.0.0.1"
        assert values["RANK"] == values["LOCAL_RANK"] == str(rank)
        assert values["WORLD_SIZE"] == values["LOCAL_WORLD_SIZE"] == "2"
        assert values["NODE_RANK"] == values["GROUP_RANK"] == "0"
        assert values["OMP_NUM_THREADS"] == "1"
        assert values["EXTRA_TEST_VAR"] == "hello"
        assert values["num_threads"] == 1
        assert values["pg_initialized"] is False  # init_process_group=False leaves it to fn


def test_every_call_gets_fresh_processes() -> None:
    for _ in range(2):
        assert run_distributed(targets.count_calls, 2, timeout=60, init_process_group=False) == [1, 1]


def test_raising_rank_is_reported_without_waiting_for_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fail_on_rank, 2, 1, "boom from the test", timeout=60)
    assert time.monotonic() - start < _NO_HANG_BOUND_S
    err = info.value
    assert err.failures[0].rank == 1
    assert err.failures[0].kind == "raised"
    message = str(err)
    assert "[rank 1] ValueError: boom from the test" in message
    assert "Remote traceback" in message and "in fail_on_rank" in message
    assert "rank 1 is about to fail" in message  # the rank's captured output
    _assert_all_gone(err.pids)


def test_peers_outside_collectives_are_killed_after_the_grace_period() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.fail_while_peers_sleep, 3, 2, timeout=60)
    assert time.monotonic() - start < _NO_HANG_BOUND_S
    err = info.value
    assert err.failed_ranks == [2]
    killed = {f.rank: f for f in err.failures if f.kind == "killed"}
    assert sorted(killed) == [0, 1]
    assert "sleep_forever_marker" in killed[0].stack
    assert "RuntimeError: rank 2 gives up" in str(err)
    _assert_all_gone(err.pids)


def test_hanging_rank_times_out_with_its_stack() -> None:
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(targets.hang_on_rank, 2, 1, timeout=5)
    err = info.value
    assert 1 in err.hung_ranks
    assert "sleep_forever_marker" in err.stacks[1]
    message = str(err)
    assert "did not finish" in message and "[rank 1]" in message
    assert "sleep_forever_marker" in message
    _assert_all_gone(err.pids)


@pytest.mark.parametrize(("how", "expected"), [("exit3", "exit code 3"), ("sigkill", "signal SIGKILL")])
def test_rank_dying_silently_is_reported_with_its_exit_status(how: str, expected: str) -> None:
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.die_on_rank, 2, 1, how, timeout=60)
    err = info.value
    died = [f for f in err.failures if f.kind == "died"]
    assert [f.rank for f in died] == [1]
    assert err.failures[0].rank == 1  # the root cause is listed first
    assert expected in died[0].summary
    assert "[rank 1] died without reporting a result" in str(err)
    _assert_all_gone(err.pids)


def test_unpicklable_target_is_rejected_in_the_parent() -> None:
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda: None, 2, timeout=60)


def test_free_ports_are_never_handed_out_twice() -> None:
    ports = [find_free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)


def test_lightning_trainer_joins_the_harness_processes(tmp_path: Path) -> None:
    results = run_distributed(
        targets.fit_tiny_trainer, 2, str(tmp_path), 2, timeout=120, init_process_group=False
    )
    assert [r["global_rank"] for r in results] == [0, 1]
    for result in results:
        assert result["world_size"] == 2
        assert result["global_step"] == 2
        assert result["external"] is True  # Lightning launched no processes of its own
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"])


def test_a_taken_master_port_is_retried_with_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_scale.testing import multiprocess

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real = multiprocess.find_free_port
        monkeypatch.setattr(multiprocess, "find_free_port", lambda: next(ports, None) or real())
        results = run_distributed(targets.report_environment, 2, timeout=60)
    assert results[0]["MASTER_PORT"] != str(taken)
    assert [r["pg_initialized"] for r in results] == [True, True]
