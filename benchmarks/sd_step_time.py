"""Per-step time and peak GPU memory of plain, DPS and NTRK sampling at Stable Diffusion 1.5 shapes.

    python benchmarks/sd_step_time.py                       # GPU: random SD 1.5-shaped weights, 512 px, batch 4, fp16
    python benchmarks/sd_step_time.py --model /models/sd15 --head ... --clip-weights ...   # real weights
    python benchmarks/sd_step_time.py --tiny --device cpu   # seconds on a CPU: the same code path, tiny shapes

The three samplers run side by side in one process on the same model, reward, prompts and seeds:
``plain`` (no reward gradient), ``dps`` and ``ntrk`` (one reward gradient per step, through the
UNet, the VAE decoder and the reward). Without ``--model`` a pipeline with random weights and the
SD 1.5 component shapes (UNet2DConditionModel 320/640/1280/1280, cross-attention 768,
AutoencoderKL 128/256/512/512, CLIP ViT-L/14 text encoder) is written to a temporary folder and
read back through :class:`StableDiffusionBackbone`, so the measured path is exactly the one
``ntrk predict`` runs; the reward is the LAION aesthetic predictor's shape (CLIP ViT-L/14 image
tower + the 768->1024->128->64->16->1 head), random unless ``--head``/``--clip-weights`` are given.

Measured per sampler, after ``--warmup`` untimed runs: wall time of ``ntrk_lightning.sample`` for
``--steps`` steps divided by the steps (the final decode and reward are included, amortised),
and ``torch.cuda.max_memory_allocated`` during the timed runs (CUDA only; ``null`` elsewhere).
Writes ``<out>/sd_step_time_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# SD 1.5 component shapes (the diffusers defaults of UNet2DConditionModel are the SD 1.x UNet)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
                force_upcast=False)  # as SD 1.5's vae/config.json (no field): decoded in the compute dtype
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
HEAD_DIMS = (768, 1024, 128, 64, 16, 1)

# tiny shapes: the same code path in seconds on a CPU (latent 8x8 -> 32 px images)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_HEAD_DIMS = (32, 16, 8, 8, 4, 1)


def clip_tokenizer() -> Any:
    """A transformers CLIPTokenizer from the BPE vocabulary shipped in the open_clip wheel (offline)."""
    import gzip

    from open_clip import tokenizer as oc_tok
    from transformers import CLIPTokenizer

    lines = gzip.open(oc_tok.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(oc_tok.bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=77)


def write_random_pipeline(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """A random-weight SD 1.5-shaped (or tiny) pipeline in ``save_pretrained`` layout."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
                                        **(TINY_TEXT if tiny else SD15_TEXT)))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    del pipe, unet, vae, text
    gc.collect()
    return folder


