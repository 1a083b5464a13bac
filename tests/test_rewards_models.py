"""Reward models read from local files (tiny random models built offline): the LAION aesthetic
predictor (real head shape, tensor preprocessing vs the PIL reference), CLIP score, HPSv2,
PickScore, JPEG (in)compressibility, weighted sums, user rewards by import path; every loader's
message for a missing or wrong file; and `ntrk predict`'s handling of a non-differentiable reward."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline_utils import REPO, records, run_in_process
from tiny_sd import make_aesthetic_head, make_hps_checkpoint, make_open_clip, make_tiny_pickscore, tiny_assets

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()  # see test_stable_diffusion.py: tiny models, shared cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_files")
    d = {"root": root}
    d["clip768_cfg"], d["clip768"] = make_open_clip(root, "ntrk-test-clip-768", embed_dim=768, seed=5)
    d["clip32_cfg"], d["clip32"] = make_open_clip(root, "ntrk-test-clip-32b", embed_dim=32, seed=6)
    d["head768"] = root / "sac+logos+ava1-l14-linearMSE.pth"
    d["head768_state"] = make_aesthetic_head(d["head768"], seed=7)
    d["hps"] = root / "HPS_v2.1_compressed.pt"
    d["hps_state"] = make_hps_checkpoint(d["hps"], "ntrk-test-clip-32b", seed=8)
    d["pick"], d["pickproc"] = root / "PickScore_v1", root / "clip-h-processor"
    make_tiny_pickscore(d["pick"], d["pickproc"])
    d["text"] = root / "notes.txt"
    d["text"].write_text("this is not a checkpoint\n")
    return d


def _images(n: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


# ---- aesthetic --------------------------------------------------------------------------------

def test_aesthetic_head_of_the_documented_shape_scores_like_a_direct_computation(files):
    """A head state dict with the released keys and shapes (768->1024->128->64->16->1 at layers
    0/2/4/6/7), saved with torch.save, gives exactly the chain of affine maps on the normalised
    CLIP embedding (no activations), computed here by hand."""
    import open_clip
    from rewards.aesthetic import LAIONAestheticReward

    state = files["head768_state"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    r = LAIONAestheticReward(head=str(files["head768"]), clip_weights=str(files["clip768"]),
                             clip_model=str(files["clip768_cfg"]))
    x = _images()
    scores = r(x)
    assert r.head.dims == (768, 1024, 128, 64, 16, 1)
    # direct: an independent open_clip model from the same file, preprocessing by the reference recipe
    model = open_clip.create_model("ntrk-test-clip-768", pretrained=str(files["clip768"])).eval()
    from metrics.clip_score import clip_preprocess

    with torch.no_grad():
        emb = model.encode_image(clip_preprocess(x, 32, OPENAI_MEAN, OPENAI_STD))
        h = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scores.detach(), h.squeeze(-1), rtol=1e-5, atol=1e-6)
    assert scores.std() > 0  # different images, different scores
    assert r.image_mean == OPENAI_MEAN and r.image_std == OPENAI_STD


def test_aesthetic_preprocessing_matches_the_pil_reference_pipeline():
    """Resize shorter side to 224 (bicubic, antialias), centre crop, OpenAI mean/std: the tensor
    version vs torchvision's transforms on a PIL image (which also rounds to 8 bits after the
    resize), for landscape, portrait and upscaled inputs."""
    from torchvision import transforms as T

    from metrics.clip_score import clip_preprocess

    ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    rng = np.random.default_rng(0)
    for h, w in ((300, 420), (512, 256), (64, 64)):
        # a smooth image (like generated ones) plus mild noise
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
        u8 = np.clip((base * 0.4 + 0.5 + rng.normal(0, 0.03, base.shape)) * 255, 0, 255).astype(np.uint8)
        want = ref(Image.fromarray(u8))
        got = clip_preprocess(torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255.0, 224, OPENAI_MEAN,
                              OPENAI_STD)[0]
        assert got.shape == want.shape == (3, 224, 224)
        err = (got - want).abs()
        # 8-bit rounding of the PIL path is up to 0.5/255/std ~ 0.008 in normalised units (measured:
        # mean 0.0045, max 0.017); a crop off by one pixel would give a mean error of 0.04-0.1
        assert err.mean() < 0.008 and err.max() < 0.03, (h, w, float(err.mean()), float(err.max()))


def test_aesthetic_reward_is_differentiable_and_checks_head_against_clip(files):
    from rewards.aesthetic import LAIONAestheticReward

    a = tiny_assets()
    r = LAIONAestheticReward(head=str(a.head), clip_weights=str(a.clip_weights), clip_model=str(a.clip_config))
    x = _images().requires_grad_(True)
    (g,) = torch.autograd.grad(r(x).sum(), x)
    assert g.abs().max() > 0 and r.differentiable and not r.needs_prompts
    assert r.head.dims == (32, 16, 8, 8, 4, 1)
    # the 768-d released head on a 32-d CLIP model: refused with both sizes named
    bad = LAIONAestheticReward(head=str(files["head768"]), clip_weights=str(a.clip_weights),
                               clip_model=str(a.clip_config))
    with pytest.raises(ValueError, match=r"expects 768-d CLIP embeddings but .* gives 32-d"):
        bad.load()


def test_linear_aesthetic_head_loads(files, tmp_path):
    from rewards.aesthetic import load_aesthetic_head

    torch.manual_seed(0)
    w, b = torch.randn(1, 768), torch.randn(1)
    torch.save({"weight": w, "bias": b}, str(tmp_path / "sa_0_4_vit_l_14_linear.pth"))
    head = load_aesthetic_head(str(tmp_path / "sa_0_4_vit_l_14_linear.pth"))
    e = torch.randn(4, 768)
    torch.testing.assert_close(head(e), e @ w.T + b)


def test_aesthetic_loader_messages(files, tmp_path):
    from rewards.aesthetic import LAIONAestheticReward

    a = tiny_assets()
    ok = dict(head=str(a.head), clip_weights=str(a.clip_weights), clip_model=str(a.clip_config))
    with pytest.raises(FileNotFoundError, match=r"LAION aesthetic head not found: .*missing.pth.*"
                                                r"sac\+logos\+ava1-l14-linearMSE.pth.*improved-aesthetic-predictor"):
        LAIONAestheticReward(**{**ok, "head": str(tmp_path / "missing.pth")})
    with pytest.raises(FileNotFoundError, match=r"CLIP ViT-L/14 weights file not found: .*nope.safetensors.*"
                                                r"timm/vit_large_patch14_clip_224.openai"):
        LAIONAestheticReward(**{**ok, "clip_weights": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ValueError, match=r"aesthetic head .*notes.txt is not a weights file"):
        LAIONAestheticReward(**{**ok, "head": str(files["text"])}).load()
    # a real checkpoint of something else (here the HPS file) as the head
    with pytest.raises(ValueError, match=r"aesthetic head .*HPS_v2.1_compressed.pt has unexpected key .*layers"):
        LAIONAestheticReward(**{**ok, "head": str(files["hps"])}).load()
    # a head whose layers do not chain
    state = dict(files["head768_state"])
    state["layers.2.weight"] = torch.zeros(128, 1000)
    torch.save(state, str(tmp_path / "broken_head.pth"))
    with pytest.raises(ValueError, match=r"layer 2 takes 1000 inputs but the previous layer gives 1024"):
        LAIONAestheticReward(**{**ok, "head": str(tmp_path / "broken_head.pth")}).load()
    # CLIP weights that are a state dict of something else
    with pytest.raises(ValueError, match=r"CLIP ViT-L/14 weights file .*sac\+logos.* is not an open_clip state dict"):
        LAIONAestheticReward(**{**ok, "clip_weights": str(files["head768"])}).load()
    with pytest.raises(ValueError, match=r"is not a weights file"):
        LAIONAestheticReward(**{**ok, "clip_weights": str(files["text"])}).load()


# ---- CLIP score, HPSv2, PickScore ---------------------------------------------------------------

def test_clip_score_reward_is_the_scaled_cosine(files):
    import open_clip
    from rewards.clip_score import CLIPScoreReward

    r = CLIPScoreReward(weights=str(files["clip32"]), model_name=str(files["clip32_cfg"]))
    x = _images().requires_grad_(True)
    prompts = ["a cat", "a dog", "a cat"]
    s = r(x, prompts)
    model = open_clip.create_model("ntrk-test-clip-32b", pretrained=str(files["clip32"])).eval()
    tok = open_clip.get_tokenizer("ntrk-test-clip-32b")
    from metrics.clip_score import clip_preprocess

    with torch.no_grad():
        img = F.normalize(model.encode_image(clip_preprocess(x, 32, OPENAI_MEAN, OPENAI_STD)), dim=-1)
        txt = F.normalize(model.encode_text(tok(prompts)), dim=-1)
    torch.testing.assert_close(s.detach(), 100 * (img * txt).sum(-1), rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(s.sum(), x)
    assert g.abs().max() > 0 and r.needs_prompts
    with pytest.raises(ValueError, match="needs prompts"):
        r(x)
    with pytest.raises(FileNotFoundError, match=r"CLIP weights file not found: .*gone.safetensors.*timm/vit_large"):
        CLIPScoreReward(weights=str(files["root"] / "gone.safetensors"), model_name=str(files["clip32_cfg"]))
    with pytest.raises(ValueError, match=r"CLIP weights file .*clip-768.safetensors is not an open_clip state dict "
                                         r"of model .*size mismatch"):
        CLIPScoreReward(weights=str(files["clip768"]), model_name=str(files["clip32_cfg"])).load()


def test_hpsv2_checkpoint_in_the_release_layout_scores_the_cosine(files):
    import open_clip
    from rewards.hps import HPSv2Reward, resize_longest_and_pad

    raw = torch.load(str(files["hps"]), weights_only=True)
    assert set(raw) == {"state_dict", "epoch", "name"}  # the release layout
    r = HPSv2Reward(checkpoint=str(files["hps"]), model_name=str(files["clip32_cfg"]))
    x = _images(h=32, w=32)
    prompts = ["a cat", "a dog", "a fox"]
    s = r(x, prompts)
    model = open_clip.create_model("ntrk-test-clip-32b").eval()
    model.load_state_dict(files["hps_state"])
    tok = open_clip.get_tokenizer("ntrk-test-clip-32b")
    from metrics.clip_score import clip_preprocess

    with torch.no_grad():
        img = F.normalize(model.encode_image(clip_preprocess(x, 32, OPENAI_MEAN, OPENAI_STD)), dim=-1)
        txt = F.normalize(model.encode_text(tok(prompts)), dim=-1)
    torch.testing.assert_close(s.detach(), (img * txt).sum(-1), rtol=1e-5, atol=1e-6)
    # HPSv2's evaluation transform: longer side to the input size, black padding to a square
    tall = _images(n=1, h=32, w=16)
    p = resize_longest_and_pad(tall, 32, (0.0,) * 3, (1.0,) * 3)
    assert p.shape == (1, 3, 32, 32)
    assert p[..., :8].abs().max() == 0 and p[..., 24:].abs().max() == 0
    torch.testing.assert_close(p[..., 8:24], tall)


def test_hpsv2_loader_messages(files, tmp_path):
    from rewards.hps import HPSv2Reward

    cfg = str(files["clip32_cfg"])
    with pytest.raises(FileNotFoundError, match=r"HPSv2 checkpoint not found: .*HPS_v2.pt.*xswu/HPSv2"):
        HPSv2Reward(checkpoint=str(tmp_path / "HPS_v2.pt"), model_name=cfg)
    with pytest.raises(ValueError, match=r"HPSv2 checkpoint .*notes.txt is not a weights file"):
        HPSv2Reward(checkpoint=str(files["text"]), model_name=cfg).load()
    with pytest.raises(ValueError, match=r"HPSv2 checkpoint .*sac\+logos.* is not an open_clip state dict .*"
                                         r"Missing key.*xswu/HPSv2"):
        HPSv2Reward(checkpoint=str(files["head768"]), model_name=cfg).load()
    with pytest.raises(ValueError, match="resize_mode"):
        HPSv2Reward(checkpoint=str(files["hps"]), model_name=cfg, resize_mode="stretch")


def test_pickscore_matches_the_transformers_reference(files):
    """At the processor's own size the PIL processor does no resampling, so the tensor path must
    agree with CLIPProcessor + get_*_features + logit_scale exactly (the published recipe)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from rewards.pickscore import PickScoreReward
    from rewards.clip_score import image_features

    r = PickScoreReward(str(files["pick"]), str(files["pickproc"]))
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    prompts = ["a cat", "a red fox in the snow"]
    s = r(u8.float() / 255.0, prompts)
    model = CLIPModel.from_pretrained(str(files["pick"]), local_files_only=True).eval()
    proc = CLIPImageProcessor.from_pretrained(str(files["pickproc"]), local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(str(files["pickproc"]), local_files_only=True)
    pix = proc(images=[Image.fromarray(im.permute(1, 2, 0).numpy()) for im in u8], return_tensors="pt")
    t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ie = F.normalize(image_features(model.get_image_features(**pix)), dim=-1)
        te = F.normalize(image_features(model.get_text_features(**t)), dim=-1)
        want = model.logit_scale.exp() * (ie * te).sum(-1)
    torch.testing.assert_close(s.detach(), want, rtol=1e-4, atol=1e-4)
    x = (u8.float() / 255).requires_grad_(True)
    (grad,) = torch.autograd.grad(r(x, prompts).sum(), x)
    assert grad.abs().max() > 0


def test_pickscore_loader_messages(files, tmp_path):
    from rewards.pickscore import PickScoreReward

    with pytest.raises(FileNotFoundError, match=r"PickScore model folder not found: .*nowhere.*yuvalkirstain/PickScore_v1"):
        PickScoreReward(str(tmp_path / "nowhere"), str(files["pickproc"]))
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        PickScoreReward(str(files["pick"]))  # processor files not in the model folder
    empty = tmp_path / "pick_noweights"
    empty.mkdir()
    shutil.copy(files["pick"] / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match=r"has no weights \(model.safetensors"):
        PickScoreReward(str(empty), str(files["pickproc"]))
    (empty / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"PickScore model folder .*pick_noweights does not hold a transformers CLIPModel"):
        PickScoreReward(str(empty), str(files["pickproc"])).load()


# ---- compressibility, combinations, user rewards ----------------------------------------------

def test_jpeg_compressibility_prefers_flat_images():
    from rewards.compressibility import JPEGCompressibility, JPEGIncompressibility, jpeg_sizes_kb

    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([flat, noise])
    c, i = JPEGCompressibility(), JPEGIncompressibility()
    rc, ri = c(x), i(x)
    assert rc.shape == (2,) and rc[0] > rc[1] and ri[1] > ri[0]
    torch.testing.assert_close(rc, -ri)
    sizes = jpeg_sizes_kb(x)
    assert 0 < sizes[0] < 2 < sizes[1]  # a flat 64x64 JPEG is ~1 kB, noise ~9 kB at quality 95
    assert not c.differentiable and not i.differentiable
    assert JPEGCompressibility(quality=50)(noise) > rc[1]  # lower quality, smaller file
    assert c(torch.rand(2, 1, 16, 16)).shape == (2,)  # grey images
    with pytest.raises(ValueError, match="quality"):
        JPEGCompressibility(quality=0)


def test_weighted_sum(files):
    from rewards.combine import WeightedSum
    from rewards.compressibility import JPEGCompressibility

    a = tiny_assets()
    from rewards.aesthetic import LAIONAestheticReward
    from rewards.clip_score import CLIPScoreReward

    aes = LAIONAestheticReward(head=str(a.head), clip_weights=str(a.clip_weights), clip_model=str(a.clip_config))
    clip = CLIPScoreReward(weights=str(files["clip32"]), model_name=str(files["clip32_cfg"]))
    ws = WeightedSum({"aesthetic": aes, "clip": clip}, {"aesthetic": 2.0, "clip": 0.05})
    assert ws.differentiable and ws.needs_prompts
    x = _images().requires_grad_(True)
    prompts = ["a", "b", "c"]
    total = ws(x, prompts)
    torch.testing.assert_close(total, 2.0 * aes(x) + 0.05 * clip(x, prompts))
    (g,) = torch.autograd.grad(total.sum(), x)
    assert g.abs().max() > 0
    assert set(ws.describe()["parts"]) == {"aesthetic", "clip"}
    mixed = WeightedSum({"aesthetic": aes, "jpeg": JPEGCompressibility()}, {"aesthetic": 1.0, "jpeg": 0.1})
    assert not mixed.differentiable and not mixed.needs_prompts
    with pytest.raises(ValueError, match=r"missing \['clip'\]"):
        WeightedSum({"aesthetic": aes, "clip": clip}, {"aesthetic": 1.0})
    with pytest.raises(ValueError, match="finite"):
        WeightedSum({"aesthetic": aes}, {"aesthetic": float("nan")})


def test_imported_reward():
    from rewards.combine import ImportedReward

    x = _images()
    f = ImportedReward("tiny_sd:mean_brightness")
    torch.testing.assert_close(f(x), x.mean(dim=(1, 2, 3)))
    assert f.name == "mean_brightness" and f.differentiable
    kw = ImportedReward("tiny_sd:channel_mean", init_args={"channel": 2}, differentiable=False)
    torch.testing.assert_close(kw(x), x[:, 2].mean(dim=(1, 2)))
    assert not kw.differentiable
    cls = ImportedReward("tiny_sd:RedMinusBlue", init_args={"scale": 3.0}, name="rb")
    torch.testing.assert_close(cls(x), 3.0 * (x[:, 0] - x[:, 2]).mean(dim=(1, 2)))
    assert isinstance(cls.user_module, torch.nn.Module) and not cls.user_module.scale.requires_grad
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        ImportedReward("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        ImportedReward("tiny_sd:nope")
    with pytest.raises(ValueError, match="cannot construct reward"):
        ImportedReward("tiny_sd:RedMinusBlue", init_args={"bogus": 1}).load()


def test_lazy_package_exports():
    import subprocess
    import sys

    code = ("import sys, rewards; heavy = [m for m in ('open_clip', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy; from rewards import WeightedSum, JPEGCompressibility, LAIONAestheticReward; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---- non-differentiable rewards in `ntrk predict` -------------------------------------------

def _write_config(path: Path, sd: Path, reward: str, samplers: str) -> Path:
    path.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_checkpointing: false}}
model:
  class_path: ntrk_lightning.pipeline.GenerationModule
  init_args:
    backbone:
      class_path: ntrk_lightning.backbones.stable_diffusion.StableDiffusionBackbone
      init_args: {{model: {sd}}}
    reward: {reward}
    samplers:
{samplers}
    num_steps: 3
data:
  class_path: ntrk_lightning.pipeline.PromptDataModule
  init_args: {{prompts: [cat, dog], samples_per_prompt: 1, batch_size: 2}}
""")
    return path


def test_ntrk_with_jpeg_compressibility_is_refused_early(tmp_path):
    a = tiny_assets()
    cfg = _write_config(tmp_path / "c.yaml", a.sd, "{class_path: rewards.compressibility.JPEGCompressibility}",
                        "      ntrk: {class_path: ntrk_lightning.samplers.NTRK}\n"
                        "      plain: {class_path: ntrk_lightning.samplers.Plain}")
    with pytest.raises(SystemExit) as e:
        run_in_process(["predict", "-c", str(cfg), "--output_dir", str(tmp_path / "run")])
    msg = str(e.value)
    assert "'ntrk'" in msg and "jpeg_compressibility" in msg and "not differentiable" in msg
    assert "best_of_n" in msg  # says what to use instead
    assert not (tmp_path / "run" / "images").exists()


def test_search_samplers_run_with_jpeg_compressibility(tmp_path):
    a = tiny_assets()
    cfg = _write_config(tmp_path / "c.yaml", a.sd, "{class_path: rewards.compressibility.JPEGCompressibility}",
                        "      best_of_n: {class_path: ntrk_lightning.samplers.BestOfN, init_args: {n: 3}}\n"
                        "      smc: {class_path: ntrk_lightning.samplers.SMC, init_args: {particles: 2, proposal: prior}}\n"
                        "      plain: {class_path: ntrk_lightning.samplers.Plain}")
    out = tmp_path / "run"
    run_in_process(["predict", "-c", str(cfg), "--output_dir", str(out)])
    recs = records(out)
    assert sorted({r["arm"] for r in recs}) == ["best_of_n", "plain", "smc"] and len(recs) == 6
    by = {(r["arm"], r["prompt_index"]): r for r in recs}
    for p in (0, 1):
        # the recorded reward is minus the JPEG size of the saved 8-bit image, in kB
        r = by[("best_of_n", p)]
        img = torch.from_numpy(np.asarray(Image.open(out / r["image"]))).permute(2, 0, 1)[None]
        from rewards.compressibility import jpeg_sizes_kb

        assert r["rewards"]["reward"] == pytest.approx(-float(jpeg_sizes_kb(img)[0]), abs=1e-6)
        assert r["nfe"] == 9 and by[("smc", p)]["nfe"] == 6
