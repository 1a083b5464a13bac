"""The ``ntrk`` command.

    ntrk predict  -c configs/digits_ntrk.yaml --output_dir outputs/digits_ntrk   generate + metrics + report
    ntrk fit      -c configs/digits_unet_fit.yaml                                 train the shipped digits models
    ntrk evaluate --images DIR [--reference DIR] ...                              metrics of any image folder
    ntrk report   RUN_DIR [RUN_DIR ...] --out DIR                                 compare runs side by side
    ntrk configs  [--copy NAME DIR]                                               the shipped configs
    ntrk samplers                                                                 every sampler and its options

``predict`` and ``fit`` are a LightningCLI (YAML configs in ``configs/``, ``class_path`` models and
data modules, every ``--trainer.*`` flag); ``-c NAME`` (a bare name such as ``digits_ntrk`` that is
not a file) runs a shipped config from any directory; ``evaluate`` is a LightningCLI of its own (images in,
metrics out, DDP like predict); ``report`` only reads files and needs no Lightning.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

USAGE = """usage: ntrk {predict,fit,evaluate,report,configs,samplers} ...

  predict   generate samples with a sampler (NTRK or a baseline), write images, records, metrics, report
  fit       train a model from a config (the shipped digits diffusion model and classifiers)
  evaluate  compute metrics (rewards, FID, CLIP score, diversity) of a folder of images
  report    one Markdown/JSON report comparing run folders, with plots and image grids
  configs   list the shipped configs (`ntrk predict -c NAME` runs one from any directory);
            `ntrk configs --copy NAME DIR` writes one out for editing
  samplers  every registered sampler with its options, defaults, NFE formula and source

