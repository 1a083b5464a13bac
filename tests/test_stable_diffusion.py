"""Stable Diffusion / SDXL backbones on tiny random-initialised pipelines (offline): loading and
validation, CFG, v-prediction, conditioning, the decode gradient, precision, gradient
checkpointing, NTRK's gain over plain sampling, end-to-end `ntrk predict` of the shipped configs,
and the step-time benchmark's CPU smoke run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline_utils import REPO, metrics, records, run_in_process
from tiny_sd import make_tiny_sd, tiny_assets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine two OpenMP threads
    # competing with other processes make every op ~100x slower (measured: 12 ms vs 1.4 s/UNet call).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def assets():
    return tiny_assets()


@pytest.fixture(scope="module")
def sd(assets):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    b = StableDiffusionBackbone(str(assets.sd))
    b.load()
    return b


@pytest.fixture(scope="module")
def sdxl(assets):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionXLBackbone

    b = StableDiffusionXLBackbone(str(assets.sdxl))
    b.load()
    return b


@pytest.fixture(scope="module")
def aesthetic(assets):
    from rewards.aesthetic import LAIONAestheticReward

    r = LAIONAestheticReward(head=str(assets.head), clip_weights=str(assets.clip_weights),
                             clip_model=str(assets.clip_config))
    return r.load()


# ---- construction and loading ------------------------------------------------------------------

def test_missing_or_incomplete_folders_fail_with_the_path_and_how_to_get_it(assets, tmp_path):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone

    with pytest.raises(FileNotFoundError, match=r"/nowhere/sd15.*hf download stable-diffusion-v1-5"):
        StableDiffusionBackbone("/nowhere/sd15")
    # a hub id that is not in the local cache: refused at once (HF_HUB_OFFLINE), never downloaded
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache.*hf download someone/not-cached"):
        StableDiffusionBackbone("someone/not-cached", cache_dir=str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_index.json"):
        StableDiffusionBackbone(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(assets.sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*broken/unet.*diffusion_pytorch_model.safetensors"):
        StableDiffusionBackbone(str(broken))
    with pytest.raises(FileNotFoundError, match=r"variant 'fp16'"):
        StableDiffusionBackbone(str(assets.sd), variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"lacks the text_encoder_2/ folder"):
        StableDiffusionXLBackbone(str(assets.sd))
    with pytest.raises(ValueError, match=r"is an SDXL model.*StableDiffusionXLBackbone"):
        StableDiffusionBackbone(str(assets.sdxl))
    with pytest.raises(ValueError, match=r"multiple of the VAE scale factor 4"):
        StableDiffusionBackbone(str(assets.sd), height=30)
    with pytest.raises(ValueError, match=r"prediction_type"):
        StableDiffusionBackbone(str(assets.sd), scheduler_overrides={"prediction_type": "v_prediction"})
    # a corrupt weights file passes the cheap checks and fails at load with the file's folder named
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    b = StableDiffusionBackbone(str(broken))
    with pytest.raises(ValueError, match=r"cannot load unet from .*broken/unet"):
        b.load()


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot(assets, tmp_path):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--tiny-sd"
    shutil.copytree(assets.sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    b = StableDiffusionBackbone("someone/tiny-sd", cache_dir=str(tmp_path / "hf"))
    assert b.folder == repo / "snapshots" / commit
    assert b.sample_shape == (4, 8, 8) and (b.height, b.width) == (32, 32)


def test_variant_weight_files_load(assets, tmp_path):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    folder = tmp_path / "sd_fp16_files"
    shutil.copytree(assets.sd, folder)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        (folder / sub / f"{name}.safetensors").rename(folder / sub / f"{name}.fp16.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*unet"):
        StableDiffusionBackbone(str(folder))
    b = StableDiffusionBackbone(str(folder), variant="fp16")
    b.load()
    assert b.describe()["variant"] == "fp16" and b.unet.dtype == torch.float32


def test_scheduler_is_a_fresh_epsilon_ddim_built_from_the_model_config(sd):
    from diffusers import DDIMScheduler, PNDMScheduler

    s1, s2 = sd.make_scheduler(), sd.make_scheduler()
    assert isinstance(s1, DDIMScheduler) and s1 is not s2
    assert s1.config.prediction_type == "epsilon" and s1.config.set_alpha_to_one
    ref = PNDMScheduler.from_pretrained(str(sd.folder), subfolder="scheduler")  # the model's own (PNDM) config
    assert torch.allclose(s1.alphas_cumprod, ref.alphas_cumprod)
    assert s1.config.steps_offset == 1 and s1.config.timestep_spacing == "leading"
    s1.set_timesteps(25)
    assert int(s1.timesteps[0]) == 961 and int(s1.timesteps[-1]) == 1


def test_classifier_free_guidance_equals_the_hand_computation(sd):
    torch.manual_seed(0)
    prompts = ["a cat", "a hedgehog", "a cat"]
    cond, uncond = sd.conditioning(prompts)
    x = torch.randn(3, *sd.sample_shape)
    t = torch.tensor([901, 501, 21])
    with torch.no_grad():
        eps = sd.model().denoiser(x, t, (cond, uncond))
        eps_c = sd.unet(x, t, encoder_hidden_states=cond).sample
        eps_u = sd.unet(x, t, encoder_hidden_states=uncond).sample
    s = sd.guidance_scale
    assert s == 7.5 and eps.dtype == torch.float32
    torch.testing.assert_close(eps, eps_u + s * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the two branches differ: the test can fail


def test_v_prediction_is_converted_to_epsilon(tmp_path):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    folder = make_tiny_sd(tmp_path / "sd_v", prediction_type="v_prediction")
    b = StableDiffusionBackbone(str(folder), guidance_scale=1.0)
    b.load()
    assert b.prediction_type == "v_prediction" and b.make_scheduler().config.prediction_type == "epsilon"
    torch.manual_seed(1)
    x = torch.randn(2, *b.sample_shape)
    t = torch.tensor([800, 100])
    cond = b.conditioning(["a fox", "a wolf"])
    with torch.no_grad():
        eps = b.model().denoiser(x, t, cond)
        v = b.unet(x, t, encoder_hidden_states=cond[0]).sample
    a = b.make_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x, rtol=1e-5, atol=1e-5)


def test_conditioning_is_batched_on_device_and_indexable(sd, sdxl):
    from ntrk_lightning.denoiser import index_cond

    cond, uncond = sd.conditioning(["a cat", "a dog", "a cat"])
    assert cond.shape == (3, 77, 32) and uncond.shape == cond.shape and cond.device == sd.device
    torch.testing.assert_close(cond[0], cond[2])
    assert not torch.allclose(cond[0], cond[1])
    torch.testing.assert_close(uncond[0], sd.conditioning([""])[0][0])  # negative prompt: ""
    sub = index_cond((cond, uncond), torch.tensor([1]))
    torch.testing.assert_close(sub[0][0], cond[1])

    c, u = sdxl.conditioning(["a cat", "a dog"])
    assert c["prompt_embeds"].shape == (2, 77, 64) and c["text_embeds"].shape == (2, 32)
    assert c["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    # SDXL base sets force_zeros_for_empty_prompt: zero negative embeddings, same time ids
    assert u["prompt_embeds"].abs().max() == 0 and u["text_embeds"].abs().max() == 0
    torch.testing.assert_close(u["time_ids"], c["time_ids"])
    sub = index_cond((c, u), torch.tensor([1, 1]))
    torch.testing.assert_close(sub[0]["text_embeds"][1], c["text_embeds"][1])


def test_sdxl_negative_prompt_is_encoded(assets):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionXLBackbone

    b = StableDiffusionXLBackbone(str(assets.sdxl), negative_prompt="blurry")
    b.load()
    c, u = b.conditioning(["a cat"])
    assert u["prompt_embeds"].abs().max() > 0
    torch.testing.assert_close(u["prompt_embeds"], b.conditioning(["blurry"])[0]["prompt_embeds"])


# ---- decode, gradients, precision, memory options ---------------------------------------------

def test_reward_gradient_reaches_the_latents_through_the_vae(assets, aesthetic):
    """d reward / d latents through VAE decode is non-zero and matches a central finite difference
    (float64, tiny model); the sliced decode gives the same images and gradients."""
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    b = StableDiffusionBackbone(str(assets.sd), vae_batch_size=1, dtype="float32", vae_dtype="float32")
    b.load()
    b.double()
    reward = aesthetic
    reward.double()
    try:
        torch.manual_seed(3)
        z = (0.5 * torch.randn(2, *b.sample_shape, dtype=torch.float64)).requires_grad_(True)
        r = reward(b.decode(z))
        (g,) = torch.autograd.grad(r.sum(), z)
        assert torch.isfinite(g).all() and g.abs().max() > 0
        # finite differences on the three coordinates with the largest gradient
        for flat in g.flatten().abs().topk(3).indices.tolist():
            h = 1e-4
            e = torch.zeros_like(z).flatten()
            e[flat] = h
            e = e.view_as(z)
            with torch.no_grad():
                fd = (reward(b.decode(z + e)).sum() - reward(b.decode(z - e)).sum()) / (2 * h)
            assert float(fd) == pytest.approx(float(g.flatten()[flat]), rel=1e-3, abs=1e-9)
        # sliced decode (vae_batch_size=1) == whole-batch decode, images and gradients
        b.vae_batch_size = None
        r_whole = reward(b.decode(z))
        (g_whole,) = torch.autograd.grad(r_whole.sum(), z)
        torch.testing.assert_close(r_whole, r.detach())
        torch.testing.assert_close(g_whole, g)
    finally:
        reward.float()


def test_images_are_rgb_in_unit_range(sd):
    torch.manual_seed(0)
    with torch.no_grad():
        img = sd.decode(torch.randn(2, *sd.sample_shape) * 3)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1


def test_gradient_checkpointing_is_active_in_eval_mode_and_changes_nothing(assets, aesthetic):
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    grads, calls = [], []
    for ckpt in (False, True):
        b = StableDiffusionBackbone(str(assets.sd), gradient_checkpointing=ckpt, dtype="float32")
        b.load()
        b.train()  # frozen backbones stay in eval mode; checkpointing must work there
        assert not b.unet.training and not b.vae.training
        torch.manual_seed(4)
        x = torch.randn(2, *b.sample_shape, requires_grad=True)
        cond = b.conditioning(["a cat", "a dog"])
        t = torch.tensor([601, 601])
        eps = b.model().denoiser(x, t, cond)
        a = float(b.make_scheduler().alphas_cumprod[601])
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        (g,) = torch.autograd.grad(aesthetic(b.decode(x0)).sum(), x)
        grads.append(g)
        calls.append(b.checkpoint_calls)
    assert calls[0] == 0 and calls[1] > 0, calls
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_bfloat16_autocast_runs_and_returns_float32(assets, sd):
    """dtype='bfloat16' really computes in bf16 (results differ from fp32) yet returns float32
    eps and images close to the fp32 ones; latents stay float32."""
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    b = StableDiffusionBackbone(str(assets.sd), dtype="bfloat16")
    b.load()
    assert b.compute_dtype(torch.device("cpu")) == torch.bfloat16
    torch.manual_seed(5)
    x = torch.randn(2, *sd.sample_shape)
    t = torch.tensor([500, 500])
    with torch.no_grad():  # the unguided branch: CFG (s = 7.5) would amplify bf16 rounding 7.5x
        e32 = sd.eps_net(x, t, sd.conditioning(["a", "b"])[0])
        e16 = b.eps_net(x, t, b.conditioning(["a", "b"])[0])
        i32, i16 = sd.decode(x), b.decode(x)
    assert e16.dtype == torch.float32 and i16.dtype == torch.float32
    assert not torch.equal(e16, e32) and not torch.equal(i16, i32)
    assert (e16 - e32).norm() / e32.norm() < 0.05
    assert (i16 - i32).abs().max() < 0.05
    with pytest.raises(ValueError, match="weights stored in float16 must run in float16"):
        StableDiffusionBackbone(str(assets.sd), weights_dtype="float16", dtype="float32")


# ---- sampling ----------------------------------------------------------------------------------

def test_ntrk_raises_the_random_aesthetic_reward_over_plain(sd, aesthetic):
    """24 paired samples (same seeds, same prompts), 10 steps: NTRK's mean gain over plain is
    far outside seed noise. Measured here (tiny head, seed 3): plain -0.036, NTRK 0.094 (gamma 1),
    paired gain 0.129 with standard error 0.003."""
    from ntrk_lightning import sample
    from ntrk_lightning.samplers import NTRK, Plain

    n = 24
    prompts = ["cat", "dog", "horse"] * (n // 3)
    cond = sd.conditioning(prompts)
    seeds = list(range(100, 100 + n))
    model, sched = sd.model(), sd.make_scheduler()
    plain = sample(model, sched, aesthetic, Plain(), 10, seed=seeds, cond=cond, prompts=prompts)
    ntrk = sample(model, sched, aesthetic, NTRK(mode="tilt", gamma=1.0), 10, seed=seeds, cond=cond, prompts=prompts)
    d = ntrk.rewards - plain.rewards
    se = float(d.std() / math.sqrt(n))
    print(f"aesthetic (random weights): plain {plain.rewards.mean():.4f}, ntrk {ntrk.rewards.mean():.4f}, "
          f"paired gain {d.mean():.4f} +- {se:.4f}")
    assert ntrk.nfe == 10 and ntrk.grad_evals == 9 and ntrk.nan_fallbacks == 0
    assert float(d.mean()) > 8 * se and float(d.mean()) > 0.05
    assert (d > 0).float().mean() > 0.9
    assert ntrk.images.shape == (n, 3, 32, 32)


def _tiny_predict(out: Path, config: str, assets, extra: list[str], backbone_path: Path) -> None:
    run_in_process(["predict", "-c", str(REPO / "configs" / config), "--output_dir", str(out),
                    "--model.init_args.backbone.init_args.model", str(backbone_path),
                    *assets.aesthetic_overrides(),
                    "--data.init_args.prompts_file", str(REPO / "configs" / "prompts" / "animals45.txt"),
                    "--data.init_args.max_prompts", "2", "--data.init_args.samples_per_prompt", "1",
                    "--data.init_args.batch_size", "2", "--trainer.accelerator", "cpu", *extra])


def expected_nfe(spec: dict, steps: int) -> int:
    """The NFE accounting of docs and configs: best_of_n N*S, svdd 1+K(S-1), smc K*S, else S."""
    if spec["name"] == "best_of_n":
        return spec["n"] * steps
    if spec["name"] == "svdd":
        return 1 + spec["candidates"] * (steps - 1)
    if spec["name"] == "smc":
        return spec["particles"] * steps
    return steps


def _check_run(out: Path, arms: list[str], prompts: list[str]) -> dict:
    recs = records(out)
    assert sorted({r["arm"] for r in recs}) == sorted(arms)
    assert len(recs) == len(arms) * len(prompts)
    for r in recs:
        assert r["prompt"] == prompts[r["prompt_index"]]
        img = Image.open(out / r["image"])
        assert img.mode == "RGB" and img.size == (32, 32)
        assert r["nfe"] == expected_nfe(r["sampler"], r["num_steps"]), r
        assert r["grad_evals"] == (r["num_steps"] - 1 if r["sampler"]["name"] in ("ntrk", "dps") else 0)
        assert math.isfinite(r["rewards"]["reward"]) and r["nan_fallbacks"] == 0
    m = metrics(out)
    assert set(m["arms"]) == set(arms)
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file()
    return m


def test_predict_sd15_every_baseline_from_the_shipped_config(assets, tmp_path):
    """The shipped baselines config, end to end with tiny files and few steps per arm: every arm
    writes RGB images of the decoded size, and spends exactly the NFE the accounting says."""
    out = tmp_path / "baselines"
    steps = {"ntrk": 3, "plain": 3, "dps_25": 3, "best_of_n_25": 2, "svdd_25": 3, "smc_25": 2, "dps_500": 4,
             "best_of_n_500": 2, "svdd_500": 2, "smc_500": 2}
    _tiny_predict(out, "sd15_aesthetic_baselines.yaml", assets,
                  ["--model.init_args.num_steps", json.dumps(steps)], assets.sd)
    m = _check_run(out, list(steps), ["cat", "dog"])
    assert m["model"]["kind"] == "stable-diffusion" and m["arms"]["svdd_500"]["nfe_per_sample"] == 21
    assert m["arms"]["best_of_n_500"]["nfe_per_sample"] == 40


def test_predict_sd15_ntrk_config_and_sdxl_config(assets, tmp_path):
    out = tmp_path / "sd15"
    _tiny_predict(out, "sd15_aesthetic_ntrk.yaml", assets, ["--model.init_args.num_steps", "4"], assets.sd)
    m = _check_run(out, ["ntrk", "plain"], ["cat", "dog"])
    assert m["num_steps"] == 4

    out = tmp_path / "sdxl"
    _tiny_predict(out, "sdxl_aesthetic_ntrk.yaml", assets,
                  ["--model.init_args.num_steps", "3",
                   "--model.init_args.backbone.init_args.weights_dtype", "float32"], assets.sdxl)
    m = _check_run(out, ["ntrk", "plain"], ["cat", "dog"])
    assert m["model"]["kind"] == "sdxl" and m["model"]["gradient_checkpointing"] is True


def test_shipped_configs_account_25_and_500_nfe(assets):
    """Instantiate the shipped configs (tiny paths substituted) and check the arms' budgets."""
    from ntrk_lightning.pipeline.cli import build_cli

    budgets = {}
    for config, backbone in (("sd15_aesthetic_ntrk.yaml", assets.sd), ("sd15_aesthetic_baselines.yaml", assets.sd),
                             ("sdxl_aesthetic_ntrk.yaml", assets.sdxl)):
        cli = build_cli(["-c", str(REPO / "configs" / config),
                         "--model.init_args.backbone.init_args.model", str(backbone),
                         *assets.aesthetic_overrides(), "--trainer.accelerator", "cpu",
                         "--data.init_args.prompts_file", str(REPO / "configs" / "prompts" / "animals45.txt")],
                        run=False)
        module = cli.model
        assert len(cli.datamodule.prompts) == 45
        for arm, spec in module.samplers.items():
            budgets[(config, arm)] = expected_nfe(spec.describe(), module.num_steps[arm])
    assert budgets[("sd15_aesthetic_ntrk.yaml", "ntrk")] == 25
    assert budgets[("sdxl_aesthetic_ntrk.yaml", "ntrk")] == 25
    base = {arm: v for (cfg, arm), v in budgets.items() if cfg == "sd15_aesthetic_baselines.yaml"}
    families = {"dps", "best_of_n", "svdd", "smc"}
    assert {a.rsplit("_", 1)[0] for a in base if a.endswith("_25")} == families
    assert {a.rsplit("_", 1)[0] for a in base if a.endswith("_500")} == families
    for arm, nfe in base.items():
        if arm.endswith("_500"):
            assert 500 <= nfe <= 501, (arm, nfe)
        else:
            assert nfe == 25, (arm, nfe)


