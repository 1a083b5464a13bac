"""Overhead of a guided step, measured side by side in one run on the shipped digits16 model.

    python -m benchmarks.overhead

For plain, DPS and NTRK (25 steps, batch 64) the seconds per step are timed in interleaved
repetitions (so drifting machine load hits all three alike) and reported as ratios to plain.
Also measured: the share of an NTRK step spent in the whitening, and the ratio of an NTRK step to
its physical floor — one denoiser forward plus one backward of the reward through the denoiser
and the Tweedie estimate (the work any gradient-guided step must do).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, machine_line, median_seconds, write_json, write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    import ntrk_lightning as ntrk
    from ntrk_lightning.backbones.digits_unet import load_digits_unet, make_scheduler
    from ntrk_lightning.whitening import whiten
    from rewards.digits import DigitClassifierReward

    model, sch = load_digits_unet(), make_scheduler()
    reward = DigitClassifierReward(target=3)
    shape = (args.batch, *model.sample_shape)
    specs = {"plain": ntrk.Plain(), "dps": ntrk.DPS(scale=0.1), "ntrk": ntrk.NTRK(mode="tilt", gamma=0.1)}
    per_step: dict[str, list[float]] = {k: [] for k in specs}
    for name, spec in specs.items():  # warm-up
        ntrk.sample(model, sch, reward, spec, 3, shape, seed=0)
    for rep in range(args.reps):
        for name, spec in specs.items():
            res = ntrk.sample(model, sch, reward, spec, args.steps, shape, seed=rep)
            per_step[name].append(res.seconds / args.steps)
    med = {k: statistics.median(v) for k, v in per_step.items()}

    # the floor: eps forward + reward backward through the Tweedie estimate and the denoiser
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch,), 500)
    a = float(sch.alphas_cumprod[500])

    def floor_step() -> None:
        xg = x.detach().requires_grad_(True)
        eps = model.denoiser(xg, t)
        x0 = (xg - (1 - a) ** 0.5 * eps) / a ** 0.5
        (g,) = torch.autograd.grad(reward(model.decode(x0)).sum(), xg)

    def forward_only() -> None:
        with torch.no_grad():
            model.denoiser(x, t)

    def whiten_only() -> None:
        whiten(x, "spectral", 1)

    floor = median_seconds(floor_step)
    fwd = median_seconds(forward_only)
    wh = median_seconds(whiten_only, 100)
    out: dict[str, Any] = {
        "machine": machine(), "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "seconds_per_step": med, "all_seconds_per_step": per_step,
        "ratio_to_plain": {k: med[k] / med["plain"] for k in med},
        "ntrk_over_dps": med["ntrk"] / med["dps"],
        "forward_seconds": fwd, "forward_backward_floor_seconds": floor, "whiten_seconds": wh,
        "whitening_share_of_ntrk_step": wh / med["ntrk"],
        "ntrk_step_over_floor": med["ntrk"] / floor,
    }
    write_json(RESULTS / "overhead.json", out)
    r = out["ratio_to_plain"]
    md = ["# Overhead of a guided step (digits16, side by side)", "",
          f"Machine: {machine_line(out['machine'])}. Batch {args.batch}, {args.steps} steps, median of {args.reps} "
          "interleaved repetitions.", "",
          "| sampler | ms / step | ratio to plain |", "|---|---:|---:|"]
    for k in ("plain", "dps", "ntrk"):
        md.append(f"| {k} | {med[k] * 1e3:.2f} | {r[k]:.2f} |")
    md += ["", f"- NTRK step / DPS step: **{out['ntrk_over_dps']:.3f}**",
           f"- whitening (spectral, per-frequency) share of an NTRK step: **{100 * out['whitening_share_of_ntrk_step']:.2f}%** "
           f"({wh * 1e3:.3f} ms)",
           f"- NTRK step / (one denoiser forward + one reward backward through it) = **{out['ntrk_step_over_floor']:.3f}** "
           f"(floor {floor * 1e3:.2f} ms; a forward alone {fwd * 1e3:.2f} ms)", ""]
    write_text(RESULTS / "overhead.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
