"""Reward vs compute: every sampler at equal NFE budgets, tuned on tuning seeds, measured on
separate evaluation seeds; the headline "budget at which each baseline matches NTRK@25".

    python -m benchmarks.reward_vs_nfe --testbed gmm digits
    python -m benchmarks.reward_vs_nfe --testbed gmm --budgets 25 100 500 2000   # the baselines table

Budgets are NFEs per returned sample (denoiser forward passes). NTRK and DPS spend them as reverse
steps (S = budget); best-of-N, SVDD and SMC keep S = 25 steps and spend the budget on
trajectories (N = budget / 25), candidates (K with 1 + K (S - 1) <= budget + K/2) or particles
(K = budget / 25). At 25 NFEs the search methods have nothing to search with and equal plain
sampling, which is the point of the comparison.

Tuning: every sampler's hyperparameter (NTRK's gamma, DPS's step size, SVDD's temperature, SMC's
lambda) is chosen per budget on the tuning seeds to maximise the *held-out judge's* mean target
logit — not the guidance reward, so that a setting that fools the guidance network without
producing the digit does not win — among the settings whose samples are no further from the
real 3s than plain samples are (MMD, see benchmarks/common.py). Without that guard, strong guidance drives samples off the
data manifold where a classifier's logit keeps growing. The chosen setting is then run on the
evaluation seeds.
Strengths of the gradient methods are searched on a grid scaled by sqrt(25 / S), which keeps the
total drift of S steps comparable across budgets; to fit the whole benchmark in 20 minutes of a
2-core CPU, that grid multiplier is tuned at the budgets in ``GRADIENT_TUNED`` and each other
budget uses the multiplier tuned at the nearest of them (in log NFE). Search methods are tuned at
every budget.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from benchmarks.common import (RESULTS, Testbed, digits_testbed, evaluate, fmt, gmm_testbed, machine, machine_line,
                               write_json, write_text)

BASE_STEPS = 25
GRADIENT_TUNED = (25, 100)
SVDD_ALPHAS = (0.0, 0.5)
SMC_LAMBDAS = (1.0, 3.0, 10.0)
SAMPLERS = ("ntrk", "dps", "best_of_n", "svdd", "smc")


def candidates(name: str, budget: int, grid: tuple[float, ...]) -> tuple[int, list[Any]]:
    """(steps, candidate specs) of sampler ``name`` at NFE ``budget``."""
    import ntrk_lightning as ntrk

    s = BASE_STEPS
    if name in ("ntrk", "dps"):
        scale = math.sqrt(BASE_STEPS / budget)
        if name == "ntrk":
            return budget, [ntrk.NTRK(mode="tilt", gamma=round(g * scale, 5)) for g in grid]
        return budget, [ntrk.DPS(scale=round(g * scale, 5)) for g in grid]
    if name == "best_of_n":
        return s, [ntrk.BestOfN(n=max(1, budget // s))]
    if name == "svdd":
        k = max(1, round((budget - 1) / (s - 1)))
        return s, [ntrk.SVDD(candidates=k, alpha=a) for a in (SVDD_ALPHAS if k > 1 else (0.0,))]
    if name == "smc":
        k = max(1, budget // s)
        return s, [ntrk.SMC(particles=k, lam=lam) for lam in (SMC_LAMBDAS if k > 1 else (1.0,))]
    raise ValueError(name)


def quality_ok(q: float, plain_q: float, tb: Testbed) -> bool:
    return q >= plain_q - tb.quality_tolerance if tb.higher_quality_is_better else q <= plain_q + tb.quality_tolerance


def select(tuning: list[dict], plain_q: float, tb: Testbed) -> int:
    """Index of the setting with the best judge logit among those of acceptable quality (or, if
    none is acceptable, the setting of best quality)."""
    ok = [i for i, t in enumerate(tuning) if quality_ok(t["quality"], plain_q, tb)]
    for i, t in enumerate(tuning):
        t["quality_ok"] = i in ok
    if not ok:
        sign = 1 if tb.higher_quality_is_better else -1
        return max(range(len(tuning)), key=lambda i: sign * tuning[i]["quality"])
    return max(ok, key=lambda i: tuning[i]["judge_logit"])


def tuned_params(spec: Any) -> dict[str, Any]:
    keys = {"ntrk": ("gamma",), "dps": ("scale",), "best_of_n": ("n",), "svdd": ("candidates", "alpha"),
            "smc": ("particles", "lam")}[spec.name]
    return {k: getattr(spec, k) for k in keys}


def run_testbed(tb: Testbed, budgets: list[int], n_eval: int, n_tune: int, samplers: tuple[str, ...],
                log=print) -> dict[str, Any]:
    import ntrk_lightning as ntrk
    from ntrk_lightning.noise import sample_seeds

    tune_seeds = sample_seeds(1000, n_tune)
    eval_seeds = sample_seeds(2000, n_eval)
    plain = evaluate(tb, ntrk.Plain(), BASE_STEPS, eval_seeds)
    plain_tune = evaluate(tb, ntrk.Plain(), BASE_STEPS, tune_seeds)
    log(f"[{tb.name}] plain@25: reward {plain['reward']:.3f} judge {plain['judge_logit']:.3f} "
        f"quality {plain['quality']:.3f}")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    tuned_at = [b for b in GRADIENT_TUNED if b in budgets] or budgets
    for name in samplers:
        chosen_multiplier: dict[int, float] = {}
        # gradient methods: the tuned budgets first, so the others can reuse their choice
        order = sorted(budgets, key=lambda b: (b not in tuned_at, b)) if name in ("ntrk", "dps") else budgets
        for budget in order:
            if name in ("ntrk", "dps") and budget > tb.scheduler.config.num_train_timesteps:
                skipped.append({"sampler": name, "budget": budget,
                                "why": f"more steps than the {tb.scheduler.config.num_train_timesteps} training "
                                       "timesteps: a gradient sampler cannot spend this budget as steps"})
                continue
            steps, specs = candidates(name, budget, tb.gradient_grid)
            tuning = []
            if name in ("ntrk", "dps") and budget not in tuned_at:
                near = min(tuned_at, key=lambda b: (abs(math.log(b / budget)), b))
                steps, specs = candidates(name, budget, (chosen_multiplier[near],))
                tuning = [{"reused_multiplier_tuned_at": near}]
                best = 0
            elif len(specs) > 1:
                for spec in specs:
                    m = evaluate(tb, spec, steps, tune_seeds)
                    tuning.append({"params": tuned_params(spec), "judge_logit": m["judge_logit"],
                                   "reward": m["reward"], "quality": m["quality"]})
                best = select(tuning, plain_tune["quality"], tb)
            else:
                best = 0
            spec = specs[best]
            if name in ("ntrk", "dps") and budget in tuned_at:
                chosen_multiplier[budget] = tb.gradient_grid[best]
            m = evaluate(tb, spec, steps, eval_seeds)
            row = {"sampler": name, "budget": budget, "steps": steps, "params": tuned_params(spec), **m,
                   "tuning": tuning}
            rows.append(row)
            log(f"[{tb.name}] {name}@{budget}: {row['params']} reward {m['reward']:.3f} judge "
                f"{m['judge_logit']:.3f} quality {m['quality']:.3f} nfe {m['nfe']:.0f} "
                f"{m['seconds_per_sample'] * 1e3:.2f} ms/sample")
    rank = {n: i for i, n in enumerate(samplers)}
    rows.sort(key=lambda r: (rank[r["sampler"]], r["budget"]))
    return {"testbed": tb.name, "quality_name": tb.quality_name,
            "higher_quality_is_better": tb.higher_quality_is_better, "budgets": budgets,
            "n_eval": n_eval, "n_tune": n_tune, "base_steps": BASE_STEPS, "plain": plain, "rows": rows,
            "skipped": skipped,
            "headline": headline(rows, tb.higher_quality_is_better, budgets), "machine": machine(),
            "tuning_objective": "held-out judge mean target logit on the tuning seeds, among settings whose "
                                f"{tb.quality_name} is within {tb.quality_tolerance} of plain sampling's",
            "plain_tuning_quality": plain_tune["quality"]}


def headline(rows: list[dict], higher_better: bool, budgets: list[int]) -> dict[str, Any]:
    """For each baseline, the smallest budget at which it matches NTRK at 25 NFEs in mean reward
    with equal-or-better quality (point estimates on the evaluation seeds)."""
    ref = next((r for r in rows if r["sampler"] == "ntrk" and r["budget"] == BASE_STEPS), None)
    if ref is None:
        return {}
    out: dict[str, Any] = {"ntrk_25": {k: ref[k] for k in ("reward", "reward_se", "quality", "judge_logit",
                                                           "judge_accuracy", "nfe")}, "baselines": {}}
    top = max(budgets)
    for name in ("dps", "best_of_n", "svdd", "smc"):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["budget"])
        if not mine:
            continue
        hit = None
        for r in mine:
            q_ok = r["quality"] >= ref["quality"] if higher_better else r["quality"] <= ref["quality"]
            if r["reward"] >= ref["reward"] and q_ok:
                hit = r
                break
        best = max(mine, key=lambda r: r["reward"])
        out["baselines"][name] = {
            "matched_at_nfe": None if hit is None else hit["budget"],
            "ratio": None if hit is None else hit["budget"] / BASE_STEPS,
            "text": (f"not reached by {top}" if hit is None else f"{hit['budget']} NFEs ({hit['budget'] / BASE_STEPS:g}x)"),
            "best_reward": best["reward"], "best_reward_at": best["budget"],
        }
    return out


def table_markdown(res: dict[str, Any]) -> str:
    q = res["quality_name"]
    arrow = "↑" if res["higher_quality_is_better"] else "↓"
    p = res["plain"]
    lines = [f"Testbed `{res['testbed']}`: {res['n_eval']} evaluation samples per row (hyperparameters tuned on "
             f"{res['n_tune']} other seeds by the held-out judge). Reward and judge logit: mean ± standard error.",
             "",
             f"| sampler | NFE budget | steps | tuned | NFE | grad evals | reward | judge logit | judge acc | {q} {arrow} |"
             + (" mean log p0 |" if "log_p0" in p else "") + " ms / sample |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if "log_p0" in p else "") + "---:|"]

    def line(name: str, budget: Any, steps: Any, params: str, r: dict) -> str:
        lp = f" {r['log_p0']:.1f} |" if "log_p0" in r else ""
        return (f"| {name} | {budget} | {steps} | {params} | {fmt(r['nfe'])} | {fmt(r['grad_evals'])} | "
                f"{r['reward']:.2f} ± {r['reward_se']:.2f} | {r['judge_logit']:.2f} | {r['judge_accuracy']:.2f} | "
                f"{fmt(r['quality'], 4)} |{lp} {r['seconds_per_sample'] * 1e3:.2f} |")

    lines.append(line("plain", 25, 25, "–", p))
    for r in res["rows"]:
        params = ", ".join(f"{k}={fmt(v)}" for k, v in r["params"].items())
        lines.append(line(r["sampler"], r["budget"], r["steps"], params, r))
    for sk in res.get("skipped", []):
        lines.append(f"\n{sk['sampler']} at {sk['budget']} NFEs: not run ({sk['why']}).")
    return "\n".join(lines) + "\n"


def headline_markdown(res: dict[str, Any]) -> str:
    h = res["headline"]
    if not h:
        return ""
    n = h["ntrk_25"]
    arrow = "at least" if res["higher_quality_is_better"] else "at most"
    lines = [f"NTRK at 25 NFEs on `{res['testbed']}`: reward {n['reward']:.2f} ± {n['reward_se']:.2f}, "
             f"{res['quality_name']} {n['quality']:.4g}. Smallest budget at which each baseline reaches that reward "
             f"with {res['quality_name']} {arrow} NTRK's:", "",
             "| baseline | matches NTRK@25 at | its best reward (at NFE) |", "|---|---|---|"]
    for name, b in h["baselines"].items():
        lines.append(f"| {name} | {b['text']} | {b['best_reward']:.2f} ({b['best_reward_at']}) |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"ntrk": "C3", "dps": "C0", "best_of_n": "C1", "svdd": "C2", "smc": "C4"}
    for name in SAMPLERS:
        rows = sorted((r for r in res["rows"] if r["sampler"] == name), key=lambda r: r["nfe"])
        if not rows:
            continue
        x = [r["nfe"] for r in rows]
        axes[0].errorbar(x, [r["reward"] for r in rows], yerr=[r["reward_se"] for r in rows], marker="o",
                         capsize=3, label=name, color=colors[name], lw=2 if name == "ntrk" else 1.2)
        axes[1].plot(x, [r["quality"] for r in rows], marker="o", label=name, color=colors[name],
                     lw=2 if name == "ntrk" else 1.2)
    p = res["plain"]
    for ax, key in ((axes[0], "reward"), (axes[1], "quality")):
        ax.axhline(p[key], color="grey", ls=":", label="plain @ 25")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample (denoiser forward passes, log scale)")
        ax.grid(alpha=0.3)
    ref = res["headline"].get("ntrk_25")
    if ref:
        axes[0].axhline(ref["reward"], color="C3", ls="--", lw=1, label="NTRK @ 25")
    axes[0].set_ylabel("mean guidance reward (target logit)")
    axes[0].set_title(f"{res['testbed']}: reward vs compute")
    axes[1].set_ylabel(res["quality_name"] + (" (higher is better)" if res["higher_quality_is_better"]
                                              else " (lower is better)"))
    axes[1].set_title(f"{res['testbed']}: sample quality vs compute")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write(res: dict[str, Any], stem: str) -> None:
    write_json(RESULTS / f"{stem}.json", res)
    md = [f"# Reward vs NFE — {res['testbed']}", "", f"Machine: {machine_line(res['machine'])}.", "",
          table_markdown(res), "", headline_markdown(res), "", f"![reward vs NFE]({stem}.png)", ""]
    write_text(RESULTS / f"{stem}.md", "\n".join(md))
    plot(res, RESULTS / f"{stem}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", nargs="+", default=["gmm", "digits"], choices=["gmm", "digits"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[25, 50, 100, 250, 500, 1000])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--n-eval", type=int, default=None, help="evaluation samples (default: gmm 128, digits 48)")
    ap.add_argument("--n-tune", type=int, default=None, help="tuning samples (default: gmm 48, digits 24)")
    ap.add_argument("--stem", default="reward_vs_nfe", help="result file stem (suffixed with the testbed)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name in args.testbed:
        tb = gmm_testbed() if name == "gmm" else digits_testbed()
        n_eval = args.n_eval or (128 if name == "gmm" else 48)
        n_tune = args.n_tune or (48 if name == "gmm" else 24)
        res = run_testbed(tb, sorted(args.budgets), n_eval, n_tune, tuple(args.samplers))
        write(res, f"{args.stem}_{name}")
        print(headline_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
