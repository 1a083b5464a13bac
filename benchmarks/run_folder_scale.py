"""Scale of an ``ntrk predict`` run folder: what resuming and finishing a run cost per sample an
earlier run had already finished, at 10k / 100k / 1M finished samples.

    python -m benchmarks.run_folder_scale [--sizes 10000,100000,1000000] [--full_max 100000]

A synthetic folder of N finished samples (one arm, one prompt, tiny 16x16 grey PNGs, records with
checksums, sharded as ``ntrk predict`` writes them; the record shard with each sample's stat
signature; the persisted metric states, ``records.jsonl`` and ``records.index.json`` a finished
earlier run leaves) is built in a temporary folder, then the next run's steps are timed with the
project's own code:

* resume: the whole ``PromptDataModule.setup`` of a run asking for the N samples again (rank 0,
  no trainer, no fingerprint), in a new process as a rerun is: one listing of the sample folders, the record shards read with
  string methods (no record decoded), two ``stat`` calls per sample against the stat signature of
  its shard line, the metric-state plan, the ``records.jsonl`` plan (key digest) and the items
  still to generate (none; seeds are derived only for those). Wall-clock and CPU time, each the
  least of 3 calls. For comparison, the full check of every sample (record parsed, PNG size and
  sha256: what a resume does for a changed file or an older folder), timed on the first 10k
  samples with ``NTRK_FULL_CHECK=1``;
* end of run, after generating ``--new`` more samples: merging the persisted states into fresh
  metrics (with this run's samples), summarising them (reward statistics and values, FID, sample
  costs), appending the new records to ``records.jsonl`` (``writer.update_records_jsonl`` with the
  plan the resume made), ``metrics.json`` from the summary, and the report from the summary
  (``Run.from_summary``: table, histograms, grid). For comparison, what the end of a resumed run
  cost before metric states were persisted: reading every finished record and image back
  (measured on the first 10k samples, per sample).

Sizes above ``--full_max`` are built without per-sample files (no PNGs, no record files: 1M
samples would be 2M files here): for them only the end of run is measured (with the plan a
resume of that folder makes), and the per-sample resume cost is the one measured at the largest
full size. Diversity is left out: its pairwise distances are quadratic in the samples at any
folder layout.

Results: ``benchmarks/results/run_folder_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.common import RESULTS
from ntrk_lightning.fileio import atomic_write_json, atomic_write_text

ARM = "ntrk"
REWARDS = ("reward", "judge_logit", "judge_accuracy")
FEATURE_DIM = 64
OLD_PATH_SAMPLES = 10_000  # samples read back to time the old end of run (per sample)
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
TARGET_US_PER_SAMPLE = 20.0


class _Features(nn.Module):
    """A cheap stand-in feature network (the digits features are 64-d too)."""

    num_features = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(x.shape[0], -1))


def _groups():
    import metrics as M
    from metrics.group import build_groups

    torch.manual_seed(0)
    feature = M.build_feature(_Features())
    ref = M.ReferenceStats(torch.zeros(FEATURE_DIM), torch.eye(FEATURE_DIM, dtype=torch.float64), 10,
                           M.feature_identity(feature))
    return build_groups([ARM], list(REWARDS), feature, ref, diversity=False, costs=True)


def _record(p: int, s: int, png: bytes, rank: int = 0) -> dict[str, Any]:
    from ntrk_lightning.pipeline import layout

    rec = layout.build_record(ARM, p, "", s, 1000 + s, {"name": "ntrk"}, 25,
                              {n: float(s % 7) for n in REWARDS}, 25, 24, 0, 0.01, rank)
    rec["png_bytes"], rec["png_sha256"] = len(png), hashlib.sha256(png).hexdigest()
    return rec


def _png() -> tuple[torch.Tensor, bytes]:
    from ntrk_lightning.pipeline import layout

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(1, 1, 16, 16, generator=g) * 255).byte()
    return base, layout.png_bytes(base[0])


def _update(group: Any, u8: torch.Tensor, records: list[dict[str, Any]]) -> None:
    from metrics.group import update_group
    from ntrk_lightning.pipeline.module import costs_of

    rewards = {n: torch.tensor([r["rewards"][n] for r in records], dtype=torch.float64) for n in REWARDS}
    update_group(group, u8.expand(len(records), -1, -1, -1), rewards, costs=costs_of(records))


def build_folder(out: Path, n: int, files: bool) -> None:
    """N finished samples of one prompt as a finished earlier run leaves them: sample files (when
    ``files``), the record shard, the persisted metric states, records.jsonl and its index."""
    from metrics.group import group_states
    from ntrk_lightning.pipeline import layout, records_file, run

    base, png = _png()
    template = _record(0, 0, png)
    texts, shard, groups = [], [], _groups()
    chunk: list[dict[str, Any]] = []
    for s in range(n):
        # the same record schema; built from a template when no file is written (1M builds)
        rec = _record(0, s, png) if files else {**template, "key": layout.key(ARM, 0, s), "sample_index": s}
        text = json.dumps(rec)
        if files:
            folder = layout.sample_dir(out, ARM, 0, s)
            if s % layout.SHARD_SAMPLES == 0:
                folder.mkdir(parents=True, exist_ok=True)
            png_path, rec_path = f"{folder}/{layout.stem(0, s)}.png", f"{folder}/{layout.stem(0, s)}.json"
            Path(png_path).write_bytes(png)
            Path(rec_path).write_text(text + "\n")
            shard.append(layout.shard_line(text, layout.stat_signature(png_path, rec_path)))
        else:
            shard.append(layout.shard_line(text, [len(png), 0, len(text) + 1, 0]))
        texts.append(text)
        chunk.append(rec)
        if len(chunk) == 4096 or s == n - 1:
            _update(groups[ARM], base, chunk)
            chunk = []
    layout.append_lines(out / layout.RECORD_SHARDS / "run0.rank00000.jsonl", shard)
    (out / layout.STATES).mkdir(parents=True, exist_ok=True)
    torch.save({"arms": {ARM: group_states(groups[ARM])}}, out / layout.STATES / "run0.rank00000.pt")
    sha = hashlib.sha256(png).hexdigest()
    atomic_write_text(out / layout.STATES / f"run0.rank00000{run.STATE_KEYS_SUFFIX}",
                      run.state_keys_text({layout.key(ARM, 0, s): sha for s in range(n)}))
    layout.write_records_jsonl(out, texts)
    records_file.write_index(out, n, records_file.key_digest((ARM, 0, s) for s in range(n)))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def _timed_cpu(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, value), each the least of ``repeat`` calls (as
    ``timeit`` does: on a shared machine the rest is other jobs); the CPU time is closer to what an
    idle machine takes."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), value


def _resume(out: Path, n: int) -> Any:
    """The data module's set-up of a run asking for the N finished samples again."""
    from ntrk_lightning.pipeline.data import PromptDataModule

    dm = PromptDataModule(prompts=[""], samples_per_prompt=n, arms=[ARM], output_dir=str(out))
    try:
        dm.setup("predict")
    finally:
        dm.release_lock()
    return dm.resume


