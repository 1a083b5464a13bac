"""Scale of an ``ntrk predict`` run folder: what resuming and finishing a run cost per sample an
earlier run had already finished, at 10k / 100k / 1M finished samples.

    python -m benchmarks.run_folder_scale [--sizes 10000,100000,1000000] [--full_max 100000]

A synthetic folder of N finished samples per arm (one arm, tiny 16x16 grey PNGs, records with
checksums, sharded as ``ntrk predict`` writes them, the record shard with each sample's stat
signature, plus one persisted metric-state file as a finished earlier run leaves it) is built in
a temporary folder, then the steps of the next run are timed with the project's own functions:

* resume (rank 0, data module ``setup``): the scans for stale temporaries and failure markers
  (``layout.remove_stale_temporaries``, ``layout.remove_failed``); ``run.verify_finished``, which
  lists the record files
  (``layout.locate_records``, also timed alone), parses the record shards once and accepts every
  sample whose two files still have the stat signature of its shard line (two ``stat`` calls, no
  read, no hash); then ``run.plan_states``, choosing the persisted states that cover them. For
  comparison, the full check of every sample (record parsed, PNG size and sha256: what every
  resume did before signatures, and still does for a changed file or an older folder), timed on
  the first 10k samples with ``NTRK_FULL_CHECK=1``;
* end of run (writer): loading and merging the persisted states into fresh metrics, summarising
  them (reward statistics and FID), ordering the records and writing ``records.jsonl`` from their
  JSON texts (a byte copy, no re-encoding), and the per-arm means of ``metrics.json``; and, for
  comparison, what the end of a resumed run cost before states were persisted: reading every
  finished record and image back (measured on the first 10k samples, per sample).

Sizes above ``--full_max`` are built without per-sample files (no PNGs, no record files: 1M
samples would be 2M files here): for them only the state/records steps are measured, and the
per-sample resume cost is the one measured at the largest full size. Diversity is left out: its
pairwise distances are quadratic in the samples at any folder layout.

Results: ``benchmarks/results/run_folder_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
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
    return build_groups([ARM], list(REWARDS), feature, ref, diversity=False)


def _record(p: int, s: int, png: bytes) -> dict[str, Any]:
    from ntrk_lightning.pipeline import layout

    rec = layout.build_record(ARM, p, "", s, 1000 + s, {"name": "ntrk"}, 25,
                              {n: float(s % 7) for n in REWARDS}, 25, 24, 0, 0.01, 0)
    rec["png_bytes"], rec["png_sha256"] = len(png), hashlib.sha256(png).hexdigest()
    return rec


def build_folder(out: Path, n: int, files: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """N finished samples of one prompt, their record shard (+ the metric states an earlier run
    persisted); returns the records and their JSON texts."""
    from metrics.group import group_states, update_group
    from ntrk_lightning.pipeline import layout

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(1, 1, 16, 16, generator=g) * 255).byte()
    png = layout.png_bytes(base[0])
    template = _record(0, 0, png)
    records, texts, shard = [], [], []
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
        records.append(rec)
        texts.append(text)
    if shard:
        layout.append_lines(out / layout.RECORD_SHARDS / "run0.rank00000.jsonl", shard)
    groups = _groups()
    chunk = 4096
    for lo in range(0, n, chunk):
        b = min(chunk, n - lo)
        update_group(groups[ARM], base.expand(b, -1, -1, -1), {r: torch.full((b,), 1.0) for r in REWARDS})
    (out / layout.STATES).mkdir(parents=True, exist_ok=True)
    torch.save({"arms": {ARM: group_states(groups[ARM])}}, out / layout.STATES / "run0.rank00000.pt")
    atomic_write_json(out / layout.STATES / "run0.rank00000.json",
                      {"keys": {r["key"]: r["png_sha256"] for r in records}}, indent=None)
    return records, texts


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def _timed_cpu(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, value), each the least of ``repeat`` calls (as
    ``timeit`` does: on a shared machine the rest is other jobs); the CPU time is closer to what an
    idle machine takes. Only for steps that change nothing on disk."""
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), value


