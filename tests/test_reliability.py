"""Reliability on real gloo processes (issue 11, items 1, 2, 3, 6 and 7).

* A rank dies (SIGKILL in the middle of an optimizer step) under ddp, pipeline, tensor parallel,
  3D and ZeRO-3: every other rank exits with an error naming the lost peer, within the strategy's
  collective timeout; the run resumed from the last checkpoint loses at most the checkpoint
  interval and its losses equal an uninterrupted run's, bit for bit.
* A rank hangs (SIGSTOP) under 3D: the survivors time out after the configured ``timeout=``, in
  the pipeline and tensor-parallel sub-groups too, instead of torch's 30-minute default.
* Determinism: the killed run (one launch) and the uninterrupted run (another launch) with the
  same seed give bitwise identical losses up to the kill.
* Layout changes on resume: a 3D checkpoint resumes on TP=2 and on one process (exact); a
  mid-epoch checkpoint cannot move to another data-parallel degree and says so.
* Two "nodes" on one machine: two ``torchrun --nnodes 2`` launchers train the GPT CPU recipe
  under the 3D strategy.

Each strategy costs one launch for the kill and one for the resume (the uninterrupted reference
and the resumed run are two fits in the same rank processes). Launches of the killed runs are
cached per module, so the layout tests reuse their checkpoints. See docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import _reliability_targets as targets
from lightning_scale.testing import SETTINGS, RankFailedError, find_free_port, run_distributed
from lightning_scale.testing.multiprocess import _kill_tree

REPO_ROOT = Path(__file__).resolve().parents[1]

EVERY = 2  # checkpoint interval (optimizer steps): one checkpoint, at step 2, before the kill
KILL_AT = 3  # the victim dies inside the step that starts at global step 3 (steps 0-2 complete)
STEPS = KILL_AT + 1  # max_steps of every run: the killed run never gets there; the resumed run
# redoes steps 2 (the restored weights) and 3 (a step of the restored optimizer state).
# A survivor's error must name the lost peer: gloo's closed/reset connection, or its timeout.
PEER_ERROR = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting \d+ms")
KILL_STRATEGIES = ["ddp", "pipeline", "tensor_parallel", "parallel_3d", "zero3"]


@dataclass
class KilledRun:
    """Launch A (train with checkpoints, one rank SIGKILLed mid-step) and, once asked for, launch B
    (an uninterrupted run from scratch, then the run resumed from the last checkpoint)."""

    strategy: str
    root: Path
    error: RankFailedError
    killed: dict  # {"time", "step", "rank"} written by the victim just before the signal
    seconds: float
    resumed: list[dict] | None = None  # launch B, per rank: {"reference", "resumed", "global_step"}
    resume_seconds: float = 0.0

    def checkpoints(self) -> dict[int, Path]:
        """step -> checkpoint path, for every complete checkpoint (a file, or a DCP directory with
        its index and meta.pt)."""
        found = {}
        for path in (self.root / "ckpt").glob("step=*.ckpt"):
            if path.is_file() or ((path / ".metadata").is_file() and (path / "meta.pt").is_file()):
                found[int(path.stem.split("=")[1])] = path
        return found

    def last_checkpoint(self) -> tuple[int, Path]:
        step = max(self.checkpoints())
        return step, self.checkpoints()[step]

    def logged_losses(self, rank: int) -> list[float]:
        """The losses rank ``rank`` logged before the kill, one per completed step."""
        return [r["loss"] for r in targets.read_log(self.root, rank, "killed")]


class KilledRuns:
    """Launches A and B of each strategy, run once per module and shared by the tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, KilledRun] = {}

    def get(self, strategy: str, resumed: bool = False) -> KilledRun:
        if strategy not in self.runs:
            self.runs[strategy] = self._kill(strategy)
        run = self.runs[strategy]
        if resumed and run.resumed is None:
            start = time.monotonic()
            run.resumed = run_distributed(targets.reference_then_resume, targets.WORLD[strategy], strategy, STEPS,
                                          str(run.last_checkpoint()[1]), str(run.root), init_process_group=False,
                                          timeout=180)
            run.resume_seconds = time.monotonic() - start
        return run

    def _kill(self, strategy: str) -> KilledRun:
        root = self.root / strategy
        root.mkdir(parents=True)
        world = targets.WORLD[strategy]
        victim = world - 1  # the last rank: the last pipeline stage, a TP peer, a dp replica
        start = time.monotonic()
        with pytest.raises(RankFailedError) as info:
            run_distributed(targets.train, world, strategy, STEPS, tag="killed", log_dir=str(root),
                            ckpt_dir=str(root / "ckpt"), every=EVERY, kill=(victim, KILL_AT),
                            init_process_group=False, timeout=180)
        seconds = time.monotonic() - start
        killed = json.loads((root / "killed.json").read_text())
        return KilledRun(strategy, root, info.value, killed, seconds)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    request.getfixturevalue("run_distributed")  # conftest: start the fork server once, before timing anything
    # Survivors must fail on their own (gloo error or collective timeout), never be ended by the
    # harness's grace period: give them longer than the collective timeout.
    saved = SETTINGS.failure_grace_s
    SETTINGS.failure_grace_s = targets.COLLECTIVE_TIMEOUT_S + 15
    try:
        yield KilledRuns(tmp_path_factory.mktemp("killed"))
    finally:
        SETTINGS.failure_grace_s = saved


