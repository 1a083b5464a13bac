"""``ntrk report``: one Markdown (+ JSON) report comparing run folders side by side.

    ntrk report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT] [--grid 16]

Reads each run folder's ``records.jsonl`` (required) and ``metrics.json`` (FID, diversity, CLIP
score; optional, noted when absent) in the format of docs/run_format.md; a run may hold several
arms. Writes to ``--out`` (default: the run folder when one is given, else ``./report``):

* ``report.md`` — the metric table and the figures below, linked by relative path;
* ``report.json`` — the table data (every number in the Markdown table, unrounded);
* ``report_reward_vs_nfe.png`` — mean primary reward (± standard error) against NFE per sample,
  log x axis, one point per arm, lines joining arms of the same sampler at different NFEs;
* ``report_hist_<reward>.png`` — overlaid reward histograms of every arm, one per reward;
* ``report_grid.png`` — the first N images of every arm, side by side.

Every number in the table comes from ``metrics.json`` (computed once, by the run's metrics),
sample counts, steps and total seconds included; a run folder whose ``metrics.json`` lacks a
number (written by an older version, or absent) gets it from its records instead, with a note
where it is a reward statistic. The figures read two things per arm: every finished sample's
reward values (histograms) and the paths of its first images (grid); ``ntrk report`` takes both
from ``records.jsonl``. Every file is written atomically. Only
files are read: no Lightning, no models.

:func:`write_report` is also called by ``ntrk predict``'s writer at the end of every run, with the
run in memory and no records (:meth:`Run.from_summary`): the content of ``metrics.json``, the
reward values of the metric states and the paths of the first images of each arm. What that costs
does not grow with the samples earlier runs finished, beyond one float per sample and reward (the
histograms); both ways give the same report.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ntrk_lightning.fileio import read_jsonl
from ntrk_lightning.jsonnum import finite_or_none
from ntrk_lightning.runfiles import FAILED, METRICS, RECORDS, REPORT as REPORT_MD, REPORT_JSON

#: largest histogram: bins beyond this are merged into equal-width ones
MAX_HIST_BINS = 40
FIG_DPI = 110
FIG_NFE = "report_reward_vs_nfe.png"
FIG_GRID = "report_grid.png"


class ReportError(ValueError):
    """Input that cannot be reported on; the message names the folder or file."""


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run to report on: its folder, its name, its ``metrics.json`` content and what the
    figures read per arm, ``reward_values`` (arm -> reward name -> every finished sample's value,
    NaN where it has none) and ``grid_images`` (arm -> image paths relative to ``dir``, in
    (prompt, sample) order; the grid shows the first N). A run read from its folder also has its
    ``records`` (then ``reward_values`` and ``grid_images`` are derived from them when not given);
    a run summarised at the end of ``ntrk predict`` has none (:meth:`from_summary`)."""

    dir: Path
    name: str
    records: list[dict[str, Any]]
    metrics: Optional[dict[str, Any]]
    arms: list[str] = field(default_factory=list)
    reward_values: Optional[dict[str, dict[str, np.ndarray]]] = None
    grid_images: Optional[dict[str, list[str]]] = None

    def __post_init__(self) -> None:
        self._by_arm: dict[str, list[dict[str, Any]]] = {}
        for r in self.records:
            self._by_arm.setdefault(str(r["arm"]), []).append(r)
        if self.reward_values is None:
            self.reward_values = _reward_values_of(self.records, self._by_arm)
        if self.grid_images is None:
            self.grid_images = {a: [str(r["image"]) for r in recs if r.get("image")]
                                for a, recs in self._by_arm.items()}

    @classmethod
    def of(cls, run_dir: Path, records: list[dict[str, Any]], metrics: Optional[dict[str, Any]]) -> "Run":
        """A run from its records and metrics (read from its folder by :func:`load_run`)."""
        name = str((metrics or {}).get("run") or Path(run_dir).resolve().name)
        seen = {str(r["arm"]) for r in records}
        arms: list[str] = [a for a in ((metrics or {}).get("arms") or {}) if a in seen]
        for r in records:
            if r["arm"] not in arms:
                arms.append(str(r["arm"]))
        return cls(Path(run_dir), name, records, metrics, arms)

    @classmethod
    def from_summary(cls, run_dir: Path, metrics: dict[str, Any], reward_values: dict[str, dict[str, Any]],
                     grid_images: dict[str, Sequence[str]]) -> "Run":
        """A run without records, as ``ntrk predict``'s writer holds it at the end of a run (what it
        costs does not grow with the samples earlier runs finished):

        * ``metrics``: the content of ``metrics.json`` (docs/run_format.md); its arms with finished
          samples are the report's arms, in its order;
        * ``reward_values``: arm -> reward name -> 1-D array of every finished sample's value (NaN
          allowed: left out of the histograms, as non-finite values are);
        * ``grid_images``: arm -> paths of its first finished images (relative to ``run_dir``, in
          (prompt, sample) order), as many as the grid shows or fewer.
        """
        if not isinstance(metrics, dict):
            raise ReportError(f"{run_dir}: the run summary needs the metrics as a JSON object")
        name = str(metrics.get("run") or Path(run_dir).resolve().name)
        per_arm = metrics.get("arms") or {}
        values: dict[str, dict[str, np.ndarray]] = {}
        for arm, m in per_arm.items():
            given = (reward_values or {}).get(arm) or {}
            # the metrics' reward names first (their order is the run's), then any other given
            names = list(dict.fromkeys([*((m or {}).get("rewards") or {}), *given]))
            values[str(arm)] = {str(n): np.asarray(given.get(n, ()), dtype=np.float64).reshape(-1) for n in names}
        images = {str(a): [str(p) for p in ((grid_images or {}).get(a) or ())] for a in per_arm}
        # as for a run read from its folder: an arm is reported when it has a finished sample
        arms = [str(a) for a in per_arm
                if _count_in(per_arm[a], max((v.size for v in values[str(a)].values()), default=0)) > 0]
        return cls(Path(run_dir), name, [], metrics, arms, values, images)

    def arm_records(self, arm: str) -> list[dict[str, Any]]:
        """The records of ``arm`` (none for a run from a summary)."""
        return self._by_arm.get(arm, [])

    def arm_metrics(self, arm: str) -> dict[str, Any]:
        """``arm``'s entry of ``metrics.json`` (empty when there is none)."""
        return ((self.metrics or {}).get("arms") or {}).get(arm) or {}

    def num_samples(self, arm: Optional[str] = None) -> int:
        """Finished samples of ``arm`` (of every reported arm when ``None``): ``metrics.json``'s
        ``num_samples``, else its records."""
        if arm is None:
            return sum(self.num_samples(a) for a in self.arms)
        return _count_in(self.arm_metrics(arm), len(self.arm_records(arm)))


