"""What ``ntrk predict`` prints: no library warnings or tips, a summary table per arm and the report
path at the end, and per-step progress only on a terminal."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline_utils import REPO, cli_env

TINY = ["--data.init_args.samples_per_prompt", "4", "--data.init_args.batch_size", "4",
        "--model.init_args.num_steps", "3", "--trainer.accelerator", "cpu"]


def _metrics(n_ntrk: int = 10) -> dict:
    return {"run": "r", "primary_reward": "reward", "arms": {
        "ntrk": {"num_samples": n_ntrk, "nfe_per_sample": 25.0, "seconds_per_sample": 0.05, "fid": 34.5,
                 "rewards": {"reward": {"mean": 7.5, "std": 1.5, "count": n_ntrk},
                             "judge": {"mean": 0.9, "std": 0.3, "count": n_ntrk}}},
        "plain": {"num_samples": 1, "nfe_per_sample": 25.0, "seconds_per_sample": 0.01, "fid": None,
                  "rewards": {"reward": {"mean": -0.5, "std": 0.0, "count": 1}}}}}


def test_summary_table_has_a_row_per_arm_with_mean_and_standard_error(tmp_path):
    from ntrk_lightning.pipeline.console import summary_table

    text = summary_table(_metrics(), tmp_path / "report.md")
    lines = text.splitlines()
    assert "held-out rewards judge" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["arm", "n"] and "NFE" in header and "FID" in header and header[-1] == "s/sample"
    ntrk = next(ln for ln in lines if ln.startswith("ntrk"))
    # population std 1.5 over n = 10: standard error 1.5 / sqrt(9) = 0.5
    assert "7.500 ± 0.500" in ntrk and "0.900 ± 0.100" in ntrk and "34.5" in ntrk
    plain = next(ln for ln in lines if ln.startswith("plain"))
    assert "-0.500" in plain and "±" not in plain  # one sample: no standard error
    assert plain.split()[-3:] == ["25", "-", "0.01"]  # no FID for this arm, missing held-out reward
    assert lines[-1] == f"report: {tmp_path / 'report.md'}"


def test_summary_table_drops_the_fid_column_when_no_arm_has_fid():
    from ntrk_lightning.pipeline.console import summary_table

    m = _metrics()
    m["arms"]["ntrk"]["fid"] = None
    assert "FID" not in summary_table(m)


def test_noise_filters_are_narrow():
    from ntrk_lightning.pipeline.console import _RANK_ZERO_LOGGER, quiet_library_noise

    msg = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        warnings.warn_explicit(msg, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mypackage.mine")  # other module
        warnings.warn_explicit("something else", FutureWarning, "_pytree.py", 30,
                               module="lightning.pytorch.utilities._pytree")  # other message
        warnings.warn_explicit(msg, UserWarning, "_pytree.py", 21,
                               module="lightning.pytorch.utilities._pytree")  # other category
    assert [(str(w.message)[:14], w.category.__name__) for w in caught] == [
        (msg[:14], "FutureWarning"), ("something else", "FutureWarning"), (msg[:14], "UserWarning")]

    seen: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger(_RANK_ZERO_LOGGER)
    handler, level = ListHandler(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        quiet_library_noise()
        quiet_library_noise()  # idempotent
        log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        log.info("GPU available: False, used: False")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert seen == ["GPU available: False, used: False"]


@pytest.mark.slow
def test_main_job_console_has_no_warnings_or_tips_and_ends_with_the_summary(tmp_path):
    """The real command in a subprocess, run by config name from a directory outside the repository."""
    out = tmp_path / "out"
    env = {**cli_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ntrk_lightning.cli", "predict", "-c", "digits_ntrk",
                           "--output_dir", str(out), *TINY], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    noisy = [ln for ln in console.splitlines()
             if re.search(r"warning|tip:|deprecat|casting directly", ln, flags=re.I)]
    assert not noisy, "\n".join(noisy)
    assert "steps" not in console  # per-step progress is for terminals only

    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == f"report: {out / 'report.md'}" and (out / "report.md").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    for arm, a in metrics["arms"].items():
        (row,) = [ln for ln in lines if ln.split()[:1] == [arm]]
        cells = re.findall(r"(-?\d+\.\d+) ± (\d+\.\d+)", row)
        r = a["rewards"]["reward"]
        assert math.isclose(float(cells[0][0]), r["mean"], abs_tol=6e-4)
        assert math.isclose(float(cells[0][1]), r["std"] / math.sqrt(r["count"] - 1), abs_tol=6e-4)
        assert len(cells) == 3  # guidance reward + the two held-out judges
        assert row.split()[1] == "4"


def _run_with_bar(tmp_path: Path, terminal: bool, monkeypatch) -> list[tuple[str, int, int]]:
    """A tiny run with a RichProgressBar drawing to a (fake) terminal or a plain file; returns
    (arm, completed, total) of the step task after every step callback."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar

    from ntrk_lightning.pipeline import console
    from ntrk_lightning.pipeline.cli import build_cli

    seen: list[tuple[str, int, int]] = []
    original = console.StepProgress._on_step

    def recording(self, info):
        original(self, info)
        task = next(t for t in self._progress.tasks if t.id == self._task)
        seen.append((self._label, int(task.completed), int(task.total)))

    monkeypatch.setattr(console.StepProgress, "_on_step", recording)
    cli = build_cli(["-c", str(REPO / "configs" / "digits_ntrk.yaml"), "--model.init_args.output_dir",
                     str(tmp_path / "out"), *TINY, "--model.init_args.num_steps", "4",
                     "--model.init_args.report", "false"], run=False)
    bar = RichProgressBar(console_kwargs={"force_terminal": terminal, "file": io.StringIO(), "width": 120})
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, inference_mode=False, callbacks=[bar],
                      default_root_dir=str(tmp_path / "out"), enable_model_summary=False)
    trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return seen


@pytest.mark.slow
def test_per_step_progress_on_a_terminal(tmp_path, monkeypatch):
    seen = _run_with_bar(tmp_path, True, monkeypatch)
    for arm in ("ntrk", "plain"):
        assert [(c, t) for a, c, t in seen if a == arm] == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.slow
def test_no_per_step_progress_without_a_terminal(tmp_path, monkeypatch):
    assert _run_with_bar(tmp_path, False, monkeypatch) == []
