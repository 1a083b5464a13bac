"""SD3 and FLUX backbones on tiny random-initialised pipelines (offline): loading and validation,
text conditioning and the velocity against diffusers' own pipelines, CFG (SD3), the distilled
guidance embedding and 2 x 2 packing (FLUX), the static-shift scheduler, decode with scaling and
shift, the reward gradient through the VAE, precision and gradient checkpointing."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from tiny_flow import T5_MAX_LENGTH, make_tiny_image_reward, make_tiny_sd3, tiny_flow_assets

PROMPTS = ["a photo of a cat", "a red fox"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models gain nothing from threads; on a shared 2-core machine they lose a lot
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def assets():
    return tiny_flow_assets()


@pytest.fixture(scope="module")
def sd3(assets):
    from ntrk_lightning.backbones import SD3Backbone

    b = SD3Backbone(str(assets.sd3), max_sequence_length=T5_MAX_LENGTH, dtype="float32")
    b.load()
    return b


@pytest.fixture(scope="module")
def flux(assets):
    from ntrk_lightning.backbones import FluxBackbone

    b = FluxBackbone(str(assets.flux), height=32, width=32, max_sequence_length=T5_MAX_LENGTH, dtype="float32")
    b.load()
    return b


@pytest.fixture(scope="module")
def image_reward(tmp_path_factory):
    from rewards.image_reward import ImageReward
    from tiny_flow import TINY_IMAGE_REWARD_ARCH

    ckpt, tok = make_tiny_image_reward(tmp_path_factory.mktemp("ir"), scale=3.0)
    return ImageReward(str(ckpt), str(tok), arch=TINY_IMAGE_REWARD_ARCH, dtype="float32").load()


# ---- construction and loading ------------------------------------------------------------------

def test_missing_or_incomplete_folders_fail_with_the_path(assets, tmp_path):
    from ntrk_lightning.backbones import FluxBackbone, SD3Backbone

    with pytest.raises(FileNotFoundError, match=r"/nowhere/sd3.*hf download stabilityai/stable-diffusion-3-medium"):
        SD3Backbone("/nowhere/sd3")
    with pytest.raises(FileNotFoundError, match=r"/nowhere/flux.*hf download black-forest-labs/FLUX.1-dev"):
        FluxBackbone("/nowhere/flux")
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache"):
        FluxBackbone("someone/not-cached", cache_dir=str(tmp_path / "hf"))
    broken = tmp_path / "flux"
    shutil.copytree(assets.flux, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*flux/transformer"):
        FluxBackbone(str(broken))
    shutil.rmtree(broken / "tokenizer_2")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=r"lacks the tokenizer_2/ folder"):
        FluxBackbone(str(broken))
    shutil.copytree(assets.flux / "tokenizer_2", broken / "tokenizer_2")
    (broken / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no T5 tokenizer in .*tokenizer_2 \(tokenizer.json or spiece.model\)"):
        FluxBackbone(str(broken))
    shutil.copy(assets.flux / "tokenizer_2" / "tokenizer.json", broken / "tokenizer_2")
    b = FluxBackbone(str(broken), height=32, width=32)  # a corrupt weights file passes the cheap checks ...
    with pytest.raises(ValueError, match=r"cannot load transformer from .*flux/transformer"):
        b.load()  # ... and fails at load with the folder named
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 8 \(VAE scale factor 4 x patch 2\)"):
        FluxBackbone(str(assets.flux), height=36)
    with pytest.raises(ValueError, match=r"height 160 exceeds what the transformer's position embedding covers \(128\)"):
        SD3Backbone(str(assets.sd3), height=160)
    with pytest.raises(ValueError, match=r"scheduler_overrides has fields .* does not know: \['nonsense'\]"):
        SD3Backbone(str(assets.sd3), scheduler_overrides={"nonsense": 1})
    # an SD3 folder saved without T5 cannot be asked for it
    no_t5 = make_tiny_sd3(tmp_path / "sd3_no_t5", with_t5=False)
    with pytest.raises(FileNotFoundError, match=r"names no T5 encoder .*use_t5=false"):
        SD3Backbone(str(no_t5), use_t5=True)
    # a folder whose T5 files are missing: the folder is named, and use_t5=false is the way out
    partial = tmp_path / "sd3_partial"
    shutil.copytree(assets.sd3, partial)
    shutil.rmtree(partial / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"lacks the text_encoder_3/ folder"):
        SD3Backbone(str(partial))
    assert SD3Backbone(str(partial), use_t5=False).use_t5 is False


def test_latent_shapes_and_describe(sd3, flux):
    assert sd3.sample_shape == (16, 8, 8) and (sd3.height, sd3.width) == (32, 32)
    assert flux.sample_shape == (16, 8, 8)
    d = flux.describe()
    assert d["kind"] == "flux" and d["guidance_embeds"] is True and d["scheduler"]["class"] == "FluxFlowMatchScheduler"
    assert sd3.describe()["kind"] == "sd3" and sd3.describe()["use_t5"] is True


# ---- schedule ----------------------------------------------------------------------------------

def test_schedulers_are_static_flow_schedulers_equal_to_the_pipelines_schedules(sd3, flux):
    """SD3: its static shift 3, default spacing. FLUX: shift exp(mu) for 16 image tokens and
    FLUX's spacing linspace(1, 1/N, N) — the same sigmas as diffusers' dynamic shifting with the
    pipeline's mu; and set_timesteps(N) alone is enough (what the core calls)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ntrk_lightning.backbones.sd3 import calculate_shift

    s = sd3.make_scheduler()
    assert type(s) is FlowMatchEulerDiscreteScheduler and s.config.shift == 3.0 and not s.config.use_dynamic_shifting
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3.folder), subfolder="scheduler")
    s.set_timesteps(25)
    ref.set_timesteps(25)
    torch.testing.assert_close(s.sigmas, ref.sigmas)

    f = flux.make_scheduler()
    assert isinstance(f, FlowMatchEulerDiscreteScheduler) and f is not flux.make_scheduler()
    assert not f.config.use_dynamic_shifting
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    assert f.config.shift == pytest.approx(np.exp(mu))
    dyn = FlowMatchEulerDiscreteScheduler.from_pretrained(str(flux.folder), subfolder="scheduler")
    assert dyn.config.use_dynamic_shifting
    for n in (4, 25):
        f.set_timesteps(n)
        dyn.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        torch.testing.assert_close(f.sigmas, dyn.sigmas, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.timesteps, dyn.timesteps, rtol=1e-5, atol=1e-4)
        assert float(f.sigmas[-1]) == 0.0 and len(f.timesteps) == n
    # the FLUX scheduler class pickles by name (DDP spawn)
    g = pickle.loads(pickle.dumps(f))
    g.set_timesteps(7)
    assert type(g).__name__ == "FluxFlowMatchScheduler" and len(g.timesteps) == 7