def _count_in(arm_metrics: Any, fallback: int) -> int:
    n = (arm_metrics or {}).get("num_samples") if isinstance(arm_metrics, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else fallback


def _number_or_nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _reward_values_of(records: Sequence[dict[str, Any]],
                      by_arm: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, np.ndarray]]:
    """arm -> reward name -> the values of the arm's records, NaN where a record has none; every
    arm holds every name the records have, in the order they first appear."""
    names = list(dict.fromkeys(k for r in records for k in (r.get("rewards") or {})))
    return {arm: {n: np.array([_number_or_nan((r.get("rewards") or {}).get(n)) for r in recs], dtype=np.float64)
                  for n in names}
            for arm, recs in by_arm.items()}


def _read_records(path: Path) -> list[dict[str, Any]]:
    out = read_jsonl(path, ReportError)
    for i, r in enumerate(out, 1):
        if "arm" not in r:
            raise ReportError(f"{path}, record {i}: a record needs at least 'arm' (docs/run_format.md)")
    return out


def load_run(run_dir: Path) -> Run:
    """Read one run folder; a clear error naming what is missing when it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder not found: {run_dir}")
    rec_path, met_path = run_dir / RECORDS, run_dir / METRICS
    if not rec_path.is_file():
        missing = RECORDS + ("" if met_path.is_file() else f" and {METRICS}")
        raise ReportError(f"not an ntrk run folder: {run_dir} has no {missing} (see docs/run_format.md)")
    records = _read_records(rec_path)
    if not records:
        raise ReportError(f"{rec_path} holds no records: the run has not finished any sample")
    metrics = None
    if met_path.is_file():
        try:
            metrics = json.loads(met_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"cannot read {met_path}: {e}") from None
        if not isinstance(metrics, dict):
            raise ReportError(f"{met_path}: expected a JSON object")
    return Run.of(run_dir, records, metrics)


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def _values(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [x for x in (finite_or_none(r.get(key)) for r in records) if x is not None]


def reward_summary(values: Sequence[float]) -> dict[str, Any]:
    """mean, population std (as ``metrics.RewardStatistics``), standard error of the mean
    (sample std / sqrt(n)), min, median, max and count of the finite values."""
    if isinstance(values, np.ndarray):
        v = values[np.isfinite(values)].astype(np.float64)
    else:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "std": None, "se": None, "min": None, "median": None, "max": None, "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()),
            "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()), "count": n}


def _mean_or_none(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def reward_definitions(run: Run, primary: str) -> dict[str, Any]:
    """name -> the reward's description in the run's ``metrics.json`` (``None``: not recorded);
    the guidance reward is recorded under ``reward``, evaluation rewards under their names."""
    m = run.metrics or {}
    out: dict[str, Any] = {}
    if isinstance(m.get("reward"), dict):
        out[str(m.get("primary_reward") or primary)] = m["reward"]
    for n, d in (m.get("eval_rewards") or {}).items():
        if isinstance(d, dict):
            out[str(n)] = d
    return out


def reward_label(definition: Any) -> str:
    """Short label of a reward description: its name, else its fields."""
    if not isinstance(definition, dict):
        return "unrecorded"
    name = definition.get("name")
    return str(name) if name else ", ".join(f"{k}={v}" for k, v in sorted(definition.items()))


def check_same_rewards(runs: Sequence[Run], primary: str) -> dict[str, str]:
    """name -> label of every reward column; raises :class:`ReportError` when runs scored by
    different rewards would share one column (the numbers would not be comparable)."""
    seen: dict[str, list[tuple[str, Any]]] = {}
    for run in runs:
        for n, d in reward_definitions(run, primary).items():
            seen.setdefault(n, []).append((run.name, {k: v for k, v in d.items() if k != "differentiable"}))
    labels: dict[str, str] = {}
    for n, defs in seen.items():
        distinct = []
        for _, d in defs:
            if d not in distinct:
                distinct.append(d)
        if len(distinct) > 1:
            which = "; ".join(f"{run}: {reward_label(d)}" for run, d in defs)
            raise ReportError(f"the runs' '{n}' columns measure different rewards ({which}); report them "
                              "separately (one `ntrk report` per reward)")
        labels[n] = reward_label(distinct[0])
    return labels


def _reward_names(runs: Sequence[Run]) -> tuple[str, list[str]]:
    """(primary reward, every reward name seen, primary first): the names of the runs' reward
    values (from the records, in the order they first appear there, or from the run summary)."""
    primary = next((str(r.metrics["primary_reward"]) for r in runs if r.metrics and r.metrics.get("primary_reward")),
                   None)
    names: list[str] = []
    for run in runs:
        for arm in run.arms:
            for k in (run.reward_values or {}).get(arm) or {}:
                if k not in names:
                    names.append(k)
    if primary is None:
        primary = "reward" if "reward" in names else (names[0] if names else "reward")
    return primary, [primary] + [n for n in names if n != primary]


def stats_summary(stats: Any) -> Optional[dict[str, Any]]:
    """A reward's statistics as ``metrics.json`` holds them (``metrics.RewardStatistics``) in the
    report's form; the standard error is std / sqrt(count - 1) (std being the population std).
    ``None`` when they are not there."""
    if not isinstance(stats, dict) or not isinstance(stats.get("count"), int) or "mean" not in stats:
        return None
    n = stats["count"]
    std = finite_or_none(stats.get("std"))
    return {"mean": finite_or_none(stats.get("mean")), "std": std,
            "se": std / math.sqrt(n - 1) if std is not None and n > 1 else None,
            "min": finite_or_none(stats.get("min")), "median": finite_or_none(stats.get("q50")),
            "max": finite_or_none(stats.get("max")), "count": n}


def _arm_rewards(m: dict[str, Any], values: dict[str, np.ndarray], names: Sequence[str]) -> tuple[dict, list[str]]:
    """name -> statistics from ``metrics.json``; from the per-sample values (listed second) where
    it has none."""
    out, fallback = {}, []
    for n in names:
        s = stats_summary((m.get("rewards") or {}).get(n))
        if s is None:
            fallback.append(n)
            s = reward_summary(values.get(n, np.empty(0)))
        out[n] = s
    return out, fallback


def _per_sample(m: dict[str, Any], recs: Sequence[dict[str, Any]], key: str, field_name: str) -> Optional[float]:
    v = m.get(key)
    return float(v) if isinstance(v, (int, float)) else _mean_or_none(_values(recs, field_name))


def _steps(run: Run, arm: str, recs: Sequence[dict[str, Any]]) -> Any:
    """Reverse steps of ``arm``: ``metrics.json``'s (per arm, else the run's), else its records'
    (a list when they differ); ``None`` when nothing says."""
    for s in (run.arm_metrics(arm).get("num_steps"), (run.metrics or {}).get("num_steps")):
        if isinstance(s, dict):
            s = s.get(arm)
        if isinstance(s, int) and not isinstance(s, bool):
            return s
    steps = sorted({int(r["num_steps"]) for r in recs if isinstance(r.get("num_steps"), (int, float))})
    return steps[0] if len(steps) == 1 else (steps or None)


def _seconds_total(m: dict[str, Any], recs: Sequence[dict[str, Any]], num_samples: int) -> Optional[float]:
    """Wall-clock seconds of the arm's finished samples: ``metrics.json``'s ``seconds_total``, else
    the sum over the records, else (a summary from an older version) seconds per sample times the
    sample count, which is that sum up to float rounding."""
    total = finite_or_none(m.get("seconds_total"))
    if total is not None:
        return total
    seconds = _values(recs, "seconds")
    if seconds:
        return float(sum(seconds))
    per = finite_or_none(m.get("seconds_per_sample"))
    return per * num_samples if per is not None and num_samples else None


def _row(run: Run, arm: str, label: str, names: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The table row of one arm of a run, and the rewards whose statistics ``metrics.json`` lacks.
    Numbers come from ``metrics.json``; the records (a run read from its folder) stand in for
    what it lacks."""
    recs = run.arm_records(arm)
    m = run.arm_metrics(arm)
    sampler = m.get("sampler") or next((r.get("sampler") for r in recs if r.get("sampler")), {}) or {}
    rewards, fallback = _arm_rewards(m, (run.reward_values or {}).get(arm) or {}, names)
    num_samples = run.num_samples(arm)
    return {
        "label": label, "run": run.name, "run_dir": str(run.dir), "arm": arm,
        "sampler": sampler, "sampler_name": str(sampler.get("name", arm)) if isinstance(sampler, dict) else arm,
        "num_steps": _steps(run, arm, recs),
        "num_samples": num_samples,
        "nfe_per_sample": _per_sample(m, recs, "nfe_per_sample", "nfe"),
        "grad_evals_per_sample": _per_sample(m, recs, "grad_evals_per_sample", "grad_evals"),
        "seconds_per_sample": _per_sample(m, recs, "seconds_per_sample", "seconds"),
        "seconds_total": _seconds_total(m, recs, num_samples),
        "nan_fallbacks": int(m["nan_fallbacks"]) if isinstance(m.get("nan_fallbacks"), int)
        else int(sum(_values(recs, "nan_fallbacks"))),
        "num_failed": int(m.get("num_failed") or 0),
        "rewards": rewards,
        "fid": finite_or_none(m.get("fid")), "diversity": finite_or_none(m.get("diversity")),
        "clip_score": finite_or_none(m.get("clip_score")),
    }, fallback