def write_random_reward(folder: Path, tiny: bool, seed: int = 1) -> tuple[Path, Path, str]:
    """(head, clip weights, clip model name) of a random aesthetic reward of the real (or tiny) shape."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if tiny:
        cfg = folder / "bench-tiny-clip.json"
        cfg.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(str(cfg))
        model_name, arg_name, dims = "bench-tiny-clip", str(cfg), TINY_HEAD_DIMS
    else:
        model_name = arg_name = "ViT-L-14-quickgelu"
        dims = HEAD_DIMS
    torch.manual_seed(seed)
    clip = open_clip.create_model(model_name)
    weights = folder / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    del clip
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        state[f"layers.{idx}.bias"] = torch.zeros(o)
    head = folder / "head.pth"
    torch.save(state, str(head))
    return head, weights, arg_name


def device_tag(device: torch.device, tiny: bool) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{tag}-tiny" if tiny else tag


def measure(model: Any, scheduler: Any, reward: Any, spec: Any, steps: int, seeds: list[int], cond: Any,
            prompts: list[str], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    from ntrk_lightning import sample

    for _ in range(warmup):
        sample(model, scheduler, reward, spec, steps, seed=seeds, cond=cond, prompts=prompts, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, res = [], None
    for _ in range(repeats):
        res = sample(model, scheduler, reward, spec, steps, seed=seeds, cond=cond, prompts=prompts, device=device)
        times.append(res.seconds)  # sample() synchronises CUDA before reading the clock
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    best = min(times)
    return {"sampler": spec.describe(), "steps": steps, "batch": len(seeds), "repeats": repeats,
            "seconds_per_run": times, "seconds_per_step": best / steps,
            "ms_per_step": 1000.0 * best / steps, "ms_per_step_per_image": 1000.0 * best / steps / len(seeds),
            "nfe_per_sample": res.nfe, "grad_evals_per_sample": res.grad_evals,
            "peak_memory_bytes": peak,
            "peak_memory_gib": None if peak is None else peak / 2 ** 30,
            "reward_mean": float(res.rewards.float().mean())}


def write_outputs(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sd_step_time_{result['device_tag']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    cfg = result["config"]
    lines = [f"# SD step time: {result['device']}", "",
             f"{'Tiny shapes' if cfg['tiny'] else 'SD 1.5 shapes'} ({'real' if cfg['model'] else 'random'} weights), "
             f"{cfg['height']}x{cfg['width']}, batch {cfg['batch']}, {cfg['steps']} steps, backbone dtype "
             f"{cfg['dtype']}, reward dtype {cfg['reward_dtype']}, gradient checkpointing "
             f"{cfg['gradient_checkpointing']}; torch {result['torch']}, diffusers {result['diffusers']}.", "",
             "| sampler | ms / step | ms / step / image | NFE / image | reward grads / image | peak memory (GiB) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["samplers"].items():
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['ms_per_step_per_image']:.1f} | {r['nfe_per_sample']:.0f} "
                     f"| {r['grad_evals_per_sample']:.0f} | {mem} |")
    lines += ["", "Per-step time = best wall time of `ntrk_lightning.sample` over the repeats / steps (final decode "
              "and reward included); peak memory = `torch.cuda.max_memory_allocated` over the timed runs.", ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run in seconds)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="image size (default 512; tiny: 32)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (default 10; tiny: 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="backbone and reward compute dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ntrk-gamma", type=float, default=1.0)
    p.add_argument("--dps-scale", type=float, default=0.1)
    p.add_argument("--model", default=None, help="a real SD 1.5 diffusers folder instead of random weights")
    p.add_argument("--head", default=None, help="a real aesthetic head file (with --clip-weights)")
    p.add_argument("--clip-weights", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone
    from ntrk_lightning.samplers import DPS, NTRK, Plain
    from rewards.aesthetic import LAIONAestheticReward

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    size = args.size or (32 if args.tiny else 512)
    steps = args.steps or (3 if args.tiny else 10)
    tmp = Path(tempfile.mkdtemp(prefix="ntrk-sd-bench-"))
    try:
        t0 = time.perf_counter()
        model_dir = Path(args.model) if args.model else write_random_pipeline(tmp / "sd", args.tiny)
        if args.head and args.clip_weights:
            head, clip_weights, clip_model = Path(args.head), Path(args.clip_weights), "ViT-L-14-quickgelu"
        else:
            head, clip_weights, clip_model = write_random_reward(tmp / "reward", args.tiny)
        build_s = time.perf_counter() - t0
        backbone = StableDiffusionBackbone(str(model_dir), height=size, width=size, dtype=dtype,
                                           gradient_checkpointing=args.gradient_checkpointing,
                                           vae_batch_size=None)
        reward = LAIONAestheticReward(head=str(head), clip_weights=str(clip_weights), clip_model=clip_model,
                                      dtype=dtype)
        backbone.load()
        reward.load()
        backbone.to(device)
        reward.to(device)
        model, scheduler = backbone.model(), backbone.make_scheduler()
        prompts = [f"a photo of a {a}" for a in ("cat", "dog", "horse", "monkey")]
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
        cond = backbone.conditioning(prompts)
        seeds = list(range(args.batch))
        samplers = {"plain": Plain(), "dps": DPS(scale=args.dps_scale), "ntrk": NTRK(mode="tilt", gamma=args.ntrk_gamma)}
        results = {}
        for name, spec in samplers.items():
            results[name] = measure(model, scheduler, reward, spec, steps, seeds, cond, prompts, device,
                                    args.warmup, args.repeats)
            print(f"{name}: {results[name]['ms_per_step']:.1f} ms/step, peak "
                  f"{results[name]['peak_memory_gib'] if results[name]['peak_memory_gib'] is not None else 'n/a'} GiB",
                  flush=True)
        import diffusers

        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "device_tag": device_tag(device, args.tiny),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "config": {"tiny": args.tiny, "model": args.model, "height": size, "width": size, "batch": args.batch,
                       "steps": steps, "warmup": args.warmup, "repeats": args.repeats, "dtype": dtype,
                       "reward_dtype": dtype, "gradient_checkpointing": args.gradient_checkpointing,
                       "latent_shape": list(backbone.sample_shape), "threads": torch.get_num_threads()},
            "setup_seconds": build_s,
            "samplers": results,
        }
        json_path, md_path = write_outputs(Path(args.out), result)
        print(f"wrote {json_path} and {md_path}")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
