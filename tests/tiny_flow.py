"""Tiny random-initialised SD3 and FLUX pipelines and a tiny ImageReward checkpoint, built offline.

Written in the layout of the real artefacts (``save_pretrained`` of ``StableDiffusion3Pipeline`` /
``FluxPipeline``: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/``), so that the backbones read them exactly as the real folders.

* SD3: ``SD3Transformer2DModel`` (patch 2), two CLIP text encoders with projection (CLIP-L / CLIP-G
  stand-ins), a T5 encoder; a 16-channel VAE with three blocks (scale factor 4, scaling and shift
  factors set). Latents 16 x 8 x 8, images 32 x 32.
* FLUX: ``FluxTransformer2DModel`` with the guidance embedding, one CLIP text encoder (pooled) and a
  T5 encoder, the same kind of VAE. Latents 16 x 8 x 8 (packed to 16 tokens of 64 channels inside
  the backbone), images 32 x 32.

Tokenizers (shared with the step-time benchmarks, :mod:`benchmarks.step_time`): CLIP's from the
BPE file in the open_clip wheel; T5's a small Unigram vocabulary (transformers'
``T5Tokenizer(vocab=[(piece, score), ...])``), saved as ``tokenizer.json``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.step_time import t5_tokenizer
from tiny_sd import built_once, clip_tokenizer

TEXT_HIDDEN = 32   # CLIP stand-ins
T5_HIDDEN = 64     # T5 stand-in; also SD3's joint_attention_dim (>= the two CLIPs' concatenated 64)
LATENT = 8         # latent side; images are LATENT * 4 = 32 pixels
LATENT_CHANNELS = 16
T5_MAX_LENGTH = 16

#: SD3-medium's scheduler config (static shift 3)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
#: FLUX.1-dev's scheduler config (resolution-dependent shift)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

def _clip_text(seed: int, with_projection: bool, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(t5_tokenizer()), d_model=T5_HIDDEN, d_kv=16, d_ff=64, num_layers=1,
                   num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=LATENT * 4, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def make_tiny_sd3(folder: Path, seed: int = 0, with_t5: bool = True) -> Path:
    """Write a tiny SD3-style pipeline to ``folder`` (returned); ``with_t5=False`` saves it without
    the T5 encoder (``text_encoder_3``/``tokenizer_3`` null in ``model_index.json``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_HIDDEN, caption_projection_dim=32,
        pooled_projection_dim=2 * 32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text(seed + 2, True), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text(seed + 3, True), tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(seed + 4) if with_t5 else None, tokenizer_3=t5_tokenizer() if with_t5 else None)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    return folder


def make_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX-style pipeline to ``folder`` (returned): ``guidance_embeds`` as FLUX.1-dev
    (distilled guidance) or not (FLUX.1-schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text(seed + 2, False), tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(seed + 3), tokenizer_2=t5_tokenizer(model_max_length=T5_MAX_LENGTH))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    return folder


class TinyFlowAssets:
    """Paths of the tiny flow pipelines, built once per process into a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sd3 = make_tiny_sd3(root / "sd3")
        self.flux = make_tiny_flux(root / "flux")


def tiny_flow_assets() -> TinyFlowAssets:
    """The process-wide tiny flow pipelines (built on first use, removed at exit)."""
    return built_once("ntrk-tiny-flow-", TinyFlowAssets)


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


# ---- ImageReward ------------------------------------------------------------------------------

#: a tiny ImageReward architecture (fields of rewards.image_reward.ImageRewardArch)
TINY_IMAGE_REWARD_ARCH = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                              text_vocab_size=64, text_width=24, text_layers=2, text_heads=3, text_intermediate=48,
                              text_max_positions=40, head_dims=(24, 32, 16, 8, 4, 1))

_BERT_WORDS = "a an the of photo cat dog horse fox wolf red blue green big small painting on in with and".split()


def bert_tokenizer():
    """A transformers ``BertTokenizer`` (uncased WordPiece) with BERT's special tokens and a small
    vocabulary of whole words and single letters (##-continuations) — ids below 64."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _BERT_WORDS
    words += [c for c in "bcdeghijklmnopqstuvxyz"] + ["##" + c for c in "aeiorstn"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def make_tiny_image_reward(folder: Path, seed: int = 0, scale: float = 1.0) -> tuple[Path, Path]:
    """``ImageReward-tiny.pt`` (a state dict in the release's key layout, with its unused BLIP
    projections and position ids) and a BERT tokenizer folder, in ``folder``."""
    from rewards.image_reward import ImageRewardArch, ImageRewardModel

    folder.mkdir(parents=True, exist_ok=True)
    arch = ImageRewardArch.from_dict(TINY_IMAGE_REWARD_ARCH)
    torch.manual_seed(seed)
    model = ImageRewardModel(arch)
    with torch.no_grad():  # zero-initialised class/position tokens would hide position bugs
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "token" in name or "pos" in name:
                p.copy_(torch.randn_like(p) * (scale / max(1, p.shape[-1]) ** 0.5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.randn(8, arch.vision_width)
    state["blip.text_proj.weight"] = torch.randn(8, arch.text_width)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(arch.text_max_positions)[None]
    ckpt = folder / "ImageReward-tiny.pt"
    torch.save(state, str(ckpt))
    tok_dir = folder / "bert-tokenizer"
    bert_tokenizer().save_pretrained(str(tok_dir))
    return ckpt, tok_dir
