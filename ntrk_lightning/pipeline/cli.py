"""LightningCLI for ``ntrk predict`` and ``ntrk fit``.

Models and data modules are given by ``class_path`` (``subclass_mode_model=True``): ``predict``
configs use :class:`~ntrk_lightning.pipeline.GenerationModule` with
:class:`~ntrk_lightning.pipeline.PromptDataModule`; ``fit`` configs the training modules of
:mod:`ntrk_lightning.training`.

Project defaults, each with the reason:

* ``--output_dir`` (top level) sets the run folder, else the generation module's own
  ``output_dir`` option does; it reaches the module and the data module as parse-time links
  (:func:`link_generation`) and the trainer's ``default_root_dir``, where ``config.yaml`` is
  written; ``SaveConfigCallback`` overwrites it, so a rerun or a requeued job does not refuse to
  start;
* the data module's arms are the keys of the module's ``samplers``, linked at parse time too:
  neither class reads the other;
* ``inference_mode=False``: reward gradients need autograd inside ``predict_step``;
* predictions are not kept in memory (``return_predictions=False``): the writer saves every batch;
* under Slurm the cluster environment never requeues by itself (``auto_requeue=False``): requeue
  is the batch script's job, and resumption comes from the output folder, not a checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

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

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:  # ``run=False``: one parser, a predict config given without subcommand
            link_generation(self.parser)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # add_arguments_to_parser runs before the subcommand's own arguments exist and is not told
        # which subcommand it serves: the predict-only defaults and links are added here
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.set_defaults(return_predictions=False)
            link_generation(parser)
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; a parse error is one line (jsonargparse prints the usage screen and a nested
        report of every union member, dozens of lines for an unknown ``class_path``)."""
        def one_line(_parser: Any, message: str) -> None:
            raise SystemExit(f"ntrk: error: {parse_error_line(message)}")

        for p in [parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            p._error_handler = one_line
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        if self.subcommand == "predict":
            out = run_folder(cfg.get("output_dir"), cfg.get("model"))  # what the links gave
            if out is None:
                self.parser.error("predict needs an output folder: --output_dir DIR")
            if not str(out).strip():
                raise SystemExit("ntrk: error: --output_dir is empty: give a folder (use . for the current one)")
            # the saved config.yaml leaves link targets out: the top-level option keeps the folder
            cfg["output_dir"] = out
            cfg["trainer"]["default_root_dir"] = out
            if cfg["trainer"].get("inference_mode", False):
                self.parser.error("trainer.inference_mode must be false for predict: reward guidance needs "
                                  "autograd inside predict_step (inference mode kills gradients)")

    def instantiate_classes(self) -> None:
        """Instantiate, turning configuration errors raised by our classes into one clear line.

        jsonargparse wraps an error raised inside a class's ``__init__`` into a long "does not
        validate against any of the Union subtypes" message; the user needs only our message."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(_config_error(e)) from None
        if hasattr(self.datamodule, "fingerprint") and hasattr(self.model, "samplers"):
            self._link_generation()

    def _link_generation(self) -> None:
        """Hand the prompt data module the model's part of the run fingerprint: a callable that
        rank 0 evaluates once it holds the folder's lock (it hashes the weight files the built
        backbone and rewards resolved). It is a function of the instantiated model, not a value
        of the configuration, so no parse-time link can carry it, and an ``apply_on="instantiate"``
        link into a subcommand's data module is not applied by LightningCLI; the arms and the run
        folder, which are configuration, travel as parse-time links (:func:`link_generation`)."""
        from functools import partial

        from ntrk_lightning.pipeline.run import model_fingerprint

        model_cfg = (self.config[self.subcommand] if self.subcommand else self.config)["model"]
        self.datamodule.fingerprint = partial(model_fingerprint, self.model, _component_specs(model_cfg))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run; problems with the run folder or the weights found on the way (a lock held by
        another run, a changed configuration, a corrupt weights file, every sample failed) end
        as one line, and this process's lock on the run folder is released however it ends."""
        from ntrk_lightning.fileio import WeightsFileError
        from ntrk_lightning.pipeline.run import RunFolderError, release_all

        try:
            super()._run_subcommand(subcommand)
        except (RunFolderError, WeightsFileError) as e:
            raise SystemExit(f"ntrk: error: {str(e).strip().splitlines()[0]}") from None
        finally:
            release_all()

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


