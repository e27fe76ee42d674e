"""Corrupt, truncated, foreign and malicious checkpoints (issue 11, reliability item 4).

Each case must raise a clear :class:`~lightning_scale.core.checkpoint.CheckpointError` naming the
file (and, for a checkpoint of another model, the keys and shapes that differ), on every rank;
leave every checkpoint file byte-identical; and never run pickled code (the malicious files would
create a file ``PWNED`` if unpickled).

Multi-rank: a 2-rank run saves a DCP checkpoint directory (the format of every suite strategy),
rank 0 writes damaged copies and single-file (plain Lightning) checkpoints, then both ranks resume
from each one. Under pipeline parallelism each rank holds other tensors; under ZeRO-3 they are
DTensors. In-process: the same errors from :mod:`lightning_scale.core.checkpoint` without a
process group (``consolidate``, ``load_sharded``, ``read_metadata``, single files).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lightning_scale.core.checkpoint import CheckpointError, consolidate, load_file, load_meta, load_sharded, read_metadata

# dcp.save without a process group (the in-process fixtures) says it assumes a single process: it is one.
pytestmark = pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process:UserWarning")

# case -> what the error must say (a regex; the file is checked separately)
EXPECTED = {
    "dcp_corrupt_metadata": r"\.metadata is corrupt or truncated .*restore it from a good copy",
    "dcp_missing_shard": r"is incomplete: shard file .*__1_0\.distcp is missing .*copy the whole directory",
    "dcp_truncated_shard": r"is truncated: shard file .*__1_0\.distcp has \d+ bytes, its metadata needs at least \d+",
    "dcp_other_model": (r"was saved from another model or configuration: \d+ tensors have other shapes, e\.g\. "
                        r"state_dict\.model\.\S+: checkpoint \(\d+, 48\) vs model \(\d+, 32\).*start without ckpt_path"),
    "dcp_pickled_metadata": r"\.metadata names objects a DCP metadata file never holds .*no code in it ran",
    "dcp_pickled_meta_pt": (r"meta\.pt holds objects that weights_only loading refuses \(it names the global (?:io|builtins)\.open\)"
                            r".*trust_checkpoint=True"),
    "dcp_truncated_meta_pt": r"meta\.pt is corrupt or truncated \(100 bytes;.*restore it from a good copy",
    "single_corrupt.ckpt": r"single_corrupt\.ckpt is corrupt or truncated \(800 bytes; UnpicklingError: Unsupported operand",
    "single_truncated.ckpt": r"single_truncated\.ckpt is corrupt or truncated \(\d+ bytes; RuntimeError: PytorchStreamReader",
    "single_pickled.ckpt": r"single_pickled\.ckpt holds objects that weights_only loading refuses .*(?:io|builtins)\.open",
    "single_other_model.ckpt": (r"single_other_model\.ckpt was saved from another model or configuration: \d+ tensors have "
                                r"other shapes, e\.g\. model\.\S+: checkpoint \(\d+, 48\) vs model \(\d+, 32\)"),
}


@pytest.mark.parametrize("kind", ["pipeline", "zero3"])
def test_damaged_checkpoints_fail_clearly_on_every_rank(kind: str, run_distributed, tmp_path: Path) -> None:
    import re

    import _reliability_input_targets as targets

    results = run_distributed(targets.checkpoint_errors, 2, kind, str(tmp_path), timeout=180, init_process_group=False)
    for rank, out in enumerate(results):
        assert not out["pwned"], "pickled code ran"
        assert out["changed"] == [], f"rank {rank}: a failed load changed files: {out['changed']}"
        got = out["results"]
        # The intact checkpoints load (no false alarm), a single file exactly.
        assert got.pop("dcp_good") == "LOADED" and got.pop("single_good.ckpt") == "LOADED"
        assert float(got.pop("single_good_max_diff")) == 0.0
        assert set(got) == set(EXPECTED)
        for case, message in got.items():
            assert message.startswith("CheckpointError: "), f"rank {rank} {case}: {message}"
            assert case in message, f"rank {rank} {case}: the error does not name the file: {message}"
            assert re.search(EXPECTED[case], message, flags=re.DOTALL), f"rank {rank} {case}: {message}"
    # Every rank reports the same failure (no rank left waiting in a collective).
    for case in EXPECTED:
        assert results[0]["results"][case] == results[1]["results"][case], case


# -- in-process (no process group) ----------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def dcp_dir(tmp_path: Path) -> Path:
    """A lightning_scale DCP checkpoint of a small module, written without a process group."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    path = tmp_path / "ck"
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": {"param_groups.0.weight.lr": 0.1}},
             checkpoint_id=path, no_dist=True)
    torch.save({"epoch": 3, "global_step": 7}, path / "meta.pt")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_consolidate_and_load_sharded_name_the_damage(dcp_dir: Path, tmp_path: Path) -> None:
    good = consolidate(dcp_dir)
    assert good["epoch"] == 3 and set(good["state_dict"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert good["optimizer_states_by_name"] == [{"param_groups.0.weight.lr": 0.1}]
    assert read_metadata(dcp_dir)["state_dict.0.weight"] == (8, 4)

    other = {"state_dict": {"0.weight": torch.zeros(8, 5), "0.bias": torch.zeros(8), "2.weight": torch.zeros(2, 8)}}
    with pytest.raises(CheckpointError) as info:
        load_sharded(dcp_dir, other)
    message = str(info.value)
    assert str(dcp_dir) in message and "another model" in message
    assert "state_dict.0.weight: checkpoint (8, 4) vs model (8, 5)" in message
    assert "1 tensors of this model are not in the checkpoint, e.g. ['state_dict.2.weight']" in message

    missing = tmp_path / "missing"
    shutil.copytree(dcp_dir, missing)
    shard = next(missing.glob("*.distcp"))
    shard.unlink()
    before = _files(tmp_path)
    for call in (lambda: consolidate(missing), lambda: load_sharded(missing, {"state_dict": {"0.bias": torch.zeros(8)}})):
        with pytest.raises(CheckpointError, match=rf"shard file {shard} is missing"):
            call()
    assert _files(tmp_path) == before  # nothing written or overwritten


def test_dcp_metadata_and_values_are_never_unpickled_unrestricted(dcp_dir: Path, tmp_path: Path) -> None:
    """DCP unpickles .metadata with plain pickle and non-tensor values with weights_only=False;
    the suite's readers refuse anything else."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil_metadata"
    shutil.copytree(dcp_dir, evil)
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError, match=r"evil_metadata/\.metadata names objects .*(?:io|builtins)\.open"):
        read_metadata(evil)
    with pytest.raises(CheckpointError, match=r"(?:io|builtins)\.open"):
        consolidate(evil)

    evil_value = tmp_path / "evil_value"  # a DCP non-tensor value that is a malicious pickle
    dcp.save({"state_dict": {"w": torch.ones(2)}, "optimizer_0": {"x": _Evil(marker)}}, checkpoint_id=evil_value,
             no_dist=True)
    torch.save({}, evil_value / "meta.pt")
    with pytest.raises(CheckpointError, match=r"value 'optimizer_0\.x' holds objects that weights_only loading refuses"):
        consolidate(evil_value)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_sharded(evil_value, {"optimizer_0": {"x": 0}})

    evil_meta = tmp_path / "evil_meta"
    shutil.copytree(dcp_dir, evil_meta)
    torch.save({"x": _Evil(marker)}, evil_meta / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt holds objects .*trust_checkpoint=True"):
        load_meta(evil_meta)
    assert not marker.exists(), "pickled code ran"


@pytest.mark.parametrize("content, match", [
    (b"", r"is empty \(0 bytes\)"),
    (b"\x00garbage" * 10, r"is corrupt or truncated \(80 bytes; UnpicklingError: Unsupported operand"),
    (b"hello" * 100, r"is corrupt or truncated \(500 bytes; "),
])
def test_single_file_errors_name_the_file(content: bytes, match: str, tmp_path: Path) -> None:
    file = tmp_path / "last.ckpt"
    file.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_file(file)
    assert str(file) in str(info.value) and "restore it from a good copy" in str(info.value)
    assert file.read_bytes() == content
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "nope.ckpt")


# -- atomic writes ----------------------------------------------------------------------------------
def test_a_checkpoint_appears_under_its_name_only_when_complete(tmp_path: Path, monkeypatch) -> None:
    from lightning_scale.core import checkpoint as ckpt

    path = tmp_path / "epoch=0-step=20.ckpt"
    tensors = {"state_dict": {"w": torch.arange(4.0)}}
    real_save = ckpt.dcp.save

    def dies_midway(state, checkpoint_id):  # a rank killed while the shards are written
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise SystemExit("killed")

    monkeypatch.setattr(ckpt.dcp, "save", dies_midway)
    with pytest.raises(SystemExit):
        ckpt.save_sharded(path, tensors, {"global_step": 20}, is_rank_zero=True)
    assert not path.exists()  # nothing that looks like a checkpoint
    assert ckpt.incomplete_path(path).is_dir() and not ckpt.incomplete_path(path).name.endswith(".ckpt")
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    ckpt.save_sharded(path, tensors, {"global_step": 20}, is_rank_zero=True)  # the next save clears it
    assert not ckpt.incomplete_path(path).exists() and load_meta(path)["global_step"] == 20
    # Replacing an existing checkpoint (last.ckpt): the old one stays until the new one is complete.
    ckpt.save_sharded(path, {"state_dict": {"w": torch.ones(4)}}, {"global_step": 21}, is_rank_zero=True)
    assert load_meta(path)["global_step"] == 21 and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_damage_messages_never_pass_on_torchs_advice_to_disable_weights_only(tmp_path: Path) -> None:
    file = tmp_path / "meta.pt"
    torch.save({"global_step": 3}, file)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        load_meta(tmp_path)
    assert "is corrupt or truncated" in str(info.value)
    assert "weights_only" not in str(info.value).replace("weights_only loading", "")
