"""``--trainer.logger``: ``ntrk predict`` and ``ntrk evaluate`` send the final metrics of every arm
(and the sample grid, where the logger takes images) to Lightning's loggers. Checked with the
CSV logger and a real TensorBoard event file, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_utils import MAIN_CONFIG, run_in_process

TINY = ["--data.init_args.samples_per_prompt", "4", "--data.init_args.batch_size", "4",
        "--model.init_args.num_steps", "3", "--trainer.accelerator", "cpu"]


def _csv_rows(save_dir: Path) -> list[dict[str, str]]:
    files = sorted(save_dir.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        return list(csv.DictReader(f))


def _csv_metric(rows: list[dict[str, str]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert len(vals) == 1, (key, vals)
    return vals[0]


def test_flat_metrics_keys_and_standard_error():
    from ntrk_lightning.pipeline.loggers import flat_metrics

    m = {"arms": {
        "ntrk": {"rewards": {"reward": {"mean": 2.0, "std": 3.0, "q50": 1.5, "count": 10},
                             "judge": {"mean": float("nan"), "std": None, "count": 0}},
                 "fid": 12.5, "diversity": {"overall": 0.25, "per_group": {}}, "clip_score": None,
                 "nfe_per_sample": 25.0, "seconds_per_sample": 0.5, "num_samples": 10},
        "plain": {"rewards": {"reward": {"mean": -1.0, "std": 0.0, "count": 1}}, "fid": float("inf")}}}
    flat = flat_metrics(m)
    assert flat["ntrk/reward_mean"] == 2.0 and flat["ntrk/reward_median"] == 1.5
    assert math.isclose(flat["ntrk/reward_se"], 3.0 / 3.0)  # population std 3 over n=10: se = 3/sqrt(9)
    assert flat["ntrk/fid"] == 12.5 and flat["ntrk/diversity"] == 0.25 and flat["ntrk/nfe_per_sample"] == 25.0
    assert "ntrk/clip_score" not in flat and "ntrk/judge_mean" not in flat  # missing / NaN: left out
    assert "plain/fid" not in flat and "plain/reward_se" not in flat  # inf; one sample has no se
    assert flat["plain/reward_mean"] == -1.0


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One tiny main-job run logging to a CSVLogger and a TensorBoardLogger at once."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("logged")
    out, csv_dir, tb_dir = root / "run", root / "csv", root / "tb"
    loggers = json.dumps([
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(csv_dir)}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tb_dir)}}])
    run_in_process(["predict", "-c", str(MAIN_CONFIG), "--output_dir", str(out), *TINY,
                    "--trainer.logger", loggers])
    return out, csv_dir, tb_dir


@pytest.mark.slow
def test_predict_sends_final_metrics_per_arm_to_csv_logger(logged_run):
    out, csv_dir, _ = logged_run
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _csv_rows(csv_dir)
    for arm, a in metrics["arms"].items():
        for name, stats in a["rewards"].items():
            assert math.isclose(_csv_metric(rows, f"{arm}/{name}_mean"), stats["mean"], rel_tol=1e-6)
        assert _csv_metric(rows, f"{arm}/nfe_per_sample") == a["nfe_per_sample"]
        if a.get("fid") is not None:
            assert math.isclose(_csv_metric(rows, f"{arm}/fid"), a["fid"], rel_tol=1e-6)


@pytest.mark.slow
def test_predict_sends_metrics_and_sample_grid_to_tensorboard(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, tb_dir = logged_run
    metrics = json.loads((out / "metrics.json").read_text())
    events = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for arm, a in metrics["arms"].items():
        (ev,) = acc.Scalars(f"{arm}/reward_mean")
        assert math.isclose(ev.value, a["rewards"]["reward"]["mean"], rel_tol=1e-5)
    assert "samples" in tags["images"]
    (img,) = acc.Images("samples")
    grid = np.asarray(Image.open(out / "report_grid.png").convert("RGB"))
    assert (img.height, img.width) == grid.shape[:2]


@pytest.mark.slow
def test_evaluate_sends_final_metrics_to_csv_logger(logged_run, tmp_path):
    run_dir = logged_run[0]
    csv_dir = tmp_path / "csv"
    from ntrk_lightning.cli import main

    code = main(["evaluate", "--images", str(run_dir), "--feature", "digits", "--output_dir", str(tmp_path / "eval"),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(csv_dir)])
    assert code == 0
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = _csv_rows(csv_dir)
    assert set(ev["arms"]) == {"ntrk", "plain"}
    for arm, a in ev["arms"].items():
        assert a["num_samples"] == 4
        assert _csv_metric(rows, f"{arm}/num_samples") == 4
        assert math.isclose(_csv_metric(rows, f"{arm}/diversity"), a["diversity"], rel_tol=1e-6)


def test_image_dispatch_by_logger_kind_without_importing_optional_packages():
    """W&B and MLflow are optional: the logger kind is recognised by class name, and each kind
    gets its own image call (stand-ins record the calls)."""
    from ntrk_lightning.pipeline.loggers import log_run

    calls: list[tuple] = []

    class Base:
        def log_metrics(self, metrics, step=None):
            calls.append((type(self).__name__, "metrics", sorted(metrics)))

        def save(self):
            calls.append((type(self).__name__, "save"))

    class WandbLogger(Base):
        def log_image(self, key, images):
            calls.append(("WandbLogger", "image", key, images[0].shape))

    class _Client:
        def log_image(self, run_id, image, artifact_file):
            calls.append(("MLFlowLogger", "image", run_id, artifact_file, image.shape))

    class MLFlowLogger(Base):
        experiment, run_id = _Client(), "run-1"

    class CSVLike(Base):
        pass

    grid = np.zeros((6, 10, 3), dtype=np.uint8)
    metrics = {"arms": {"a": {"rewards": {"reward": {"mean": 1.0, "std": 1.0, "count": 5}}}}}
    log_run([WandbLogger(), MLFlowLogger(), CSVLike()], metrics, grid)
    assert ("WandbLogger", "image", "samples", (6, 10, 3)) in calls
    assert ("MLFlowLogger", "image", "run-1", "samples.png", (6, 10, 3)) in calls
    assert not any(c[0] == "CSVLike" and c[1] == "image" for c in calls)
    for kind in ("WandbLogger", "MLFlowLogger", "CSVLike"):
        assert (kind, "metrics", ["a/reward_mean", "a/reward_se", "a/reward_std"]) in calls
        assert (kind, "save") in calls
