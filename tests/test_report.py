"""``ntrk report``: two synthetic digits runs (NTRK and plain arms, docs/run_format.md) in, a
Markdown + JSON report with legible PNGs out; numbers equal what the records imply."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntrk_lightning.report import ReportError, main, write_report
from run_fixtures import make_run, two_runs


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines() if line.strip()]


def _check_png(path: Path, min_w: int = 400, min_h: int = 250) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_w and img.height >= min_h, (path, img.size)
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.std() > 5.0, f"{path} looks blank"


def test_report_on_two_runs(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    out = tmp_path / "report"
    assert main([str(a), str(b), "--out", str(out), "--title", "NTRK vs plain"]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["title"] == "NTRK vs plain" and md.startswith("# NTRK vs plain")
    assert data["primary_reward"] == "reward" and data["reward_names"] == ["reward", "judge"]

    # one row per (run, arm), in the runs' arm order, with the numbers the records imply
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["digits_s25/ntrk", "digits_s25/plain", "digits_s50/ntrk", "digits_s50/plain"]
    for run in (a, b):
        recs = _records(run)
        metrics = json.loads((run / "metrics.json").read_text())
        for arm in ("ntrk", "plain"):
            row = rows[f"{run.name}/{arm}"]
            mine = [r for r in recs if r["arm"] == arm]
            v = np.array([r["rewards"]["reward"] for r in mine])
            assert row["num_samples"] == len(mine) == 10
            assert row["rewards"]["reward"]["mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert row["rewards"]["reward"]["std"] == pytest.approx(v.std(), rel=1e-12)
            assert row["rewards"]["reward"]["se"] == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), rel=1e-12)
            assert row["rewards"]["judge"]["mean"] == pytest.approx(np.mean([r["rewards"]["judge"] for r in mine]))
            assert row["nfe_per_sample"] == pytest.approx(np.mean([r["nfe"] for r in mine]))
            assert row["grad_evals_per_sample"] == pytest.approx(np.mean([r["grad_evals"] for r in mine]))
            assert row["seconds_per_sample"] == pytest.approx(np.mean([r["seconds"] for r in mine]))
            assert row["nan_fallbacks"] == sum(r["nan_fallbacks"] for r in mine)
            assert row["num_steps"] == mine[0]["num_steps"]
            assert row["sampler"] == mine[0]["sampler"]
            m = metrics["arms"][arm]
            assert row["fid"] == m["fid"]
            div = m["diversity"]["overall"] if isinstance(m["diversity"], dict) else m["diversity"]
            assert row["diversity"] == div
            assert row["clip_score"] == m["clip_score"]
    assert rows["digits_s25/ntrk"]["nan_fallbacks"] == 1

    # figures: valid, sized, referenced with relative paths that resolve next to report.md
    figs = data["figures"]
    expected = {"report_reward_vs_nfe.png", "report_hist_reward.png", "report_hist_judge.png", "report_grid.png"}
    assert {figs["reward_vs_nfe"], figs["grid"], *figs["histograms"].values()} == expected
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == expected
    for link in links:
        assert not Path(link).is_absolute()
        _check_png(out / link)
    _check_png(out / "report_grid.png", min_w=600, min_h=150)

    # the table carries every arm with sampler hyperparameters, NFE and the reward
    table = [ln for ln in md.splitlines() if ln.startswith("| digits_")]
    assert len(table) == 4
    s25 = next(ln for ln in table if ln.startswith("| digits_s25/ntrk "))
    assert "gamma=0.3" in s25 and "| 25 |" in s25 and f"{rows['digits_s25/ntrk']['rewards']['reward']['mean']:.4g}" in s25
    assert "21.5" in next(ln for ln in table if ln.startswith("| digits_s50/ntrk "))  # CLIP score shown
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes: no temporaries left


def test_single_run_with_several_arms_writes_into_the_run(tmp_path):
    run = make_run(tmp_path, "one", {
        "ntrk": {"sampler": {"name": "ntrk", "gamma": 0.5}, "nfe": 10, "grad_evals": 9, "reward_shift": 1.0},
        "plain": {"sampler": {"name": "plain"}, "nfe": 10},
        "best_of_4": {"sampler": {"name": "best_of_n", "n": 4}, "nfe": 40, "reward_shift": 0.8},
    }, num_prompts=3, samples_per_prompt=2)
    path = write_report([run], run)
    assert path == run / "report.md"
    data = json.loads((run / "report.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["ntrk", "plain", "best_of_4"]
    assert data["rows"][2]["nfe_per_sample"] == 40
    for f in ("report_reward_vs_nfe.png", "report_grid.png", "report_hist_reward.png"):
        _check_png(run / f, min_h=150)
    # a rerun (e.g. a resumed predict) overwrites in place
    assert main([str(run)]) == 0 and (run / "report.md").read_text().startswith("# ntrk report: one")


def test_missing_metrics_json_is_noted_not_fatal(tmp_path):
    run = make_run(tmp_path, "nometrics", {"plain": {"sampler": {"name": "plain"}, "nfe": 25}}, write_metrics=False)
    (run / "images" / "plain" / "p00000_s00001.png").unlink()  # one image gone
    write_report([run], tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["rows"][0]["fid"] is None and data["rows"][0]["num_samples"] == 10
    notes = " ".join(data["notes"])
    assert "no metrics.json" in notes and "could not be read" in notes
    assert "## Notes" in (tmp_path / "out" / "report.md").read_text()


def test_not_a_run_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "plain_folder").mkdir()
    assert main([str(tmp_path / "plain_folder")]) == 2
    err = capsys.readouterr().err
    assert "not an ntrk run folder" in err and "records.jsonl" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "records.jsonl").write_text('{"arm": "a"}\nnot json\n')
    with pytest.raises(ReportError, match="line 2: not valid JSON"):
        write_report([broken], tmp_path / "r")
    (broken / "records.jsonl").write_text("")
    with pytest.raises(ReportError, match="holds no records"):
        write_report([broken], tmp_path / "r")
    assert not (tmp_path / "r" / "report.md").exists()


def test_numbers_come_from_metrics_json_with_a_fallback_to_records(tmp_path):
    """The table takes reward statistics from metrics.json (the run's metrics computed them once);
    a reward metrics.json lacks (an older folder) is computed from the records, with a note."""
    run = make_run(tmp_path, "r", {"plain": {"sampler": {"name": "plain"}, "nfe": 25}}, num_prompts=1,
                   samples_per_prompt=6)
    m = json.loads((run / "metrics.json").read_text())
    m["arms"]["plain"]["rewards"] = {"reward": {"mean": 123.0, "std": 2.0, "min": 1.0, "max": 200.0, "q50": 120.0,
                                                "count": 5}}
    m["arms"]["plain"]["nfe_per_sample"] = 77.0
    (run / "metrics.json").write_text(json.dumps(m))
    write_report([run], tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    row = data["rows"][0]
    assert row["rewards"]["reward"] == {"mean": 123.0, "std": 2.0, "se": pytest.approx(2.0 / 2.0), "min": 1.0,
                                        "median": 120.0, "max": 200.0, "count": 5}
    assert row["nfe_per_sample"] == 77.0
    judge = [r["rewards"]["judge"] for r in _records(run)]
    assert row["rewards"]["judge"]["mean"] == pytest.approx(np.mean(judge), rel=1e-12)
    assert any("judge computed from records.jsonl" in n for n in data["notes"])
    assert not any("reward," in n or "of reward" in n for n in data["notes"])


# ---------------------------------------------------------------------------------------------
# The same report from a run summary (what ``ntrk predict``'s writer holds at the end of a run)
# ---------------------------------------------------------------------------------------------

def _as_the_writer_writes_it(run: Path, arm_none: str = "ntrk", name_none: str = "judge") -> None:
    """Give ``run`` what a run folder of the current writer has: one reward value that was not
    finite (``null`` in its record), reward statistics in ``metrics.json`` from
    ``metrics.RewardStatistics`` over the records' values, and ``num_steps`` per arm."""
    import torch

    from metrics.reward_stats import RewardStatistics
    from ntrk_lightning.jsonnum import finite_or_none, nan_if_none

    recs = _records(run)
    next(r for r in recs if r["arm"] == arm_none)["rewards"][name_none] = None
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = json.loads((run / "metrics.json").read_text())
    for arm, am in m["arms"].items():
        mine = [r for r in recs if r["arm"] == arm]
        am["num_steps"] = mine[0]["num_steps"]
        am["rewards"] = {}
        for name in mine[0]["rewards"]:
            stat = RewardStatistics()
            stat.update(torch.tensor([nan_if_none(r["rewards"][name]) for r in mine], dtype=torch.float64))
            am["rewards"][name] = {k: (v if isinstance(v, int) else finite_or_none(v))
                                   for k, v in stat.compute().items()}
    (run / "metrics.json").write_text(json.dumps(m))


def _summary(run: Path, first: int, seconds_total: bool = True):
    """``Run.from_summary`` as the writer calls it: metrics.json (with ``seconds_total`` per arm,
    the sum of its samples' seconds), every finished sample's reward values as float64 arrays
    (NaN where the record has ``null``) and the first ``first`` images of every arm."""
    from ntrk_lightning.jsonnum import nan_if_none
    from ntrk_lightning.report import Run

    recs = _records(run)
    metrics = json.loads((run / "metrics.json").read_text())
    values, images = {}, {}
    for arm, am in metrics["arms"].items():
        mine = [r for r in recs if r["arm"] == arm]
        names = mine[0]["rewards"] if mine else am["rewards"]
        values[arm] = {n: np.array([nan_if_none(r["rewards"][n]) for r in mine]) for n in names}
        images[arm] = [r["image"] for r in mine[:first]]
        if seconds_total:
            am["seconds_total"] = float(sum(r["seconds"] for r in mine))
    return Run.from_summary(run, metrics, values, images)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _without_date(md: str) -> str:
    return "\n".join(ln for ln in md.splitlines() if not ln.startswith("Generated by `ntrk report` on "))


def test_report_from_a_run_summary_equals_the_report_from_the_records(tmp_path):
    """The writer's report (metrics, reward values and first images in memory, no records) is the
    report ``ntrk report`` writes from the folder: same rows (every number), reward names, notes,
    Markdown, and pixel for pixel the same histograms (the non-finite value left out) and grid."""
    a, b = two_runs(tmp_path)
    for run in (a, b):
        _as_the_writer_writes_it(run)
    from_records, from_summary = tmp_path / "records", tmp_path / "summary"
    write_report([a, b], from_records, grid_images=4)
    runs = [_summary(a, first=4), _summary(b, first=4)]
    assert all(not r.records for r in runs)
    write_report([a, b], from_summary, grid_images=4, runs=runs)

    want, got = (json.loads((d / "report.json").read_text()) for d in (from_records, from_summary))
    assert [r["label"] for r in got["rows"]] == ["digits_s25/ntrk", "digits_s25/plain", "digits_s50/ntrk",
                                                  "digits_s50/plain"]
    assert got["rows"] == want["rows"]
    assert got["reward_names"] == want["reward_names"] == ["reward", "judge"]
    for key in ("title", "runs", "primary_reward", "reward_labels", "figures", "notes"):
        assert got[key] == want[key], key
    assert [r["num_records"] for r in got["runs"]] == [20, 20]
    judge = want["rows"][0]["rewards"]["judge"]  # digits_s25/ntrk: one judge value was null
    assert judge["count"] == 9 and want["rows"][0]["rewards"]["reward"]["count"] == 10
    row = want["rows"][0]
    assert (row["num_samples"], row["num_steps"], row["seconds_total"]) == (10, 25, pytest.approx(10 * 0.02))

    figs = got["figures"]
    assert sorted(figs["histograms"]) == ["judge", "reward"]
    assert sorted(p.name for p in from_summary.glob("report_hist_*.png")) == ["report_hist_judge.png",
                                                                              "report_hist_reward.png"]
    for f in [figs["reward_vs_nfe"], figs["grid"], *figs["histograms"].values()]:
        assert np.array_equal(_pixels(from_summary / f), _pixels(from_records / f)), f
    md = [_without_date((d / "report.md").read_text()) for d in (from_records, from_summary)]
    assert md[1] == md[0] and "20 samples" in md[1]


def test_run_summary_without_seconds_total_fewer_images_and_an_empty_arm(tmp_path):
    """A summary from metrics without ``seconds_total`` (an older version) gives seconds per sample
    times the sample count, which is the records' sum; an arm without finished samples is left
    out as it is for a folder; fewer images than the grid shows make a smaller grid, not an
    error."""
    from ntrk_lightning.report import Run

    run = make_run(tmp_path, "r", {"ntrk": {"sampler": {"name": "ntrk", "gamma": 0.5}, "nfe": 10, "seconds": 0.03},
                                   "plain": {"sampler": {"name": "plain"}, "nfe": 10, "seconds": 0.01}},
                   num_prompts=3, samples_per_prompt=4)
    _as_the_writer_writes_it(run)
    m = json.loads((run / "metrics.json").read_text())
    m["arms"]["unused"] = {"sampler": {"name": "plain"}, "num_samples": 0, "num_failed": 0, "rewards": {}}
    (run / "metrics.json").write_text(json.dumps(m))
    write_report([run], tmp_path / "records", grid_images=16)
    summary = _summary(run, first=2, seconds_total=False)
    assert summary.arms == ["ntrk", "plain"] and summary.num_samples() == 24
    write_report([run], tmp_path / "summary", grid_images=16, runs=[summary])
    want, got = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("records", "summary"))
    assert [r["arm"] for r in got] == [r["arm"] for r in want] == ["ntrk", "plain"]
    for w, g in zip(want, got):
        assert g["seconds_total"] == pytest.approx(w["seconds_total"], rel=1e-12)
        assert g["seconds_total"] == pytest.approx(12 * (0.03 if g["arm"] == "ntrk" else 0.01), rel=1e-12)
        assert {k: v for k, v in g.items() if k != "seconds_total"} == {k: v for k, v in w.items()
                                                                        if k != "seconds_total"}
    # 2 images per arm given, a grid of 16 asked: the grid of those 2 (as a 2-image grid from the records)
    write_report([run], tmp_path / "records2", grid_images=2)
    assert np.array_equal(_pixels(tmp_path / "summary" / "report_grid.png"),
                          _pixels(tmp_path / "records2" / "report_grid.png"))
    assert not np.array_equal(_pixels(tmp_path / "summary" / "report_grid.png")[:50],
                              _pixels(tmp_path / "records" / "report_grid.png")[:50])

    # metrics without an arm's reward statistics: computed from the values, with a note; no
    # images given: no grid, no error
    m["arms"]["plain"]["rewards"] = {}
    m["arms"]["ntrk"]["seconds_total"] = 7.5  # the writer's number wins over seconds per sample x count
    bare = Run.from_summary(run, m, summary.reward_values, {})
    write_report([], tmp_path / "bare", runs=[bare])
    data = json.loads((tmp_path / "bare" / "report.json").read_text())
    assert data["reward_names"] == ["reward", "judge"]
    for n in ("reward", "judge"):
        assert data["rows"][1]["rewards"][n] == pytest.approx(want[1]["rewards"][n], rel=1e-12)
    assert any("plain: statistics of reward, judge computed from the per-sample values" in n for n in data["notes"])
    assert "grid" not in data["figures"]
    assert data["rows"][0]["seconds_total"] == 7.5


