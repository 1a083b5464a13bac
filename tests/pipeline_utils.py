"""Helpers shared by the pipeline tests: small runs of the shipped main-job config, reading a run
folder back, and running the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIG = REPO / "configs" / "digits_ntrk.yaml"

# A small version of the main job: same config file, fewer samples and steps.
SMALL = ["--data.init_args.samples_per_prompt", "10", "--data.init_args.batch_size", "4",
         "--model.init_args.num_steps", "10", "--trainer.accelerator", "cpu"]


def predict_args(out: Path, extra: Sequence[str] = (), config: Path = MAIN_CONFIG) -> list[str]:
    return ["predict", "-c", str(config), "--output_dir", str(out), *SMALL, *extra]


def run_in_process(args: Sequence[str]) -> None:
    from ntrk_lightning.cli import main

    assert main(list(args)) == 0


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_cli(args: Sequence[str], timeout: float = 300, check: bool = True,
            prefix: Sequence[str] = (sys.executable, "-m", "ntrk_lightning.cli")) -> subprocess.CompletedProcess:
    """The real command in a subprocess (DDP launched from inside pytest would re-run pytest)."""
    proc = subprocess.run([*prefix, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ntrk {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list[dict]:
    lines = (out / "records.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def images_by_key(out: Path) -> dict[str, np.ndarray]:
    return {r["key"]: np.asarray(Image.open(out / r["image"])) for r in records(out)}


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_metrics_close(a: dict, b: dict, rtol: float = 1e-6, atol: float = 1e-6, path: str = "") -> None:
    """Every number in ``a`` equals its counterpart in ``b`` (timings excepted)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            if k in ("seconds_per_sample", "seconds_total", "seconds", "run", "last_run"):
                continue
            assert_metrics_close(a[k], b[k], rtol, atol, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_metrics_close(x, y, rtol, atol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, f"{path}: {a} vs {b}"
        assert abs(a - b) <= atol + rtol * abs(b), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def sample_path(out: Path, key: str, suffix: str = ".png") -> Path:
    """The file of a sample (``arm/pXXXXX_sXXXXX``) in the run folder's layout."""
    from ntrk_lightning.pipeline import layout

    arm, stem = key.split("/")
    p, s = (int(x[1:]) for x in stem.split("_"))
    return layout.image_path(out, arm, p, s).with_suffix(suffix)


def flatten_run(out: Path) -> None:
    """Turn a run folder into the layout from before sharding and persisted metric states:
    ``images/<arm>/<stem>.{png,json}`` (what older versions wrote)."""
    import shutil

    for arm_dir in (out / "images").iterdir():
        for f in [f for f in arm_dir.rglob("*") if f.is_file() and f.parent != arm_dir]:
            f.rename(arm_dir / f.name)
        for shard in sorted((d for d in arm_dir.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            shard.rmdir()  # deepest first: the shard folders are empty now
        for rec_path in arm_dir.glob("*.json"):
            rec = json.loads(rec_path.read_text())
            rec["image"] = f"images/{arm_dir.name}/{rec_path.stem}.png"
            rec_path.write_text(json.dumps(rec) + "\n")
    for folder in ("metric_states", "records"):
        shutil.rmtree(out / folder, ignore_errors=True)


def expected_keys(arms: Sequence[str], n: int, prompts: int = 1) -> set[str]:
    return {f"{a}/p{p:05d}_s{s:05d}" for a in arms for p in range(prompts) for s in range(n)}


def wait_for(pred, timeout: float, interval: float = 0.1, proc: Optional[subprocess.Popen] = None) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(interval)
    return False
