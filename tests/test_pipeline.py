"""`ntrk predict` on one process: outputs, determinism, resumption after a kill, clear errors."""

import hashlib
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ntrk_lightning.noise import derive_seed
from pipeline_utils import (REPO, assert_metrics_close, cli_env, expected_keys, flatten_run, images_by_key, metrics,
                            predict_args, records, run_cli, run_in_process, sample_path, wait_for)

N = 10  # samples per arm in the small main job (pipeline_utils.SMALL)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    run_in_process(predict_args(out))
    return out


def test_main_job_writes_images_records_metrics_and_report(small_run):
    out = small_run
    recs = records(out)
    assert {r["key"] for r in recs} == expected_keys(["ntrk", "plain"], N) and len(recs) == 2 * N
    for r in recs:
        assert r["seed"] == derive_seed(0, r["prompt_index"], r["sample_index"])
        img = Image.open(out / r["image"])
        assert img.size == (16, 16) and img.mode == "L"
        assert set(r["rewards"]) == {"reward", "judge_logit", "judge_accuracy"}
        assert r["nfe"] == 10 and r["num_steps"] == 10 and r["nan_fallbacks"] == 0
        assert r["grad_evals"] == (9 if r["arm"] == "ntrk" else 0)
        assert r["sampler"]["name"] == r["arm"]
        # the per-sample record file says the same as records.jsonl
        assert json.loads((out / r["image"]).with_suffix(".json").read_text()) == r
    m = metrics(out)
    assert set(m["arms"]) == {"ntrk", "plain"} and m["num_steps"] == 10
    for arm in ("ntrk", "plain"):
        a = m["arms"][arm]
        vals = np.array([r["rewards"]["reward"] for r in recs if r["arm"] == arm])
        assert a["num_samples"] == N and a["rewards"]["reward"]["count"] == N
        assert a["rewards"]["reward"]["mean"] == pytest.approx(vals.mean(), rel=1e-6)
        assert a["fid"] is not None and a["fid"] > 0 and a["diversity"]["overall"] > 0
    # NTRK steers toward the target digit: a large margin even on 10 samples
    assert m["arms"]["ntrk"]["rewards"]["reward"]["mean"] > m["arms"]["plain"]["rewards"]["reward"]["mean"] + 2.0
    report = (out / "report.md").read_text()
    assert "ntrk" in report and "plain" in report
    assert (out / "config.yaml").is_file()
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_finished_samples_and_fills_gaps(small_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    before = images_by_key(out)
    metrics_before = metrics(out)
    # a "killed" run: some samples never finished, one PNG without its record, a stale temp file
    gone = ["ntrk/p00000_s00003", "ntrk/p00000_s00007", "plain/p00000_s00000"]
    for k in gone:
        sample_path(out, k, ".json").unlink()
    sample_path(out, "plain/p00000_s00000").unlink()
    (sample_path(out, "ntrk/p00000_s00009").parent / ".p00000_s00009.png.x.tmp").write_bytes(b"partial")
    (out / "records.jsonl").unlink()
    (out / "metrics.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.json")}
    run_in_process(predict_args(out))
    after = images_by_key(out)
    assert set(after) == set(before)
    for k in before:  # deterministic: regenerated samples are the same images
        assert np.abs(after[k].astype(int) - before[k].astype(int)).max() <= 1, k
    for p, t in kept.items():  # finished samples were not touched
        assert p.stat().st_mtime_ns == t, p
    assert not list(out.rglob("*.tmp"))
    # regenerated samples ran in other batch compositions: float noise of ~1e-5 in their rewards
    assert_metrics_close(metrics(out), metrics_before, rtol=1e-3, atol=1e-3)


def _no_image_reads(monkeypatch):
    from ntrk_lightning.pipeline import layout

    def refuse(path):
        raise AssertionError(f"a finished image was read back: {path}")

    monkeypatch.setattr(layout, "read_image_u8", refuse)