def link_generation(parser: LightningArgumentParser) -> None:
    """Link, at parse time, what the prompt data module needs from the generation module's
    configuration: its arms (the keys of ``model.init_args.samplers``) and the run folder
    (``--output_dir``, else ``model.init_args.output_dir``; the module gets the same one).

    A link whose source is missing (a model without ``samplers``) or whose target is missing (a
    data module without ``arms``/``output_dir``, a model without ``output_dir``) is skipped by
    jsonargparse. The linked values are dropped from the saved ``config.yaml`` and recomputed on
    a rerun with it."""
    parser.link_arguments(("output_dir", "model"), "model.init_args.output_dir", compute_fn=run_folder,
                          apply_on="parse")
    parser.link_arguments(("output_dir", "model"), "data.init_args.output_dir", compute_fn=run_folder,
                          apply_on="parse")
    # the target is also a source, so that a value the user set there is seen (and refused)
    parser.link_arguments(("model.init_args.samplers", "data.init_args.arms"), "data.init_args.arms",
                          compute_fn=arm_names, apply_on="parse")


def run_folder(output_dir: Optional[str], model: Any) -> Optional[str]:
    """The run folder: ``--output_dir`` wins over the generation module's own ``output_dir``."""
    if output_dir is not None:
        return output_dir
    init = getattr(model, "init_args", None)
    return getattr(init, "output_dir", None)


class LinkedOptionError(ValueError):
    """A configuration sets an option that the CLI derives from another one."""


def arm_names(samplers: Any, given: Optional[list[str]] = None) -> Optional[list[str]]:
    """The data module's arms: the names of the generation module's samplers, in their order.
    ``given`` (what the configuration itself put in ``data.init_args.arms``) must be unset or
    the same names; a non-mapping ``samplers`` is left for the module to refuse by itself."""
    if not isinstance(samplers, dict):
        return given
    arms = [str(name) for name in samplers]
    if given is not None and list(given) != arms:
        raise LinkedOptionError(f"data.init_args.arms is set from model.init_args.samplers ({arms}); "
                                f"remove it from the configuration (it gives {list(given)})")
    return arms


