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
import os
import platform
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

from benchmarks.step_time import (add_common_arguments, clip_tokenizer, device_and_dtype, device_tag,  # noqa: E402
                                  load_on_device, reward_files, time_samplers, write_outputs)

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

# tiny shapes: the same code path in seconds on a CPU (latent 8x8 -> 32 px images)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


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


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, batch=4, size=512, steps=10, cuda_dtype="float16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--model", default=None, help="a real SD 1.5 diffusers folder instead of random weights")
    return p.parse_args(argv)


def save_result(args: argparse.Namespace, backbone: Any, device: torch.device, dtype: str, size: int, steps: int,
                setup_seconds: float, results: dict[str, Any]) -> dict[str, Any]:
    """The result record, written as ``sd_step_time_<device>.json`` and ``.md``."""
    import diffusers

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_tag": device_tag(device, args.tiny),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "config": {"tiny": args.tiny, "model": args.model, "height": size, "width": size, "batch": args.batch,
                   "steps": steps, "warmup": args.warmup, "repeats": args.repeats, "dtype": dtype,
                   "reward_dtype": dtype, "gradient_checkpointing": args.gradient_checkpointing,
                   "latent_shape": list(backbone.sample_shape), "threads": torch.get_num_threads()},
        "setup_seconds": setup_seconds,
        "samplers": results,
    }
    cfg = result["config"]
    description = (f"{'Tiny shapes' if cfg['tiny'] else 'SD 1.5 shapes'} ({'real' if cfg['model'] else 'random'} "
                   f"weights), {cfg['height']}x{cfg['width']}, batch {cfg['batch']}, {cfg['steps']} steps, backbone "
                   f"dtype {cfg['dtype']}, reward dtype {cfg['reward_dtype']}, gradient checkpointing "
                   f"{cfg['gradient_checkpointing']}; torch {result['torch']}, diffusers {result['diffusers']}.")
    json_path, md_path = write_outputs(Path(args.out), f"sd_step_time_{result['device_tag']}", result,
                                       f"SD step time: {result['device']}", description)
    print(f"wrote {json_path} and {md_path}")
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone

    device, dtype = device_and_dtype(args, "float16")
    size = args.size or (32 if args.tiny else 512)
    steps = args.steps or (3 if args.tiny else 10)
    tmp = Path(tempfile.mkdtemp(prefix="ntrk-sd-bench-"))
    try:
        t0 = time.perf_counter()
        model_dir = Path(args.model) if args.model else write_random_pipeline(tmp / "sd", args.tiny)
        files = reward_files(args, tmp)
        build_s = time.perf_counter() - t0
        backbone = StableDiffusionBackbone(str(model_dir), height=size, width=size, dtype=dtype,
                                           gradient_checkpointing=args.gradient_checkpointing,
                                           vae_batch_size=None)
        reward = load_on_device(backbone, files, dtype, device)
        results = time_samplers(backbone, reward, args, steps, device)
        return save_result(args, backbone, device, dtype, size, steps, build_s, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
