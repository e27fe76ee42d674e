"""The ``lightning-scale`` console script: LightningCLI with the suite's strategies registered.

``lightning-scale fit|validate|test|predict --config recipe.yaml`` runs a recipe;
``lightning-scale plan ...`` predicts per-device memory (:mod:`lightning_scale.plan_cli`). Importing
:mod:`lightning_scale` registers the suite's strategies with Lightning, so a YAML file may
select them by registered name (``strategy: pipeline``) or by ``class_path``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_scale  # noqa: F401  (registers the strategies)
from lightning_scale.utils.wandb_offline import configure_offline_if_needed


class ScaleCLI(LightningCLI):
    """LightningCLI whose model and data are any LightningModule / LightningDataModule subclass."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        tidy_trainer_output(trainer)
        return trainer


def tidy_trainer_output(trainer) -> None:
    """What a recipe run prints should be true and quiet:

    * the rich progress bar writes "Epoch 0/-2" when the run is bounded by ``max_steps``
      (``max_epochs`` is then -1): it writes "Epoch 0" instead;
    * W&B warns "git root <save_dir> does not exist" when its directory is made after ``init``:
      the loggers' save directories are made first;
    * W&B warns "The anonymous setting has no effect" for Lightning's unset ``anonymous``: dropped."""
    from pathlib import Path

    from lightning.pytorch.callbacks import RichProgressBar

    bar = getattr(trainer, "progress_bar_callback", None)
    if isinstance(bar, RichProgressBar):
        describe = bar._get_train_description

        def without_unknown_total(current_epoch: int) -> str:
            text = describe(current_epoch)
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                text = text.replace(f"Epoch {current_epoch}/{(trainer.max_epochs or 0) - 1}", f"Epoch {current_epoch}")
            return text

        bar._get_train_description = without_unknown_total
    from lightning_scale.loggers import drop_unset_anonymous

    for logger in trainer.loggers:
        drop_unset_anonymous(logger)  # no "The anonymous setting has no effect" from wandb
        save_dir = getattr(logger, "save_dir", None)
        if save_dir and trainer.is_global_zero:
            Path(save_dir).mkdir(parents=True, exist_ok=True)


def _take_price_options(argv: list[str]) -> list[str]:
    """``--prices FILE`` (YAML/JSON/CSV rows) and ``--gpu-rates "H100 SXM=2.1; A100 (80 GB)=1.2"``:
    your prices for CostReporter, as one option each. They are passed on as the environment
    variables the price table reads (``LIGHTNING_SCALE_GPU_PRICES`` / ``LIGHTNING_SCALE_GPU_RATES``),
    so every rank and every CostReporter of the run sees them; removed from what LightningCLI parses."""
    import os

    from lightning_scale.core.prices import ENV_VAR, RATES_ENV_VAR, parse_rates

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag, env in (("--prices", ENV_VAR), ("--gpu-rates", RATES_ENV_VAR)):
            if arg == flag or arg.startswith(flag + "="):
                value = arg.split("=", 1)[1] if "=" in arg and arg.startswith(flag + "=") else None
                if value is None:
                    if i + 1 >= len(argv):
                        raise SystemExit(f"lightning-scale: {flag} needs a value")
                    value = argv[i + 1]
                    i += 1
                if flag == "--gpu-rates":
                    try:
                        parse_rates(value)
                    except ValueError as err:
                        raise SystemExit(f"lightning-scale: {err}") from None
                os.environ[env] = value
                break
        else:
            out.append(arg)
        i += 1
    return out


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-scale``. ``args`` defaults to ``sys.argv[1:]``.

    ``lightning-scale plan ...`` runs the memory planner (:mod:`lightning_scale.plan_cli`);
    every other subcommand is LightningCLI's.
    """
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    argv = _take_price_options(argv)
    # `class_path: my_module.MyTask` in a recipe names a module of the project you run from, as
    # `python -m` would find it (the console script's own directory is on sys.path, not yours).
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        # LightningCLI's help lists its own subcommands; the planner is ours.
        print("lightning-scale plan ...    predict per-device memory and the layouts that fit (lightning-scale plan --help)\n"
              "lightning-scale fit ... [--gpu-rates 'H100 SXM=2.1; ...'] [--prices FILE]    your GPU prices for "
              "CostReporter\n")
    if argv[:1] == ["plan"]:
        from lightning_scale.plan_cli import main as plan_main

        raise SystemExit(plan_main(argv[1:]))
    if args is None and argv != sys.argv[1:]:
        sys.argv = [sys.argv[0], *argv]  # the price options were taken out; LightningCLI reads the rest
    # W&B: without an API key (or with WANDB_MODE unset on a machine without network) log
    # offline instead of prompting for a login.
    configure_offline_if_needed()
    ScaleCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # None: LightningCLI reads sys.argv itself (passing both warns that one may be a mistake).
        args=None if args is None else argv,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
