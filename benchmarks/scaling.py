"""Generation throughput of `ntrk predict` with 1 and 2 DDP processes, in one run.

    python -m benchmarks.scaling

Runs the main job's config (NTRK + plain reference on digits16) on fresh output folders, once on
one process and once with `--trainer.devices 2 --trainer.strategy ddp` (CPU), alternating twice,
and reads each run's `metrics.json` (`last_run.predict_seconds`: the predict loop until every
process had finished, so start-up and imports are excluded). Throughput = generated samples per
second; the result is the ratio 2-process / 1-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, machine_line, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, devices: int, samples: int, batch: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ntrk_lightning.cli", "predict", "-c", str(REPO / "configs" / "digits_ntrk.yaml"),
           "--output_dir", str(out), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
           "--data.init_args.samples_per_prompt", str(samples), "--data.init_args.batch_size", str(batch),
           "--model.init_args.report", "false"]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    last = json.loads((out / "metrics.json").read_text())["last_run"]
    return {"devices": devices, "wall_seconds": wall, **last,
            "samples_per_second": last["generated_this_run"] / last["predict_seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="samples per arm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for devices in (1, 2):
                out = Path(tmp) / f"r{rep}_d{devices}"
                runs.append(run(out, devices, args.samples, args.batch))
                shutil.rmtree(out)
                print(runs[-1])
    tput = {d: statistics.median(r["samples_per_second"] for r in runs if r["devices"] == d) for d in (1, 2)}
    res = {"machine": machine(), "samples_per_arm": args.samples, "batch": args.batch, "runs": runs,
           "samples_per_second": tput, "ratio_2_over_1": tput[2] / tput[1]}
    write_json(RESULTS / "scaling.json", res)
    md = ["# `ntrk predict` throughput: 1 vs 2 DDP processes", "",
          f"Machine: {machine_line(res['machine'])}. Main job config (NTRK + plain, digits16, 25 steps), "
          f"{args.samples} samples per arm, batch {args.batch}, {args.repeats} alternating repeats (median).", "",
          "| processes | samples / s (predict loop) | wall-clock of the command, s |", "|---:|---:|---:|"]
    for d in (1, 2):
        walls = [r["wall_seconds"] for r in runs if r["devices"] == d]
        md.append(f"| {d} | {tput[d]:.1f} | {statistics.median(walls):.1f} |")
    md += ["", f"Throughput ratio 2 / 1 processes: **{res['ratio_2_over_1']:.2f}**. Both configurations use the "
           "machine's 2 cores: the single process through 2 intra-op threads, each DDP process with 1 thread "
           "(Lightning divides the cores among local processes). The ratio is what sharding items over "
           "processes buys over intra-op threading for this small model, net of DDP's own costs "
           "(start-up excluded, the final metric synchronisation included).", ""]
    write_text(RESULTS / "scaling.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
