"""The ``ntrk`` command: a LightningCLI driven by YAML in ``configs/``.

    ntrk fit -c configs/digits_unet_fit.yaml
    ntrk fit -c configs/digits_classifier_fit.yaml --trainer.max_epochs 10

Models and data modules are given by ``class_path`` (``subclass_mode_model=True``,
``subclass_mode_data=True``), so any importable LightningModule / LightningDataModule works.

Extension points for later subcommands (``predict``, ``evaluate``, ``report``):

* add the name to :meth:`NTRKCLI.subcommands` (and, for a custom one, a method of that name on a
  ``Trainer`` subclass passed as ``trainer_class``);
* add top-level options such as ``--output_dir`` in :meth:`NTRKCLI.add_arguments_to_parser` and
  link them to model/data/trainer arguments there.

``SaveConfigCallback`` runs with ``overwrite=True``: a rerun (or a requeued job) in the same
folder rewrites ``config.yaml`` instead of refusing to start.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class NTRKCLI(LightningCLI):
    """LightningCLI with the project's subcommands and defaults."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Subcommand name -> Trainer-method arguments that are skipped in the parser."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Hook for project-wide options (e.g. a future ``--output_dir``)."""


def build_cli(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> NTRKCLI:
    """Construct the CLI (exposed for tests: ``build_cli(["fit", "-c", path])``)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("parser_kwargs", {"description": "ntrk-lightning: NTRK reward alignment, training and evaluation"})
    return NTRKCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        **kwargs,
    )


def main() -> None:
    """Console entry point ``ntrk``."""
    build_cli()


if __name__ == "__main__":  # python -m ntrk_lightning.cli fit -c ...
    main()