# ---- conditioning and velocity vs diffusers' pipelines ---------------------------------------------

def _sd3_pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)


def _flux_pipeline(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder), local_files_only=True)


def test_sd3_conditioning_matches_the_diffusers_pipeline(sd3, assets, tmp_path):
    from ntrk_lightning.denoiser import index_cond

    pipe = _sd3_pipeline(assets.sd3)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True,
                                                      max_sequence_length=T5_MAX_LENGTH)
    cond, uncond = sd3.conditioning(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + T5_MAX_LENGTH, 64) and cond["pooled"].shape == (2, 64)
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(cond["pooled"], pooled)
    torch.testing.assert_close(uncond["prompt_embeds"], npe)  # "" encoded, not zeros
    torch.testing.assert_close(uncond["pooled"], npooled)
    sub = index_cond((cond, uncond), torch.tensor([1, 1]))
    torch.testing.assert_close(sub[0]["pooled"][0], cond["pooled"][1])
    # without T5 (as diffusers with text_encoder_3=None): zeros in the T5 part
    from ntrk_lightning.backbones import SD3Backbone

    b = SD3Backbone(str(assets.sd3), use_t5=False, max_sequence_length=T5_MAX_LENGTH)
    b.load()
    assert b.text_encoder_3 is None
    c, _ = b.conditioning(PROMPTS)
    assert c["prompt_embeds"][:, 77:].abs().max() == 0
    torch.testing.assert_close(c["prompt_embeds"][:, :77], pe[:, :77])


def test_flux_conditioning_matches_the_diffusers_pipeline(flux, assets):
    pipe = _flux_pipeline(assets.flux)
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=T5_MAX_LENGTH)
    cond = flux.conditioning(PROMPTS)
    assert set(cond) == {"prompt_embeds", "pooled"}
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(cond["pooled"], pooled)
    assert not torch.allclose(cond["pooled"][0], cond["pooled"][1])


