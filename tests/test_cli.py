"""The ``lightning-scale`` console script: help, recipe parsing, and clear errors on bad input.

Only ``--help`` goes through the installed console script in a subprocess (that is what a user
types); everything else calls :func:`lightning_scale.cli.main` in this process, which is the
same code path without paying the ~10 s import of torch + lightning + wandb per case. Error
cases use ``--trainer.devices=1 --trainer.logger=false`` so nothing is launched or logged: the
CLI fails while building the objects, before any training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_scale.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))
GPT_RECIPE = RECIPES_DIR / "gpt" / "nano-cpu.yaml"
#: Keep error cases in one process and free of side effects.
SINGLE_PROCESS = ["--trainer.devices=1", "--trainer.logger=false"]

# Lightning 2.6's cli.py calls jsonargparse APIs deprecated in jsonargparse 4.49 (and jsonargparse
# adds a note on how to silence them): not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:(?s).*deprecated in v4\.49:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:(?s).*JSONARGPARSE_DEPRECATION_WARNINGS:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``main`` sets WANDB_MODE when unset; pin it (restored after the test) and keep W&B's
    files out of the repository. ``sys.argv`` is the bare script name, as for a user (with
    pytest's own arguments there LightningCLI warns that both argv and ``args`` were given)."""
    monkeypatch.setattr(sys, "argv", ["lightning-scale"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def _console_script() -> list[str]:
    """The installed ``lightning-scale`` script of this interpreter (venv or system)."""
    beside_python = Path(sys.executable).with_name("lightning-scale")
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("lightning-scale")
    assert found, "the `lightning-scale` console script is not installed (pip install -e .)"
    return [found]


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    """Run ``main(args)`` expecting it to exit (help, print_config, argparse errors)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out + err


# --------------------------------------------------------------------------------------------
# Help and parsing
# --------------------------------------------------------------------------------------------
def test_console_script_help_lists_subcommands() -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [*_console_script(), "--help"], capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert f"    {sub} " in proc.stdout, f"`{sub}` missing from --help:\n{proc.stdout}"
    assert "lightning-scale plan ..." in proc.stdout and "--gpu-rates" in proc.stdout  # ours, not LightningCLI's


def test_fit_help_shows_trainer_model_and_data_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run_main(["fit", "--help"], capsys)
    assert code == 0
    for option in ("--config", "--trainer.strategy", "--trainer.devices", "--model", "--data", "--print_config"):
        assert option in text, f"{option} missing from `fit --help`"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_recipe_print_config_parses(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run_main(["fit", "--config", str(recipe), "--print_config"], capsys)
    assert code in (0, None), text
    config = yaml.safe_load(text)
    source = yaml.safe_load(recipe.read_text())
    # The recipe's choices survive parsing, with every default filled in.
    assert config["model"]["class_path"] == source["model"]["class_path"]
    assert config["data"]["class_path"] == source["data"]["class_path"]
    for key in ("accelerator", "devices"):
        assert config["trainer"][key] == source["trainer"][key]
    strategy, asked = config["trainer"]["strategy"], source["trainer"]["strategy"]
    if isinstance(asked, dict):  # class_path + init_args: the parsed form adds every default
        assert strategy["class_path"] == asked["class_path"]
        assert {k: strategy["init_args"][k] for k in asked["init_args"]} == asked["init_args"]
    else:
        assert strategy == asked
    assert "optim" in config["model"]["init_args"]


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_bad_data_path_names_the_path() -> None:
    missing = "/nonexistent/lightning-scale-corpus"
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        main(["fit", "--config", str(GPT_RECIPE), f"--data.init_args.path={missing}", *SINGLE_PROCESS])
    message = str(exc.value)
    assert f"Text corpus path '{missing}' does not exist" in message
    assert "set path=None for the built-in corpus" in message


def test_bad_model_config_says_divisible_by_n_head() -> None:
    with pytest.raises(ValueError) as exc:
        main(
            [
                "fit",
                "--config",
                str(GPT_RECIPE),
                "--model.init_args.model.n_embd=100",
                "--model.init_args.model.n_head=3",
                *SINGLE_PROCESS,
            ]
        )
    assert "n_embd (100) must be divisible by n_head (3)" in str(exc.value)


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError) as exc:
        main(["fit", "--config", str(GPT_RECIPE), "--trainer.strategy=no_such_strategy", *SINGLE_PROCESS])
    message = str(exc.value)
    assert "no_such_strategy" in message
    assert "invalid strategy name" in message


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run_main(["fit", "--config", str(GPT_RECIPE), "--trainer.no_such_option=1"], capsys)
    assert code == 2
    assert "no_such_option" in text


def test_a_step_bounded_run_shows_its_epoch_without_a_negative_total(tmp_path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_scale.cli import tidy_trainer_output

    trainer = L.Trainer(max_steps=5, callbacks=[RichProgressBar()], logger=False, default_root_dir=str(tmp_path))
    bar = trainer.progress_bar_callback
    bar._trainer = trainer  # what Lightning's setup hook does
    trainer.fit_loop.max_epochs = -1  # what fit sets when only max_steps bounds the run (loops/utilities.py)
    assert bar._get_train_description(0).strip() == "Epoch 0/-2"  # Lightning's own text for max_epochs=-1
    tidy_trainer_output(trainer)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bounded = L.Trainer(max_epochs=3, callbacks=[RichProgressBar()], logger=False, default_root_dir=str(tmp_path))
    bounded.progress_bar_callback._trainer = bounded
    tidy_trainer_output(bounded)
    assert bounded.progress_bar_callback._get_train_description(1).strip() == "Epoch 1/2"


def test_only_the_two_named_third_party_deprecations_are_silenced() -> None:
    import warnings

    import lightning_scale  # noqa: F401  (installs the filters)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import importlib

        importlib.reload(lightning_scale)  # re-installs the two filters inside this context
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use isinstance(treespec, TreeSpec)", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_a_recipe_names_a_module_of_the_project_it_is_run_from(tmp_path) -> None:
    # `class_path: my_task.MyTask` works from the project directory without PYTHONPATH.
    (tmp_path / "my_task.py").write_text(
        "import lightning as L, torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "class MyTask(L.LightningModule):\n"
        "    def __init__(self, width: int = 4):\n"
        "        super().__init__()\n"
        "        self.layer = torch.nn.Linear(width, 1)\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        return self.layer(batch[0]).pow(2).mean()\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
        "class MyData(L.LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)\n")
    (tmp_path / "recipe.yaml").write_text(
        "trainer: {accelerator: cpu, devices: 1, max_steps: 2, logger: false, enable_checkpointing: false,\n"
        "          enable_progress_bar: false}\n"
        "model: {class_path: my_task.MyTask, init_args: {width: 4}}\n"
        "data: {class_path: my_task.MyData}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([*_console_script(), "fit", "--config", "recipe.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env={**env, "WANDB_MODE": "disabled"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_steps=2` reached" in proc.stdout + proc.stderr