def build_cli(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> NTRKCLI:
    """Construct (and by default run) the CLI; ``args`` include the subcommand."""
    install_yaml_bounds()
    check_config_files(sys.argv[1:] if args is None else args)
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


def _component_specs(model_cfg: Any) -> dict[str, Any]:
    """class_path + init_args of the backbone and rewards as parsed (for the run fingerprint)."""
    cfg = model_cfg.as_dict() if hasattr(model_cfg, "as_dict") else dict(model_cfg)
    init = cfg.get("init_args") or {}
    return {"backbone": init.get("backbone"), "reward": init.get("reward"),
            "eval_rewards": init.get("eval_rewards") or {}}


# ---------------------------------------------------------------------------------------------
# Config files: bounded YAML, one-line errors for empty or malformed files
# ---------------------------------------------------------------------------------------------

#: most YAML nodes a config may expand to once aliases are followed (the shipped configs have
#: about a hundred; an "alias bomb" of a few hundred bytes expands to billions)
MAX_YAML_NODES = 100_000


class ConfigBoundError(ValueError):
    """A config whose aliases expand beyond :data:`MAX_YAML_NODES`, or that refers to itself."""


def _check_expansion(root: Any, limit: int = MAX_YAML_NODES) -> int:
    """Count the nodes of a composed YAML document with every alias expanded, without expanding:
    each distinct node is sized once (memo), so a bomb is measured in microseconds."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    visiting: set[int] = set()
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if nid in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for kv in node.value for x in kv]
        else:
            sizes[nid] = 1
            continue
        if done:
            visiting.discard(nid)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > limit:
                raise ConfigBoundError(f"expands to more than {limit} values once its aliases (*name) are "
                                       "followed (an alias bomb?)")
            sizes[nid] = total
            continue
        if nid in visiting:
            raise ConfigBoundError("refers to itself through an alias")
        visiting.add(nid)
        stack.append((node, True))
        for c in children:
            if id(c) not in sizes:
                if id(c) in visiting:
                    raise ConfigBoundError("refers to itself through an alias")
                stack.append((c, False))
    return sizes.get(id(root), 0)


def bounded_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader, refusing alias expansion beyond :data:`MAX_YAML_NODES`."""
    from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

    if isinstance(stream, str) and "*" in stream:  # without '*' there are no aliases to expand
        import yaml

        node = yaml.compose(stream, Loader=get_yaml_default_loader())
        if node is not None:
            _check_expansion(node)
    return yaml_load(stream)


def install_yaml_bounds() -> None:
    """Make every YAML value jsonargparse loads (config files, inline values) bounded."""
    import yaml
    from jsonargparse import set_loader

    set_loader("yaml", bounded_yaml_load, exceptions=(yaml.YAMLError,))


def check_config_files(argv: Sequence[str], prog: str = "ntrk") -> None:
    """Read every ``-c/--config FILE`` given before LightningCLI does and refuse, in one line, a
    missing, unreadable, empty, malformed or alias-bomb file (LightningCLI's own messages for
    these are tracebacks, usage screens or "Unexpected config:")."""
    import yaml

    files = []
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    for f in files:
        p = Path(f)
        if not p.exists() and ("\n" in f or ":" in f):
            continue  # an inline YAML string, parsed (bounded) by the loader
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SystemExit(f"{prog}: error: config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"{prog}: error: cannot read config file {p}: {e}") from None
        try:
            value = bounded_yaml_load(text) if text.strip() else None
        except ConfigBoundError as e:
            raise SystemExit(f"{prog}: error: config file {p} {e}") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SystemExit(f"{prog}: error: config file {p} is not valid YAML{line}: {problem}") from None
        if value is None or (isinstance(value, str) and not value.strip()):
            raise SystemExit(f"{prog}: error: config file {p} is empty (see configs/ for examples)")
        if not isinstance(value, dict):
            raise SystemExit(f"{prog}: error: config file {p} must be a YAML mapping of options, "
                             f"found a {type(value).__name__}")


_STRUCTURAL = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
               "Expected a <class 'NoneType'>")


def parse_error_line(message: str) -> str:
    """One line from jsonargparse's nested parse error: the option path, the innermost reason
    and the class_path it concerns."""
    import re

    # a link's compute function that refused its sources (e.g. arm_names): its reason alone,
    # without jsonargparse's dump of every source value
    message = re.sub(r"Call to compute_fn of link '.*?' with args \(.*\) failed: ", "", str(message), flags=re.S)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "invalid arguments"
    keys: list[str] = []
    cls = None
    reason = None
    for ln in lines:
        m = re.match(r'^(?:- )?Parser key "([^"]+)"', ln)
        if m:
            keys.append(m.group(1))
            continue
        m = re.match(r"^(?:- )?Problem with given class_path '([^']+)'", ln)
        if m:
            cls = m.group(1)
            continue
        if ln.startswith(_STRUCTURAL) or ln.lstrip("- ").startswith(_STRUCTURAL):
            continue
        reason = ln[2:] if ln.startswith("- ") else ln
        if not reason.startswith("Parser key"):
            break
    reason = reason or lines[0]
    where = ".".join(dict.fromkeys(keys))
    text = f"{where}: {reason}" if where else reason
    if cls and cls not in text:
        text += f" (class_path {cls!r})"
    return text + " (see `ntrk SUBCOMMAND --help`)" if "help" not in text else text
