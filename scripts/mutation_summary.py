"""Summarise a mutmut run (mutants/**/*.meta) into a small text report: counts per status and
file, the kill rate, and every surviving mutant with its diff (``mutmut show``).

Usage: python scripts/mutation_summary.py [--names FILE] [--out docs/mutation-report.txt]
``--names`` restricts the summary to the mutants listed in FILE (a sampled run)."""

from __future__ import annotations

import argparse
import collections
import glob
import json
import subprocess
import sys
from pathlib import Path

# mutmut 3's exit-code meanings (mutmut/stats.py)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          None: "not checked"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", help="file with one mutant name per line (the sampled run)")
    ap.add_argument("--out", default="docs/mutation-report.txt")
    ap.add_argument("--no-diffs", action="store_true", help="do not append `mutmut show` of survivors")
    args = ap.parse_args(argv)
    metas = sorted(glob.glob("mutants/**/*.py.meta", recursive=True))
    if not metas:
        print("no mutants/ folder with results: run scripts/mutation.sh first", file=sys.stderr)
        return 2
    codes: dict[str, object] = {}
    for m in metas:
        codes.update(json.loads(Path(m).read_text())["exit_code_by_key"])
    if args.names:
        wanted = [n.strip() for n in Path(args.names).read_text().splitlines() if n.strip()]
        missing = [n for n in wanted if n not in codes]
        if missing:
            print(f"{args.names}: {len(missing)} names are not mutants of this tree, e.g. {missing[0]}", file=sys.stderr)
            return 2
        codes = {n: codes[n] for n in wanted}
    status = {n: STATUS.get(c, "suspicious") for n, c in codes.items()}
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for n, s in status.items():
        per_file[n.split(".x")[0]][s] += 1
    total = collections.Counter(status.values())
    # timeouts count as killed (the mutant made the tests hang or crawl); "not checked" and
    # "no tests" are reported separately and not counted
    checked = total["killed"] + total["timeout"] + total["survived"] + total["segfault"] + total["suspicious"]
    killed = total["killed"] + total["timeout"] + total["segfault"]
    lines = [f"mutants: {len(status)}   " + "   ".join(f"{k}: {v}" for k, v in sorted(total.items())),
             f"kill rate (killed + timeout + segfault) / checked: {killed}/{checked} = "
             f"{100.0 * killed / max(checked, 1):.1f}%", "", "per module:"]
    for f, c in sorted(per_file.items()):
        lines.append(f"  {f:40s} " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    survivors = sorted(n for n, s in status.items() if s in ("survived", "suspicious", "no tests"))
    lines += ["", f"survivors and untested ({len(survivors)}):"] + [f"  {n}  [{status[n]}]" for n in survivors]
    if not args.no_diffs:
        for n in survivors:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", n], capture_output=True, text=True).stdout
            lines += ["", f"---- {n}", diff.rstrip()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4 + len(per_file) + 1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
