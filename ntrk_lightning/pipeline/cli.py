"""LightningCLI for ``ntrk predict`` and ``ntrk fit``.

Models and data modules are given by ``class_path`` (``subclass_mode_model=True``): ``predict``
configs use :class:`~ntrk_lightning.pipeline.GenerationModule` with
:class:`~ntrk_lightning.pipeline.PromptDataModule`; ``fit`` configs the training modules of
:mod:`ntrk_lightning.training`.

Project defaults (PITFALLS.md says why):

* ``--output_dir`` (top level) sets the generation module's output folder and the trainer's
  ``default_root_dir``, where ``config.yaml`` is written; ``SaveConfigCallback`` overwrites it, so
  a rerun or a requeued job does not refuse to start;
* ``inference_mode=False``: reward gradients need autograd inside ``predict_step``;
* predictions are not kept in memory (``return_predictions=False``): the writer saves every batch;
* under Slurm the cluster environment never requeues by itself (``auto_requeue=False``): requeue
  is the batch script's job, and resumption comes from the output folder, not a checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class NTRKCLI(LightningCLI):
    """LightningCLI with the project's subcommands and defaults."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "predict": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=Optional[str], default=None,
                            help="predict: folder for images, records.jsonl, metrics.json, report.md and "
                                 "config.yaml (a rerun skips what it holds)")
        if "return_predictions" in {a.dest for a in parser._actions}:
            parser.set_defaults(return_predictions=False)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        out = cfg.get("output_dir")
        if self.subcommand == "predict":
            init = cfg["model"].get("init_args") if hasattr(cfg["model"], "get") else None
            if out is None and init is not None:
                out = init.get("output_dir")
            if out is None:
                self.parser.error("predict needs an output folder: --output_dir DIR")
            if init is not None and "output_dir" in init:
                init["output_dir"] = out
            cfg["trainer"]["default_root_dir"] = out
            if cfg["trainer"].get("inference_mode", False):
                self.parser.error("trainer.inference_mode must be false for predict: reward guidance needs "
                                  "autograd inside predict_step (PITFALLS: inference mode kills gradients)")

    def instantiate_classes(self) -> None:
        """Instantiate, turning configuration errors raised by our classes into one clear line.

        jsonargparse wraps an error raised inside a class's ``__init__`` into a long "does not
        validate against any of the Union subtypes" message; the user needs only our message."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(_config_error(e)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from lightning.fabric.plugins.environments import SLURMEnvironment
        from lightning.pytorch.plugins.environments import ClusterEnvironment

        if SLURMEnvironment.detect():
            plugins = self.config_init[self.subcommand]["trainer"].get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, ClusterEnvironment) for p in plugins):
                from lightning.pytorch.plugins.environments import SLURMEnvironment as PLSlurm

                kwargs.setdefault("plugins", [])
                kwargs["plugins"] = list(kwargs["plugins"]) + [PLSlurm(auto_requeue=False)]
        return super().instantiate_trainer(**kwargs)


def build_cli(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> NTRKCLI:
    """Construct (and by default run) the CLI; ``args`` include the subcommand."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("parser_kwargs", {"description": "ntrk-lightning: NTRK reward alignment of diffusion models"})
    kwargs.setdefault("trainer_defaults", {"inference_mode": False, "callbacks": [RichProgressBar(leave=True)]})
    return NTRKCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   args=args, run=run, **kwargs)


def _config_error(e: BaseException) -> str:
    """The most specific message in an exception chain, as ``ntrk: error: ...``."""
    msgs = []
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        msgs.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    inner = msgs[-1]
    # jsonargparse lists the failures of each union member as "  - <message>"
    for text in msgs:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
                inner = line[2:]
                break
    return f"ntrk: error: {inner}"
