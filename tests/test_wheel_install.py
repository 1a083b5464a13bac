"""A user who installs the built wheel (no repository checkout) runs the main job by config name.

The wheel is built from a copy of the project's sources (so the checkout gets no ``build/``), and
installed without dependencies into a fresh virtualenv outside the repository. The dependencies
are the ones already installed: a ``.pth`` file puts the current environment's site-packages on
the new one's path, after its own (the editable install of the checkout is not activated there:
``.pth`` files inside a directory added by a ``.pth`` line are not processed). Offline, and a few
seconds plus the tiny job.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "ntrk_lightning", "rewards", "metrics", "configs")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")

    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True, ignore=ignore)  # keeps ntrk_lightning/configs a link
        else:
            shutil.copy2(p, src / name)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
         root, env)
    (wheel,) = dist.glob("ntrk_lightning-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env)
                   .stdout.strip())
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_path("purelib")] if Path(p).is_dir()]
    (purelib / "_ntrk_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], root, env)
    work = root / "work"  # a directory with no configs/ and no sources
    work.mkdir()
    return venv, work, env, purelib


@pytest.mark.slow
def test_wheel_ships_configs_and_prompt_lists(installed):
    venv, work, env, purelib = installed
    code = ("import ntrk_lightning, json\n"
            "from ntrk_lightning import builtin_configs as b\n"
            "cfg = b.resolve('sd15_aesthetic_ntrk')\n"
            "print(json.dumps({'pkg': ntrk_lightning.__file__, 'cfg': str(cfg),\n"
            "                  'names': [c.name for c in b.list_configs()],\n"
            "                  'overrides': b.data_path_overrides(cfg)}))\n")
    info = json.loads(_run([str(venv / "bin" / "python"), "-c", code], work, env).stdout)
    assert Path(info["pkg"]).is_relative_to(purelib)  # the wheel's copy, not the checkout
    assert Path(info["cfg"]).is_relative_to(purelib) and Path(info["cfg"]).is_file()
    assert {"digits_ntrk", "digits_baselines", "sd15_aesthetic_ntrk"} <= set(info["names"])
    flag, prompts = info["overrides"]
    assert flag == "--data.init_args.prompts_file" and Path(prompts).is_relative_to(purelib)
    assert Path(prompts).read_bytes() == (REPO / "configs" / "prompts" / "animals45.txt").read_bytes()

    listing = _run([str(venv / "bin" / "ntrk"), "configs"], work, env).stdout
    assert "digits_ntrk" in listing and "The main job" in listing
    _run([str(venv / "bin" / "ntrk"), "configs", "--copy", "digits_ntrk", str(work / "mine")], work, env)
    assert (work / "mine" / "digits_ntrk.yaml").read_text() == (REPO / "configs" / "digits_ntrk.yaml").read_text()
    again = subprocess.run([str(venv / "bin" / "ntrk"), "configs", "--copy", "digits_ntrk", str(work / "mine")],
                           cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "not overwriting" in again.stderr


@pytest.mark.slow
def test_installed_wheel_runs_the_main_job_by_name(installed):
    venv, work, env, _ = installed
    out = work / "run"
    proc = _run([str(venv / "bin" / "ntrk"), "predict", "-c", "digits_ntrk", "--output_dir", str(out),
                 "--data.init_args.samples_per_prompt", "4", "--data.init_args.batch_size", "4",
                 "--model.init_args.num_steps", "5", "--trainer.accelerator", "cpu"], work, env, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"ntrk", "plain"}
    assert all(a["num_samples"] == 4 and a["nfe_per_sample"] == 5 for a in metrics["arms"].values())
    assert len(list((out / "images" / "ntrk").rglob("*.png"))) == 4 and (out / "report.md").is_file()
    assert proc.stdout.rstrip().splitlines()[-1] == f"report: {out / 'report.md'}"
