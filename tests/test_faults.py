"""Fault injection on `ntrk predict` / `evaluate` / `report` (issue 16): every numbered failure
of the issue has a test here.

1. a rerun with another config is refused before any model work; extending is allowed;
2. a second run on a folder in use is refused (lock), stale locks are taken over;
3. damaged finished samples (garbage/empty PNG, truncated record) are regenerated and counted;
4. non-finite images are recorded as failed, never written as finished; all-failed exits non-zero;
5. a YAML alias bomb and a huge image are refused in one line, quickly;
6. one-line errors for corrupt weights, unknown class_path, empty YAML, empty --output_dir, a grey
   reward on RGB images;
7. `ntrk report` labels rewards and refuses to mix different ones in one column;
8. atomic writes fsync the file before and the folder after the rename;
and SIGKILL at several points (a forked copy of the test process, killed for real), then a rerun:
the same set as an uninterrupted run (PNG bytes identical, metrics equal).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch
from PIL import Image

from ntrk_lightning.pipeline import layout, run
from pipeline_utils import (REPO, assert_metrics_close, cli_env, expected_keys, metrics, predict_args, records,
                            run_in_process, sample_path, wait_for)

N = 4  # samples per arm: 2 batches of 2
FAST = ["--data.init_args.samples_per_prompt", str(N), "--data.init_args.batch_size", "2",
        "--model.init_args.num_steps", "4", "--model.init_args.report", "false"]
ARMS = ["ntrk", "plain"]


def fast_args(out: Path, extra: Sequence[str] = ()) -> list[str]:
    return predict_args(out, [*FAST, *extra])


def png_bytes_by_key(out: Path) -> dict[str, bytes]:
    return {r["key"]: (out / r["image"]).read_bytes() for r in records(out)}


def refused(args: Sequence[str], capsys) -> str:
    """Run in-process, expect a refusal; returns its message (asserting it is one line)."""
    from ntrk_lightning.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    code = exc.value.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    msg = code if isinstance(code, str) else err.strip().splitlines()[-1]
    assert msg.startswith("ntrk: error: ") and "\n" not in msg.strip(), msg
    return msg


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, the yardstick of every fault below."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_in_process(fast_args(out))
    return out


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def assert_same_as_reference(out: Path, reference: Path) -> None:
    ref_png, got_png = png_bytes_by_key(reference), png_bytes_by_key(out)
    assert set(got_png) == set(ref_png) == expected_keys(ARMS, N)
    differ = sorted(k for k in ref_png if got_png[k] != ref_png[k])
    assert not differ, f"PNG bytes differ from the uninterrupted run: {differ}"
    assert_metrics_close(metrics(out), metrics(reference), rtol=1e-4, atol=1e-4)
    assert not list(out.rglob("*.tmp")) and not (out / run.LOCK).exists()


# ---------------------------------------------------------------------------------------------
# 1. run identity
# ---------------------------------------------------------------------------------------------

def test_rerun_with_another_config_is_refused_and_changes_nothing(reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # the case: other gamma, other seed, more samples
    msg = refused(fast_args(out, ["--model.init_args.samplers.ntrk.init_args.gamma", "0.5",
                                  "--data.init_args.seed", "7", "--data.init_args.samples_per_prompt", "8"]), capsys)
    assert str(out) in msg and "seed was 0, now 7" in msg
    msg = refused(fast_args(out, ["--model.init_args.samplers.ntrk.init_args.gamma", "0.5"]), capsys)
    assert "arms.ntrk.sampler.gamma was 0.1, now 0.5" in msg
    msg = refused(fast_args(out, ["--model.init_args.num_steps", "5"]), capsys)
    assert "num_steps was 4, now 5" in msg
    msg = refused(fast_args(out, ["--model.init_args.reward.init_args.target", "7"]), capsys)
    assert "reward.init_args.target was 3, now 7" in msg
    msg = refused(fast_args(out, ["--data.init_args.prompts", "[a digit]"]), capsys)
    assert "prompt 0 was" in msg
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, metrics.json, records: all untouched


def test_changed_weights_file_is_refused(reference, tmp_path, capsys):
    """The weights' content is part of the identity (same file name, other bytes)."""
    out = copy_of(reference, tmp_path)
    wdir = tmp_path / "weights"
    shutil.copytree(REPO / "ntrk_lightning" / "weights", wdir)
    cfg = json.loads((wdir / "digits_unet_config.json").read_text())
    cfg["note"] = "edited"
    (wdir / "digits_unet_config.json").write_text(json.dumps(cfg))
    msg = refused(fast_args(out, ["--model.init_args.backbone.init_args.weights_dir", str(wdir)]), capsys)
    assert "backbone.weights" in msg