# --------------------------------------------------------------------------------------------
# 1, 2, 6: a rank dies; the others fail fast; resume is exact and loses at most the interval
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", KILL_STRATEGIES)
def test_killed_rank_fails_its_peers_fast_and_resume_loses_at_most_the_interval(strategy, killed_runs) -> None:
    run = killed_runs.get(strategy, resumed=True)
    world = targets.WORLD[strategy]
    victim = run.killed["rank"]
    assert run.killed["step"] == KILL_AT and victim == world - 1

    # The victim is reported dead by SIGKILL, listed first (the root cause).
    failures = {f.rank: f for f in run.error.failures}
    assert sorted(failures) == list(range(world)), str(run.error)
    assert run.error.failures[0].rank == victim
    assert failures[victim].kind == "died" and "SIGKILL" in failures[victim].summary
    # Every survivor raised by itself (none was ended by the harness) an error naming the lost
    # peer, within the collective timeout of the kill.
    delays = {}
    for rank in range(world - 1):
        failure = failures[rank]
        assert failure.kind == "raised", failure.describe()
        assert PEER_ERROR.search(failure.summary), failure.describe()
        if strategy != "ddp":  # the suite's strategies name the rank that died (Lightning's DDP does not)
            assert f"rank {victim} (pid " in failure.summary and "stopped running" in failure.summary, failure.describe()
        delays[rank] = failure.time_s - run.killed["time"]
        assert 0 <= delays[rank] <= targets.COLLECTIVE_TIMEOUT_S + 5, delays

    # Nothing was lost beyond the checkpoint interval: the last complete checkpoint is at most
    # EVERY steps behind the last completed step (KILL_AT steps were completed before the kill).
    for rank in range(world):
        assert len(run.logged_losses(rank)) == KILL_AT, rank
    last, _ = run.last_checkpoint()
    lost = KILL_AT - last
    assert 0 < lost <= EVERY, (sorted(run.checkpoints()), KILL_AT)

    # Launch B: the uninterrupted run from scratch, then the run resumed from the last checkpoint.
    assert run.resumed is not None
    for rank, res in enumerate(run.resumed):
        assert res["global_step"] == STEPS
        reference, resumed = res["reference"], res["resumed"]
        assert len(reference) == STEPS and len(resumed) == STEPS - last >= 2
        # Resume exactness (2): bit for bit the uninterrupted runs' losses from the checkpoint on.
        assert resumed == reference[last:], f"rank {rank}: resumed {resumed} vs uninterrupted {reference[last:]}"
        assert resumed[: KILL_AT - last] == run.logged_losses(rank)[last:], f"rank {rank}"
        # Determinism (6): the killed launch and the uninterrupted launch, same seed, same bits.
        assert run.logged_losses(rank) == reference[:KILL_AT], f"rank {rank}"
    print(f"\n{strategy}: kill launch {run.seconds:.1f} s, resume launch {run.resume_seconds:.1f} s; survivors "
          f"errored {', '.join(f'rank {r} +{d:.2f} s' for r, d in sorted(delays.items()))} after the kill; "
          f"resumed from step {last}, {lost} completed step(s) lost (interval {EVERY})")


