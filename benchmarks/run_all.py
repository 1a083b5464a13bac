"""Rerun every benchmark and rewrite the result files and the README's benchmark section.

    python -m benchmarks.run_all            # about 2.5 hours on a 2-core CPU machine (paper_table: ~2 h)
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


def ablation_section() -> list[str]:
    """NTRK's kernel and whitening at 25 NFEs (benchmarks/ntrk_ablation.py) and the whitening's cost."""
    ab = _load("ntrk_ablation")
    L: list[str] = []
    if ab:
        L += ["**NTRK's kernel and whitening at 25 NFEs** (each row's strength tuned on separate seeds: best held-out "
              "judge logit among settings no further from the target class than plain sampling; "
              f"[details](benchmarks/results/ntrk_ablation.md); machine: {machine_line(ab['machine'])}):", ""]
        for res in ab["results"]:
            L += [f"*{res['testbed']}*, {res['n_eval']} samples per row:", "",
                  f"| row | tuned | reward ± se | judge acc | {res['quality_name']} (↓) |", "|---|---|---:|---:|---:|"]
            for r in res["rows"]:
                tuned = "–" if r["param"] is None else f"{r['param']}={fmt(r['value'])}"
                L.append(f"| {r['label']} | {tuned} | {r['reward']:.2f} ± {r['reward_se']:.2f} | "
                         f"{r['judge_accuracy']:.3f} | {r['quality']:.1f} |")
            L.append("")
    wc = _load("whitening_cost")
    if wc and "digits" in wc.get("cost", {}):
        c = wc["cost"]
        L += [f"**Cost of the `typical` whitening** (CPU time per call, {machine_line(wc['machine'])}): "
              f"{1000 * c['digits']['typical_structured_cpu_s']:.1f} ms on a digits batch (64, 1, 16, 16) = "
              f"{100 * c['digits']['typical_structured_cpu_s'] / c['digits']['denoiser_forward_cpu_s']:.0f}% of one "
              f"digits UNet forward; {1000 * c['sd15_latent']['typical_structured_cpu_s']:.0f} ms at SD-1.5 latents "
              f"(4, 4, 64, 64) and {1000 * c['flux_latent']['typical_structured_cpu_s']:.0f} ms at a FLUX latent "
              "(1, 16, 128, 128), where no denoiser runs on this CPU machine "
              "([details](benchmarks/results/whitening_cost.md)).", ""]
    return L


PAPER_TESTBEDS = ("digits", "digits_flow", "gmm")


def paper_table_section() -> list[str]:
    """The paper's Table 2 re-measured (benchmarks/paper_table.py): one compact table per testbed."""
    from benchmarks.paper_table import STEPS, claim_sentence

    L: list[str] = []
    results = {tb: r for tb in PAPER_TESTBEDS if (r := _load(f"paper_table_{tb}"))}
    L += claim_matrix(results)
    for tb, res in results.items():
        L += [f"**Table 2 on `{tb}`** ({res['n_eval']} samples per row, every arm tuned on {res['n_tune']} separate "
              f"seeds; [full table](benchmarks/results/paper_table_{tb}.md), "
              f"[plot](benchmarks/results/paper_table_{tb}.png); machine: {machine_line(res['machine'])}):", "",
              f"| method | NFE | target reward ↑ | held-out judge logit ↑ | judge acc ↑ | {res['quality_name']} ↓ | FID ↓ |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        top = max(res["budgets"])
        for r in res["rows"]:
            if r["budget"] not in (STEPS, top):
                continue
            h, q = r["heldout"], r["quality"]
            L.append(f"| {r['label']} | {fmt(r['nfe'])} | {r['target_reward']:.2f} ± {r['target_reward_se']:.2f} | "
                     f"{h['judge_logit']:.2f} ± {h['judge_logit_se']:.2f} | {h['judge_acc']:.3f} | {q['mmd']:.1f} | "
                     f"{fmt(q.get('fid'))} |")
        L += ["", f"Verdict: {claim_sentence(res)}", ""]
    return L


def claim_matrix(results: dict) -> list[str]:
    """Where the paper's 20x claim holds: NTRK at 25 NFEs against each baseline at the largest budget,
    per testbed (target reward, held-out judge logit, and which samples are closer to the target class)."""
    if not results:
        return []
    word = {"higher": "**wins**", "lower": "loses", "tie": "ties"}
    keys = list(dict.fromkeys(k for r in results.values() for k in r["claim"].get("baselines", {})))
    top = {tb: r["claim"].get("budget") for tb, r in results.items()}
    L = ["**Where the paper's 20x claim holds** (NTRK at 25 NFEs against each baseline at "
         f"~{max(t for t in top.values() if t)} NFEs; wins/loses = beyond 2 standard errors, on the target reward / "
         "on the held-out judge logit; the last word says whose samples are closer to the target class, by MMD):", "",
         "| baseline | " + " | ".join(f"`{tb}`" for tb in results) + " |", "|---|" + "---|" * len(results)]
    for k in keys:
        cells = []
        for res in results.values():
            b = res["claim"].get("baselines", {}).get(k)
            cells.append("–" if b is None else f"{word[b['target']]} / {word[b['heldout']]} / "
                                               f"{'NTRK closer' if b['mmd_lower'] else 'baseline closer'}")
        label = next(r["claim"]["baselines"][k]["label"] for r in results.values() if k in r["claim"].get("baselines", {}))
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    return L + ["", claim_summary(results), ""]


def claim_summary(results: dict) -> str:
    """The matrix in three sentences, computed from it."""
    cases = [(tb, k, b) for tb, r in results.items() for k, b in r["claim"].get("baselines", {}).items()]
    label = {k: b["label"] for _, k, b in cases}
    keys = list(dict.fromkeys(k for _, k, _ in cases))
    always = [label[k] for k in keys
              if all(b["target"] == b["heldout"] == "higher" for _, kk, b in cases if kk == k)]
    higher = [(tb, k, b) for tb, k, b in cases if b["target"] == "lower"]
    higher_but_further = [c for c in higher if c[2]["mmd_lower"]]
    dominating = [f"{label[k]} on `{tb}`" for tb, k, b in cases
                  if b["target"] != "higher" and b["heldout"] != "higher" and not b["mmd_lower"]]
    return (f"In short: NTRK at 25 NFEs beats {', '.join(always) or 'no baseline'} at ~20x its NFEs on both rewards "
            f"on every testbed. A baseline reached a higher target reward in {len(higher)} of {len(cases)} cases, "
            f"{len(higher_but_further)} of them with samples further from the target class than NTRK's. At least tied on "
            f"both rewards and with closer samples: {', '.join(dominating) or 'none'}. The claim as the paper states it "
            f"(NTRK@25 not below any baseline at ~500 on either reward) holds on "
            f"{', '.join(f'`{tb}`' for tb, r in results.items() if r['claim'].get('holds')) or 'none'} of the "
            f"{len(results)} testbeds.")


def readme_section() -> str:
    """The README's benchmark section, generated from the result files: the paper's table first."""
    L = [BEGIN, ""]
    rv = {tb: _load(f"reward_vs_nfe_{tb}") for tb in ("digits", "gmm")}
    first = next((r for r in rv.values() if r), None)
    if first is None:
        return "\n".join(L + ["(no results yet: run `python -m benchmarks.run_all`)", "", END])
    L += ["Rerun everything with `.venv/bin/python -m benchmarks.run_all`; the tables below are generated from "
          "`benchmarks/results/` (no GPU was used for any of them).", ""]
    L += paper_table_section()
    L += ablation_section()
    L += [f"**Earlier sweep (measured with the earlier `tilt` kernel, before the paper's kernel became the default; "
          f"machine: {machine_line(first['machine'])}): the NFE budget at which each baseline first matches NTRK at "
          "25 NFEs** (mean guidance reward "
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
        L += [f"**Overhead** (digits16, batch {ov['batch']}, side by side, measured with the earlier tilt kernel and `spectral` whitening): a step costs {r['dps']:.2f}x plain for DPS "
              f"and {r['ntrk']:.2f}x plain for NTRK; NTRK/DPS = {ov['ntrk_over_dps']:.3f}; the whitening is "
              f"{100 * ov['whitening_share_of_ntrk_step']:.2f}% of an NTRK step; an NTRK step is "
              f"{ov['ntrk_step_over_floor']:.2f}x one denoiser forward + reward backward "
              "([details](benchmarks/results/overhead.md)).", ""]
    sc = _load("scaling")
    if sc:
        L += [f"**Scaling**: `ntrk predict` with 2 DDP processes generates {sc['ratio_2_over_1']:.2f}x the samples per "
              f"second of 1 process on this 2-core machine ({fmt(sc['samples_per_second']['1'], 3)} vs "
              f"{fmt(sc['samples_per_second']['2'], 3)} samples/s; [details](benchmarks/results/scaling.md)).", ""]
    L += _run_folder_scale_lines()
    L.append(END)
    return "\n".join(L)


def _run_folder_scale_lines() -> list[str]:
    """The run-folder scale paragraph: resume cost per finished sample, end of run at each size."""
    rf = _load("run_folder_scale")
    if not rf or "end_of_run_s" not in rf["rows"][0] or "report_s" not in rf["rows"][0]:
        return []
    rows = rf["rows"]
    full = [r for r in rows if r["per_sample_files"]]
    big = full[-1] if full else rows[-1]
    ends = ", ".join(f"{r['end_of_run_s']:.2f} s at {r['finished']:,}" for r in rows)
    resumes = ", ".join(f"{r['resume_us_per_sample']:.1f} µs at {r['finished']:,}" for r in full)
    return [f"**Run folder scale** ({rf['machine']}; resume timed in a new process, as a rerun starts): resuming "
            f"a run costs, per finished sample, {resumes} finished samples (target "
            f"{rf['target_resume_us_per_sample']:g} µs), against {big['full_check_us_per_sample']:.0f} µs for the full "
            f"check of a sample; the end of a run that generated {rows[0]['new_samples']} new samples takes "
            f"{ends} finished before (before metric states were persisted it re-read every finished image: "
            f"{big.get('old_end_of_run_s', 0):.0f} s at {big['finished']:,}; "
            "[details](benchmarks/results/run_folder_scale.md)).", ""]


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
        from benchmarks import core_gmm, overhead, reward_vs_nfe, run_folder_scale, scaling

        t0 = time.perf_counter()
        from benchmarks import ntrk_ablation, whitening_cost

        from benchmarks import paper_table

        steps = [("paper_table", lambda: paper_table.main([])),
                 ("ntrk_ablation", lambda: ntrk_ablation.main([])),
                 ("whitening_cost", lambda: whitening_cost.main([])),
                 ("core_gmm", lambda: core_gmm.main([])),
                 ("reward_vs_nfe gmm", lambda: reward_vs_nfe.main(["--testbed", "gmm", "--budgets", "25", "50", "100",
                                                                    "250", "500", "1000", "2000"])),
                 ("reward_vs_nfe digits", lambda: reward_vs_nfe.main(["--testbed", "digits"])),
                 ("overhead", lambda: overhead.main([])),
                 ("scaling", lambda: scaling.main([])),
                 ("run_folder_scale", lambda: run_folder_scale.main([]))]
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