@pytest.mark.slow
def test_extending_a_run_is_allowed_and_keeps_finished_samples(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    run_in_process(fast_args(out, ["--data.init_args.samples_per_prompt", str(N + 1)]))
    assert {r["key"] for r in records(out)} == expected_keys(ARMS, N + 1)
    for p, t in kept.items():
        assert p.stat().st_mtime_ns == t, f"{p} was regenerated"
    m = metrics(out)
    assert m["last_run"]["generated_this_run"] == 2 and m["last_run"]["identity"] == "same"


def test_old_folder_without_fingerprint_is_adopted(reference, tmp_path):
    """A folder from before run.json and checksums: its samples are checked by decoding, kept,
    and the folder gets a fingerprint."""
    out = copy_of(reference, tmp_path)
    (out / run.RUN_JSON).unlink()
    for rec_path in (out / "images").rglob("p*_s*.json"):
        rec = json.loads(rec_path.read_text())
        rec.pop("png_sha256"), rec.pop("png_bytes")
        rec_path.write_text(json.dumps(rec))
    bad = sample_path(out, "plain/p00000_s00002")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # no checksum to compare: must not decode
    run_in_process(fast_args(out))
    m = metrics(out)
    assert m["last_run"]["identity"] == "adopted"
    assert m["last_run"]["generated_this_run"] == 1 and m["last_run"]["damaged_regenerated"] == 1
    assert json.loads((out / run.RUN_JSON).read_text())["fingerprint"]["seed"] == 0
    assert bad.read_bytes() == sample_path(reference, "plain/p00000_s00002").read_bytes()


# ---------------------------------------------------------------------------------------------
# 2. lock
# ---------------------------------------------------------------------------------------------

def _write_lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "token": "other",
                                               "started": "earlier", **holder}))


def test_folder_in_use_by_a_live_process_is_refused(reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, pid=holder.pid, pid_start=run._proc_start(holder.pid))
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        msg = refused(fast_args(out), capsys)
        assert f"PID {holder.pid}" in msg and "in use by another run" in msg
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and taken over; the run completes and unlocks
    run_in_process(fast_args(out))
    assert not (out / run.LOCK).exists()


