"""Tests for lightning_scale.utils.wandb_offline: W&B offline runs written by Lightning's
WandbLogger are read back exactly, damaged logs behave as documented, and offline mode is
chosen when no credentials exist.

Everything W&B writes (runs, cache, config, HOME) stays under pytest's tmp dirs. Two real
offline runs are made once per module (the W&B service start costs ~1-2 s).
"""

from __future__ import annotations

import warnings

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightning_scale.utils.wandb_offline import (
    WandbLogError,
    WandbLogTruncatedWarning,
    WandbLogWarning,
    configure_offline_if_needed,
    find_offline_runs,
    find_run_file,
    read_history,
    read_summary,
)

pytestmark = pytest.mark.timeout(180)

N_SERIES = 20
FIT_STEPS = 10
_CREDENTIAL_VARS = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL")


@dataclass(frozen=True)
class Run:
    """A finished offline run and what was logged to it."""

    dir: Path
    run_id: str
    values: list[float]


@dataclass(frozen=True)
class Runs:
    save_dir: Path
    series: Run
    fit: Run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Make two offline runs in one save dir: a logged loss series and a Trainer.fit."""
    import lightning.pytorch as pl
    import torch
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.data import DataLoader, TensorDataset

    root = tmp_path_factory.mktemp("wandb_offline")
    save_dir = root / "save"
    save_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var, sub in [("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                         ("WANDB_ARTIFACT_DIR", "artifacts")]:
            mp.setenv(var, str(root / sub))
        for var in _CREDENTIAL_VARS:
            mp.delenv(var, raising=False)

        # 1. A loss series through the logger API, plus one NaN and one nested row.
        logger = WandbLogger(save_dir=str(save_dir), offline=True, project="test")
        series = [math.exp(-0.15 * i) + 0.001 * i for i in range(N_SERIES)]
        for i, value in enumerate(series):
            logger.log_metrics({"train/loss": value}, step=i)
        logger.experiment.log({"diverged": float("nan"), "cfg": {"lr": 0.25}})
        series_run = Run(Path(logger.experiment.dir).parent, logger.experiment.id, series)
        logger.experiment.finish()

        # 2. A real (tiny) Trainer.fit logging `train_loss` with self.log every step.
        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
                self.losses: list[float] = []

            def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.layer(x), y)
                self.losses.append(loss.detach().item())
                self.log("train_loss", loss)
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
        model = Tiny()
        logger = WandbLogger(save_dir=str(save_dir), offline=True, project="test")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=FIT_STEPS,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root / "trainer"),
        )
        trainer.fit(model, DataLoader(data, batch_size=8))
        fit_run = Run(Path(logger.experiment.dir).parent, logger.experiment.id, model.losses)
        logger.experiment.finish()

        yield Runs(save_dir, series_run, fit_run)
        wandb.teardown()


def test_module_imports_no_lightning() -> None:
    # Importing the package registers the strategies (and so imports lightning); the reader
    # module itself must not need lightning: check its own imports statically.
    import ast

    import lightning_scale.utils.wandb_offline as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name == "lightning" or name.startswith(("lightning.", "pytorch_lightning")) for name in imported)


def test_find_offline_runs(runs: Runs) -> None:
    expected = {runs.series.dir.resolve(), runs.fit.dir.resolve()}
    assert set(find_offline_runs(runs.save_dir)) == expected
    assert set(find_offline_runs(runs.save_dir / "wandb")) == expected
    assert find_offline_runs(runs.series.dir) == [runs.series.dir]
    assert runs.series.dir.name.endswith(runs.series.run_id)
    assert find_run_file(runs.series.dir).name == f"run-{runs.series.run_id}.wandb"
    assert find_offline_runs(runs.save_dir / "missing") == []


def test_find_offline_runs_newest_last(tmp_path: Path) -> None:
    # Ordered by the start time in the name, not by the run id.
    for name in ["offline-run-20240102_000000-aaaa", "offline-run-20231231_235959-zzzz",
                 "offline-run-20240101_120000-mmmm"]:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / "offline-run-20240102_000000-aaaa")
    assert [p.name.rsplit("-", 1)[1] for p in find_offline_runs(tmp_path)] == ["zzzz", "mmmm", "aaaa"]


def test_series_history_round_trips(runs: Runs) -> None:
    rows = read_history(runs.series.dir)
    loss_rows = [r for r in rows if "train/loss" in r]
    assert [r["train/loss"] for r in loss_rows] == runs.series.values  # exact, in order
    assert [r["trainer/global_step"] for r in loss_rows] == list(range(N_SERIES))
    assert [r["_step"] for r in rows] == list(range(len(rows)))
    assert read_history(find_run_file(runs.series.dir)) == rows  # .wandb file path works too

    last = rows[-1]  # non-finite floats decode to floats; nested keys are joined with "."
    assert isinstance(last["diverged"], float) and math.isnan(last["diverged"])
    assert last["cfg.lr"] == 0.25


def test_trainer_fit_history(runs: Runs) -> None:
    rows = read_history(runs.fit.dir)
    loss_rows = [r for r in rows if "train_loss" in r]
    assert len(runs.fit.values) == FIT_STEPS
    assert len(loss_rows) == FIT_STEPS
    assert [r["train_loss"] for r in loss_rows] == pytest.approx(runs.fit.values, rel=1e-6)
    assert [r["trainer/global_step"] for r in loss_rows] == list(range(FIT_STEPS))
    assert all("epoch" in r for r in loss_rows)


def test_read_summary(runs: Runs) -> None:
    summary = read_summary(runs.series.dir)
    assert summary["train/loss"] == runs.series.values[-1]
    assert summary["trainer/global_step"] == N_SERIES - 1
    assert read_summary(runs.fit.dir)["train_loss"] == pytest.approx(runs.fit.values[-1], rel=1e-6)


def test_truncated_log_returns_rows_read_with_warning(runs: Runs, tmp_path: Path) -> None:
    full = read_history(runs.series.dir)
    data = find_run_file(runs.series.dir).read_bytes()
    cut = tmp_path / "run-cut.wandb"
    # Cut about two thirds in, inside a record: a cut that happens to fall on a record boundary
    # (or in a block's zero padding) is a complete shorter log, not a truncated one.
    for end in range(len(data) * 2 // 3, len(data) * 2 // 3 + 64):
        cut.write_bytes(data[:end])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partial = read_history(cut)
        truncated = [w for w in caught if issubclass(w.category, WandbLogTruncatedWarning)]
        if truncated:
            break
    assert truncated and "run-cut.wandb" in str(truncated[0].message)
    assert 0 < len(partial) < len(full)
    assert partial == full[: len(partial)]

    empty = tmp_path / "run-empty.wandb"  # a run killed before its first write
    empty.write_bytes(b"")
    with pytest.warns(WandbLogTruncatedWarning, match="run-empty.wandb"):
        assert read_history(empty) == []


@pytest.mark.parametrize("content", [os.urandom(4096), b"not a wandb log\n" * 100, b"xyz"],
                         ids=["random", "text", "short"])
def test_garbage_file_raises_naming_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "run-garbage.wandb"
    bad.write_bytes(content)
    with pytest.raises(WandbLogError, match="run-garbage.wandb"):
        read_history(bad)


def test_corrupt_record_raises_or_recovers(runs: Runs, tmp_path: Path) -> None:
    data = bytearray(find_run_file(runs.series.dir).read_bytes())
    at = data.rindex(b"train/loss")  # inside the payload of the last loss row
    data[at] ^= 0xFF  # the record's crc32 no longer matches
    bad = tmp_path / "run-flipped.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(WandbLogError, match="run-flipped.wandb.*corrupt"):
        read_history(bad)
    with pytest.warns(WandbLogWarning, match="corrupt"):
        recovered = read_history(bad, strict=False)
    full = read_history(runs.series.dir)
    assert len(recovered) < len(full)
    assert recovered == full[: len(recovered)]


def test_missing_run_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_history(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No .wandb"):
        read_history(tmp_path)


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (*_CREDENTIAL_VARS, "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_configure_offline_without_key(no_credentials: Path) -> None:
    assert configure_offline_if_needed() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_configure_keeps_online_with_key(no_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A netrc entry for another host does not count; one for api.wandb.ai does.
    netrc_file = no_credentials / ".netrc"
    netrc_file.write_text("machine example.com\n  login user\n  password secret\n")
    netrc_file.chmod(0o600)
    env: dict[str, str] = {"HOME": str(no_credentials)}
    assert configure_offline_if_needed(env) == "offline" and env["WANDB_MODE"] == "offline"

    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert configure_offline_if_needed() == "online"
    assert "WANDB_MODE" not in os.environ

    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert configure_offline_if_needed() == "online"
    assert "WANDB_MODE" not in os.environ


def test_configure_respects_explicit_mode(no_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert configure_offline_if_needed() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert configure_offline_if_needed() == "offline"
    assert os.environ["WANDB_MODE"] == "dryrun"  # left as the user set it