def test_resume_takes_finished_samples_from_persisted_states_not_images(small_run, tmp_path, monkeypatch):
    """An extended rerun reads no finished image back (their metric states are persisted), and
    its metrics equal those of one uninterrupted run of the whole set."""
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    _no_image_reads(monkeypatch)
    run_in_process(predict_args(out, ["--data.init_args.samples_per_prompt", str(N + 2)]))
    m = metrics(out)
    assert m["last_run"]["generated_this_run"] == 4 and m["arms"]["ntrk"]["num_samples"] == N + 2
    monkeypatch.undo()
    whole = tmp_path / "whole"
    run_in_process(predict_args(whole, ["--data.init_args.samples_per_prompt", str(N + 2),
                                        "--model.init_args.report", "false"]))
    assert_metrics_close(m["arms"], metrics(whole)["arms"], rtol=1e-3, atol=1e-3)


def test_flat_folder_of_an_older_version_is_read_and_extended_sharded(small_run, tmp_path, monkeypatch):
    """A run folder from before sharding (flat images, no persisted states): its samples are kept
    and read back once for the metrics, new samples go to shard folders, and the next rerun reads
    no image back."""
    from ntrk_lightning.pipeline import layout

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    flatten_run(out)
    flat = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*/*.png")}
    assert len(flat) == 2 * N
    run_in_process(predict_args(out, ["--data.init_args.samples_per_prompt", str(N + 1)]))
    m = metrics(out)
    assert m["last_run"]["generated_this_run"] == 2 and m["arms"]["plain"]["num_samples"] == N + 1
    assert all(p.stat().st_mtime_ns == t for p, t in flat.items())
    assert layout.image_path(out, "ntrk", 0, N).is_file()  # the new sample: sharded
    images = {r["key"]: r["image"] for r in records(out)}
    assert images["ntrk/p00000_s00000"] == "images/ntrk/p00000_s00000.png"  # where it still is
    assert all((out / path).is_file() for path in images.values())
    _no_image_reads(monkeypatch)
    run_in_process(predict_args(out, ["--data.init_args.samples_per_prompt", str(N + 1)]))
    assert_metrics_close(metrics(out)["arms"], m["arms"], rtol=1e-9, atol=1e-9)


def test_independent_of_batch_size(small_run, tmp_path):
    out = tmp_path / "run"
    run_in_process(predict_args(out, ["--data.init_args.batch_size", "3", "--model.init_args.report", "false"]))
    a, b = images_by_key(small_run), images_by_key(out)
    assert set(b) == expected_keys(["ntrk", "plain"], N)
    for k in b:
        assert np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1, k
    assert not (out / "report.md").exists()


def test_sigterm_then_rerun_completes_without_regenerating(tmp_path):
    """Kill a run with SIGTERM mid-way; the same command completes the set and leaves every sample
    finished before the kill untouched."""
    out = tmp_path / "run"
    args = predict_args(out, ["--data.init_args.samples_per_prompt", "48", "--data.init_args.batch_size", "2"])
    proc = subprocess.Popen([sys.executable, "-m", "ntrk_lightning.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = wait_for(lambda: len(list((out / "images").rglob("*.json"))) >= 6, 240, proc=proc)
        assert started and proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    done = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.json")}
    assert 0 < len(done) < 96, "the kill did not land mid-run"
    for png in (out / "images").rglob("*.png"):  # whatever exists is a complete image
        Image.open(png).load()
    run_cli(args)
    recs = records(out)
    assert {r["key"] for r in recs} == expected_keys(["ntrk", "plain"], 48) and len(recs) == 96
    for p, t in done.items():
        assert p.stat().st_mtime_ns == t, f"{p} was regenerated"
    assert metrics(out)["arms"]["ntrk"]["num_samples"] == 48


@pytest.mark.parametrize("extra,message", [
    (["--model.init_args.reward.init_args.score", "hit"], "not differentiable"),
    (["--data.init_args.prompts", "[]"], "prompt list is empty"),
    (["--model.init_args.reward.init_args.target", "12"], "target class must be in 0..9"),
    (["--model.init_args.num_steps", "0"], "num_steps"),
    (["--trainer.inference_mode", "true"], "inference_mode"),
    (["--model.init_args.fid_reference", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_configs_fail_early_with_a_clear_message(tmp_path, capsys, extra, message):
    """Refused while parsing/instantiating: a one-line message (argparse-style exit), no
    traceback, no output written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_in_process(predict_args(out, extra))
    text = f"{exc.value.code}\n{capsys.readouterr().err}"
    assert exc.value.code not in (0, None)
    assert message in text, text[-2000:]
    assert not (out / "images").exists()


def test_missing_output_dir_is_refused_by_the_real_command():
    proc = run_cli(["predict", "-c", "configs/digits_ntrk.yaml"], check=False, timeout=120)
    assert proc.returncode != 0 and "--output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_states_uses_only_state_files_that_still_match(tmp_path):
    """A persisted state file counts only while every sample it covers is finished with the PNG
    checksum it was computed from, and no earlier file covers the same sample; everything else is
    read back."""
    from ntrk_lightning.pipeline import layout, run

    finished = {("a", 0, s): f"h{s}" for s in range(6)}
    folder = tmp_path / layout.STATES
    folder.mkdir()

    def state(name, keys, pt=True, version=run.STATE_FORMAT):
        text = run.state_keys_text({layout.key("a", 0, s): h for s, h in keys})
        (folder / f"{name}{run.STATE_KEYS_SUFFIX}").write_text(text.replace(f"format {run.STATE_FORMAT}",
                                                                            f"format {version}"))
        if pt:
            (folder / f"{name}.pt").write_bytes(b"")

    state("r1", [(0, "h0"), (1, "h1")])                # good
    state("r2", [(1, "h1"), (2, "h2")])                # overlaps r1: left out
    state("r3", [(3, "OTHER")])                        # computed from another PNG: left out
    state("r4", [(4, "h4"), (9, "h9")])                # names a sample that is not finished: left out
    state("r5", [(5, "h5")], pt=False)                 # key list without its states: left out
    state("r6", [(5, "h5")], version=1)                # an older format (no sample costs): left out
    (folder / "r7.json").write_text(json.dumps({"keys": {layout.key("a", 0, 5): "h5"}}))  # format 1's list
    (folder / "r7.pt").write_bytes(b"")
    (folder / f"r8{run.STATE_KEYS_SUFFIX}").write_text(run.state_keys_text({}) + "a/p00000_s00005\n")  # cut
    (folder / "r8.pt").write_bytes(b"")
    files, reread = run.plan_states(tmp_path, finished)
    assert files == ["r1"]
    assert reread == [("a", 0, 2), ("a", 0, 3), ("a", 0, 4), ("a", 0, 5)]


def _refuse_reads(monkeypatch):
    """Make reading a per-sample record or hashing a PNG on resume fail loudly."""
    from ntrk_lightning.pipeline import run

    def refuse(*args, **kwargs):
        raise AssertionError(f"a finished sample's file was read: {args[:1]}")

    monkeypatch.setattr(run, "sha256_file", refuse)
    monkeypatch.setattr(run, "_check_record", refuse)
    monkeypatch.setattr(run, "_check_png", refuse)


def test_resume_of_an_intact_folder_reads_no_record_file_and_hashes_no_png(small_run, tmp_path, monkeypatch):
    """The record shards carry each sample's stat signature: with every file unchanged, resuming
    accepts all finished samples from the shards, and records.jsonl stays the same bytes."""
    from ntrk_lightning.pipeline import layout, run

    out = tmp_path / "run"
    shutil.copytree(small_run, out)  # copy2 keeps size and mtime_ns
    before = (out / "records.jsonl").read_bytes()
    keys = expected_keys(["ntrk", "plain"], N)
    wanted = {(k.split("/")[0], 0, int(k[-5:])) for k in keys}
    _refuse_reads(monkeypatch)
    found = run.verify_finished(out, ["ntrk", "plain"], wanted, [""])
    assert set(found.sha) == wanted and not found.problems and not found.fresh
    assert all(found.sha[k] == hashlib.sha256(layout.image_path(out, *k).read_bytes()).hexdigest() for k in wanted)
    run_in_process(predict_args(out))  # the whole rerun too
    assert metrics(out)["last_run"]["generated_this_run"] == 0
    assert (out / "records.jsonl").read_bytes() == before


def test_changed_mtime_same_content_passes_the_full_check_and_is_resigned(small_run, tmp_path, monkeypatch):
    """A sample whose file changed mtime but not content (touched, copied without -p) is checked
    in full, accepted (not counted damaged), and signed again so the next resume is quick."""
    from ntrk_lightning.pipeline import layout, run

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    wanted = {(a, 0, s) for a in ("ntrk", "plain") for s in range(N)}
    png = layout.image_path(out, "ntrk", 0, 4)
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    checked = []
    real = run._check_png
    monkeypatch.setattr(run, "_check_png", lambda path, rec: checked.append(Path(path).name) or real(path, rec))
    found = run.verify_finished(out, ["ntrk", "plain"], wanted, [""])
    assert set(found.sha) == wanted and not found.problems and png.is_file()
    assert checked == ["p00000_s00004.png"] and found.fresh == [("ntrk", 0, 4)]
    monkeypatch.undo()
    _refuse_reads(monkeypatch)  # signed again: quick this time
    found = run.verify_finished(out, ["ntrk", "plain"], wanted, [""])
    assert set(found.sha) == wanted and not found.problems


def _signed_folder(out, n=6):
    """A run folder of ``n`` finished samples of arm ``a`` written as the writer does (files, then
    their shard lines with stat signatures), without a model."""
    import torch

    from ntrk_lightning.pipeline import layout

    g = torch.Generator().manual_seed(0)
    lines = []
    for s in range(n):
        rec = layout.build_record("a", 0, "x", s, s, {"name": "plain"}, 2, {"reward": 0.5}, 2, 0, 0, 0.1, 0)
        text, _ = layout.write_sample(out, rec, torch.randint(0, 256, (1, 8, 8), generator=g, dtype=torch.uint8))
        # written "an hour ago": a damage below can never fall into the same mtime tick
        png, rec_file = layout.image_path(out, "a", 0, s), layout.record_path(out, "a", 0, s)
        for f in (png, rec_file):
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 3600 * 10**9))
        lines.append(layout.shard_line(text, layout.stat_signature(str(png), str(rec_file))))
    layout.append_lines(out / layout.RECORD_SHARDS / "r0.rank00000.jsonl", lines)
    return {("a", 0, s) for s in range(n)}


def test_quick_check_sends_every_damage_to_the_full_check(tmp_path, monkeypatch):
    """Each damage of test_faults' integrity test (garbage, empty and one-byte-flipped PNG,
    truncated record, missing PNG), done to a signed folder, is found and deleted; the untouched
    sample is accepted without being read; a sample on disk that no shard names is checked in full."""
    from ntrk_lightning.pipeline import layout, run

    monkeypatch.setenv("NTRK_FSYNC", "0")
    wanted = _signed_folder(tmp_path, 7)
    png = lambda s: layout.image_path(tmp_path, "a", 0, s)  # noqa: E731
    png(0).write_bytes(os.urandom(300))
    png(1).write_bytes(b"")
    rec = layout.record_path(tmp_path, "a", 0, 2)
    rec.write_text(rec.read_text()[:40])
    png(3).unlink()
    data = bytearray(png(4).read_bytes())
    data[len(data) // 2] ^= 0xFF
    png(4).write_bytes(bytes(data))
    shard = tmp_path / layout.RECORD_SHARDS / "r0.rank00000.jsonl"
    kept = shard.read_text().splitlines()
    shard.write_text("\n".join(kept[:6]) + "\n")  # sample 6: files on disk, no shard line (a kill)
    checked = []
    real = run._check_png
    monkeypatch.setattr(run, "_check_png", lambda path, r: checked.append(Path(path).name) or real(path, r))
    found = run.verify_finished(tmp_path, ["a"], wanted, ["x"])
    assert set(found.sha) == {("a", 0, 5), ("a", 0, 6)}
    assert sorted(p["key"] for p in found.problems) == [f"a/p00000_s0000{s}" for s in range(5)]
    assert "p00000_s00005.png" not in checked and "p00000_s00006.png" in checked
    assert not png(4).exists() and not layout.record_path(tmp_path, "a", 0, 4).exists()
    checked_shard = [p for p in (tmp_path / layout.RECORD_SHARDS).iterdir() if p.name.endswith(".checked.jsonl")]
    assert [e.record["key"] for e in layout.read_shard(checked_shard[0])] == ["a/p00000_s00006"]


def test_extended_rerun_appends_to_records_jsonl_and_reads_no_earlier_record(small_run, tmp_path, monkeypatch):
    """A rerun asking for more samples per prompt leaves the earlier records.jsonl lines as they
    are and appends its own, sorted, without reading the record shards or records of earlier runs;
    seeds are derived for the new items only; the per-arm numbers of metrics.json come from the
    metric states and agree with the records."""
    from ntrk_lightning.pipeline import data, layout

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    before = (out / "records.jsonl").read_text()
    seeds = []
    real_seed = data.derive_seed
    monkeypatch.setattr(data, "derive_seed", lambda *k: seeds.append(k) or real_seed(*k))

    def refuse(*args, **kwargs):
        raise AssertionError(f"the end of the run read earlier records: {args[:1]}")

    monkeypatch.setattr(layout, "read_shards", refuse)
    monkeypatch.setattr(layout, "read_shard", refuse)
    run_in_process(predict_args(out, ["--data.init_args.samples_per_prompt=12"]))
    assert sorted(seeds) == [(0, 0, 10), (0, 0, 11)]
    after = (out / "records.jsonl").read_text()
    assert after.startswith(before)
    added = [json.loads(line)["key"] for line in after[len(before):].splitlines()]
    assert added == ["ntrk/p00000_s00010", "ntrk/p00000_s00011", "plain/p00000_s00010", "plain/p00000_s00011"]
    index = json.loads((out / "records.index.json").read_text())
    assert index["count"] == 24 and index["bytes"] == len(after.encode())
    recs, m = records(out), metrics(out)
    for arm in ("ntrk", "plain"):
        mine = [r for r in recs if r["arm"] == arm]
        a = m["arms"][arm]
        assert a["num_samples"] == 12 and a["rewards"]["reward"]["count"] == 12
        assert a["nfe_per_sample"] == pytest.approx(np.mean([r["nfe"] for r in mine]))
        assert a["grad_evals_per_sample"] == pytest.approx(np.mean([r["grad_evals"] for r in mine]))
        assert a["seconds_total"] == pytest.approx(sum(r["seconds"] for r in mine), rel=1e-9)
        assert a["rewards"]["reward"]["mean"] == pytest.approx(np.mean([r["rewards"]["reward"] for r in mine]))
    monkeypatch.undo()
    # without its index, the next run cannot trust records.jsonl: it rewrites it, sorted, same lines
    (out / "records.index.json").unlink()
    run_in_process(predict_args(out, ["--data.init_args.samples_per_prompt=12"]))
    rewritten = (out / "records.jsonl").read_text().splitlines()
    assert sorted(rewritten) == sorted(after.splitlines()) and rewritten != after.splitlines()
    assert [json.loads(x)["key"] for x in rewritten] == sorted(json.loads(x)["key"] for x in rewritten)


def test_samples_of_a_killed_run_are_appended_by_the_next(small_run, tmp_path):
    """Samples a killed run finished (files and shard lines, but no records.jsonl update) are in
    later shards than records.jsonl knows: the next run appends them (their metrics read back once),
    and the folder ends as the uninterrupted run's."""
    from ntrk_lightning.pipeline import layout

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(small_run, whole)
    shutil.copytree(small_run, killed)
    run_in_process(predict_args(whole, ["--data.init_args.samples_per_prompt=12"]))
    # what the killed run left: the new samples' files and its record shard, nothing else
    for arm in ("ntrk", "plain"):
        for s in (10, 11):
            for f in (layout.image_path(whole, arm, 0, s), layout.record_path(whole, arm, 0, s)):
                dst = killed / f.relative_to(whole)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
    new_shards = {p.name for p in layout.shard_files(whole)} - {p.name for p in layout.shard_files(killed)}
    for name in new_shards:
        shutil.copy2(whole / layout.RECORD_SHARDS / name, killed / layout.RECORD_SHARDS / name)
    before = (killed / "records.jsonl").read_text()
    run_in_process(predict_args(killed, ["--data.init_args.samples_per_prompt=12"]))
    m = metrics(killed)
    assert m["last_run"]["generated_this_run"] == 0
    after = (killed / "records.jsonl").read_text()
    assert after.startswith(before) and sorted(after.splitlines()) == sorted((whole / "records.jsonl").read_text().splitlines())
    assert_metrics_close(m, metrics(whole))
