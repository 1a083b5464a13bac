"""Synthetic ``ntrk predict`` run folders in the format of docs/run_format.md, for report and
evaluate tests (no sampling: images are real digits, rewards drawn from a seeded generator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image


def digit_images(n: int, offset: int = 0, brighten: float = 0.0) -> list[np.ndarray]:
    """``n`` real scikit-learn digits at 16x16 as uint8 arrays (H, W)."""
    from ntrk_lightning.data.digits import real_images

    x, _ = real_images(16)
    out = []
    for i in range(n):
        a = x[(offset + 7 * i) % len(x), 0].numpy()
        out.append(np.clip(np.round((a * (1 - brighten) + brighten) * 255), 0, 255).astype(np.uint8))
    return out


def make_run(root: Path, name: str, arms: dict[str, dict[str, Any]], num_prompts: int = 2,
             samples_per_prompt: int = 5, num_steps: int = 25, seed: int = 0,
             metrics: Optional[dict[str, dict[str, Any]]] = None, write_metrics: bool = True) -> Path:
    """Write ``root/name`` with ``images/<arm>/pXXXXX_sXXXXX.{png,json}``, ``records.jsonl`` and
    ``metrics.json``. ``arms``: arm -> {"sampler": {...}, "nfe": int, "grad_evals": int,
    "reward_shift": float, "seconds": float}. Returns the folder."""
    out = root / name
    rng = np.random.default_rng(seed)
    records = []
    for a_i, (arm, spec) in enumerate(arms.items()):
        imgs = digit_images(num_prompts * samples_per_prompt, offset=a_i * 3, brighten=0.1 * a_i)
        k = 0
        for p in range(num_prompts):
            for s in range(samples_per_prompt):
                stem = f"p{p:05d}_s{s:05d}"
                rel = f"images/{arm}/{stem}.png"
                (out / "images" / arm).mkdir(parents=True, exist_ok=True)
                Image.fromarray(imgs[k], mode="L").save(out / rel)
                rec = {
                    "arm": arm, "key": f"{arm}/{stem}", "prompt_index": p, "prompt": f"a digit {p}",
                    "sample_index": s, "seed": 1000 * p + s, "image": rel, "sampler": spec["sampler"],
                    "num_steps": num_steps,
                    "rewards": {"reward": float(rng.normal(spec.get("reward_shift", 0.0), 1.0)),
                                "judge": float(rng.uniform(0, 1))},
                    "nfe": spec["nfe"], "grad_evals": spec.get("grad_evals", 0),
                    "nan_fallbacks": int(spec.get("nan_fallbacks", 0)) if k == 0 else 0,
                    "seconds": float(spec.get("seconds", 0.01)), "rank": 0,
                }
                (out / "images" / arm / f"{stem}.json").write_text(json.dumps(rec) + "\n")
                records.append(rec)
                k += 1
    records.sort(key=lambda r: (r["arm"], r["prompt_index"], r["sample_index"]))
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if write_metrics:
        arms_m = {}
        for arm, spec in arms.items():
            extra = (metrics or {}).get(arm, {})
            arms_m[arm] = {"sampler": spec["sampler"], "num_samples": num_prompts * samples_per_prompt,
                           "nfe_per_sample": float(spec["nfe"]), "grad_evals_per_sample": float(spec.get("grad_evals", 0)),
                           "seconds_per_sample": float(spec.get("seconds", 0.01)),
                           "nan_fallbacks": int(spec.get("nan_fallbacks", 0)), "rewards": {},
                           "fid": extra.get("fid"), "diversity": extra.get("diversity"),
                           "clip_score": extra.get("clip_score")}
        (out / "metrics.json").write_text(json.dumps({"run": name, "model": {"name": "digits16"},
                                                      "num_steps": num_steps, "primary_reward": "reward",
                                                      "arms": arms_m}, indent=2))
    return out


def two_runs(root: Path) -> tuple[Path, Path]:
    """Run ``digits_s25`` (NTRK + plain at 25 steps) and ``digits_s50`` (the same at 50 steps)."""
    a = make_run(root, "digits_s25", {
        "ntrk": {"sampler": {"name": "ntrk", "gamma": 0.3, "mode": "tilt"}, "nfe": 25, "grad_evals": 24,
                 "reward_shift": 2.0, "seconds": 0.02, "nan_fallbacks": 1},
        "plain": {"sampler": {"name": "plain", "eta": 1.0}, "nfe": 25, "grad_evals": 0, "reward_shift": 0.0,
                  "seconds": 0.01},
    }, num_steps=25, seed=1, metrics={"ntrk": {"fid": 3.5, "diversity": {"overall": 4.0, "per_group": {"0": 3.9}}},
                                       "plain": {"fid": 2.5, "diversity": 5.0}})
    b = make_run(root, "digits_s50", {
        "ntrk": {"sampler": {"name": "ntrk", "gamma": 0.3, "mode": "tilt"}, "nfe": 50, "grad_evals": 49,
                 "reward_shift": 2.5, "seconds": 0.04},
        "plain": {"sampler": {"name": "plain", "eta": 1.0}, "nfe": 50, "grad_evals": 0, "reward_shift": 0.1,
                  "seconds": 0.02},
    }, num_steps=50, seed=2, metrics={"ntrk": {"fid": 3.0, "diversity": 4.2, "clip_score": 21.5},
                                       "plain": {"fid": 2.2, "diversity": 5.1}})
    return a, b