# --------------------------------------------------------------------------------------------
# 1: a rank hangs; the survivors' collectives time out in every sub-group of the mesh
# --------------------------------------------------------------------------------------------
def test_hung_rank_times_out_its_peers_in_every_mesh_group(tmp_path, monkeypatch) -> None:
    # SIGSTOP: the victim's sockets stay open, so only the collective timeout can end the wait.
    # Under pp2 x tp2 the survivors wait in the tp sub-group (rank 2), and in pipeline send/recv
    # on the pp sub-groups (ranks 0, 1), which DeviceMesh creates with torch's 30-minute default
    # unless the strategy passes its timeout on.
    timeout_s = 2.0
    monkeypatch.setattr(SETTINGS, "failure_grace_s", 2.0)  # then the stopped rank is killed
    monkeypatch.setattr(SETTINGS, "stack_dump_wait_s", 0.2)  # a stopped process dumps no stack
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.train, 4, "parallel_3d", 2, tag="hung", log_dir=str(tmp_path), kill=(3, 1),
                        signal_name="SIGSTOP", timeout_s=timeout_s, init_process_group=False, timeout=60)
    stopped = json.loads((tmp_path / "killed.json").read_text())
    failures = {f.rank: f for f in info.value.failures}
    assert failures[3].kind == "killed"  # still stopped when the harness ended it
    delays = {}
    for rank in (0, 1, 2):
        assert failures[rank].kind == "raised", failures[rank].describe()
        assert PEER_ERROR.search(failures[rank].summary), failures[rank].describe()
        delays[rank] = failures[rank].time_s - stopped["time"]
    # Rank 2 waits on rank 3 directly; the others may fail earlier, when rank 2 exits.
    assert timeout_s - 0.5 <= delays[2] <= timeout_s + 5, delays
    assert all(d <= timeout_s + 5 for d in delays.values()), delays
    print(f"\nhung rank 3 (pp2 x tp2, timeout {timeout_s:g} s): survivors errored "
          + ", ".join(f"rank {r} +{d:.2f} s" for r, d in sorted(delays.items())))


# --------------------------------------------------------------------------------------------
# 3: changing the layout on resume
# --------------------------------------------------------------------------------------------
def test_3d_checkpoint_resumes_on_tensor_parallel_and_on_one_process(killed_runs) -> None:
    # The 3D run's mid-epoch checkpoint (pp2 x tp2, 4 ranks) on TP=2 (2 ranks) and on one process:
    # data parallel degree 1 in all three, so the same global batches. Compared with the
    # uninterrupted 3D run (launch B of the kill test, shared).
    run = killed_runs.get("parallel_3d", resumed=True)
    step, path = run.last_checkpoint()
    expected = run.resumed[0]["reference"][step:]
    assert len(expected) >= 2  # the restored weights, then a step of the restored optimizer state
    for layout in ("tensor_parallel", "single"):
        results = run_distributed(targets.train, targets.WORLD[layout], layout, STEPS, tag=f"on-{layout}",
                                  log_dir=str(run.root), resume=str(path), init_process_group=False, timeout=180)
        for rank, res in enumerate(results):
            assert len(res["losses"]) == len(expected)
            for i, (a, b) in enumerate(zip(res["losses"], expected)):
                assert abs(a - b) <= 1e-6 * abs(b), f"{layout} rank {rank}, step {step + i}: {a} vs {b}"


def test_mid_epoch_checkpoint_refuses_another_data_parallel_degree(killed_runs) -> None:
    # ZeRO-3 on 2 ranks (dp=2) saved mid-epoch; one process (dp=1) with the same global batch
    # cannot continue the epoch from the loader's saved position (each replica's position in its
    # own shard of the data): it must say so on every rank instead of training on other data.
    run = killed_runs.get("zero3")
    with pytest.raises(RankFailedError) as info:
        run_distributed(targets.train, 1, "single", STEPS, tag="dp-change", log_dir=str(run.root),
                        resume=str(run.last_checkpoint()[1]), init_process_group=False, timeout=120)
    message = str(info.value)
    assert "mid-epoch (after batch 2 of epoch 0) with 2 data-parallel replicas; this run has 1" in message, message
    assert "Resume with 2 data-parallel replicas, or from a checkpoint taken at the end of an epoch" in message


