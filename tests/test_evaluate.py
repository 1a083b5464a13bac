"""``ntrk evaluate``: the same metrics on 2 DDP ranks as on 1 (real CLI in a subprocess), equal to
direct in-process computations; run-folder input; clear one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import metrics as M
from ntrk_lightning.evaluation import ImageFolderDataModule, main

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 37  # uneven over 2 ranks (19 + 18) and over batches of 8
PROMPTS = ["a digit zero", "a digit three", "a digit seven"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """37 real digits as 16x16 grey PNGs, with a one-prompt-per-line prompts file."""
    from ntrk_lightning.data.digits import real_images

    root = tmp_path_factory.mktemp("eval")
    folder = root / "images"
    folder.mkdir()
    x, _ = real_images(16)
    u8 = (x[:N_IMAGES * 5:5] * 255).round().byte()
    for i in range(N_IMAGES):
        Image.fromarray(u8[i, 0].numpy(), mode="L").save(folder / f"img_{i:03d}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(PROMPTS[i % 3] + "\n" for i in range(N_IMAGES)))
    return folder, prompts, u8


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def _cli(args: list[str], out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ntrk_lightning.cli", "evaluate", *args, "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    return json.loads((out / "metrics.json").read_text())


def test_ddp_equals_single_process_and_direct_computation(image_folder, tiny_clip, tmp_path):
    folder, prompts, u8 = image_folder
    cfg, weights = tiny_clip
    common = ["--images", str(folder), "--prompts", str(prompts), "--reference", "digits", "--feature", "digits",
              "--clip_model", str(cfg), "--clip_weights", str(weights), "--batch_size", "8",
              "--rewards+=rewards.digits.DigitClassifierReward", "--rewards.target", "3",
              "--rewards+=rewards.digits.DigitClassifierReward", "--rewards.classifier", "judge",
              "--trainer.accelerator", "cpu"]
    single = _cli(common + ["--trainer.devices", "1"], tmp_path / "one")
    multi = _cli(common + ["--trainer.devices", "2", "--trainer.strategy", "ddp"], tmp_path / "two")
    assert single["world_size"] == 1 and multi["world_size"] == 2
    arm = folder.name
    a, b = single["arms"][arm], multi["arms"][arm]
    assert a["num_samples"] == b["num_samples"] == N_IMAGES
    names = ["digit3_reward_logit", "digit3_judge_logit"]
    assert list(a["rewards"]) == list(b["rewards"]) == names
    for name in names:
        sa, sb = a["rewards"][name], b["rewards"][name]
        assert sa["count"] == sb["count"] == N_IMAGES
        for k in ("mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95"):
            assert sb[k] == pytest.approx(sa[k], rel=1e-5, abs=1e-6), (name, k)
    for k in ("fid", "diversity", "clip_score"):
        assert a[k] is not None and math.isfinite(a[k])
        assert b[k] == pytest.approx(a[k], rel=1e-5), k
    assert a["diversity_per_group"].keys() == b["diversity_per_group"].keys() == {"0", "1", "2"}
    for g, v in a["diversity_per_group"].items():
        assert b["diversity_per_group"][g] == pytest.approx(v, rel=1e-5)

    # the same numbers computed directly, in this process, from the same files
    from rewards.digits import DigitClassifierReward

    x = u8.float() / 255.0
    groups = torch.tensor([i % 3 for i in range(N_IMAGES)])
    ps = [PROMPTS[i % 3] for i in range(N_IMAGES)]
    r = DigitClassifierReward(target=3)(x).double()
    assert a["rewards"]["digit3_reward_logit"]["mean"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert a["rewards"]["digit3_reward_logit"]["q95"] == pytest.approx(float(torch.quantile(r, 0.95)), rel=1e-5)
    fid = M.FrechetDistance("digits", reference="digits")
    fid.update(u8)
    assert a["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    div = M.Diversity("digits")
    div.update(u8, groups)
    d = div.compute()
    assert a["diversity"] == pytest.approx(d["overall"], rel=1e-6)
    assert a["diversity_per_group"]["2"] == pytest.approx(d["per_group"][2], rel=1e-6)
    clip = M.OpenCLIPScore(str(cfg), weights)
    assert a["clip_score"] == pytest.approx(float(clip.scores(x, ps).double().mean()), rel=1e-4, abs=1e-4)


def test_run_folder_is_scored_per_arm(tmp_path, capsys):
    from run_fixtures import make_run

    run = make_run(tmp_path, "r", {"ntrk": {"sampler": {"name": "ntrk"}, "nfe": 25},
                                   "plain": {"sampler": {"name": "plain"}, "nfe": 25}},
                   num_prompts=2, samples_per_prompt=4, write_metrics=False)
    rc = main(["--images", str(run), "--feature", "digits", "--reference", "digits:16",
               "--rewards+=rewards.digits.DigitClassifierReward", "--output_dir", str(tmp_path / "out"),
               "--trainer.enable_progress_bar", "false"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert res["kind"] == "run" and list(res["arms"]) == ["ntrk", "plain"]
    for arm in ("ntrk", "plain"):
        m = res["arms"][arm]
        assert m["num_samples"] == 8 and m["rewards"]["digit3_reward_logit"]["count"] == 8
        assert set(m["diversity_per_group"]) == {"0", "1"} and m["fid"] > 0
    # the plain arm's images differ from the ntrk arm's (brightened in the fixture)
    assert res["arms"]["ntrk"]["fid"] != res["arms"]["plain"]["fid"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # atomic, no leftovers


def test_prompts_jsonl_and_padding_for_more_ranks_than_images(image_folder, tmp_path):
    folder, _, _ = image_folder
    names = sorted(p.name for p in folder.iterdir())
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"image": n, "prompt": f"p{i % 2}", "prompt_index": 10 + i % 2}) + "\n"
                          for i, n in reversed(list(enumerate(names)))))
    s = ImageFolderDataModule(images=str(folder), prompts=str(jl)).scan()
    assert [it.path.name for it in s.items] == names and s.has_prompts
    assert [it.group for it in s.items[:3]] == [10, 11, 10] and s.items[1].prompt == "p1"

    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((folder / names[0]).read_bytes())
    dm = ImageFolderDataModule(images=str(one), batch_size=4)

    class _T:  # what the data module reads from a 3-process trainer
        world_size = 3

    dm.trainer = _T()  # type: ignore[assignment]
    ds = dm.predict_dataloader().dataset
    assert len(ds) == 3 and not ds[0]["skip"] and ds[1]["skip"] and ds[2]["skip"]
    assert ds[0]["image"].shape == (1, 16, 16) and ds[0]["image"].dtype == torch.uint8


def _err(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in "\n".join(err)
    msg = [ln for ln in err if ln.startswith("ntrk evaluate: error:")]
    assert len(msg) == 1, err
    return msg[0]


def test_clear_errors(image_folder, tmp_path, capsys, monkeypatch):
    folder, prompts, _ = image_folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in _err(capsys, ["--images", str(empty), "--feature", "digits"])
    assert "not found" in _err(capsys, ["--images", str(tmp_path / "missing"), "--feature", "digits"])

    bad = tmp_path / "bad"
    bad.mkdir()
    for n in sorted(p.name for p in folder.iterdir())[:3]:
        (bad / n).write_bytes((folder / n).read_bytes())
    (bad / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    msg = _err(capsys, ["--images", str(bad), "--feature", "digits"])
    assert "img_001.png" in msg and "corrupt" in msg
    # without the up-front check the file is found while predicting: still one line, still named
    msg = _err(capsys, ["--images", str(bad), "--feature", "digits", "--data.verify", "false",
                        "--trainer.enable_progress_bar", "false"])
    assert "img_001.png" in msg

    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    msg = _err(capsys, ["--images", str(folder), "--prompts", str(short), "--feature", "digits"])
    assert "2 lines" in msg and f"{N_IMAGES} images" in msg

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    msg = _err(capsys, ["--images", str(folder), "--reference", "digits"])  # default feature: inception
    assert M.INCEPTION_WEIGHTS_FILE in msg and "download" in msg

    msg = _err(capsys, ["--images", str(folder), "--feature", "digits", "--clip_model", "ViT-B-32",
                        "--clip_weights", str(tmp_path / "w.safetensors")])
    assert "needs prompts" in msg
    msg = _err(capsys, ["--images", str(folder), "--feature", "digits", "--reference", str(tmp_path / "nothing")])
    assert "nothing" in msg
