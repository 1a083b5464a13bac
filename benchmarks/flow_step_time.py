"""Per-step time and peak GPU memory of plain, DPS and NTRK sampling on SD3 and FLUX (flow matching).

    python benchmarks/flow_step_time.py --model flux                 # GPU: random FLUX.1-dev-shaped weights, 1024 px, bf16
    python benchmarks/flow_step_time.py --model sd3 --size 1024      # GPU: random SD3-medium-shaped weights
    python benchmarks/flow_step_time.py --model flux --path /models/FLUX.1-dev --head ... --clip-weights ...
    python benchmarks/flow_step_time.py --model flux --tiny --device cpu   # seconds on a CPU: same code path

Mirrors ``benchmarks/sd_step_time.py`` (both take their timing, reward and output helpers from
``benchmarks/step_time.py``): the three samplers run side by side in one process on the same backbone, reward, prompts and seeds —
``plain`` (no reward gradient), ``dps`` and ``ntrk`` (one reward gradient per step through the
transformer, the VAE decoder and the reward) — on the core's stochastic flow step.

Without ``--path`` a pipeline with random weights is written to a temporary folder and read back
through :class:`~ntrk_lightning.backbones.FluxBackbone` / :class:`~ntrk_lightning.backbones.SD3Backbone`,
so the measured path is the one ``ntrk predict`` runs. The transformer and the VAE have the real
shapes (FLUX.1-dev: 19 double + 38 single blocks, width 3072, 12B parameters; SD3 medium: 24
blocks, width 1536, 2B); the text encoders keep their output widths but only 1-2 layers (they run
once per prompt, outside the timed steps; T5-XXL alone would be 4.7B random parameters to write).
The reward is the LAION aesthetic predictor's shape (CLIP ViT-L/14 image tower + MLP head), random
unless ``--head``/``--clip-weights`` are given. Random-weight writing needs disk: ~24 GB (FLUX,
bfloat16) or ~4 GB (SD3) in ``--tmp``.

Measured per sampler, after ``--warmup`` untimed runs: best wall time of ``ntrk_lightning.sample``
over ``--repeats`` runs of ``--steps`` steps, divided by the steps (final decode and reward
amortised), and ``torch.cuda.max_memory_allocated`` over the timed runs (CUDA only). Writes
``<out>/flow_step_time_<model>_<device>.json`` and ``.md`` (atomically).
"""

from __future__ import annotations

import argparse
import gc
import os
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

from benchmarks.step_time import (add_common_arguments, clip_tokenizer, cpu_name, device_and_dtype,  # noqa: E402
                                  device_tag, load_on_device, reward_files, t5_tokenizer, time_samplers,
                                  write_outputs)

# ---- real shapes -------------------------------------------------------------------------------
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = dict(VAE16, scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE = dict(VAE16, scaling_factor=1.5305, shift_factor=0.0609)
# text encoders: real output widths, 1-2 layers (run once per prompt, not per step)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=20,
              projection_dim=1280)
T5_XXL_WIDTH = dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# ---- tiny shapes: the same code path in seconds on a CPU (latent 16 x 8 x 8 -> 32 px images) -----
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
TINY_VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                  block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, use_quant_conv=False,
                  use_post_quant_conv=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4)


def _clip_text(shape: dict, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, hidden_act="gelu", **shape)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(shape: dict) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, **shape))


def _stored(module: Any, dtype: torch.dtype) -> Any:
    return module if dtype == torch.float32 else module.to(dtype)