def _end_of_run(out: Path, records: list[dict[str, Any]], lines: list[str], finished: dict) -> dict[str, float]:
    from metrics.group import merge_group_states, summarize_group
    from ntrk_lightning.pipeline import layout, run
    from ntrk_lightning.pipeline.data import Resume
    from ntrk_lightning.pipeline.writer import SampleWriter, metrics_json

    t_plan, cpu_plan, (files, reread) = _timed_cpu(lambda: run.plan_states(out, finished))
    assert files == ["run0.rank00000"] and not reread, (files, len(reread))
    groups = _groups()

    def merge():
        states = torch.load(out / layout.STATES / f"{files[0]}.pt", weights_only=True)["arms"]
        merge_group_states(groups[ARM], states[ARM])

    t_merge, _ = _timed(merge)
    t_summary, summary = _timed(lambda: summarize_group(groups[ARM], list(REWARDS)))
    assert summary["rewards"]["reward"]["count"] == len(records)
    resume = Resume(records={layout.record_key(r): r for r in records},
                    lines={layout.record_key(r): t for r, t in zip(records, lines)})

    def records_jsonl():  # what the writer's rank 0 does: order the records, copy their texts
        ordered, texts = SampleWriter(out)._all_records(resume, 1, [ARM])
        layout.write_records_jsonl(out, texts)
        return ordered

    t_records, ordered = _timed(records_jsonl)
    assert len(ordered) == len(records)
    described = {"samplers": {ARM: {"name": "ntrk"}}, "steps_per_arm": {ARM: 25}, "model": {}, "num_steps": 25,
                 "primary_reward": "reward", "reward": None, "eval_rewards": {}, "fid_reference": "x",
                 "fid_feature": "x"}
    t_metrics, _ = _timed(lambda: metrics_json(out, described, {ARM: {}}, ordered, [], [ARM]))
    return {"plan_states_s": t_plan, "plan_states_cpu_s": cpu_plan, "merge_states_s": t_merge, "summary_s": t_summary,
            "records_jsonl_s": t_records, "metrics_json_s": t_metrics,
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


def measure(n: int, files: bool, root: Path) -> dict[str, Any]:
    from ntrk_lightning.pipeline import layout, run

    out = root / f"n{n}"
    t_build, (records, texts) = _timed(lambda: build_folder(out, n, files))
    res: dict[str, Any] = {"finished": n, "per_sample_files": files, "build_s": round(t_build, 2)}
    if files:
        keys = {(ARM, 0, s) for s in range(n)}
        res["locate_records_s"], _, located = _timed_cpu(lambda: layout.locate_records(out, [ARM]))
        assert len(located) == n
        res["housekeeping_s"], res["housekeeping_cpu_s"], _ = _timed_cpu(  # the data module's other scans
            lambda: (layout.remove_stale_temporaries(out, [ARM]), layout.remove_failed(out, [ARM], set())))
        res["verify_finished_s"], res["verify_finished_cpu_s"], found = _timed_cpu(
            lambda: run.verify_finished(out, [ARM], keys, [""]))
        assert len(found.records) == n and not found.problems
        assert not [p for p in (out / layout.RECORD_SHARDS).iterdir() if p.name != "run0.rank00000.jsonl"]
        assert [found.lines[k] for k in sorted(keys)] == texts
        finished = found.records
        old_keys = {(ARM, 0, s) for s in range(min(n, OLD_PATH_SAMPLES))}
        os.environ[run.FULL_CHECK_ENV] = "1"
        try:
            t_full, full = _timed(lambda: run.verify_finished(out, [ARM], old_keys, [""]))
        finally:
            del os.environ[run.FULL_CHECK_ENV]
        assert len(full.records) == len(old_keys) and not full.problems
        res["full_check_us_per_sample"] = 1e6 * t_full / len(old_keys)
        res["old_reread_us_per_sample"] = 1e6 * _old_end_of_run_per_sample(out, sorted(old_keys))
    else:
        finished = {layout.record_key(r): r for r in records}
    res.update(_end_of_run(out, records, texts, finished))
    shutil.rmtree(out, ignore_errors=True)
    return res


def _derive(rows: list[dict[str, Any]]) -> None:
    """Per-sample costs; the resume costs of file-less sizes from the largest full size."""
    full = [r for r in rows if r["per_sample_files"]]
    ref = full[-1] if full else None
    for r in rows:
        n = r["finished"]
        if ref is not None:
            list_us = 1e6 * (r.get("locate_records_s", ref["locate_records_s"] / ref["finished"] * n)) / n
            check_s = r.get("verify_finished_s", ref["verify_finished_s"] / ref["finished"] * n)
            check_s += r.get("housekeeping_s", ref["housekeeping_s"] / ref["finished"] * n)
            check_us = 1e6 * check_s / n
            r["list_us_per_sample"], r["verify_us_per_sample"] = round(list_us, 2), round(check_us, 2)
            r["full_check_us_per_sample"] = round(r.get("full_check_us_per_sample", ref["full_check_us_per_sample"]), 2)
            r["old_end_of_run_s"] = round(ref["old_reread_us_per_sample"] * n / 1e6, 2)
        r["plan_states_us_per_sample"] = round(1e6 * r["plan_states_s"] / n, 3)
        if "verify_us_per_sample" in r:
            r["resume_us_per_sample"] = round(r["verify_us_per_sample"] + r["plan_states_us_per_sample"], 2)
            cpu = r.get("verify_finished_cpu_s", ref["verify_finished_cpu_s"] / ref["finished"] * n)
            cpu += r.get("housekeeping_cpu_s", ref["housekeeping_cpu_s"] / ref["finished"] * n)
            r["resume_cpu_us_per_sample"] = round(1e6 * (cpu + r["plan_states_cpu_s"]) / n, 2)
        r["end_of_run_s"] = round(r["merge_states_s"] + r["summary_s"] + r["records_jsonl_s"] + r["metrics_json_s"], 3)
        r["records_jsonl_us_per_sample"] = round(1e6 * r["records_jsonl_s"] / n, 3)
        r["end_of_run_us_per_sample"] = round(1e6 * r["end_of_run_s"] / n, 3)


def _markdown(rows: list[dict[str, Any]], machine: str) -> str:
    head = ("| finished | files | resume µs/sample | CPU µs/sample | of which list | plan states | full check µs/sample (before) "
            "| merge s | summary s | records.jsonl s (µs/sample) | metrics.json s | end of run s "
            "| before: read back s |")
    lines = [f"# Run folder scale ({machine})", "",
             "`python -m benchmarks.run_folder_scale`: resuming and finishing a run whose folder already "
             "holds N finished samples (one arm). Resume = the data module's scans for stale temporaries "
             "and failure markers + `run.verify_finished` (listing the record "
             "files, parsing the record shards once, two `stat` calls per sample against the stat "
             "signature in its shard line) + `run.plan_states` (choosing the persisted metric states), "
             "wall-clock and CPU time of the process, each the least of 3 calls (the CPU time is closer "
             "to what an idle machine takes). "
             "Full check = parsing each record file and hashing its PNG, as every resume did before "
             "signatures (and still does for a changed file or an older folder; timed on "
             f"{OLD_PATH_SAMPLES} samples). End of run = merging the states, summarising (reward "
             "statistics, FID), ordering the records and writing records.jsonl from their JSON texts, "
             "and metrics.json's per-arm means. \"Before: read back\" = reading every finished record "
             "and image back for the metrics, as resumed runs did before metric states were persisted "
             f"(timed on {OLD_PATH_SAMPLES} samples, scaled). Rows without per-sample files (1M) take "
             "the resume cost per sample from the largest full row.", "",
             "What stays linear in N at the end of a run: records.jsonl is one file holding every "
             "record, so writing it is a copy of N record texts (about 0.5 kB each here), and the per-arm "
             "means of metrics.json (nfe, seconds per sample) run over every record in memory; the "
             "µs/sample column gives the first.", "",
             f"Measured on a machine shared with other jobs (load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores at the end): absolute times are several times those of an idle "
             "machine, and rows measured at different moments saw different loads.", "",
             head, "|" + "---:|" * 13]
    for r in rows:
        lines.append(f"| {r['finished']} | {'yes' if r['per_sample_files'] else 'no'} | "
                     f"{r.get('resume_us_per_sample', '–')} | {r.get('resume_cpu_us_per_sample', '–')} | "
                     f"{r.get('list_us_per_sample', '–')} | "
                     f"{r['plan_states_us_per_sample']} | {r.get('full_check_us_per_sample', '–')} | "
                     f"{r['merge_states_s']:.3f} | {r['summary_s']:.3f} | "
                     f"{r['records_jsonl_s']:.3f} ({r['records_jsonl_us_per_sample']}) | {r['metrics_json_s']:.3f} | "
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
    ap.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--reuse", default=None,
                    help="JSON-lines file of rows printed by an earlier invocation, kept instead of measured again")
    args = ap.parse_args(argv)
    os.environ["NTRK_FSYNC"] = "0"  # building the folders is not what is measured
    machine = f"{_cpu_name()}, {os.cpu_count()} cores, no GPU"
    root = Path(args.root or tempfile.mkdtemp(prefix="ntrk_scale_"))
    rows = [json.loads(line) for line in Path(args.reuse).read_text().splitlines()] if args.reuse else []
    for n in (int(s) for s in args.sizes.split(",")):
        if any(r["finished"] == n for r in rows):
            continue
        rows.append(measure(n, n <= args.full_max, root))
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
