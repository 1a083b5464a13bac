"""What ``ntrk`` prints: no library noise, per-step progress on a terminal, a summary at the end.

* :func:`quiet_library_noise` silences the messages that libraries print at every run and that say
  nothing about the user's job. Each filter names one message, its category and the module that
  emits it; everything else (our warnings, a library's warnings about real problems) still shows.
* :class:`StepProgress` adds a second line under Lightning's rich progress bar that moves with
  every reverse step of the current arm (an SD batch can take minutes per progress-bar tick). It
  is active only when the bar draws to a terminal.
* :func:`summary_table` renders ``metrics.json`` as one compact table (a row per arm: guidance
  reward mean +- standard error, held-out rewards, NFE, FID, seconds per sample) for the end of
  ``ntrk predict``, followed by the path of the report.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl

# ---------------------------------------------------------------------------------------------
# Library noise
# ---------------------------------------------------------------------------------------------

#: Lightning's advertisement, logged at INFO on every Trainer construction without a LitLogger
_LIGHTNING_TIP = "💡 Tip:"
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def quiet_library_noise() -> None:
    """Install the narrow filters. Idempotent: the logging filter is added once, and re-adding an
    identical warnings filter only moves it to the front (so a caller's ``catch_warnings`` block,
    e.g. pytest's per test, gets it again)."""
    log = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropLightningTip) for f in log.filters):
        log.addFilter(_DropLightningTip())
    # Lightning 2.6's pytree helper builds a `LeafSpec`, which torch >= 2.10 deprecates; the
    # message is about Lightning's code, raised at the first batch transfer of every run.
    warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Printed on any machine where Slurm's client is installed, even for a local run; under Slurm the
    # project's batch script (scripts/slurm/predict.sbatch) launches `ntrk` through srun itself.
    warnings.filterwarnings("ignore", message=re.escape("The `srun` command is available on your system but is not used"),
                            module=r"lightning\.fabric\.plugins\.environments\.slurm")


# ---------------------------------------------------------------------------------------------
# Per-step progress
# ---------------------------------------------------------------------------------------------

class StepProgress(pl.Callback):
    """A rich task under Lightning's ``RichProgressBar`` that advances with every reverse step.

    The generation module hands :attr:`callback` (``None`` when inactive) to
    :func:`ntrk_lightning.sample` as its per-step ``callback``; a step reports
    ``{"step": i, "num_steps": S, ...}``. Active only on global rank zero, with a
    ``RichProgressBar`` whose console is a terminal (a log file gets no per-step lines).
    """

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Optional[int] = None
        self._label = ""

    @staticmethod
    def _rich_progress(trainer: pl.Trainer) -> Any:
        from lightning.pytorch.callbacks import RichProgressBar

        bar = trainer.progress_bar_callback
        if not isinstance(bar, RichProgressBar) or not trainer.is_global_zero:
            return None
        progress = getattr(bar, "progress", None)
        if progress is None or not progress.console.is_terminal:
            return None
        return progress

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._progress = self._rich_progress(trainer)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._remove_task()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_task()
        self._progress = None

    def _remove_task(self) -> None:
        if self._progress is not None and self._task is not None:
            try:
                self._progress.remove_task(self._task)
            except KeyError:
                pass
        self._task = None

    def for_arm(self, arm: str, num_steps: int) -> Optional[Callable[[dict[str, Any]], None]]:
        """The per-step callback for the next ``sample()`` call of ``arm`` with ``num_steps``
        reverse steps (``None``: inactive)."""
        if self._progress is None:
            return None
        self._remove_task()
        self._label = arm
        self._task = self._progress.add_task(f"  {arm}: steps", total=max(1, int(num_steps)))
        return self._on_step

    def _on_step(self, info: dict[str, Any]) -> None:
        if self._progress is None or self._task is None:
            return
        kw = {"total": int(info["num_steps"])} if info.get("num_steps") else {}
        self._progress.update(self._task, completed=int(info.get("step", 0)) + 1, **kw)


def step_callback(trainer: Optional[pl.Trainer], arm: str,
                  num_steps: int) -> Optional[Callable[[dict[str, Any]], None]]:
    """The per-step callback of the trainer's :class:`StepProgress` for ``arm`` (or ``None``)."""
    if trainer is None:
        return None
    for cb in trainer.callbacks:
        if isinstance(cb, StepProgress):
            return cb.for_arm(arm, num_steps)
    return None


# ---------------------------------------------------------------------------------------------
# End-of-run summary
# ---------------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{v:.{digits}g}" if abs(v) >= 1000 or abs(v) < 0.01 else f"{v:.{digits}f}".rstrip("0").rstrip(".")


def mean_se(stats: Optional[dict[str, Any]]) -> str:
    """``mean ± se`` from a RewardStatistics summary (population std and count)."""
    if not stats or stats.get("mean") is None:
        return "-"
    mean, std, n = stats.get("mean"), stats.get("std"), int(stats.get("count") or 0)
    if std is None or n < 2:
        return f"{mean:.3f}"
    se = float(std) / math.sqrt(n - 1)  # sample std / sqrt(n), as the report computes it
    return f"{mean:.3f} ± {se:.3f}"


def _held_out(metrics: dict[str, Any]) -> list[str]:
    primary = metrics.get("primary_reward") or "reward"
    names: list[str] = []
    for arm in (metrics.get("arms") or {}).values():
        for name in (arm.get("rewards") or {}):
            if name != primary and name not in names:
                names.append(name)
    return names


def summary_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per arm of the summary table."""
    arms: dict[str, Any] = metrics.get("arms") or {}
    primary = metrics.get("primary_reward") or "reward"
    held_out = _held_out(metrics)
    show_fid = any(a.get("fid") is not None for a in arms.values())
    header = ["arm", "n", f"{primary} (mean ± se)", *held_out, "NFE", *(["FID"] if show_fid else []), "s/sample"]
    rows = []
    for name, a in arms.items():
        rewards = a.get("rewards") or {}
        row = [name, _fmt(a.get("num_samples")), mean_se(rewards.get(primary)),
               *[mean_se(rewards.get(h)) for h in held_out], _fmt(a.get("nfe_per_sample")),
               *([_fmt(a.get("fid"))] if show_fid else []), _fmt(a.get("seconds_per_sample"))]
        rows.append(row)
    return header, rows


def summary_table(metrics: dict[str, Any], report: Optional[Path] = None) -> str:
    """The end-of-run summary: an aligned plain-text table (no colours, so logs stay readable)."""
    header, rows = summary_rows(metrics)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    primary = metrics.get("primary_reward") or "reward"
    held_out = _held_out(metrics)
    title = f"run {metrics.get('run', '?')}: guidance reward {primary!r}"
    if held_out:
        title += f"; held-out rewards {', '.join(held_out)}"
    out = [title, line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    if report is not None:
        out.append(f"report: {report}")
    return "\n".join(out)


def print_run_summary(output_dir: Path, print_fn: Callable[[str], None] = print) -> bool:
    """Print the summary of the run in ``output_dir`` (``False`` if it has no ``metrics.json``)."""
    import json

    from ntrk_lightning.pipeline import layout

    path = Path(output_dir) / layout.METRICS
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    report = Path(output_dir) / layout.REPORT
    print_fn(summary_table(metrics, report if report.is_file() else None))
    return True