def test_histogram_bars_are_each_arms_fraction_of_finite_values_per_bin(monkeypatch):
    """What the histogram draws: per arm, the fraction of its finite values in each bin (NaN left
    out of both the counts and n), bins shared by the arms, the legend naming n and the mean."""
    from ntrk_lightning import report
    from ntrk_lightning.report import Run, plot_histograms

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    rng = np.random.default_rng(5)
    a = np.concatenate([rng.normal(0.0, 1.0, 300), [np.nan, np.inf]])
    b = rng.normal(1.5, 0.5, 200)
    run = Run.from_summary(Path("r"), {"run": "r", "arms": {"a": {"num_samples": 302}, "b": {"num_samples": 200}}},
                           {"a": {"x": a}, "b": {"x": b}}, {})
    rows = [{"run_dir": str(run.dir), "arm": arm, "label": arm} for arm in run.arms]
    assert plot_histograms(rows, [run], "x", Path("unused.png"))
    ax = figures[0].axes[0]
    outlines = [p.get_xy() for p in ax.patches][1::2]  # per arm: filled, then outlined
    assert len(outlines) == 2
    for xy, v in zip(outlines, (a[np.isfinite(a)], b)):
        edges = xy[0::2, 0]
        edges = edges[:np.argmax(edges) + 1]
        heights = xy[1::2, 1][:len(edges) - 1]
        inside = [(v >= lo) & ((v < hi) if k < len(edges) - 2 else (v <= hi))
                  for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
        assert np.allclose(heights, [m.sum() / v.size for m in inside], rtol=1e-9, atol=0)
        assert heights.sum() == pytest.approx(1.0)
    assert ax.get_legend_handles_labels()[1] == [f"a (n=300, mean={a[np.isfinite(a)].mean():.3g})",
                                                 f"b (n=200, mean={b.mean():.3g})"]
