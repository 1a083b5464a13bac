"""A real one-node Slurm cluster runs the shipped sbatch template: a 2-task DDP job of the real CLI
is preempted mid-run with the requeue signal, is requeued, and finishes the full set with no
duplicates and no gaps, without regenerating what was finished before the signal.

Needs root and Debian's slurm packages (``.ci/run`` installs them); elsewhere it is skipped with
the reason."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline_utils import REPO, cli_env, expected_keys, metrics, records, wait_for

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TEMPLATE = REPO / "scripts" / "slurm" / "predict.sbatch"
N = 40

needs = []
if os.geteuid() != 0:
    needs.append("root (slurmctld/slurmd/munged are started by the test)")
if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
    needs.append("Debian's slurmctld/slurmd/slurm-client/munge packages (.ci/run installs them)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if needs:
        pytest.skip("needs " + " and ".join(needs))
    state = Path(f"/tmp/ntrk-slurm-{os.getpid()}")
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"could not bring up Slurm:\n{up.stdout}\n{up.stderr}")
    env = cli_env()
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, timeout=120)


def _cpu_script(tmp: Path) -> Path:
    """The shipped template minus its GPU request (this cluster has none)."""
    text = TEMPLATE.read_text()
    text = re.sub(r"^#SBATCH --(gpus-per-node|cpus-per-task)=.*\n", "", text, flags=re.M)
    path = tmp / "predict_cpu.sbatch"
    path.write_text(text)
    return path


def _job_field(env, job, field):
    out = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else None


def test_requeued_job_finishes_the_set_without_duplicates_or_gaps(cluster, tmp_path):
    env = dict(cluster)
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin"
    import sys

    env.update({
        "NTRK_CONFIG": str(REPO / "configs" / "digits_ntrk.yaml"),
        "NTRK_OUTPUT": str(out),
        "NTRK_BIN": f"{sys.executable} -m ntrk_lightning.cli",
        "NTRK_ACCELERATOR": "cpu",
        "NTRK_EXTRA_ARGS": f"--trainer.strategy ddp --data.init_args.samples_per_prompt {N} "
                           "--data.init_args.batch_size 2 --model.init_args.num_steps 10",
        "PATH": f"{venv_bin}:{env.get('PATH', '')}",
    })
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                          "--job-name=ntrk-ci", str(_cpu_script(tmp_path))],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]

    def finished():
        return list((out / "images").rglob("*.json")) if (out / "images").exists() else []

    try:
        assert wait_for(lambda: len(finished()) >= 4, 300, interval=0.2), \
            f"job never produced samples:\n{log.read_text() if log.exists() else ''}"
        done_before = {p: p.stat().st_mtime_ns for p in finished()}
        assert len(done_before) < 2 * N, "the job finished before it could be preempted"
        # preemption: the requeue signal to the batch shell, whose trap requeues the job
        subprocess.run(["scancel", "--batch", "-s", "USR1", job], env=env, check=True, timeout=30)
        assert wait_for(lambda: (_job_field(env, job, "Restarts") or "0") != "0", 120, interval=0.5), \
            log.read_text()
        # a requeued job waits for its BeginTime (~2 min); let it start now
        for _ in range(20):
            if _job_field(env, job, "JobState") == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, timeout=30)
                break
            time.sleep(0.5)
        assert wait_for(lambda: _job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                        420, interval=1.0), log.read_text()
        state = _job_field(env, job, "JobState")
        assert state == "COMPLETED", f"{state}\n{log.read_text()}"
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    text = log.read_text()
    assert "USR1: requeueing" in text and "restart 1" in text
    recs = records(out)
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 2 * N
    assert set(keys) == expected_keys(["ntrk", "plain"], N)
    assert {r["rank"] for r in recs} == {0, 1}
    for p, t in done_before.items():
        assert p.stat().st_mtime_ns == t, f"{p} was regenerated after the requeue"
    assert metrics(out)["arms"]["ntrk"]["num_samples"] == N
