#!/usr/bin/env bash
# Mutation testing of the sampling core with mutmut (config: [tool.mutmut] in pyproject.toml).
#
#   scripts/mutation.sh                 # every mutant (about 2,600; hours on a 2-core CPU)
#   SAMPLE=400 SEED=17 scripts/mutation.sh   # a reproducible random sample of mutants
#   JOBS=2 scripts/mutation.sh          # parallel workers (default 2)
#
# Runs from a fresh clone after `pip install -e ".[test]" mutmut==3.8.1`. Each mutant is run
# against the tests marked `core` that reach the mutated function; the summary (kill rate, every
# survivor with its diff) goes to docs/mutation-report.txt. Not part of CI: too slow.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
if ! "$PY" -m mutmut --version >/dev/null 2>&1; then
    echo "mutation.sh: mutmut is not installed; run: $PY -m pip install mutmut==3.8.1" >&2
    exit 2
fi
rm -rf mutants
names=()
if [[ -n "${SAMPLE:-}" ]]; then
    # generate the mutants only (mutmut 3.8's own generation step), then draw the sample
    "$PY" - "$JOBS" <<'PYEOF'
import os, sys
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
create_mutants(int(sys.argv[1]))
PYEOF
    "$PY" - "$SAMPLE" "${SEED:-17}" > mutants/sample.txt <<'PYEOF'
import glob, json, random, sys
names = sorted(n for m in glob.glob("mutants/**/*.py.meta", recursive=True)
               for n in json.load(open(m))["exit_code_by_key"])
for n in sorted(random.Random(int(sys.argv[2])).sample(names, min(int(sys.argv[1]), len(names)))):
    print(n)
PYEOF
    mapfile -t names < mutants/sample.txt
    echo "mutation.sh: sampled ${#names[@]} mutants (seed ${SEED:-17}), list in mutants/sample.txt"
fi
"$PY" -m mutmut run --max-children "$JOBS" "${names[@]}" || true
"$PY" scripts/mutation_summary.py ${SAMPLE:+--names mutants/sample.txt} --out docs/mutation-report.txt