def build_rows(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], str, list[str], list[str]]:
    """One row per (run, arm); the primary reward; every reward name seen; notes on numbers that
    came from the records because ``metrics.json`` lacked them."""
    primary, names = _reward_names(runs)
    multi = len(runs) > 1
    used_labels: set[str] = set()
    rows, notes = [], []
    for run in runs:
        for arm in run.arms:
            label = f"{run.name}/{arm}" if multi else arm
            base, k = label, 2
            while label in used_labels:
                label, k = f"{base} ({k})", k + 1
            used_labels.add(label)
            row, fallback = _row(run, arm, label, names)
            rows.append(row)
            if fallback and run.metrics is not None:
                source = RECORDS if run.records else "the per-sample values"
                notes.append(f"{label}: statistics of {', '.join(fallback)} computed from {source} ({METRICS} "
                             "has none: a run folder from an older version)")
    return rows, primary, names, notes


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no global backend change)
# ---------------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    from ntrk_lightning.fileio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_reward_vs_nfe(rows: Sequence[dict[str, Any]], primary: str, path: Path) -> bool:
    pts = [r for r in rows if r["nfe_per_sample"] and r["rewards"][primary]["mean"] is not None]
    if not pts:
        return False
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    samplers = list(dict.fromkeys(r["sampler_name"] for r in pts))
    color = dict(zip(samplers, _colors(len(samplers))))
    # samplers sharing an NFE are spread a little sideways so their error bars stay readable
    at_x: dict[float, list[str]] = {}
    for r in pts:
        names_here = at_x.setdefault(r["nfe_per_sample"], [])
        if r["sampler_name"] not in names_here:
            names_here.append(r["sampler_name"])

    def dodge(x: float, name: str) -> float:
        here = at_x[x]
        return x * 1.05 ** (here.index(name) - (len(here) - 1) / 2)

    for s in samplers:
        group = sorted((r for r in pts if r["sampler_name"] == s), key=lambda r: r["nfe_per_sample"])
        xs = [dodge(r["nfe_per_sample"], s) for r in group]
        ys = [r["rewards"][primary]["mean"] for r in group]
        es = [r["rewards"][primary]["se"] or 0.0 for r in group]
        connect = len({r["nfe_per_sample"] for r in group}) > 1
        ax.errorbar(xs, ys, yerr=es, fmt="o-" if connect else "o", color=color[s], capsize=4, markersize=6,
                    linewidth=1.5, label=s)
        for r, x, y in zip(group, xs, ys):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    xs_all = sorted({r["nfe_per_sample"] for r in pts})
    ax.set_xlim(xs_all[0] / 1.6, xs_all[-1] * 1.6)
    ax.set_xticks(xs_all if len(xs_all) <= 12 else ax.get_xticks())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("denoiser evaluations per sample (NFE, log scale; same-NFE points spread sideways)")
    ax.set_ylabel(f"mean {primary} (reward units, ± s.e.)")
    ax.set_title(f"{primary} vs compute, {len(pts)} arm(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="sampler", fontsize=8)
    _save(fig, path)
    return True


def plot_histograms(rows: Sequence[dict[str, Any]], runs: Sequence[Run], name: str, path: Path) -> bool:
    """Overlaid histograms of reward ``name``, one per row, over the finite values of the run's
    ``reward_values``; ``False`` (nothing written) when no row has one."""
    data = []
    for row in rows:
        run = next(r for r in runs if str(r.dir) == row["run_dir"])
        vals = np.asarray(((run.reward_values or {}).get(row["arm"]) or {}).get(name, ()), dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            data.append((row["label"], vals))
    if not data:
        return False
    allv = np.concatenate([v for _, v in data])
    edges = np.histogram_bin_edges(allv, bins="auto")
    if len(edges) > MAX_HIST_BINS + 1:
        edges = np.linspace(allv.min(), allv.max(), MAX_HIST_BINS + 1)
    if edges[0] == edges[-1]:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for (label, v), c in zip(data, _colors(len(data))):
        # one pass over the values (the edges are equal-width: numpy's linear-time path, no sort); the
        # two drawings below then cost O(bins), not O(samples)
        fraction = np.histogram(v, bins=len(edges) - 1, range=(edges[0], edges[-1]))[0] / v.size
        ax.hist(edges[:-1], bins=edges, weights=fraction, histtype="stepfilled", alpha=0.25, color=c)
        ax.hist(edges[:-1], bins=edges, weights=fraction, histtype="step", linewidth=1.6, color=c,
                label=f"{label} (n={v.size}, mean={v.mean():.3g})")
        ax.axvline(v.mean(), color=c, linestyle="--", linewidth=1)
    ax.set_xlabel(f"{name} (reward units)")
    ax.set_ylabel("fraction of samples per bin")
    ax.set_title(f"Distribution of {name} per arm (dashed: mean)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _load_rgb(path: Path) -> Optional[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception:
        return None


def _montage(images: list[np.ndarray], cols: int) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    rows = math.ceil(len(images) / cols)
    pad = max(1, h // 16)
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + img.shape[0], x:x + img.shape[1]] = img
    return out


def plot_grid(rows: Sequence[dict[str, Any]], runs: Sequence[Run], n: int, path: Path) -> tuple[bool, list[str]]:
    """The first ``n`` of every row's ``grid_images``, one panel per row; (written, notes on
    unreadable files)."""
    notes: list[str] = []
    panels = []
    for row in rows:
        run = next(r for r in runs if str(r.dir) == row["run_dir"])
        imgs, missing = [], 0
        for rel in ((run.grid_images or {}).get(row["arm"]) or [])[:n]:
            arr = _load_rgb(run.dir / str(rel))
            if arr is None:
                missing += 1
            else:
                imgs.append(arr)
        if missing:
            notes.append(f"{row['label']}: {missing} of the first {n} image files could not be read")
        panels.append((row, imgs))
    if not any(imgs for _, imgs in panels):
        return False, notes
    k = len(panels)
    per_row = min(k, 4)
    nrows = math.ceil(k / per_row)
    fig = _figure(3.3 * per_row, 3.7 * nrows)
    for i, (row, imgs) in enumerate(panels):
        ax = fig.add_subplot(nrows, per_row, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        title = f"{row['label']}\n{_sampler_text(row['sampler'], 3)}"
        if imgs:
            cols = max(1, math.ceil(math.sqrt(len(imgs))))
            ax.imshow(_montage(imgs, cols), interpolation="nearest")
            title += f"\nfirst {len(imgs)} samples"
        else:
            ax.text(0.5, 0.5, "no readable images", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Samples per arm (same prompts and seeds across arms of a run)", fontsize=11)
    _save(fig, path)
    return True, notes


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}g}"
    return str(v)


def _sampler_defaults(name: str) -> dict[str, Any]:
    """Default hyperparameters of a registered sampler (so labels show only what was set)."""
    import dataclasses

    from ntrk_lightning.samplers import REGISTRY

    cls = REGISTRY.get(name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


def _sampler_text(sampler: Any, limit: int = 6) -> str:
    if not isinstance(sampler, dict):
        return str(sampler)
    name = str(sampler.get("name", ""))
    defaults = _sampler_defaults(name)
    items = []
    for k, v in sampler.items():
        if k == "name" or isinstance(v, dict) or (k in defaults and defaults[k] == v):
            continue
        items.append(f"{k}={_fmt(v, 3) if isinstance(v, float) else v}")
    more = " …" if len(items) > limit else ""
    return (name + (" (" + ", ".join(items[:limit]) + more + ")" if items else "")).strip()


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "reward"


def render_markdown(title: str, runs: Sequence[Run], rows: Sequence[dict[str, Any]], primary: str,
                    names: Sequence[str], figures: dict[str, Any], notes: Sequence[str],
                    labels: Optional[dict[str, str]] = None) -> str:
    labels = labels or {}
    L = [f"# {title}", ""]
    L.append(f"Generated by `ntrk report` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             f"{len(runs)} run folder(s):")
    L.append("")
    for run in runs:
        arms = ", ".join(f"`{a}`" for a in run.arms)
        fid_ref = (run.metrics or {}).get("fid_reference")
        fid_txt = f"; FID against `{fid_ref}` in `{run.metrics.get('fid_feature')}` features" if fid_ref else ""
        guided = reward_definitions(run, primary).get(primary)
        reward_txt = f"; guided by `{reward_label(guided)}`" if guided is not None else "; guidance reward not recorded"
        L.append(f"- **{_md_escape(run.name)}** — `{run.dir}` (arms {arms}; {run.num_samples()} samples"
                 f"{reward_txt}{fid_txt})")
    L.append("")
    L.append("## Metrics")
    L.append("")
    defined = "; ".join(f"`{n}` = `{labels[n]}`" for n in names if n in labels)
    if defined:
        L.append(f"Rewards: {defined}.")
        L.append("")
    L.append(f"Primary reward: `{primary}` (mean ± std over samples; std is the population std). "
             "NFE = denoiser forward passes per returned sample; seconds are wall-clock per sample. "
             "FID, diversity (mean pairwise feature distance) and CLIP score come from each run's "
             "`metrics.json`; `–` = not computed.")
    L.append("")
    others = [n for n in names if n != primary]
    head = ["arm", "sampler", "steps", "samples", "NFE / sample", "grad evals / sample", "s / sample",
            f"{primary} (mean ± std)", *[f"{n} (mean)" for n in others], "FID ↓", "diversity", "CLIP score",
            "NaN fallbacks"]
    L.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
    L.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        p = r["rewards"][primary]
        prim = "–" if p["mean"] is None else f"{_fmt(p['mean'])} ± {_fmt(p['std'], 3)}"
        cells = [r["label"], _sampler_text(r["sampler"]), _fmt(r["num_steps"]), _fmt(r["num_samples"]),
                 _fmt(r["nfe_per_sample"]), _fmt(r["grad_evals_per_sample"]), _fmt(r["seconds_per_sample"], 3),
                 prim, *[_fmt(r["rewards"][n]["mean"]) for n in others], _fmt(r["fid"]), _fmt(r["diversity"]),
                 _fmt(r["clip_score"]), _fmt(r["nan_fallbacks"])]
        L.append("| " + " | ".join(_md_escape(str(c)) for c in cells) + " |")
    L.append("")
    if figures.get("reward_vs_nfe"):
        L += ["## Reward vs compute", "",
              f"Mean `{primary}` of every arm against its NFE per sample (log scale); error bars are "
              "standard errors of the mean; arms of the same sampler at different NFEs are joined.", "",
              f"![{primary} vs NFE]({figures['reward_vs_nfe']})", ""]
    if figures.get("histograms"):
        L += ["## Reward distributions", ""]
        for n, f in figures["histograms"].items():
            L += [f"![distribution of {n}]({f})", ""]
    if figures.get("grid"):
        L += ["## Samples", "", "The first images of every arm (records order: prompt, then sample).", "",
              f"![samples per arm]({figures['grid']})", ""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dirs: Sequence[Path], out_dir: Path, title: Optional[str] = None,
                 grid_images: int = 16, runs: Optional[Sequence[Run]] = None) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs for ``run_dirs`` (or for ``runs`` already
    in memory) into ``out_dir``; returns the path of ``report.md``. Raises :class:`ReportError` for
    a folder that is not a run."""
    if not run_dirs and not runs:
        raise ReportError("no run folders given")
    runs = list(runs) if runs is not None else [load_run(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, primary, names, notes = build_rows(runs)
    labels = check_same_rewards(runs, primary)
    notes = [f"{run.name}: no {METRICS} in {run.dir} (FID, diversity and CLIP score not available)"
             for run in runs if run.metrics is None] + notes
    notes += _run_notes(runs, rows)
    figures, fig_notes = _figures(rows, runs, primary, names, out_dir, grid_images)
    notes += fig_notes
    if title is None:
        title = f"ntrk report: {runs[0].name}" if len(runs) == 1 else "ntrk report: " + " vs ".join(r.name for r in runs)
    return _write_outputs(out_dir, title, runs, rows, primary, names, labels, figures, notes)


def _run_notes(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        if r["num_failed"]:
            notes.append(f"{r['label']}: {r['num_failed']} sample(s) failed (non-finite final image; listed in "
                         f"{Path(r['run_dir']) / FAILED}, generated again by a rerun) and are not in the table")
    for run in runs:
        damaged = ((run.metrics or {}).get("last_run") or {}).get("damaged_regenerated")
        if damaged:
            notes.append(f"{run.name}: the last run found {damaged} damaged finished sample(s) (checksum or record "
                         "mismatch) and generated them again")
    return notes


def _figures(rows: Sequence[dict[str, Any]], runs: Sequence[Run], primary: str, names: Sequence[str], out_dir: Path,
             grid_images: int) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    figures: dict[str, Any] = {}
    if plot_reward_vs_nfe(rows, primary, out_dir / FIG_NFE):
        figures["reward_vs_nfe"] = FIG_NFE
    hists = {}
    for n in names:
        fname = f"report_hist_{_slug(n)}.png"
        if plot_histograms(rows, runs, n, out_dir / fname):
            hists[n] = fname
    figures["histograms"] = hists
    ok, grid_notes = plot_grid(rows, runs, int(grid_images), out_dir / FIG_GRID)
    notes += grid_notes
    if ok:
        figures["grid"] = FIG_GRID
    return figures, notes


def _write_outputs(out_dir: Path, title: str, runs: Sequence[Run], rows: Sequence[dict[str, Any]], primary: str,
                   names: Sequence[str], labels: dict[str, str], figures: dict[str, Any], notes: list[str]) -> Path:
    from ntrk_lightning.fileio import atomic_write_json, atomic_write_text

    data = {"title": title, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": [{"name": r.name, "dir": str(r.dir), "arms": r.arms, "num_records": r.num_samples(),
                      "has_metrics": r.metrics is not None} for r in runs],
            "primary_reward": primary, "reward_names": names, "reward_labels": labels, "rows": rows,
            "figures": figures, "notes": notes}
    atomic_write_json(out_dir / REPORT_JSON, data)
    md = render_markdown(title, runs, rows, primary, names, figures, notes, labels)
    return atomic_write_text(out_dir / REPORT_MD, md)


def main(argv: list[str]) -> int:
    """``ntrk report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT] [--grid N]``."""
    parser = argparse.ArgumentParser(prog="ntrk report",
                                     description="Compare ntrk run folders in one Markdown/JSON report with plots.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders written by `ntrk predict`")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the run folder when one is given, else ./report)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--grid", type=int, default=16, help="images per arm in the sample grid (default 16)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    if args.grid < 1:
        print("ntrk report: error: --grid must be >= 1", file=sys.stderr)
        return 2
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("report"))
    try:
        path = write_report(args.run_dirs, out, title=args.title, grid_images=args.grid)
    except (ReportError, OSError) as e:
        print(f"ntrk report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # python -m ntrk_lightning.report ...
    sys.exit(main(sys.argv[1:]))
