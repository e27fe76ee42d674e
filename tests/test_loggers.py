"""lightning_scale.loggers.wandb_logger: a script without W&B credentials logs offline."""

from __future__ import annotations


def test_a_script_without_credentials_gets_an_offline_wandb_logger(tmp_path, monkeypatch) -> None:
    import os

    from lightning.pytorch.loggers import WandbLogger

    from lightning_scale.loggers import wandb_logger

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_MODE", "")  # restored after the test
    monkeypatch.delenv("WANDB_MODE")
    logger = wandb_logger(project="p", save_dir=str(tmp_path))
    assert isinstance(logger, WandbLogger) and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit choice wins
    wandb_logger(project="p", save_dir=str(tmp_path))
    assert os.environ["WANDB_MODE"] == "disabled"


def test_an_unset_anonymous_is_not_passed_to_wandb(tmp_path, monkeypatch) -> None:
    from lightning_scale.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert "anonymous" not in wandb_logger(project="p", save_dir=str(tmp_path))._wandb_init
    assert wandb_logger(project="p", save_dir=str(tmp_path), anonymous=True)._wandb_init["anonymous"] == "allow"
