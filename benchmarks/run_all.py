"""Rerun every benchmark and rewrite the result files and the README's benchmark section.

    python -m benchmarks.run_all            # about 15-20 minutes on a 2-core CPU machine
    python -m benchmarks.run_all --readme   # only regenerate the README section from the results

Results go to benchmarks/results/ (JSON for machines, Markdown and PNG for people). The README
section between the `benchmarks:begin` / `benchmarks:end` markers is generated from those files
(tests/test_readme.py checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, fmt, machine_line, write_text

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def readme_section() -> str:
    """The README's benchmark section, generated from the result files."""
    L = [BEGIN, ""]
    rv = {tb: _load(f"reward_vs_nfe_{tb}") for tb in ("digits", "gmm")}
    first = next((r for r in rv.values() if r), None)
    if first is None:
        return "\n".join(L + ["(no results yet: run `python -m benchmarks.run_all`)", "", END])
    L += [f"Measured on {machine_line(first['machine'])} (no GPU). Rerun everything with "
          "`.venv/bin/python -m benchmarks.run_all`; the tables below are generated from `benchmarks/results/`.", ""]
    L += ["**Headline: the NFE budget at which each baseline first matches NTRK at 25 NFEs** (mean guidance reward "
          "at least NTRK@25's, sample quality no worse; every sampler tuned per budget on separate seeds by a held-out "
          "judge, see `benchmarks/reward_vs_nfe.py`):", ""]
    L += ["| testbed | NTRK@25 reward | quality of NTRK@25 | DPS | best-of-N | SVDD | SMC |", "|---|---:|---:|---|---|---|---|"]
    for tb, res in rv.items():
        if not res or not res.get("headline"):
            continue
        h = res["headline"]
        n = h["ntrk_25"]
        cells = [h["baselines"].get(b, {}).get("text", "–") for b in ("dps", "best_of_n", "svdd", "smc")]
        L.append(f"| {tb} | {n['reward']:.2f} ± {n['reward_se']:.2f} | {res['quality_name']} {fmt(n['quality'], 4)} | "
                 + " | ".join(cells) + " |")
    L.append("")
    for tb, res in rv.items():
        if res:
            L += [f"![reward and quality vs NFE, {tb}](benchmarks/results/reward_vs_nfe_{tb}.png)", ""]
    L += ["Full tables: [digits](benchmarks/results/reward_vs_nfe_digits.md), "
          "[GMM](benchmarks/results/reward_vs_nfe_gmm.md), [core sweep of gamma and whitening on the GMM]"
          "(benchmarks/results/core_gmm.md).", ""]
    ov = _load("overhead")
    if ov:
        r = ov["ratio_to_plain"]
        L += [f"**Overhead** (digits16, batch {ov['batch']}, side by side): a step costs {r['dps']:.2f}x plain for DPS "
              f"and {r['ntrk']:.2f}x plain for NTRK; NTRK/DPS = {ov['ntrk_over_dps']:.3f}; the whitening is "
              f"{100 * ov['whitening_share_of_ntrk_step']:.2f}% of an NTRK step; an NTRK step is "
              f"{ov['ntrk_step_over_floor']:.2f}x one denoiser forward + reward backward "
              "([details](benchmarks/results/overhead.md)).", ""]
    sc = _load("scaling")
    if sc:
        L += [f"**Scaling**: `ntrk predict` with 2 DDP processes generates {sc['ratio_2_over_1']:.2f}x the samples per "
              f"second of 1 process on this 2-core machine ({fmt(sc['samples_per_second']['1'], 3)} vs "
              f"{fmt(sc['samples_per_second']['2'], 3)} samples/s; [details](benchmarks/results/scaling.md)).", ""]
    L.append(END)
    return "\n".join(L)


def update_readme() -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(README, head + readme_section() + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="store_true", help="only regenerate the README section")
    args = ap.parse_args(argv)
    if not args.readme:
        from benchmarks import core_gmm, overhead, reward_vs_nfe, scaling

        t0 = time.perf_counter()
        steps = [("core_gmm", lambda: core_gmm.main([])),
                 ("reward_vs_nfe gmm", lambda: reward_vs_nfe.main(["--testbed", "gmm", "--budgets", "25", "50", "100",
                                                                    "250", "500", "1000", "2000"])),
                 ("reward_vs_nfe digits", lambda: reward_vs_nfe.main(["--testbed", "digits"])),
                 ("overhead", lambda: overhead.main([])),
                 ("scaling", lambda: scaling.main([]))]
        timings = {}
        for name, fn in steps:
            t = time.perf_counter()
            fn()
            timings[name] = time.perf_counter() - t
            print(f"== {name}: {timings[name]:.0f} s", flush=True)
        timings["total"] = time.perf_counter() - t0
        (RESULTS / "run_all_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    update_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
