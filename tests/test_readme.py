"""The README's promises: its Python examples run as written, its Quickstart test command is the
one CI runs, and its benchmark numbers are the ones in benchmarks/results/."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run_as_written(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(code)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, f"README example {i} failed:\n{code}\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip(), f"README example {i} printed nothing"


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    section = README.split("## Quickstart", 1)[1]
    block = _blocks("bash")[0]
    assert section.index(block) < section.index("##")  # the first code block of the section
    commands = [ln for ln in block.splitlines() if ln.strip()]
    assert len(commands) == 2
    assert "ntrk predict -c configs/digits_ntrk.yaml" in commands[0] and "pytest" in commands[1]
    ci = subprocess.run(["bash", str(REPO / ".ci" / "test-command")], capture_output=True, text=True)
    assert ci.returncode == 0 and ci.stdout.strip() == commands[1]
    assert ".ci/test-command" in (REPO / ".ci" / "run").read_text()


def test_benchmark_section_matches_the_result_files():
    from benchmarks.run_all import BEGIN, END, readme_section

    current = README.split(BEGIN, 1)[1].split(END, 1)[0]
    assert BEGIN + current + END == readme_section(), \
        "README benchmark section is stale: run `python -m benchmarks.run_all --readme`"


def test_benchmark_section_leads_with_the_paper_tables():
    """The three Table-2 result files exist, and the README's benchmark section opens with their tables
    (the numbers themselves are checked against the files by the test above)."""
    from benchmarks.run_all import BEGIN, PAPER_TESTBEDS

    section = README.split(BEGIN, 1)[1]
    for tb in PAPER_TESTBEDS:
        for ext in ("json", "md", "png"):
            assert (REPO / "benchmarks" / "results" / f"paper_table_{tb}.{ext}").is_file(), (tb, ext)
        assert f"**Table 2 on `{tb}`**" in section
    assert section.index("**Table 2 on `digits`**") < section.index("NTRK's kernel and whitening")