def write_random_pipeline(folder: Path, model: str, tiny: bool, device: torch.device, seed: int = 0) -> Path:
    """A random-weight FLUX.1-dev- / SD3-medium-shaped (or tiny) pipeline in ``save_pretrained``
    layout; large modules are initialised on ``device`` and stored in bfloat16 (tiny: float32)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    torch.manual_seed(seed)
    store = torch.float32 if tiny else torch.bfloat16
    init_device = torch.device("cpu") if tiny else device
    clip_shape = TINY_CLIP if tiny else CLIP_L
    with torch.device(init_device):
        if model == "flux":
            transformer = _stored(FluxTransformer2DModel(**(TINY_FLUX_TRANSFORMER if tiny else FLUX_TRANSFORMER)), store)
            vae = AutoencoderKL(**(dict(TINY_VAE16, scaling_factor=0.3611, shift_factor=0.1159) if tiny else FLUX_VAE))
            pipe = FluxPipeline(transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                                text_encoder=_clip_text(clip_shape, False), tokenizer=clip_tokenizer(),
                                text_encoder_2=_t5(TINY_T5 if tiny else T5_XXL_WIDTH), tokenizer_2=t5_tokenizer())
        else:
            transformer = _stored(SD3Transformer2DModel(**(TINY_SD3_TRANSFORMER if tiny else SD3_TRANSFORMER)), store)
            vae = AutoencoderKL(**(dict(TINY_VAE16, scaling_factor=1.5305, shift_factor=0.0609) if tiny else SD3_VAE))
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                text_encoder=_clip_text(clip_shape, True), tokenizer=clip_tokenizer(),
                text_encoder_2=_clip_text(TINY_CLIP if tiny else CLIP_G, True), tokenizer_2=clip_tokenizer(),
                text_encoder_3=_t5(TINY_T5 if tiny else T5_XXL_WIDTH), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(str(folder))
    del pipe, transformer, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--path", default=None, help="a real diffusers folder (FLUX.1-dev / SD3) instead of random weights")
    add_common_arguments(p, batch=2, size=1024, steps=6, cuda_dtype="bfloat16")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every activation of the reward backward (default: checkpointing on, as the configs)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: FLUX 3.5, SD3 7.0")
    p.add_argument("--tmp", default=None, help="folder for the random-weight pipeline (default: the system temp)")
    return p.parse_args(argv)


def make_backbone(args: argparse.Namespace, folder: Path, size: int, dtype: str, weights_dtype: str) -> Any:
    """The FLUX or SD3 backbone on ``folder``, with the benchmark's size, precision and slicing."""
    from ntrk_lightning.backbones import FluxBackbone, SD3Backbone

    common = dict(height=size, width=size, dtype=dtype, weights_dtype=weights_dtype, vae_batch_size=1,
                  gradient_checkpointing=args.gradient_checkpointing)
    if args.model == "flux":
        return FluxBackbone(str(folder), guidance_scale=args.guidance_scale or 3.5, max_sequence_length=512,
                            **common)
    return SD3Backbone(str(folder), guidance_scale=args.guidance_scale or 7.0, max_sequence_length=256, **common)


def save_result(args: argparse.Namespace, backbone: Any, device: torch.device, dtype: str, weights_dtype: str,
                size: int, steps: int, seconds: dict[str, float], results: dict[str, Any]) -> dict[str, Any]:
    """The result record, written as ``flow_step_time_<model>_<device>.json`` and ``.md``."""
    import diffusers

    n_params = sum(p.numel() for p in backbone.transformer.parameters())
    result = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({cpu_name()}; {torch.get_num_threads()} threads), no GPU"),
        "device_tag": device_tag(device, args.tiny),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "config": {"model": args.model, "tiny": args.tiny, "path": args.path, "height": size, "width": size,
                   "batch": args.batch, "steps": steps, "warmup": args.warmup, "repeats": args.repeats,
                   "dtype": dtype, "weights_dtype": weights_dtype, "reward_dtype": dtype,
                   "gradient_checkpointing": args.gradient_checkpointing,
                   "latent_shape": list(backbone.sample_shape), "transformer_parameters": n_params,
                   "scheduler_shift": float(backbone.make_scheduler().config.shift),
                   "threads": torch.get_num_threads()},
        **seconds,
        "samplers": results,
    }
    cfg = result["config"]
    shapes = "tiny shapes" if cfg["tiny"] else {"flux": "FLUX.1-dev shapes", "sd3": "SD3-medium shapes"}[cfg["model"]]
    description = (f"{shapes} ({'real' if cfg['path'] else 'random'} weights), {cfg['height']}x{cfg['width']}, batch "
                   f"{cfg['batch']}, {cfg['steps']} steps, backbone dtype {cfg['dtype']} (weights "
                   f"{cfg['weights_dtype']}), reward dtype {cfg['reward_dtype']}, gradient checkpointing "
                   f"{cfg['gradient_checkpointing']}; torch {result['torch']}, diffusers {result['diffusers']}.")
    json_path, md_path = write_outputs(Path(args.out), f"flow_step_time_{cfg['model']}_{result['device_tag']}", result,
                                       f"Flow step time ({cfg['model']}): {result['device']}", description)
    print(f"wrote {json_path} and {md_path}")
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args, "bfloat16")
    weights_dtype = "float32" if args.tiny or dtype == "float32" else dtype
    size = args.size or (32 if args.tiny else 1024)
    steps = args.steps or (3 if args.tiny else 6)
    tmp = Path(tempfile.mkdtemp(prefix="ntrk-flow-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        folder = Path(args.path) if args.path else write_random_pipeline(tmp / args.model, args.model, args.tiny, device)
        files = reward_files(args, tmp)
        build_s = time.perf_counter() - t0
        backbone = make_backbone(args, folder, size, dtype, weights_dtype)
        reward = load_on_device(backbone, files, dtype, device)
        load_s = time.perf_counter() - t0 - build_s
        results = time_samplers(backbone, reward, args, steps, device)
        return save_result(args, backbone, device, dtype, weights_dtype, size, steps,
                           {"setup_seconds": build_s, "load_seconds": load_s}, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
