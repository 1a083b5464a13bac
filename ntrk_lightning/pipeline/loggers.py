"""Final metrics and the sample grid of a run, sent to the trainer's loggers (``--trainer.logger``).

``ntrk predict`` and ``ntrk evaluate`` call :func:`log_run` on global rank zero after writing
``metrics.json``. Every logger receives ``log_metrics`` with one flat dict, keys ``<arm>/<metric>``
(e.g. ``ntrk/reward_mean``, ``ntrk/judge_logit_se``, ``plain/fid``, ``ntrk/nfe_per_sample``).
Loggers that take images receive the sample grid as well:

* TensorBoard (``TensorBoardLogger``): ``SummaryWriter.add_image("samples", grid, dataformats="HWC")``;
* Weights & Biases (``WandbLogger``): ``log_image(key="samples", images=[grid])``;
* MLflow (``MLFlowLogger``): ``MlflowClient.log_image`` (``log_artifact`` of the PNG on older
  MLflow).

The logger kind is recognised by class name, so none of the optional packages (``tensorboard``,
``wandb``, ``mlflow``; extras of the same names) is imported unless its logger is in use. A logger
failing to take the image costs a warning, never the run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ntrk_lightning.jsonnum import finite_or_none

GRID_KEY = "samples"


def _finite(v: Any) -> Optional[float]:
    """A loggable number (a flag counts as 0/1), or ``None``."""
    if isinstance(v, bool):
        return float(v)
    return None if isinstance(v, dict) else finite_or_none(v)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``<arm>/<metric>`` -> number from a ``metrics.json`` of ``ntrk predict`` or ``ntrk evaluate``
    (non-finite and missing values are left out: loggers store floats)."""
    out: dict[str, float] = {}
    for arm, a in (metrics.get("arms") or {}).items():
        for name, stats in (a.get("rewards") or {}).items():
            if not isinstance(stats, dict):
                continue
            for key in ("mean", "std", "q50"):
                v = _finite(stats.get(key))
                if v is not None:
                    out[f"{arm}/{name}_{'median' if key == 'q50' else key}"] = v
            std, n = _finite(stats.get("std")), int(stats.get("count") or 0)
            if std is not None and n > 1:
                out[f"{arm}/{name}_se"] = std / math.sqrt(n - 1)  # sample std / sqrt(n)
        diversity = a.get("diversity")
        if isinstance(diversity, dict):
            diversity = diversity.get("overall")
        for key, v in (("fid", a.get("fid")), ("diversity", diversity), ("clip_score", a.get("clip_score")),
                       ("num_samples", a.get("num_samples")), ("nfe_per_sample", a.get("nfe_per_sample")),
                       ("grad_evals_per_sample", a.get("grad_evals_per_sample")),
                       ("seconds_per_sample", a.get("seconds_per_sample"))):
            f = _finite(v)
            if f is not None:
                out[f"{arm}/{key}"] = f
    return out


def _kinds(logger: Any) -> set[str]:
    return {c.__name__ for c in type(logger).__mro__}


def load_grid(path: Path) -> Optional[np.ndarray]:
    """The grid PNG as an (H, W, 3) uint8 array (``None`` if absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError):
        return None


def montage(paths: Sequence[Path], cols: int = 8) -> Optional[np.ndarray]:
    """A grid (H, W, 3) uint8 of the images at ``paths`` (unreadable files are skipped)."""
    from PIL import Image

    images = []
    for p in paths:
        try:
            with Image.open(p) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError):
            continue
    if not images:
        return None
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    out = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        out[r * h:r * h + img.shape[0], c * w:c * w + img.shape[1]] = img
    return out


def log_image(logger: Any, grid: np.ndarray, grid_path: Optional[Path] = None, key: str = GRID_KEY) -> bool:
    """Send ``grid`` (H, W, 3 uint8) to ``logger`` if its kind takes images; ``True`` if sent."""
    kinds = _kinds(logger)
    if "TensorBoardLogger" in kinds:
        logger.experiment.add_image(key, grid, global_step=0, dataformats="HWC")
        return True
    if "WandbLogger" in kinds:
        logger.log_image(key=key, images=[grid])
        return True
    if "MLFlowLogger" in kinds:
        client, run_id = logger.experiment, logger.run_id
        if hasattr(client, "log_image"):
            client.log_image(run_id, grid, f"{key}.png")
            return True
        if grid_path is not None and hasattr(client, "log_artifact"):
            client.log_artifact(run_id, str(grid_path))
            return True
    return False


def log_run(loggers: Iterable[Any], metrics: dict[str, Any], grid: Optional[np.ndarray] = None,
            grid_path: Optional[Path] = None) -> dict[str, float]:
    """Send the final metrics (and the sample grid) to every logger; returns what was logged."""
    loggers = [lg for lg in (loggers or []) if lg is not None]
    flat = flat_metrics(metrics)
    if not loggers:
        return flat
    if grid is None and grid_path is not None:
        grid = load_grid(grid_path)
    for lg in loggers:
        if flat:
            lg.log_metrics(flat, step=0)
        if grid is not None:
            try:
                log_image(lg, grid, grid_path)
            except Exception as e:  # an optional logger's image API must not cost the run
                warnings.warn(f"{type(lg).__name__} did not take the sample grid: {type(e).__name__}: {e}",
                              stacklevel=2)
        lg.save()
    return flat


def log_predict_run(loggers: Iterable[Any], output_dir: Path, metrics: dict[str, Any],
                    grid_images: dict[str, Sequence[str]], per_arm: int = 8) -> dict[str, float]:
    """:func:`log_run` for an ``ntrk predict`` run: its metrics (as written to ``metrics.json``) and
    the report's grid (without a report: the first ``per_arm`` of ``grid_images``, the image paths
    of every arm relative to the run folder, one row per arm)."""
    from ntrk_lightning.report import FIG_GRID

    out = Path(output_dir)
    grid_path: Optional[Path] = out / FIG_GRID
    grid = load_grid(grid_path) if grid_path.is_file() else None
    if grid is None:
        grid_path = None
        paths: list[Path] = []
        for arm in metrics.get("arms") or {}:
            paths += [out / img for img in list(grid_images.get(arm, []))[:per_arm]]
        grid = montage(paths, cols=per_arm)
    return log_run(loggers, metrics, grid, grid_path)