def test_lock_rules(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    a = run.RunLock(folder)
    a.acquire()
    with pytest.raises(run.RunFolderError, match="in use by another run"):
        run.RunLock(folder).acquire()  # the same process cannot take it twice
    a.release()
    assert not (folder / run.LOCK).exists()
    # another host: never guessed stale
    _write_lock(folder, host="elsewhere", pid=os.getpid())
    with pytest.raises(run.RunFolderError, match="delete"):
        run.RunLock(folder).acquire()
    # ... unless it is an earlier attempt of this Slurm job (a requeue)
    _write_lock(folder, host="elsewhere", pid=123, slurm_job="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    b = run.RunLock(folder)
    b.acquire()
    assert json.loads((folder / run.LOCK).read_text())["token"] == b.token
    b.release()
    monkeypatch.delenv("SLURM_JOB_ID")
    # a reused PID (same number, other start time) is not the holder
    _write_lock(folder, pid=os.getppid(), pid_start="1")
    c = run.RunLock(folder)
    c.acquire()
    # releasing never removes a lock that is not ours
    (folder / run.LOCK).write_text(json.dumps({"host": "x", "pid": 1, "token": "someone"}))
    c.release()
    assert (folder / run.LOCK).exists()


@pytest.mark.slow
def test_concurrent_real_run_is_refused_then_sigkill_and_rerun_completes(reference, tmp_path, capsys):
    """The real command in a subprocess holds the folder; a second run is refused; SIGKILL the
    first mid-run; the rerun takes over the stale lock and ends equal to an uninterrupted run."""
    out = tmp_path / "run"
    args = fast_args(out, ["--data.init_args.samples_per_prompt", "40"])
    proc = subprocess.Popen([sys.executable, "-m", "ntrk_lightning.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ok = wait_for(lambda: (out / run.LOCK).exists() and len(list((out / "images").rglob("p*_s*.json"))) >= 3,
                      240, proc=proc)
        assert ok and proc.poll() is None, "the first run ended before the test could join it"
        msg = refused(fast_args(out), capsys)
        assert f"PID {proc.pid}" in msg
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out / run.LOCK).exists()  # a SIGKILL leaves its lock behind...
    run_in_process(fast_args(out))  # ...which the rerun recognises as stale
    assert_same_as_reference(out, reference)


# ---------------------------------------------------------------------------------------------
# SIGKILL at chosen points (the real command in a subprocess, killed for real at an exact point)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "png:3",      # the 3rd PNG is on disk, its record is not
    "half:5",     # halfway through writing the 5th PNG's temporary file
    "records",    # records.jsonl rewritten, metrics.json not yet
    "states",     # metric states saved, their key list (what makes them count) not yet
    "identity",   # locked, run.json written, nothing generated
])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(reference, tmp_path, point):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kill_runner.py"), point, *fast_args(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"{point}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert (out / run.LOCK).exists()  # a SIGKILL leaves its lock behind...
    run_in_process(fast_args(out))  # ...which the rerun takes over (same host, PID gone)
    assert_same_as_reference(out, reference)


# ---------------------------------------------------------------------------------------------
# 3. integrity
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_damaged_finished_samples_are_regenerated_and_counted(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    img = out / "images"
    sample_path(out, "ntrk/p00000_s00001").write_bytes(os.urandom(300))          # garbage PNG
    sample_path(out, "ntrk/p00000_s00003").write_bytes(b"")                      # power loss: empty
    rec = sample_path(out, "plain/p00000_s00003", ".json")
    rec.write_text(rec.read_text()[:40])                                         # truncated record
    sample_path(out, "plain/p00000_s00002").unlink()                             # record without PNG
    png = sample_path(out, "ntrk/p00000_s00002")                                 # one flipped byte
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0xFF
    png.write_bytes(bytes(data))
    kept = {p: p.stat().st_mtime_ns for p in img.rglob("p*_s*.json") if p != rec}
    run_in_process(fast_args(out))
    m = metrics(out)
    assert m["last_run"]["damaged_regenerated"] == 5 and m["last_run"]["generated_this_run"] == 5
    assert {d["key"] for d in m["last_run"]["damaged"]} == {
        "ntrk/p00000_s00001", "ntrk/p00000_s00003", "plain/p00000_s00003", "plain/p00000_s00002",
        "ntrk/p00000_s00002"}
    assert_same_as_reference(out, reference)
    untouched = [p for p, t in kept.items() if p.exists() and p.stat().st_mtime_ns == t]
    assert len(untouched) == 2 * N - 5  # every sample but the damaged ones


# ---------------------------------------------------------------------------------------------
# 4. non-finite values
# ---------------------------------------------------------------------------------------------

def test_to_uint8_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        layout.to_uint8(torch.tensor([[[[0.5, float("nan")]]]]))
    assert layout.to_uint8(torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[[[0, 255]]]]


@pytest.mark.slow
def test_some_non_finite_samples_are_failed_not_finished(tmp_path):
    out = tmp_path / "run"
    args = fast_args(out, ["--model.init_args.backbone.class_path", "fault_models.NaNSomeBackbone"])
    run_in_process(args)
    failed = [json.loads(line) for line in (out / layout.FAILED).read_text().splitlines()]
    done = records(out)
    assert failed and done, "the fault model should fail some samples and not others"
    fkeys, dkeys = {f["key"] for f in failed}, {r["key"] for r in done}
    assert fkeys | dkeys == expected_keys(ARMS, N) and not fkeys & dkeys
    for f in failed:
        assert f["failed"] == "non-finite final image" and f["nan_values"] > 0
        assert not sample_path(out, f["key"]).exists()  # no black stand-in
    for r in done:
        assert r["rewards"]["reward"] is not None
        assert Image.open(out / r["image"]).getextrema() != (0, 0)
    m = metrics(out)
    for arm in ARMS:
        a = m["arms"][arm]
        assert a["num_failed"] == sum(f["arm"] == arm for f in failed)
        assert a["num_samples"] == a["rewards"]["reward"]["count"] == N - a["num_failed"]
    # a rerun tries the failed samples again (and, the model being broken, fails them again)
    run_in_process(args)
    m2 = metrics(out)
    assert m2["last_run"]["generated_this_run"] == len(failed)
    assert {json.loads(line)["key"] for line in (out / layout.FAILED).read_text().splitlines()} == fkeys


@pytest.mark.slow
def test_nan_weights_fail_every_sample_with_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    wdir = tmp_path / "weights"
    shutil.copytree(REPO / "ntrk_lightning" / "weights", wdir)
    w = wdir / "digits_unet.safetensors"
    state = load_file(str(w))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(w))
    out = tmp_path / "run"
    msg = refused(fast_args(out, ["--model.init_args.backbone.init_args.weights_dir", str(wdir),
                                  "--data.init_args.samples_per_prompt", "2"]), capsys)
    assert "every sample" in msg and "failed" in msg
    assert not list((out / "images").rglob("*.png"))
    assert len((out / layout.FAILED).read_text().splitlines()) == 2 * 2
    assert metrics(out)["arms"]["ntrk"]["num_failed"] == 2
    assert not (out / run.LOCK).exists()


