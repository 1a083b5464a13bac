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


#: the NTRK and DPS strengths timed (the step's cost does not depend on them)
NTRK_GAMMA = 0.1
DPS_SCALE = 0.1
#: the noise level of the floor measurement (any mid-trajectory training timestep)
FLOOR_TIMESTEP = 500


def time_samplers(model: Any, sch: Any, reward: Any, shape: tuple[int, ...], steps: int,
                  reps: int) -> dict[str, list[float]]:
    """Seconds per step of plain, DPS and NTRK, in ``reps`` interleaved repetitions after a warm-up."""
    import ntrk_lightning as ntrk

    specs = {"plain": ntrk.Plain(), "dps": ntrk.DPS(scale=DPS_SCALE), "ntrk": ntrk.NTRK(mode="tilt", gamma=NTRK_GAMMA)}
    per_step: dict[str, list[float]] = {k: [] for k in specs}
    for name, spec in specs.items():  # warm-up
        ntrk.sample(model, sch, reward, spec, 3, shape, seed=0)
    for rep in range(reps):
        for name, spec in specs.items():
            res = ntrk.sample(model, sch, reward, spec, steps, shape, seed=rep)
            per_step[name].append(res.seconds / steps)
    return per_step


def time_floor(model: Any, sch: Any, reward: Any, shape: tuple[int, ...]) -> dict[str, float]:
    """Median seconds of one denoiser forward, of the forward plus the reward backward through the
    Tweedie estimate and the denoiser (the floor of a guided step), and of one whitening."""
    from ntrk_lightning.whitening import whiten

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((shape[0],), FLOOR_TIMESTEP)
    a = float(sch.alphas_cumprod[FLOOR_TIMESTEP])

    def floor_step() -> None:
        xg = x.detach().requires_grad_(True)
        eps = model.denoiser(xg, t)
        x0 = (xg - (1 - a) ** 0.5 * eps) / a ** 0.5
        torch.autograd.grad(reward(model.decode(x0)).sum(), xg)

    def forward_only() -> None:
        with torch.no_grad():
            model.denoiser(x, t)

    return {"floor": median_seconds(floor_step), "forward": median_seconds(forward_only),
            "whiten": median_seconds(lambda: whiten(x, "spectral", 1), 100)}


def report(out: dict[str, Any]) -> str:
    med, r, wh = out["seconds_per_step"], out["ratio_to_plain"], out["whiten_seconds"]
    floor, fwd = out["forward_backward_floor_seconds"], out["forward_seconds"]
    md = ["# Overhead of a guided step (digits16, side by side)", "",
          f"Machine: {machine_line(out['machine'])}. Batch {out['batch']}, {out['steps']} steps, median of "
          f"{out['reps']} interleaved repetitions.", "",
          "| sampler | ms / step | ratio to plain |", "|---|---:|---:|"]
    for k in ("plain", "dps", "ntrk"):
        md.append(f"| {k} | {med[k] * 1e3:.2f} | {r[k]:.2f} |")
    md += ["", f"- NTRK step / DPS step: **{out['ntrk_over_dps']:.3f}**",
           f"- whitening (spectral, per-frequency) share of an NTRK step: **{100 * out['whitening_share_of_ntrk_step']:.2f}%** "
           f"({wh * 1e3:.3f} ms)",
           f"- NTRK step / (one denoiser forward + one reward backward through it) = **{out['ntrk_step_over_floor']:.3f}** "
           f"(floor {floor * 1e3:.2f} ms; a forward alone {fwd * 1e3:.2f} ms)", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from ntrk_lightning.backbones.digits_unet import load_digits_unet, make_scheduler
    from rewards.digits import DigitClassifierReward

    model, sch = load_digits_unet(), make_scheduler()
    reward = DigitClassifierReward(target=3)
    shape = (args.batch, *model.sample_shape)
    per_step = time_samplers(model, sch, reward, shape, args.steps, args.reps)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    t = time_floor(model, sch, reward, shape)
    out: dict[str, Any] = {
        "machine": machine(), "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "seconds_per_step": med, "all_seconds_per_step": per_step,
        "ratio_to_plain": {k: med[k] / med["plain"] for k in med},
        "ntrk_over_dps": med["ntrk"] / med["dps"],
        "forward_seconds": t["forward"], "forward_backward_floor_seconds": t["floor"], "whiten_seconds": t["whiten"],
        "whitening_share_of_ntrk_step": t["whiten"] / med["ntrk"],
        "ntrk_step_over_floor": med["ntrk"] / t["floor"],
    }
    write_json(RESULTS / "overhead.json", out)
    md = report(out)
    write_text(RESULTS / "overhead.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