def _resume_in_a_new_process(out: Path, n: int) -> dict[str, float]:
    """The resume timed in a new Python process, as a rerun or a requeued job starts (the process
    that built the folder holds a fragmented heap of a million records that a real resume never
    has: measured in it, the same resume took ~15% longer at 1M)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_folder_scale", "--time_resume", str(out),
                           "--sizes", str(n)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_resume(out: Path, n: int) -> dict[str, float]:
    wall, cpu, resume = _timed_cpu(lambda: _resume(out, n))
    assert not resume.pending and not resume.problems and not resume.reread, "the folder should be intact"
    return {"resume_s": wall, "resume_cpu_s": cpu}


def _plan_without_files(out: Path, n: int) -> Any:
    """The records plan a resume makes of a file-less folder (what its listing would give)."""
    from ntrk_lightning.pipeline import records_file

    keys = [(ARM, 0, s) for s in range(n)]
    return records_file.plan(records_file.read_synced(out), {k: records_file.key_text(k) for k in keys}, [])


def _new_records(out: Path, n: int, new: int) -> tuple[dict, torch.Tensor]:
    """``new`` samples this run generated (keys after the N finished ones), as the writer holds them."""
    from ntrk_lightning.pipeline import layout

    base, png = _png()
    recs = {}
    for s in range(n, n + new):
        rec = _record(0, s, png)
        recs[layout.record_key(rec)] = (rec, json.dumps(rec))
    return recs, base


def _end_of_run(out: Path, n: int, new: int, plan: Any, resume: Any) -> dict[str, Any]:
    from metrics.group import merge_group_states, reward_values, summarize_group
    from ntrk_lightning.pipeline import layout
    from ntrk_lightning.pipeline.writer import grid_images, metrics_json, update_records_jsonl
    from ntrk_lightning.report import Run, write_report

    recs, base = _new_records(out, n, new)
    groups = _groups()
    _update(groups[ARM], base, [r for r, _ in recs.values()])  # during the run

    def merge():
        states = torch.load(out / layout.STATES / "run0.rank00000.pt", weights_only=True)["arms"]
        merge_group_states(groups[ARM], states[ARM])

    t_merge, _ = _timed(merge)
    t_summary, summary = _timed(lambda: {ARM: {**summarize_group(groups[ARM], list(REWARDS)),
                                               "values": reward_values(groups[ARM], list(REWARDS))}})
    assert summary[ARM]["costs"]["count"] == n + new and summary[ARM]["rewards"]["reward"]["count"] == n + new
    assert plan.append, "the resume should append to records.jsonl"
    t_records, count = _timed(lambda: update_records_jsonl(out, plan, recs, [ARM]))
    assert count == n + new
    described = {"samplers": {ARM: {"name": "ntrk"}}, "steps_per_arm": {ARM: 25}, "model": {}, "num_steps": 25,
                 "primary_reward": "reward", "reward": None, "eval_rewards": {}, "fid_reference": "x",
                 "fid_feature": "x", "run_name": "scale"}
    values = {ARM: {k: v.numpy() for k, v in summary[ARM].pop("values").items()}}
    t_metrics, result = _timed(lambda: metrics_json(out, described, summary, [], [ARM]))
    assert result["arms"][ARM]["num_samples"] == n + new
    first = resume.first_images if resume is not None else {ARM: [(0, s, "") for s in range(16)]}
    t_report, _ = _timed(lambda: write_report([out], out / "report", title="scale", runs=[Run.from_summary(
        out, result, values, grid_images(first, recs, [ARM]))]))
    return {"new_samples": new, "merge_states_s": t_merge, "summary_s": t_summary, "records_jsonl_s": t_records,
            "metrics_json_s": t_metrics, "report_s": t_report,
            "records_jsonl_mb": round((out / layout.RECORDS).stat().st_size / 1e6, 1)}


def _old_end_of_run_per_sample(out: Path, keys: list) -> float:
    """Seconds per sample to read a finished record and PNG back (what every resumed run did)."""
    from ntrk_lightning.pipeline import layout

    t = time.perf_counter()
    for arm, p, s in keys:
        path = layout.find_record(out, arm, p, s)
        json.loads(path.read_text(encoding="utf-8"))
        layout.read_image_u8(path.with_suffix(".png"))
    return (time.perf_counter() - t) / max(1, len(keys))


def _full_check_per_sample(out: Path, n: int) -> float:
    from ntrk_lightning.pipeline import run

    keys = {(ARM, 0, s) for s in range(min(n, OLD_PATH_SAMPLES))}
    os.environ[run.FULL_CHECK_ENV] = "1"
    try:
        t_full, full = _timed(lambda: run.verify_finished(out, [ARM], keys, [""]))
    finally:
        del os.environ[run.FULL_CHECK_ENV]
    assert len(full.sha) == len(keys) and not full.problems
    return t_full / len(keys)


def measure(n: int, files: bool, root: Path, new: int) -> dict[str, Any]:
    out = root / f"n{n}"
    t_build, _ = _timed(lambda: build_folder(out, n, files))
    res: dict[str, Any] = {"finished": n, "per_sample_files": files, "build_s": round(t_build, 2)}
    resume = None
    if files:
        res.update(_resume_in_a_new_process(out, n))
        resume = _resume(out, n)  # again, untimed, for the end of run's plan
        assert not resume.pending and not resume.problems and not resume.reread, "the folder should be intact"
        assert resume.state_files == ["run0.rank00000"]
        plan = resume.records_plan
        res["full_check_us_per_sample"] = 1e6 * _full_check_per_sample(out, n)
        res["old_reread_us_per_sample"] = 1e6 * _old_end_of_run_per_sample(
            out, [(ARM, 0, s) for s in range(min(n, OLD_PATH_SAMPLES))])
    else:
        plan = _plan_without_files(out, n)
    res.update(_end_of_run(out, n, new, plan, resume))
    shutil.rmtree(out, ignore_errors=True)
    return res


def _derive(rows: list[dict[str, Any]]) -> None:
    """Per-sample costs; the resume costs of file-less sizes from the largest full size."""
    full = [r for r in rows if r["per_sample_files"]]
    ref = full[-1] if full else None
    for r in rows:
        n = r["finished"]
        if "resume_s" in r:
            r["resume_us_per_sample"] = round(1e6 * r["resume_s"] / n, 2)
            r["resume_cpu_us_per_sample"] = round(1e6 * r["resume_cpu_s"] / n, 2)
        elif ref is not None:
            r["resume_us_per_sample"] = ref["resume_us_per_sample"]
            r["resume_cpu_us_per_sample"] = ref["resume_cpu_us_per_sample"]
        if ref is not None:
            r["full_check_us_per_sample"] = round(r.get("full_check_us_per_sample", ref["full_check_us_per_sample"]), 2)
            r["old_end_of_run_s"] = round(ref["old_reread_us_per_sample"] * n / 1e6, 2)
        r["end_of_run_s"] = round(r["merge_states_s"] + r["summary_s"] + r["records_jsonl_s"] + r["metrics_json_s"]
                                  + r["report_s"], 3)


def _markdown(rows: list[dict[str, Any]], machine: str) -> str:
    head = ("| finished | files | resume µs/sample | CPU µs/sample | full check µs/sample "
            "| new samples | merge s | summary s | records.jsonl s | metrics.json s | report s | end of run s "
            "| before: read back s |")
    lines = [f"# Run folder scale ({machine})", "",
             "`python -m benchmarks.run_folder_scale`: resuming and finishing a run whose folder already "
             "holds N finished samples (one arm). Resume = the data module's whole `setup` in a new process (one listing, "
             "the record shards read without decoding a record, two `stat` calls per sample against its "
             "stat signature, the metric-state and records.jsonl plans, the items left), wall-clock and "
             "CPU time of the process, each the least of 3 calls. Full check = parsing each record file "
             "and hashing its PNG (a changed file, an older folder; timed on "
             f"{OLD_PATH_SAMPLES} samples). End of run, after generating the new samples: merging the "
             "persisted states, summarising (reward statistics and values, FID, sample costs), appending "
             "the new records to records.jsonl, metrics.json from the summary, and the report (table, "
             "histograms, grid) from the summary. \"Before: read back\" = reading every finished record "
             "and image back for the metrics, as resumed runs did before metric states were persisted "
             f"(timed on {OLD_PATH_SAMPLES} samples, scaled). Rows without per-sample files (1M) take "
             "the resume cost per sample from the largest full row.", "",
             "What still grows with N at the end of a run: the reward statistics are exact (every value "
             "is kept, 8 bytes per sample and reward, and sorted once for the quantiles) and the "
             "histograms bin every value; both are vectorised.", "",
             f"Load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             head, "|" + "---:|" * 13]
    for r in rows:
        lines.append(f"| {r['finished']} | {'yes' if r['per_sample_files'] else 'no'} | "
                     f"{r.get('resume_us_per_sample', '–')} | {r.get('resume_cpu_us_per_sample', '–')} | "
                     f"{r.get('full_check_us_per_sample', '–')} | {r['new_samples']} | "
                     f"{r['merge_states_s']:.3f} | {r['summary_s']:.3f} | {r['records_jsonl_s']:.3f} | "
                     f"{r['metrics_json_s']:.3f} | {r['report_s']:.3f} | "
                     f"{r['end_of_run_s']} | {r.get('old_end_of_run_s', '–')} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    ap.add_argument("--full_max", type=int, default=100_000, help="largest size built with per-sample files")
    ap.add_argument("--new", type=int, default=256, help="samples the measured run generates")
    ap.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--reuse", default=None,
                    help="JSON-lines file of rows printed by an earlier invocation, kept instead of measured again")
    ap.add_argument("--time_resume", default=None, help=argparse.SUPPRESS)  # internal: one resume, in this process
    args = ap.parse_args(argv)
    if args.time_resume:
        print(json.dumps(_time_resume(Path(args.time_resume), int(args.sizes))))
        return 0
    os.environ["NTRK_FSYNC"] = "0"  # building the folders is not what is measured
    machine = f"{_cpu_name()}, {os.cpu_count()} cores, no GPU"
    root = Path(args.root or tempfile.mkdtemp(prefix="ntrk_scale_"))
    rows = [json.loads(line) for line in Path(args.reuse).read_text().splitlines()] if args.reuse else []
    for n in (int(s) for s in args.sizes.split(",")):
        if any(r["finished"] == n for r in rows):
            continue
        rows.append(measure(n, n <= args.full_max, root, args.new))
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r["finished"])
    _derive(rows)
    result = {"machine": machine, "load_average_at_end": os.getloadavg(),
              "target_resume_us_per_sample": TARGET_US_PER_SAMPLE, "rows": rows}
    atomic_write_json(RESULTS / "run_folder_scale.json", result)
    atomic_write_text(RESULTS / "run_folder_scale.md", _markdown(rows, machine))
    print(_markdown(rows, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