@pytest.mark.slow
def test_infinite_gamma_is_not_written_as_black_images(tmp_path, capsys):
    out = tmp_path / "run"
    refused(fast_args(out, ["--model.init_args.samplers.ntrk.init_args.gamma", ".inf",
                            "--data.init_args.samples_per_prompt", "2"]), capsys)
    assert not list((out / "images" / "ntrk").rglob("*.png")) if (out / "images").exists() else True


@pytest.mark.slow
def test_nan_gamma_is_a_one_line_config_error(tmp_path, capsys):
    out = tmp_path / "run"
    msg = refused(fast_args(out, ["--model.init_args.samplers.ntrk.init_args.gamma", ".nan",
                                  "--data.init_args.samples_per_prompt", "2"]), capsys)
    assert "gamma" in msg
    assert not (out / "images").exists()


# ---------------------------------------------------------------------------------------------
# 5. resource bombs
# ---------------------------------------------------------------------------------------------

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)  # 9^9 = 387 million strings once expanded
    t = time.perf_counter()
    msg = refused(["predict", "-c", str(cfg), "--output_dir", str(tmp_path / "o")], capsys)
    assert time.perf_counter() - t < 2.0
    assert "alias" in msg and str(cfg) in msg
    # inline values go through the same bounded loader
    from ntrk_lightning.pipeline.cli import ConfigBoundError, bounded_yaml_load

    with pytest.raises(ConfigBoundError):
        bounded_yaml_load(BOMB)
    assert bounded_yaml_load("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}


def test_evaluate_refuses_an_image_above_the_pixel_cap_before_decoding(tmp_path, capsys):
    from ntrk_lightning.evaluation import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (10000, 10000)).save(folder / "huge.png")
    assert (folder / "huge.png").stat().st_size < 200_000
    Image.new("L", (16, 16)).save(folder / "small.png")
    t = time.perf_counter()
    assert main(["--images", str(folder), "--diversity", "false"]) == 2
    assert time.perf_counter() - t < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("ntrk evaluate: error: image") and "huge.png" in err and "--max_pixels" in err
    assert len(err.splitlines()) == 1
    # the cap is an option
    (folder / "huge.png").unlink()
    assert main(["--images", str(folder), "--diversity", "false", "--max_pixels", "100"]) == 2
    err = capsys.readouterr().err
    assert "small.png" in err and "16x16 = 256 pixels" in err