def _euler(model, sched, x, cond, steps):
    """Deterministic Euler flow sampling (what the diffusers pipelines do) with the backbone's
    denoiser and scheduler: x <- x + (sigma_next - sigma) v."""
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        v = model.denoiser(x, t.expand(x.shape[0]), cond)
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
    return x


def test_sd3_sampling_reproduces_the_diffusers_pipeline(sd3, assets):
    """Euler sampling with the backbone's CFG velocity and scheduler == StableDiffusion3Pipeline's
    latents from the same start: timestep convention, CFG, conditioning, schedule."""
    pipe = _sd3_pipeline(assets.sd3)
    torch.manual_seed(0)
    x = torch.randn(2, *sd3.sample_shape)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=x.clone(), num_inference_steps=3, guidance_scale=sd3.guidance_scale,
                   height=32, width=32, max_sequence_length=T5_MAX_LENGTH, output_type="latent").images
        ours = _euler(sd3.model(), sd3.make_scheduler(), x, sd3.conditioning(PROMPTS), 3)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_flux_sampling_reproduces_the_diffusers_pipeline(flux, assets):
    """Euler sampling with the backbone (unpacked latents, guidance embedding, timestep / 1000,
    FLUX's schedule) == FluxPipeline's packed latents from the same start, unpacked."""
    from ntrk_lightning.backbones.flux import pack_latents, unpack_latents

    pipe = _flux_pipeline(assets.flux)
    torch.manual_seed(1)
    x = torch.randn(2, *flux.sample_shape)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=pack_latents(x), num_inference_steps=3, guidance_scale=flux.guidance_scale,
                   height=32, width=32, max_sequence_length=T5_MAX_LENGTH, output_type="latent").images
        ours = _euler(flux.model(), flux.make_scheduler(), x, flux.conditioning(PROMPTS), 3)
    torch.testing.assert_close(ours, unpack_latents(ref, 8, 8), rtol=1e-4, atol=1e-4)


def test_packing_round_trip_and_layout():
    from diffusers import FluxPipeline

    from ntrk_lightning.backbones.flux import image_ids, pack_latents, unpack_latents

    torch.manual_seed(2)
    x = torch.randn(3, 16, 6, 10)
    p = pack_latents(x)
    assert p.shape == (3, 15, 64)
    torch.testing.assert_close(p, FluxPipeline._pack_latents(x, 3, 16, 6, 10))
    torch.testing.assert_close(unpack_latents(p, 6, 10), x)
    # token (row 1, col 2) holds latent pixels [2:4, 4:6] of every channel, channels outermost
    torch.testing.assert_close(p[:, 1 * 5 + 2].view(3, 16, 2, 2), x[:, :, 2:4, 4:6])
    torch.testing.assert_close(image_ids(6, 10, torch.device("cpu")),
                               FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))


