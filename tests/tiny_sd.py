"""Tiny random-initialised Stable Diffusion / SDXL pipelines and reward files, built offline.

Everything here is written in the layout of the real artefacts, so that the code under test reads
them exactly as it reads the real ones:

* :func:`make_tiny_sd` / :func:`make_tiny_sdxl` — a diffusers folder written by
  ``StableDiffusionPipeline.save_pretrained`` / ``StableDiffusionXLPipeline.save_pretrained``
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``).
  Latents are 4 x 8 x 8 and the VAE has 3 blocks (scale factor 4), so images are 32 x 32 RGB.
* :func:`make_open_clip` — an open_clip model config JSON + safetensors weights (any embed dim).
* :func:`make_aesthetic_head` — a LAION-style head state dict (keys ``layers.{0,2,4,6,7}``).
* :func:`make_hps_checkpoint` — an open_clip state dict under ``"state_dict"`` (the HPSv2 layout).
* :func:`make_tiny_pickscore` — a transformers ``CLIPModel`` folder + tokenizer + preprocessor.

The tokenizers are built from the BPE vocabulary that ships inside the open_clip wheel, so no
vocabulary is downloaded (open_clip ships its BPE file in the wheel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

# ---- tokenizer -----------------------------------------------------------------------------

# one CLIP tokenizer for the fixtures and the step-time benchmarks' random pipelines
from benchmarks.step_time import clip_tokenizer  # noqa: E402,F401


# ---- Stable Diffusion ----------------------------------------------------------------------

#: SD 1.5's scheduler (a PNDM config: "scaled_linear" betas, leading spacing with offset 1)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      prediction_type="epsilon")

TEXT_HIDDEN = 32
LATENT = 8  # latent side; images are LATENT * 4 = 32 pixels


def _text_encoder(hidden: int, seed: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    return model.eval()


def _vae(seed: int, force_upcast: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=LATENT * 4, scaling_factor=0.18215, force_upcast=force_upcast)


def make_tiny_sd(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD 1.x-style pipeline to ``folder`` (returned) in ``save_pretrained`` layout."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8)
    sched = PNDMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(TEXT_HIDDEN, seed + 2),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    return folder


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-style pipeline (two text encoders, pooled text embeds, time ids)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    proj, time_dim = 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj, transformer_layers_per_block=1)
    # SDXL ships an Euler config; the backbone must turn any scheduler config into DDIM
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1, force_upcast=True), text_encoder=_text_encoder(TEXT_HIDDEN, seed + 2),
        text_encoder_2=_text_encoder(TEXT_HIDDEN, seed + 3, with_projection=True, projection_dim=proj),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder))
    return folder


# ---- open_clip and reward files ------------------------------------------------------------

def open_clip_config(embed_dim: int = 32, image_size: int = 32) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def make_open_clip(folder: Path, name: str, embed_dim: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """``<name>.json`` (open_clip model config, registered) and ``<name>.safetensors`` in ``folder``."""
    from tiny_clip import make_tiny_clip

    return make_tiny_clip(folder, seed=seed, name=name, config=open_clip_config(embed_dim))


#: the documented LAION head: Linear layers at these Sequential indices (dropouts in between)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
REAL_HEAD_DIMS = (768, 1024, 128, 64, 16, 1)


def make_aesthetic_head(path: Path, dims: Sequence[int] = REAL_HEAD_DIMS, seed: int = 0,
                        scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Save a random head state dict with the documented keys ``layers.{0,2,4,6,7}.{weight,bias}``
    (``dims``: in -> 4 hidden -> 1) with ``torch.save``; returns the state dict."""
    if len(dims) != 6 or dims[-1] != 1:
        raise ValueError("dims must be (in, h1, h2, h3, h4, 1)")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (i, o) in zip(HEAD_LINEAR_INDICES, zip(dims[:-1], dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) * (scale / i ** 0.5)
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))
    return state


def make_hps_checkpoint(path: Path, model_name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """An open_clip model's weights in the HPSv2 release layout: ``{"state_dict": ..., "epoch": ...}``
    (keys as in a DDP-trained run, with the ``module.`` prefix stripped, as the released files have)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 1, "name": "tiny-hps"}, str(path))
    return state


def make_tiny_pickscore(model_dir: Path, processor_dir: Path, seed: int = 2, image_size: int = 32) -> None:
    """A tiny transformers ``CLIPModel`` in ``model_dir`` (the PickScore_v1 layout) and the CLIP
    processor files (tokenizer + ``preprocessor_config.json``) in ``processor_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=24)
    CLIPModel(cfg).eval().save_pretrained(str(model_dir))
    clip_tokenizer().save_pretrained(str(processor_dir))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       do_center_crop=True, resample=3).save_pretrained(str(processor_dir))


# ---- one set of tiny assets per test process -------------------------------------------------

class TinyAssets:
    """Paths of every tiny artefact, built once per process into a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sd = make_tiny_sd(root / "sd")
        self.sdxl = make_tiny_sdxl(root / "sdxl")
        self.clip_config, self.clip_weights = make_open_clip(root / "clip", "ntrk-tiny-clip-32", embed_dim=32)
        self.head = root / "aesthetic_head_tiny.pth"
        make_aesthetic_head(self.head, (32, 16, 8, 8, 4, 1), seed=3)

    def aesthetic_overrides(self, prefix: str = "--model.init_args.reward.init_args.") -> list[str]:
        """Command-line overrides that point a config's aesthetic reward at the tiny files."""
        return [f"{prefix}head", str(self.head), f"{prefix}clip_weights", str(self.clip_weights),
                f"{prefix}clip_model", str(self.clip_config)]


_T = TypeVar("_T")
_BUILT: dict[str, Any] = {}


def built_once(prefix: str, build: Callable[[Path], _T]) -> _T:
    """``build(root)`` once per process, in a fresh temporary folder named ``prefix...`` that is
    removed at exit; later calls return the same object."""
    if prefix not in _BUILT:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, root, True)
        _BUILT[prefix] = build(root)
    return _BUILT[prefix]


def tiny_assets() -> TinyAssets:
    """The process-wide tiny assets (built on first use, removed at exit)."""
    return built_once("ntrk-tiny-sd-", TinyAssets)


# ---- user rewards for ImportedReward tests -------------------------------------------------

def mean_brightness(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """A user reward function: mean pixel value per image."""
    return images.mean(dim=(1, 2, 3))


def channel_mean(images: torch.Tensor, channel: int = 0) -> torch.Tensor:
    """A user reward taking only images, with a keyword argument (given as init_args)."""
    return images[:, channel].mean(dim=(1, 2))


class RedMinusBlue(torch.nn.Module):
    """A user reward class (an nn.Module, so it follows the reward to the accelerator)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return self.scale * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