# ---------------------------------------------------------------------------------------------
# 6. one-line errors
# ---------------------------------------------------------------------------------------------

def test_truncated_weights_file_is_one_line_naming_it(tmp_path, capsys):
    wdir = tmp_path / "weights"
    shutil.copytree(REPO / "ntrk_lightning" / "weights", wdir)
    w = wdir / "digits_unet.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "run"
    msg = refused(fast_args(out, ["--model.init_args.backbone.init_args.weights_dir", str(wdir)]), capsys)
    assert str(w) in msg and "good copy" in msg and "ntrk fit" in msg
    assert not (out / run.LOCK).exists()
    # the classifier weights (a reward) likewise
    c = wdir / "digits_classifier.safetensors"
    c.write_bytes(b"\x00" * 7)
    msg = refused(fast_args(tmp_path / "run2", ["--model.init_args.reward.init_args.weights_dir", str(wdir)]),
                  capsys)
    assert str(c) in msg and "good copy" in msg


@pytest.mark.parametrize("case,expect", [
    ("unknown_class", "NoSuchBackbone"),
    ("empty_yaml", "is empty"),
    ("not_a_mapping", "must be a YAML mapping"),
    ("bad_yaml", "not valid YAML"),
    ("empty_output_dir", "--output_dir is empty"),
])
def test_bad_invocations_are_one_line(tmp_path, capsys, case, expect):
    cfg = tmp_path / "c.yaml"
    text = (REPO / "configs" / "digits_ntrk.yaml").read_text()
    out = str(tmp_path / "o")
    if case == "unknown_class":
        cfg.write_text(text.replace("ntrk_lightning.backbones.DigitsUNetBackbone", "ntrk_lightning.backbones.NoSuchBackbone"))
    elif case == "empty_yaml":
        cfg.write_text("# nothing\n")
    elif case == "not_a_mapping":
        cfg.write_text("- a\n- b\n")
    elif case == "bad_yaml":
        cfg.write_text("model: [unclosed\n")
    else:
        cfg.write_text(text)
        out = ""
    msg = refused(["predict", "-c", str(cfg), "--output_dir", out], capsys)
    assert expect in msg
    assert not Path(tmp_path / "o").exists() and not (Path.cwd() / "images").exists()


def test_grey_reward_on_rgb_images_in_evaluate_is_one_line(tmp_path, capsys):
    from ntrk_lightning.evaluation import main

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    code = main(["--images", str(folder), "--diversity", "false",
                 "--rewards+=rewards.digits.DigitClassifierReward", "--rewards.target", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "digit3_reward_logit" in err and "cannot score" in err and "(3, 16, 16)" in err


# ---------------------------------------------------------------------------------------------
# 7. report
# ---------------------------------------------------------------------------------------------

def test_report_labels_rewards_and_refuses_to_mix_them(reference, tmp_path, capsys):
    from ntrk_lightning.report import main

    a = copy_of(reference, tmp_path / "a")
    b = copy_of(reference, tmp_path / "b")
    assert main([str(a), str(b), "--out", str(tmp_path / "same")]) == 0
    md = (tmp_path / "same" / "report.md").read_text()
    assert "guided by `digit3_reward_logit`" in md and "`reward` = `digit3_reward_logit`" in md
    m = json.loads((b / "metrics.json").read_text())
    m["reward"]["name"], m["reward"]["target"] = "digit7_reward_logit", 7
    (b / "metrics.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main([str(a), str(b), "--out", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "digit3_reward_logit" in err and "digit7_reward_logit" in err
    assert not (tmp_path / "mixed" / "report.md").exists()


# ---------------------------------------------------------------------------------------------
# 8. durability
# ---------------------------------------------------------------------------------------------

def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    from ntrk_lightning import fileio

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    target = tmp_path / "x.json"
    fileio.atomic_write_text(target, "{}")
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)
    assert target.read_text() == "{}"
