"""FLUX.1 (dev / schnell) from a local diffusers folder, as a flow-matching backbone of the core.

    backbone = FluxBackbone("/models/FLUX.1-dev", guidance_scale=3.5)
    backbone.load()
    model, scheduler = backbone.model(), backbone.make_scheduler()
    cond = backbone.conditioning(["a photo of a cat"] * 4)       # a dict, no negative branch
    res = ntrk_lightning.sample(model, scheduler, reward, NTRK(), 25, seed=[0, 1, 2, 3], cond=cond, ...)

What differs from SD3 (:mod:`ntrk_lightning.backbones.sd3`, which has the shared part):

* **Packing.** ``FluxTransformer2DModel`` takes 2 x 2 latent patches as tokens: (B, 16, h, w) ->
  (B, h/2 * w/2, 64), with per-token position ids ``img_ids`` (0, row, col) and all-zero
  ``txt_ids`` for the text tokens. The adapter packs before and unpacks after the transformer, so
  the core sees (B, 16, H/8, W/8) latents like any other model.
* **Guidance.** FLUX.1-dev is guidance-*distilled*: the guidance scale is an input of the network
  (``guidance`` embedding), there is no unconditional branch and no CFG (one forward pass per row).
  FLUX.1-schnell has no guidance embedding; ``guidance_scale`` is then unused.
* **Timestep.** The core passes diffusers timesteps ``t = sigma * 1000``; the transformer wants
  ``sigma`` (``t / 1000``; it multiplies by 1000 inside), as diffusers' pipeline passes it.
* **Text.** CLIP-L's pooled output (``pooler_output``) and T5-XXL's last hidden state
  (``max_sequence_length`` tokens, 512 for dev, 256 for schnell).
* **Schedule.** The resolution-dependent shift ``mu`` (image token count) is baked into a static
  ``shift = exp(mu)``; and :class:`FluxFlowMatchScheduler` spaces the unshifted sigmas as FLUX's
  pipeline does, ``linspace(1, 1/N, N)`` (diffusers' default spacing ends near 0.001 instead).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ntrk_lightning.backbones.sd3 import FlowMatchingBackbone
from ntrk_lightning.backbones.stable_diffusion import checked_guidance_scale, compute_context, upcast

FLUX_COMPONENTS = {"transformer": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
                   "tokenizer": "tokenizer", "text_encoder_2": "transformers", "tokenizer_2": "t5_tokenizer",
                   "scheduler": "scheduler"}


def _flux_scheduler_class() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FluxFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
        """``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(N)`` uses FLUX's pipeline
        spacing of the unshifted sigmas, ``linspace(1, 1/N, N)``, then the (static) shift."""

        def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None,
                          sigmas: Optional[list[float]] = None, mu: Optional[float] = None,
                          timesteps: Optional[list[float]] = None) -> None:
            if sigmas is None and timesteps is None and num_inference_steps is not None:
                sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    # a module-level name, so that pickling (DDP spawn) finds the class
    FluxFlowMatchScheduler.__qualname__ = "FluxFlowMatchScheduler"
    FluxFlowMatchScheduler.__module__ = __name__
    return FluxFlowMatchScheduler


def flux_scheduler_class() -> Any:
    """The ``FluxFlowMatchScheduler`` class (built on first use: diffusers is imported lazily)."""
    if "FluxFlowMatchScheduler" not in globals():
        globals()["FluxFlowMatchScheduler"] = _flux_scheduler_class()
    return globals()["FluxFlowMatchScheduler"]


def __getattr__(name: str) -> Any:
    if name == "FluxFlowMatchScheduler":
        return flux_scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2 x 2 patches as tokens, row-major, channels
    ordered (c, dy, dx) — the layout ``FluxTransformer2DModel`` was trained on."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, n, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxVelocity(nn.Module):
    """``v = f(x_t, t, cond)`` around a ``FluxTransformer2DModel`` on unpacked latents (B, C, h, w);
    ``cond`` is a dict with ``prompt_embeds`` (B, L, D) (T5) and ``pooled`` (B, P) (CLIP).
    ``guidance_scale`` feeds the distilled guidance embedding (``None``: a model without one)."""

    def __init__(self, transformer: nn.Module, guidance_scale: Optional[float],
                 compute_dtype: Callable[[torch.device], torch.dtype]) -> None:
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        p = next(self.transformer.parameters())
        emb = cond["prompt_embeds"]
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        with compute_context(x.device, self.compute_dtype(x.device)):
            out = self.transformer(
                hidden_states=pack_latents(x).to(p.dtype), timestep=t.float() / 1000.0,  # float32, as the pipeline
                guidance=guidance, pooled_projections=cond["pooled"].to(p.dtype),
                encoder_hidden_states=emb.to(p.dtype),
                txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=p.dtype),
                img_ids=image_ids(h, w, x.device).to(p.dtype), return_dict=False)[0]
        return unpack_latents(upcast(out), h, w)


class FluxBackbone(FlowMatchingBackbone):
    """FLUX.1 (``FluxTransformer2DModel`` + 16-channel ``AutoencoderKL`` + CLIP-L pooled + T5-XXL).

    Args:
        model: local diffusers folder (``black-forest-labs/FLUX.1-dev`` downloaded with ``hf
            download``), or a hub id present in the local Hugging Face cache.
        guidance_scale: the distilled guidance embedding's value (FLUX.1-dev default 3.5; no CFG,
            one forward pass per row). Ignored by models without the embedding (schnell).
        max_sequence_length: T5 tokens (dev 512, schnell 256).
        options: height, width (default 1024; multiples of 16), dtype, weights_dtype, vae_dtype,
            vae_batch_size, gradient_checkpointing, variant, scheduler_overrides, revision,
            cache_dir, name: as in :class:`~ntrk_lightning.backbones.sd3.SD3Backbone`.
    """

    components = FLUX_COMPONENTS
    kind = "flux"
    _hint_repo = "black-forest-labs/FLUX.1-dev"

    def __init__(self, model: str, guidance_scale: float = 3.5, max_sequence_length: int = 512,
                 **options: Any) -> None:
        super().__init__(model, max_sequence_length=max_sequence_length, **options)
        self.guidance_scale = checked_guidance_scale(guidance_scale)
        self.guidance_embeds = bool(self.transformer_config.get("guidance_embeds", False))
        self.text_encoder: Optional[nn.Module] = None
        self.text_encoder_2: Optional[nn.Module] = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None

    def _patch_size(self) -> int:
        return 2  # 2 x 2 packing (the transformer's own patch_size is 1)

    def _default_size(self) -> int:
        return 128 * self.vae_scale_factor  # diffusers' FluxPipeline.default_sample_size

    def _packing(self) -> int:
        return 4

    def _transformer_class(self) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def _scheduler_class(self) -> Any:
        return flux_scheduler_class()

    def _load_text(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.text_encoder = self._text_encoder(CLIPTextModel, "text_encoder")
        self.text_encoder_2 = self._text_encoder(T5EncoderModel, "text_encoder_2")
        self.tokenizer = self._load_tokenizer("tokenizer")
        self.tokenizer_2 = self._load_tokenizer("tokenizer_2", AutoTokenizer)
        checks = (("pooled_projection_dim", self.text_encoder.config.hidden_size, "CLIP pooled"),
                  ("joint_attention_dim", self.text_encoder_2.config.d_model, "T5"))
        for field, got, what in checks:
            expected = int(getattr(self.transformer.config, field))
            if int(got) != expected:
                raise ValueError(f"{self.folder}: the transformer expects {expected}-d {what} embeddings but the "
                                 f"text encoder gives {got}; the folder mixes components of different models")

    def _velocity_net(self) -> nn.Module:
        g = self.guidance_scale if bool(self.transformer.config.guidance_embeds) else None
        return FluxVelocity(self.transformer, g, self.compute_dtype)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        dev = self.device
        with torch.no_grad(), compute_context(dev, self.compute_dtype(dev)):
            pooled = self.text_encoder(self._tokens(self.tokenizer, prompts, self.tokenizer.model_max_length)).pooler_output
            t5 = self.text_encoder_2(self._tokens(self.tokenizer_2, prompts, self.max_sequence_length))[0]
        return {"prompt_embeds": upcast(t5), "pooled": upcast(pooled)}

    def conditioning(self, prompts: Sequence[str]) -> Any:
        """A dict (``prompt_embeds`` (B, L, D) from T5, ``pooled`` (B, P) from CLIP), batched along dim 0."""
        return self._prompt_embeddings(prompts)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "guidance_scale": self.guidance_scale,
                "guidance_embeds": self.guidance_embeds}
