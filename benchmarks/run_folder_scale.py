"""Scale of an ``ntrk predict`` run folder: what resuming and finishing a run cost per sample an
earlier run had already finished, at 10k / 100k / 1M finished samples.

    python -m benchmarks.run_folder_scale [--sizes 10000,100000,1000000] [--full_max 100000]

A synthetic folder of N finished samples per arm (one arm, tiny 16x16 grey PNGs, records with
checksums, sharded as ``ntrk predict`` writes them, plus one persisted metric-state file as a
finished earlier run leaves it) is built in a temporary folder, then the steps of the next run
are timed with the project's own functions:

* planning (rank 0, data module ``setup``): listing the records (``layout.locate_records``),
  checking every finished sample (``run.verify_finished``: record parsed, PNG size and sha256),
  choosing the persisted states that cover them (``run.plan_states``);
* end of run (writer): loading and merging the persisted states into fresh metrics, summarising
  them (reward statistics and FID), rewriting ``records.jsonl``; and, for comparison, what the
  end of a resumed run cost before states were persisted: reading every finished record and
  image back (measured on the first 10k samples, per sample).

Sizes above ``--full_max`` are built without per-sample files (no PNGs, no record files: 1M
samples would be 2M files here): for them only the state/records steps are measured, and the
per-sample listing and checking costs are those measured at the largest full size. Diversity is
left out: its pairwise distances are quadratic in the samples at any folder layout.

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


def build_folder(out: Path, n: int, files: bool) -> list[dict[str, Any]]:
    """N finished samples of one prompt (+ the metric states an earlier run persisted)."""
    from metrics.group import group_states, update_group
    from ntrk_lightning.pipeline import layout

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(1, 1, 16, 16, generator=g) * 255).byte()
    png = layout.png_bytes(base[0])
    template = _record(0, 0, png)
    records = []
    for s in range(n):
        # the same record schema; built from a template when no file is written (1M builds)
        rec = _record(0, s, png) if files else {**template, "key": layout.key(ARM, 0, s), "sample_index": s}
        if files:
            folder = layout.sample_dir(out, ARM, 0, s)
            if s % layout.SHARD_SAMPLES == 0:
                folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{layout.stem(0, s)}.png").write_bytes(png)
            (folder / f"{layout.stem(0, s)}.json").write_text(json.dumps(rec) + "\n")
        records.append(rec)
    groups = _groups()
    chunk = 4096
    for lo in range(0, n, chunk):
        b = min(chunk, n - lo)
        update_group(groups[ARM], base.expand(b, -1, -1, -1), {r: torch.full((b,), 1.0) for r in REWARDS})
    (out / layout.STATES).mkdir(parents=True, exist_ok=True)
    torch.save({"arms": {ARM: group_states(groups[ARM])}}, out / layout.STATES / "run0.rank00000.pt")
    atomic_write_json(out / layout.STATES / "run0.rank00000.json",
                      {"keys": {r["key"]: r["png_sha256"] for r in records}}, indent=None)
    return records


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def _end_of_run(out: Path, records: list[dict[str, Any]], finished: dict) -> dict[str, float]:
    from metrics.group import merge_group_states, summarize_group
    from ntrk_lightning.pipeline import layout, run

    t_plan, (files, reread) = _timed(lambda: run.plan_states(out, finished))
    assert files == ["run0.rank00000"] and not reread, (files, len(reread))
    groups = _groups()

    def merge():
        states = torch.load(out / layout.STATES / f"{files[0]}.pt", weights_only=True)["arms"]
        merge_group_states(groups[ARM], states[ARM])

    t_merge, _ = _timed(merge)
    t_summary, summary = _timed(lambda: summarize_group(groups[ARM], list(REWARDS)))
    assert summary["rewards"]["reward"]["count"] == len(records)
    t_records, _ = _timed(lambda: layout.write_records_jsonl(out, records))
    return {"plan_states_s": t_plan, "merge_states_s": t_merge, "summary_s": t_summary,
            "records_jsonl_s": t_records}


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
    t_build, records = _timed(lambda: build_folder(out, n, files))
    res: dict[str, Any] = {"finished": n, "per_sample_files": files, "build_s": round(t_build, 2)}
    if files:
        keys = {(ARM, 0, s) for s in range(n)}
        res["locate_records_s"], located = _timed(lambda: layout.locate_records(out, [ARM]))
        assert len(located) == n
        res["verify_finished_s"], (finished, problems) = _timed(lambda: run.verify_finished(out, [ARM], keys, [""]))
        assert len(finished) == n and not problems
        res["old_reread_us_per_sample"] = 1e6 * _old_end_of_run_per_sample(out, sorted(keys)[:OLD_PATH_SAMPLES])
    else:
        finished = {layout.record_key(r): r for r in records}
    res.update(_end_of_run(out, records, finished))
    shutil.rmtree(out, ignore_errors=True)
    return res


def _derive(rows: list[dict[str, Any]]) -> None:
    """Per-sample costs; listing/checking of file-less sizes from the largest full size."""
    full = [r for r in rows if r["per_sample_files"]]
    ref = full[-1] if full else None
    for r in rows:
        n = r["finished"]
        if ref is not None:
            list_us = 1e6 * (r.get("locate_records_s", ref["locate_records_s"] / ref["finished"] * n)) / n
            check_us = 1e6 * (r.get("verify_finished_s", ref["verify_finished_s"] / ref["finished"] * n)) / n
            r["list_us_per_sample"], r["check_us_per_sample"] = round(list_us, 2), round(check_us, 2)
            r["old_end_of_run_s"] = round(ref["old_reread_us_per_sample"] * n / 1e6, 2)
        r["plan_states_us_per_sample"] = round(1e6 * r["plan_states_s"] / n, 3)
        r["end_of_run_s"] = round(r["merge_states_s"] + r["summary_s"] + r["records_jsonl_s"], 3)
        r["end_of_run_us_per_sample"] = round(1e6 * r["end_of_run_s"] / n, 3)


def _markdown(rows: list[dict[str, Any]], machine: str) -> str:
    head = ("| finished | files | list µs/sample | check µs/sample | plan states µs/sample | merge s | summary s "
            "| records.jsonl s | end of run s | before: read back s |")
    lines = [f"# Run folder scale ({machine})", "",
             "`python -m benchmarks.run_folder_scale`: resuming and finishing a run whose folder already "
             "holds N finished samples (one arm). List = finding the records; check = parsing each record "
             "and hashing its PNG (integrity on resume); plan = choosing the persisted metric states; end "
             "of run = merging those states, summarising (reward statistics, FID) and rewriting "
             "records.jsonl. \"Before\" = reading every finished record and image back for the metrics, "
             f"as resumed runs did before metric states were persisted (timed on {OLD_PATH_SAMPLES} "
             "samples, scaled). Rows without per-sample files (1M) take list/check per sample from the "
             "largest full row.", "",
             f"Measured on a machine shared with other jobs (load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores at the end): absolute times are several times those of an idle "
             "machine, and rows measured at different moments saw different loads.", "",
             head, "|" + "---:|" * 10]
    for r in rows:
        lines.append(f"| {r['finished']} | {'yes' if r['per_sample_files'] else 'no'} | "
                     f"{r.get('list_us_per_sample', '–')} | {r.get('check_us_per_sample', '–')} | "
                     f"{r['plan_states_us_per_sample']} | {r['merge_states_s']:.3f} | {r['summary_s']:.3f} | "
                     f"{r['records_jsonl_s']:.3f} | {r['end_of_run_s']} | {r.get('old_end_of_run_s', '–')} |")
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