Run `ntrk SUBCOMMAND --help` for the options of each.
"""


def main(argv: Optional[list[str]] = None) -> Any:
    """Console entry point ``ntrk``."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Nothing must reach for a model hub at run time: weights come from local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "configs":
        return configs_main(rest)
    if cmd == "samplers":
        return samplers_main(rest)
    if cmd == "report":
        from ntrk_lightning.report import main as report_main

        return report_main(rest)
    if cmd == "evaluate":
        from ntrk_lightning.evaluation import main as evaluate_main
        from ntrk_lightning.pipeline.console import quiet_library_noise

        quiet_library_noise()
        return evaluate_main(rest)
    if cmd in ("predict", "fit"):
        from ntrk_lightning.builtin_configs import ConfigError

        try:
            rest = resolve_config_args(rest)
        except ConfigError as e:
            print(f"ntrk {cmd}: error: {e}", file=sys.stderr)
            return 2
        from ntrk_lightning.pipeline.cli import build_cli
        from ntrk_lightning.pipeline.console import print_run_summary, quiet_library_noise

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        quiet_library_noise()
        try:
            if argv is None:  # from the shell LightningCLI reads sys.argv itself (and warns when given both)
                sys.argv[1:] = [cmd, *rest]
                cli = build_cli(None)
            else:
                cli = build_cli([cmd, *rest])
        except SIGTERMException:
            print("ntrk: stopped by SIGTERM; finished samples are saved, rerun the same command to "
                  "complete the run", file=sys.stderr)
            return 143
        trainer = getattr(cli, "trainer", None)
        out = getattr(getattr(cli, "model", None), "output_dir", None)
        finished = trainer is not None and getattr(trainer.state, "finished", False)  # not after Ctrl-C
        if cmd == "predict" and out is not None and finished and trainer.is_global_zero:
            print_run_summary(out)
        return 0
    print(f"ntrk: unknown subcommand {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


CONFIG_FLAGS = ("-c", "--config")


def resolve_config_args(args: list[str]) -> list[str]:
    """Replace every ``-c NAME`` (a shipped config's name, not a file) by the shipped file, and add
    overrides that point the config's missing ``configs/...`` data files at the shipped ones."""
    from pathlib import Path

    from ntrk_lightning import builtin_configs as bc

    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        value: Optional[str] = None
        if a in CONFIG_FLAGS and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif any(a.startswith(f + "=") for f in CONFIG_FLAGS):
            value, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
            continue
        path = bc.resolve(value) if bc.is_config_name(value) else Path(value)
        # the config's own overrides come right after it, so later flags still win
        out += ["--config", str(path), *(bc.data_path_overrides(path) if path.is_file() else [])]
    return out


def configs_main(argv: list[str]) -> int:
    """``ntrk configs`` (list) and ``ntrk configs --copy NAME DIR``."""
    import argparse

    from ntrk_lightning import builtin_configs as bc

    parser = argparse.ArgumentParser(prog="ntrk configs", description="The configs that ship with ntrk-lightning.")
    parser.add_argument("--copy", nargs=2, metavar=("NAME", "DIR"),
                        help="write the config NAME to DIR/NAME.yaml (never overwrites)")
    ns = parser.parse_args(argv)
    if ns.copy:
        try:
            dest = bc.copy_config(ns.copy[0], ns.copy[1])
        except bc.ConfigError as e:
            print(f"ntrk configs: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {dest}; run it with: ntrk {bc._subcommand(dest)} -c {dest}"
              + (" --output_dir DIR" if bc._subcommand(dest) == "predict" else ""))
        return 0
    configs = bc.list_configs()
    width = max(len(c.name) for c in configs)
    print("Built-in configs (run one from any directory: ntrk predict -c NAME --output_dir DIR;\n"
          "write one out for editing: ntrk configs --copy NAME DIR):\n")
    for c in configs:
        print(f"  {c.name.ljust(width)}  {c.subcommand:<7}  {c.summary}")
    return 0


def samplers_main(argv: list[str]) -> int:
    """``ntrk samplers``: every registered sampler, from the specs themselves."""
    import argparse

    argparse.ArgumentParser(prog="ntrk samplers",
                            description="Every registered sampler with its options, defaults, NFE formula and "
                                        "source.").parse_args(argv)
    print(describe_all())
    return 0


def _arg_docs(doc: str) -> dict[str, str]:
    """``name -> help`` from the ``Args:`` section of a Google-style docstring (``a, b: text``
    documents both; indented lines continue the entry)."""
    import textwrap

    lines = textwrap.dedent("\n".join(doc.splitlines()[1:])).splitlines()
    out: dict[str, str] = {}
    in_args, current, indent = False, [], None
    for line in lines:
        if line.strip() == "Args:":
            in_args, indent = True, None
            continue
        if not in_args:
            continue
        if not line.strip():
            in_args = False
            continue
        ind = len(line) - len(line.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            in_args = False
            continue
        if ind == indent and ":" in line:
            names, text = line.strip().split(":", 1)
            current = [n.strip() for n in names.split(",")]
            for n in current:
                out[n] = text.strip()
        elif current:
            for n in current:
                out[n] += " " + line.strip()
    return out


def describe_sampler(cls: type) -> str:
    """One sampler's entry: registry name, class, summary, NFE formula, source and every option
    with its type, default and documentation, read from the spec class itself."""
    import dataclasses
    import inspect

    import re

    doc = inspect.getdoc(cls) or ""
    first_paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    summary = first_paragraph.split(". ", 1)[0].rstrip(".") + "." if first_paragraph else ""
    lines = [f"{cls.name}  ({cls.__module__.rsplit('.', 1)[0]}.{cls.__name__})  {summary}",
             f"    NFE per sample: {getattr(cls, 'nfe_formula', '?')}",
             f"    source: {getattr(cls, 'source', '?')}"]
    helps = _arg_docs(inspect.getdoc(cls) or "")
    hints = {}
    try:
        import typing

        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: show the raw one
        pass
    fields = [f for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        typ = hints.get(f.name, f.type)
        tname = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
        tname = re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", tname)  # module paths off
        entry = f"    {f.name}: {tname} = {default}"
        if f.name in helps:
            entry += f"  -- {helps[f.name]}"
        lines.append(entry)
    return "\n".join(lines)


def describe_all() -> str:
    """Every registered sampler (``ntrk_lightning.samplers.REGISTRY``), in registry order."""
    from ntrk_lightning.samplers import REGISTRY

    head = ("Registered samplers (configs: class_path ntrk_lightning.samplers.<Class> with these init_args; "
            "Python: ntrk_lightning.make_sampler(name, **options)).\n"
            "NFE = denoiser evaluations per returned sample with S reverse steps.\n")
    return head + "\n" + "\n\n".join(describe_sampler(cls) for cls in REGISTRY.values())


def entry() -> None:
    """``console_scripts`` wrapper: exit with main's status."""
    try:
        code = main()
    except BrokenPipeError:  # `ntrk samplers | head`
        sys.stderr.close()
        code = 0
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # python -m ntrk_lightning.cli ...
    entry()
