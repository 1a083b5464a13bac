"""The ``ntrk`` command.

    ntrk predict  -c configs/digits_ntrk.yaml --output_dir outputs/digits_ntrk   generate + metrics + report
    ntrk fit      -c configs/digits_unet_fit.yaml                                 train the shipped digits models
    ntrk evaluate --images DIR [--reference DIR] ...                              metrics of any image folder
    ntrk report   RUN_DIR [RUN_DIR ...] --out DIR                                 compare runs side by side

``predict`` and ``fit`` are a LightningCLI (YAML configs in ``configs/``, ``class_path`` models and
data modules, every ``--trainer.*`` flag); ``evaluate`` is a LightningCLI of its own (images in,
metrics out, DDP like predict); ``report`` only reads files and needs no Lightning.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

USAGE = """usage: ntrk {predict,fit,evaluate,report} ...

  predict   generate samples with a sampler (NTRK or a baseline), write images, records, metrics, report
  fit       train a model from a config (the shipped digits diffusion model and classifiers)
  evaluate  compute metrics (rewards, FID, CLIP score, diversity) of a folder of images
  report    one Markdown/JSON report comparing run folders, with plots and image grids

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
    if cmd == "report":
        from ntrk_lightning.report import main as report_main

        return report_main(rest)
    if cmd == "evaluate":
        from ntrk_lightning.evaluation import main as evaluate_main

        return evaluate_main(rest)
    if cmd in ("predict", "fit"):
        from ntrk_lightning.pipeline.cli import build_cli

        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            # From the shell, LightningCLI reads sys.argv itself (and warns when given both).
            build_cli(None if argv is None else args)
        except SIGTERMException:
            print("ntrk: stopped by SIGTERM; finished samples are saved, rerun the same command to "
                  "complete the run", file=sys.stderr)
            return 143
        return 0
    print(f"ntrk: unknown subcommand {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def entry() -> None:
    """``console_scripts`` wrapper: exit with main's status."""
    code = main()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # python -m ntrk_lightning.cli ...
    entry()
