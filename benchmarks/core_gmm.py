"""The sampling core on the exact GMM: NTRK at 25 steps for several strengths and whitening
operators against plain sampling, and the cost of the whitening next to one denoiser call.

    python -m benchmarks.core_gmm

Writes benchmarks/results/core_gmm.{json,md}. Every row uses the same 256 evaluation seeds.
Reward = target logit of the 8x8 guidance classifier; MMD = distance to exact draws of the
mixture's 3s (benchmarks/common.py; lower is better); log p0 = the mixture's exact log-likelihood
of the samples; judge = the held-out 8x8 MLP's accuracy on the target digit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from benchmarks.common import RESULTS, gmm_testbed, machine, machine_line, median_seconds, write_json, write_text

GAMMAS = (0.05, 0.1, 0.2, 0.3)
WHITENINGS = (("spectral", 1), ("spectral", 2), ("radial", 1), ("sphere", 1), ("standardize", 1), ("identity", 1))


def sweep(n: int) -> list[dict[str, Any]]:
    import ntrk_lightning as ntrk
    from ntrk_lightning.noise import sample_seeds

    tb = gmm_testbed()
    seeds = sample_seeds(2000, n)
    specs: list[tuple[str, Any]] = [("plain", ntrk.Plain())]
    for kind, block in WHITENINGS:
        for g in GAMMAS:
            specs.append((f"ntrk tilt {kind}/{block} gamma={g}", ntrk.NTRK(mode="tilt", gamma=g, whitening=kind, block=block)))
    for rho in (0.2, 0.4):
        specs.append((f"ntrk mix spectral/1 rho={rho}", ntrk.NTRK(rho=rho * rho)))
    specs.append(("ntrk tilt spectral/1 gamma=0.1 grad=tweedie", ntrk.NTRK(mode="tilt", gamma=0.1, grad="tweedie")))
    rows = []
    for label, spec in specs:
        res = ntrk.sample(tb.model, tb.scheduler, tb.reward, spec, 25, seed=seeds)
        with torch.no_grad():
            acc = float((tb.judge(res.images.clamp(0, 1)).argmax(1) == 3).double().mean())
        lp = tb.extra["gmm"].log_prob(res.samples)
        rows.append({"label": label, "sampler": spec.describe(), "reward": float(res.rewards.mean()),
                     "mmd": tb.quality(res.samples, res.images),
                     "reward_se": float(res.rewards.std() / n ** 0.5), "log_p0": float(lp.mean()),
                     "log_p0_se": float(lp.std() / n ** 0.5), "judge_accuracy": acc, "nfe": res.nfe,
                     "grad_evals": res.grad_evals, "nan_fallbacks": res.nan_fallbacks})
        print(f"{label:45s} reward {rows[-1]['reward']:7.3f}  mmd {rows[-1]['mmd']:8.2f}  "
              f"log p0 {rows[-1]['log_p0']:8.2f}  judge {acc:.3f}")
    return rows, tb.extra["log_p0_of_exact_3s"]


def whitening_cost() -> list[dict[str, Any]]:
    from ntrk_lightning.backbones.digits_unet import load_digits_unet
    from ntrk_lightning.whitening import whiten

    tb = gmm_testbed()
    unet = load_digits_unet()
    g = torch.Generator().manual_seed(0)
    out = []
    cases = [("gmm 8x8, batch 256", (256, 1, 8, 8), lambda x: tb.extra["gmm"].eps(x, torch.full((x.shape[0],), 500))),
             ("digits16 UNet 16x16, batch 256", (256, 1, 16, 16),
              lambda x: unet.denoiser(x, torch.full((x.shape[0],), 500))),
             ("SD 1.5 latents 4x64x64, batch 4", (4, 4, 64, 64), None),
             ("SDXL latents 4x128x128, batch 4", (4, 4, 128, 128), None)]
    with torch.no_grad():
        for label, shape, den in cases:
            x = torch.randn(shape, generator=g)
            row = {"case": label, "shape": list(shape)}
            for kind, block in (("spectral", 1), ("radial", 1), ("sphere", 1)):
                row[f"whiten_{kind}_ms"] = 1e3 * median_seconds(lambda: whiten(x, kind, block))
            if den is not None:
                row["denoiser_forward_ms"] = 1e3 * median_seconds(lambda: den(x), reps=10)
                row["ratio_spectral_to_forward"] = row["whiten_spectral_ms"] / row["denoiser_forward_ms"]
            out.append(row)
            print(row)
    return out


def markdown(rows: list[dict], cost: list[dict], info: dict, exact_lp: float) -> str:
    L = ["# Sampling core on the exact digits GMM", "",
         f"Machine: {machine_line(info)}. 25 DDIM steps (eta = 1), {rows[0].get('n', '')} samples per row, the same "
         "seeds in every row. Reward: target-3 logit of the 8x8 guidance classifier; MMD: distance to exact draws "
         "of the mixture's 3s (lower is better); log p0: exact mixture log-likelihood of the samples — exact draws "
         f"of 3s score {exact_lp:.1f} on average, and 25-step DDIM samples score higher than exact draws because "
         "the last steps average out detail; judge: held-out MLP's accuracy on 3.", "",
         "| sampler | reward (± se) | MMD vs exact 3s | mean log p0 (± se) | judge acc | NFE | grad evals |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['label']} | {r['reward']:.2f} ± {r['reward_se']:.2f} | {r['mmd']:.1f} | "
                 f"{r['log_p0']:.1f} ± {r['log_p0_se']:.1f} | {r['judge_accuracy']:.3f} | {r['nfe']:g} | {r['grad_evals']:g} |")
    L += ["", "## Cost of the whitening", "",
          "Median wall-clock of one `whiten` call (no gradient), and of one denoiser forward on the same batch.", "",
          "| case | spectral/1 ms | radial/1 ms | sphere ms | denoiser forward ms | spectral / forward |",
          "|---|---:|---:|---:|---:|---:|"]
    for c in cost:
        ratio = c.get("ratio_spectral_to_forward")
        L.append(f"| {c['case']} | {c['whiten_spectral_ms']:.3f} | {c['whiten_radial_ms']:.3f} | {c['whiten_sphere_ms']:.3f} | "
                 f"{c.get('denoiser_forward_ms', float('nan')):.3f} | {'–' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows, exact_lp = sweep(args.n)
    for r in rows:
        r["n"] = args.n
    cost = whitening_cost()
    info = machine()
    write_json(RESULTS / "core_gmm.json", {"machine": info, "n": args.n, "rows": rows, "whitening_cost": cost,
                                           "log_p0_of_exact_3s": exact_lp})
    write_text(RESULTS / "core_gmm.md", markdown(rows, cost, info, exact_lp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