def test_sd3_cfg_equals_the_hand_computation(sd3):
    torch.manual_seed(3)
    x = torch.randn(2, *sd3.sample_shape)
    t = torch.tensor([900.0, 300.0])
    cond, uncond = sd3.conditioning(PROMPTS)
    with torch.no_grad():
        guided = sd3.model().denoiser(x, t, (cond, uncond))
        vc = sd3.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                             pooled_projections=cond["pooled"]).sample
        vu = sd3.transformer(hidden_states=x, timestep=t, encoder_hidden_states=uncond["prompt_embeds"],
                             pooled_projections=uncond["pooled"]).sample
    assert guided.shape == x.shape and guided.dtype == torch.float32
    torch.testing.assert_close(guided, vu + sd3.guidance_scale * (vc - vu), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(vc, vu, atol=1e-4)  # the prompt matters


def test_flux_guidance_scale_feeds_the_embedding_and_schnell_has_none(flux, assets, tmp_path):
    from ntrk_lightning.backbones import FluxBackbone
    from tiny_flow import make_tiny_flux

    torch.manual_seed(4)
    x = torch.randn(2, *flux.sample_shape)
    t = torch.tensor([700.0, 700.0])
    cond = flux.conditioning(PROMPTS)
    b = FluxBackbone(str(assets.flux), guidance_scale=7.0, height=32, width=32, max_sequence_length=T5_MAX_LENGTH)
    b.load()
    with torch.no_grad():
        v35, v7 = flux.model().denoiser(x, t, cond), b.model().denoiser(x, t, cond)
    assert v35.shape == x.shape and not torch.allclose(v35, v7, atol=1e-5)
    schnell = FluxBackbone(str(make_tiny_flux(tmp_path / "schnell", guidance_embeds=False)), height=32, width=32,
                           max_sequence_length=T5_MAX_LENGTH)
    schnell.load()
    assert schnell.velocity_net.guidance_scale is None and schnell.describe()["guidance_embeds"] is False
    with torch.no_grad():
        assert torch.isfinite(schnell.model().denoiser(x, t, schnell.conditioning(PROMPTS))).all()


# ---- decode, gradients, precision ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_decode_applies_scaling_and_shift_and_lands_in_unit_range(which, request):
    b = request.getfixturevalue(which)
    cfg = b.vae.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1
    torch.manual_seed(5)
    z = torch.randn(2, *b.sample_shape)
    with torch.no_grad():
        img = b.decode(z)
        ref = b.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img, (ref * 0.5 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_reward_gradient_reaches_the_latents_through_the_vae(which, assets, image_reward):
    """d ImageReward / d latents through the decode (scaling and shift) is non-zero and matches a
    central finite difference (float64); the sliced decode gives the same values and gradients."""
    from ntrk_lightning.backbones import FluxBackbone, SD3Backbone

    if which == "sd3":
        b = SD3Backbone(str(assets.sd3), vae_batch_size=1, dtype="float32", vae_dtype="float32")
    else:
        b = FluxBackbone(str(assets.flux), height=32, width=32, vae_batch_size=1, dtype="float32", vae_dtype="float32")
    b.load()
    b.double()
    image_reward.double()
    try:
        torch.manual_seed(6)
        z = (0.5 * torch.randn(2, *b.sample_shape, dtype=torch.float64)).requires_grad_(True)
        r = image_reward(b.decode(z), PROMPTS)
        (g,) = torch.autograd.grad(r.sum(), z)
        assert torch.isfinite(g).all() and g.abs().max() > 0
        for flat in g.flatten().abs().topk(3).indices.tolist():
            h = 1e-5
            e = torch.zeros_like(z).flatten()
            e[flat] = h
            e = e.view_as(z)
            with torch.no_grad():
                fd = (image_reward(b.decode(z + e), PROMPTS).sum() - image_reward(b.decode(z - e), PROMPTS).sum()) / (2 * h)
            assert float(fd) == pytest.approx(float(g.flatten()[flat]), rel=1e-4, abs=1e-10)
        b.vae_batch_size = None
        r_whole = image_reward(b.decode(z), PROMPTS)
        (g_whole,) = torch.autograd.grad(r_whole.sum(), z)
        torch.testing.assert_close(r_whole, r.detach())
        torch.testing.assert_close(g_whole, g)
    finally:
        image_reward.float()


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_gradient_checkpointing_is_active_in_eval_mode_and_changes_nothing(which, assets, image_reward):
    """The reward gradient through the velocity (x0 = x_t - sigma v) and the decode, with and
    without checkpointing: same gradient, and checkpointed blocks really ran."""
    from ntrk_lightning.backbones import FluxBackbone, SD3Backbone

    grads, calls = [], []
    for ckpt in (False, True):
        if which == "sd3":
            b = SD3Backbone(str(assets.sd3), gradient_checkpointing=ckpt, dtype="float32", guidance_scale=3.0,
                            max_sequence_length=T5_MAX_LENGTH)
        else:
            b = FluxBackbone(str(assets.flux), gradient_checkpointing=ckpt, dtype="float32", height=32, width=32,
                             max_sequence_length=T5_MAX_LENGTH)
        b.load()
        b.train()  # frozen backbones stay in eval mode; checkpointing must work there
        assert not b.transformer.training and not b.vae.training
        torch.manual_seed(7)
        x = torch.randn(2, *b.sample_shape, requires_grad=True)
        cond = b.conditioning(PROMPTS)
        v = b.model().denoiser(x, torch.tensor([600.0, 600.0]), cond)
        x0 = x - 0.6 * v
        (g,) = torch.autograd.grad(image_reward(b.decode(x0), PROMPTS).sum(), x)
        grads.append(g)
        calls.append(b.checkpoint_calls)
    assert calls[0] == 0 and calls[1] > 0, calls
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_bfloat16_autocast_runs_and_returns_float32(which, assets, request):
    from ntrk_lightning.backbones import FluxBackbone, SD3Backbone

    ref = request.getfixturevalue(which)
    kw = dict(dtype="bfloat16", max_sequence_length=T5_MAX_LENGTH)
    b = SD3Backbone(str(assets.sd3), **kw) if which == "sd3" else FluxBackbone(str(assets.flux), height=32,
                                                                                width=32, **kw)
    b.load()
    assert b.compute_dtype(torch.device("cpu")) == torch.bfloat16
    torch.manual_seed(8)
    x = torch.randn(2, *b.sample_shape)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        c32, c16 = ref.conditioning(PROMPTS), b.conditioning(PROMPTS)
        v32 = ref.velocity_net(x, t, c32[0] if which == "sd3" else c32)
        v16 = b.velocity_net(x, t, c16[0] if which == "sd3" else c16)
        i32, i16 = ref.decode(x), b.decode(x)
    assert v16.dtype == torch.float32 and i16.dtype == torch.float32
    assert not torch.equal(v16, v32) and not torch.equal(i16, i32)
    assert (v16 - v32).norm() / v32.norm() < 0.05
    assert (i16 - i32).abs().max() < 0.05
    auto = SD3Backbone(str(assets.sd3)) if which == "sd3" else FluxBackbone(str(assets.flux), height=32, width=32)
    assert auto.compute_dtype(torch.device("cuda")) == torch.bfloat16  # what SD3 / FLUX run in
    assert auto.compute_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="weights stored in bfloat16 must run in bfloat16"):
        SD3Backbone(str(assets.sd3), weights_dtype="bfloat16", dtype="float32")
    # bfloat16 storage: transformer and every text encoder in bfloat16, the VAE in float32
    kw = dict(weights_dtype="bfloat16", max_sequence_length=T5_MAX_LENGTH)
    half = SD3Backbone(str(assets.sd3), **kw) if which == "sd3" else FluxBackbone(str(assets.flux), height=32,
                                                                                   width=32, **kw)
    half.load()
    encoders = [half.text_encoder, half.text_encoder_2] + ([half.text_encoder_3] if which == "sd3" else [])
    assert {next(m.parameters()).dtype for m in [half.transformer, *encoders]} == {torch.bfloat16}
    assert next(half.vae.parameters()).dtype == torch.float32
    with torch.no_grad():
        v = half.velocity_net(x, t, half.conditioning(PROMPTS)[0] if which == "sd3" else half.conditioning(PROMPTS))
    assert v.dtype == torch.float32 and (v - v32).norm() / v32.norm() < 0.05


# ---- sampling through the core and `ntrk predict` end to end --------------------------------------

@pytest.fixture(scope="module")
def reward_files(tmp_path_factory):
    """Tiny stand-ins for every reward file the flow configs name: aesthetic head + CLIP (target),
    HPSv2 checkpoint and ImageReward checkpoint + BERT tokenizer (held out)."""
    from tiny_flow import TINY_IMAGE_REWARD_ARCH
    from tiny_sd import make_aesthetic_head, make_hps_checkpoint, make_open_clip

    root = tmp_path_factory.mktemp("flow_rewards")
    cfg, weights = make_open_clip(root / "clip", "ntrk-flow-tiny-clip", embed_dim=32)
    head = root / "aesthetic_head_tiny.pth"
    make_aesthetic_head(head, (32, 16, 8, 8, 4, 1), seed=3)
    hps = root / "HPS_v2.1_tiny.pt"
    make_hps_checkpoint(hps, "ntrk-flow-tiny-clip", seed=5)
    ir_ckpt, ir_tok = make_tiny_image_reward(root / "image_reward", scale=3.0)
    return {"clip_config": cfg, "clip_weights": weights, "head": head, "hps": hps, "ir_ckpt": ir_ckpt,
            "ir_tok": ir_tok, "ir_arch": json.dumps(TINY_IMAGE_REWARD_ARCH)}


def _reward_overrides(f: dict) -> list[str]:
    r, e = "--model.init_args.reward.init_args.", "--model.init_args.eval_rewards."
    return [f"{r}head", str(f["head"]), f"{r}clip_weights", str(f["clip_weights"]), f"{r}clip_model",
            str(f["clip_config"]),
            f"{e}hpsv2.init_args.checkpoint", str(f["hps"]), f"{e}hpsv2.init_args.model_name", str(f["clip_config"]),
            f"{e}image_reward.init_args.checkpoint", str(f["ir_ckpt"]),
            f"{e}image_reward.init_args.tokenizer_dir", str(f["ir_tok"]),
            f"{e}image_reward.init_args.arch", f["ir_arch"]]


def _backbone_overrides(which: str, assets) -> list[str]:
    b = "--model.init_args.backbone"
    if which == "flux":
        return [f"{b}.init_args.model", str(assets.flux), f"{b}.init_args.height", "32", f"{b}.init_args.width", "32",
                f"{b}.init_args.max_sequence_length", str(T5_MAX_LENGTH), f"{b}.init_args.weights_dtype", "float32"]
    # the FLUX baselines config with the SD3 backbone in its place: every sampler on SD3 too
    spec = {"class_path": "ntrk_lightning.backbones.sd3.SD3Backbone",
            "init_args": {"model": str(assets.sd3), "guidance_scale": 4.0, "max_sequence_length": T5_MAX_LENGTH,
                          "vae_batch_size": 4, "height": 32, "width": 32, "weights_dtype": "float32"}}
    return [b, json.dumps(spec)]


STEPS = {"ntrk": 3, "plain": 3, "best_of_n": 2, "dps": 3, "svdd": 3, "smc": 2}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_predict_every_sampler_from_the_flux_baselines_config(which, assets, reward_files, tmp_path):
    """`ntrk predict` of the shipped FLUX baselines config with tiny files (FLUX, then SD3 in its
    place): every arm writes RGB images of the decoded size, spends exactly the NFE the accounting
    says, and records the held-out HPSv2 and ImageReward scores."""
    from pipeline_utils import REPO, records, run_in_process
    from test_stable_diffusion import _check_run

    out = tmp_path / which
    run_in_process(["predict", "-c", str(REPO / "configs" / "flux_aesthetic_baselines.yaml"), "--output_dir", str(out),
                    *_backbone_overrides(which, assets), *_reward_overrides(reward_files),
                    "--data.init_args.prompts_file", str(REPO / "configs" / "prompts" / "animals45.txt"),
                    "--data.init_args.max_prompts", "2", "--data.init_args.samples_per_prompt", "1",
                    "--data.init_args.batch_size", "2", "--trainer.accelerator", "cpu",
                    "--model.init_args.num_steps", json.dumps(STEPS)])
    m = _check_run(out, list(STEPS), ["cat", "dog"])
    assert m["model"]["kind"] == which
    assert m["arms"]["svdd"]["nfe_per_sample"] == 1 + 20 * 2 and m["arms"]["best_of_n"]["nfe_per_sample"] == 40
    assert m["arms"]["smc"]["nfe_per_sample"] == 40 and m["arms"]["ntrk"]["nfe_per_sample"] == 3
    for r in records(out):
        assert set(r["rewards"]) == {"reward", "hpsv2", "image_reward"}
        assert all(np.isfinite(v) for v in r["rewards"].values())


def test_shipped_flow_configs_print_and_account_25_and_500_nfe(assets, reward_files, capsys):
    """The three flow configs parse without weights (--print_config), and instantiated with tiny
    files their arms have the budgets of the paper's Table 2: 25 NFE for NTRK/plain, ~500 for the
    baselines."""
    from pipeline_utils import REPO, run_in_process
    from ntrk_lightning.pipeline.cli import build_cli
    from test_stable_diffusion import expected_nfe

    for name in ("flux_aesthetic_ntrk", "flux_aesthetic_baselines", "sd3_aesthetic_ntrk"):
        with pytest.raises(SystemExit) as e:
            run_in_process(["predict", "-c", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
        assert not e.value.code, e.value
        printed = capsys.readouterr().out
        assert "/PATH/TO/" in printed and ("FluxBackbone" in printed or "SD3Backbone" in printed)
    budgets = {}
    for name in ("flux_aesthetic_ntrk", "flux_aesthetic_baselines"):
        cli = build_cli(["-c", str(REPO / "configs" / f"{name}.yaml"), *_backbone_overrides("flux", assets),
                         *_reward_overrides(reward_files), "--trainer.accelerator", "cpu",
                         "--data.init_args.prompts_file", str(REPO / "configs" / "prompts" / "animals45.txt")],
                        run=False)
        module = cli.model
        assert set(module.eval_rewards) == {"hpsv2", "image_reward"}
        assert type(module.backbone).__name__ == "FluxBackbone" and module.backbone.guidance_scale == 3.5
        for arm, spec in module.samplers.items():
            budgets[(name, arm)] = expected_nfe(spec.describe(), module.num_steps[arm])
    assert budgets[("flux_aesthetic_ntrk", "ntrk")] == budgets[("flux_aesthetic_ntrk", "plain")] == 25
    base = {arm: v for (cfg, arm), v in budgets.items() if cfg == "flux_aesthetic_baselines"}
    assert base.pop("ntrk") == 25 and base.pop("plain") == 25
    assert set(base) == {"best_of_n", "dps", "svdd", "smc"}
    assert all(500 <= v <= 501 for v in base.values()), base


def test_placeholder_paths_fail_early_with_a_clear_message(tmp_path):
    from pipeline_utils import REPO, run_in_process

    with pytest.raises(SystemExit) as e:
        run_in_process(["predict", "-c", str(REPO / "configs" / "flux_aesthetic_ntrk.yaml"),
                        "--output_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu"])
    msg = str(e.value)
    assert "/PATH/TO/FLUX.1-dev" in msg and "hf download black-forest-labs/FLUX.1-dev" in msg
    assert not (tmp_path / "run" / "images").exists()


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_ntrk_raises_the_aesthetic_reward_over_plain(which, reward_files, request):
    """The core's flow kernel with each backbone: 16 paired samples (same seeds and prompts), 8
    steps, the tiny random aesthetic reward; NTRK's mean gain over plain is far outside the paired
    standard error (measured: FLUX gain 0.091 +- 0.002, SD3 0.053 +- 0.002; every pair improves),
    and the accounting is S forward passes and S - 1 gradients."""
    from ntrk_lightning import sample
    from ntrk_lightning.samplers import NTRK, Plain
    from rewards.aesthetic import LAIONAestheticReward

    b = request.getfixturevalue(which)
    reward = LAIONAestheticReward(head=str(reward_files["head"]), clip_weights=str(reward_files["clip_weights"]),
                                  clip_model=str(reward_files["clip_config"])).load()
    n = 16
    prompts = ["a cat", "a dog"] * (n // 2)
    cond = b.conditioning(prompts)
    seeds = list(range(200, 200 + n))
    model, sched = b.model(), b.make_scheduler()
    plain = sample(model, sched, reward, Plain(), 8, seed=seeds, cond=cond, prompts=prompts)
    ntrk = sample(model, sched, reward, NTRK(), 8, seed=seeds, cond=cond, prompts=prompts)
    d = ntrk.rewards - plain.rewards
    se = float(d.std() / np.sqrt(n))
    print(f"{which} aesthetic (random weights): plain {plain.rewards.mean():.4f}, ntrk {ntrk.rewards.mean():.4f}, "
          f"paired gain {d.mean():.4f} +- {se:.4f}")
    assert ntrk.nfe == 8 and ntrk.grad_evals == 7 and ntrk.nan_fallbacks == 0 and plain.nfe == 8
    assert float(d.mean()) > 8 * se and float(d.mean()) > 0.02
    assert (d > 0).float().mean() > 0.8
    assert ntrk.images.shape == (n, 3, 32, 32) and torch.isfinite(ntrk.images).all()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_flow_step_time_benchmark_runs_tiny_on_cpu(which, tmp_path):
    import importlib.util

    from pipeline_utils import REPO

    spec = importlib.util.spec_from_file_location("flow_step_time", REPO / "benchmarks" / "flow_step_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--model", which, "--tiny", "--device", "cpu", "--batch", "2", "--steps", "2", "--warmup", "0",
                       "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / f"flow_step_time_{which}_cpu-tiny.json").read_text())
    md = (tmp_path / f"flow_step_time_{which}_cpu-tiny.md").read_text()
    assert data == json.loads(json.dumps(result))
    assert set(data["samplers"]) == {"plain", "dps", "ntrk"} and "no GPU" in data["device"]
    for name, r in data["samplers"].items():
        assert r["ms_per_step"] > 0 and r["peak_memory_bytes"] is None and f"| {name} |" in md
        assert r["nfe_per_sample"] == 2
        assert r["grad_evals_per_sample"] == (0 if name == "plain" else 1)
    assert data["config"]["latent_shape"] == [16, 8, 8] and data["config"]["model"] == which
    assert not list(tmp_path.glob("*.tmp"))