def test_placeholder_paths_fail_early_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_in_process(["predict", "-c", str(REPO / "configs" / "sd15_aesthetic_ntrk.yaml"),
                        "--output_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu"])
    msg = str(e.value)
    assert "/PATH/TO/stable-diffusion-v1-5" in msg and "hf download" in msg
    assert not (tmp_path / "run" / "images").exists()


def test_animal_prompts_file():
    path = REPO / "configs" / "prompts" / "animals45.txt"
    lines = path.read_text().splitlines()
    comments = [ln for ln in lines if ln.startswith("#")]
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert len(prompts) == 45 and len(set(prompts)) == 45
    assert all(p.isalpha() and p.islower() for p in prompts)
    assert any("DDPO" in c and "Black" in c for c in comments)
    from ntrk_lightning.pipeline.data import read_prompts

    assert read_prompts(path) == prompts


def test_step_time_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sd_step_time", REPO / "benchmarks" / "sd_step_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--tiny", "--device", "cpu", "--batch", "2", "--steps", "2", "--warmup", "0",
                       "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sd_step_time_cpu-tiny.json").read_text())
    md = (tmp_path / "sd_step_time_cpu-tiny.md").read_text()
    assert data == json.loads(json.dumps(result))
    assert set(data["samplers"]) == {"plain", "dps", "ntrk"}
    for name, r in data["samplers"].items():
        assert r["ms_per_step"] > 0 and r["peak_memory_bytes"] is None and f"| {name} |" in md
        assert r["nfe_per_sample"] == 2
    assert data["samplers"]["ntrk"]["grad_evals_per_sample"] == 1
    assert data["samplers"]["plain"]["grad_evals_per_sample"] == 0
    assert data["config"]["latent_shape"] == [4, 8, 8]