def test_ddp_single_file_checkpoint_resumes_under_zero3_with_weights_but_not_the_optimizer(killed_runs) -> None:
    # ddp's single-file checkpoint (2 ranks, mid-epoch) resumed under native ZeRO-3 on 2 ranks (the
    # same data-parallel degree, so the same batches): the weights load, so the first resumed step
    # equals the uninterrupted ddp run; the index-keyed optimizer state cannot be mapped to the
    # sharded layout, so rank 0 warns and the next step (fresh Adam moments) departs from it.
    run = killed_runs.get("ddp", resumed=True)
    step, path = run.last_checkpoint()
    assert path.is_file()  # Lightning's own single-file format, not a DCP directory
    results = run_distributed(targets.train, 2, "zero3", STEPS, tag="ddp-to-zero3", log_dir=str(run.root),
                              resume=str(path), init_process_group=False, timeout=180)
    for rank, res in enumerate(results):
        expected = run.resumed[rank]["reference"][step:]  # each rank's own loss on its shard of the batch
        first, second = res["losses"][:2]
        assert abs(first - expected[0]) <= 1e-6 * abs(expected[0]), f"rank {rank}: {first} vs {expected[0]}"
        departure = abs(second - expected[1]) / abs(expected[1])
        print(f"ddp -> zero3, rank {rank}: first resumed step exact, the next {departure:.1e} off (relative)")
        assert departure > 1e-6, "the optimizer state was restored after all?"
    restored = [w for w in results[0]["warnings"] if "optimizer state is keyed by parameter index and is NOT restored" in w]
    assert len(restored) == 1, results[0]["warnings"]
    assert not any("NOT restored" in w for w in results[1]["warnings"])  # rank 0 only


# --------------------------------------------------------------------------------------------
# 7: two nodes on one machine (two torchrun launchers)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_torchrun_nodes_train_the_gpt_recipe_with_the_3d_strategy(tmp_path) -> None:
    torchrun = shutil.which("torchrun")
    cli = shutil.which("lightning-scale")
    if torchrun is None or cli is None:
        pytest.fail("torchrun and the lightning-scale console script must be installed (pip install -e .)")
    port = find_free_port()
    steps = 3
    common = [
        torchrun, "--nnodes", "2", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        cli, "fit", "--config", str(REPO_ROOT / "recipes" / "gpt" / "nano-cpu.yaml"),
        "--trainer.num_nodes", "2", "--trainer.devices", "2",
        "--trainer.strategy", "lightning_scale.strategies.Parallel3DStrategy",
        "--trainer.strategy.pipeline_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "2",
        "--trainer.strategy.microbatches", "4",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "logs"), "--trainer.logger.name", "two-nodes",
        "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.batch_size", "8",  # 4 microbatches of 2 sequences
        # The recipe's reporting callbacks (profiler, memory, cost) triple the fit time of these
        # few steps; they have their own multi-rank tests. The subject here is the launch.
        "--trainer.callbacks", "[]",
        "--model.init_args.sample_tokens", "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        argv = common[:5] + ["--node_rank", str(node)] + common[5:]
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    start = time.monotonic()
    try:
        codes = [p.wait(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: the launcher and its workers (each in its own session)
                _kill_tree(p.pid)
                p.wait()
        for log in logs:
            log.close()
    seconds = time.monotonic() - start
    full = {n: (tmp_path / f"node{n}.log").read_text() for n in (0, 1)}
    output = "\n".join(f"--- node {n} (tail) ---\n{text[-4000:]}" for n, text in full.items())
    assert codes == [0, 0], f"launcher exit codes {codes} after {seconds:.0f} s\n{output}"
    # Node 0 hosts global rank 0, which reports the mesh: 4 ranks over the two launchers.
    assert "Parallel3DStrategy: mesh pp x dp x tp = 2 x 1 x 2" in full[0], output
    assert "Initializing distributed: GLOBAL_RANK: 3, MEMBER: 4/4" in full[1], output
    metrics = sorted((tmp_path / "logs").rglob("metrics.csv"))
    assert len(metrics) == 1, metrics
    import csv

    rows = list(csv.DictReader(metrics[0].open()))
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    assert [s for s, _ in train] == list(range(steps)), rows
    assert all(math.isfinite(v) and 0 < v < 10 for _, v in train), train
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 1 and math.isfinite(val[0]), rows
    print(f"\ntwo torchrun nodes x 2 processes, pp2 x tp2: {steps} steps in {seconds:.1f} s, train/loss {train}")
