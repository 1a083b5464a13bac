"""Stable Diffusion 3 / 3.5 from a local diffusers folder, as a flow-matching backbone of the core;
and :class:`FlowMatchingBackbone`, what SD3 and FLUX (:mod:`ntrk_lightning.backbones.flux`) share.

    backbone = SD3Backbone("/models/stable-diffusion-3-medium-diffusers")   # or a cached hub id
    backbone.load()                                                         # local files only
    model, scheduler = backbone.model(), backbone.make_scheduler()          # FlowMatchEulerDiscreteScheduler
    cond = backbone.conditioning(["a photo of a cat"] * 4)                  # (cond, uncond)
    res = ntrk_lightning.sample(model, scheduler, reward, NTRK(), 25, seed=[0, 1, 2, 3], cond=cond,
                                prompts=["a photo of a cat"] * 4)

What the core sees (rectified flow, x_t = (1 - s) x0 + s eps with s = sigma in [0, 1]):

* the state is the VAE latent (16, H/8, W/8), float32;
* the denoiser is the velocity ``v = f(x_t, t, cond)`` in diffusers' convention ``v = eps - x0``,
  with ``t`` the scheduler's timesteps (``sigma * 1000``), one per row. SD3 takes classifier-free
  guidance on the velocity, ``v_u + s (v_c - v_u)``, both branches in one batch of 2B rows (one
  NFE per sample and step, as for SD);
* ``decode`` is the VAE decoder of ``latents / scaling_factor + shift_factor`` mapped to [0, 1]
  (differentiable; ``vae_batch_size`` slices it);
* ``make_scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` from the model's scheduler config with
  the shift made static: SD3's config has ``shift=3.0``; a resolution-dependent config
  (``use_dynamic_shifting``) gets ``shift = exp(mu)`` for this backbone's image size, which gives
  the same sigmas (``exp(mu) s / (exp(mu) s + 1 - s)`` is the static shift formula), so the core
  only calls ``set_timesteps(num_steps)``.

Text encoders (SD3): CLIP-L and CLIP-G (penultimate hidden states, concatenated and zero-padded to
the T5 width; pooled projections concatenated) and T5-XXL (last hidden state, ``max_sequence_length``
tokens), the two sequences concatenated. As in diffusers, T5 may be absent (``model_index.json``
has no ``text_encoder_3``, or ``use_t5=False`` to save its ~9 GB): its embeddings are then zeros.
The negative prompt (default ``""``) is encoded, not zeroed (SD3's pipeline does the same).

Precision: weights stored in ``weights_dtype``; the transformer and text encoders run under
autocast to ``dtype`` (``auto``: bfloat16 on CUDA — what SD3 and FLUX are released and run in;
float16 overflows in T5 and FLUX — float32 elsewhere); the VAE in ``vae_dtype`` (``auto``:
``dtype``, float32 when its config sets ``force_upcast`` and ``dtype`` is float16).
``gradient_checkpointing`` recomputes transformer and VAE-decoder activations in the backward
pass of the reward gradient.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ntrk_lightning.backbones.base import check_prompts
from ntrk_lightning.backbones.stable_diffusion import (_DTYPES, DTypeName, LatentBackbone, _read_json, _stack,
                                                        check_pipeline_folder, checked_guidance_scale, compute_context,
                                                        load_component, load_tokenizer, resolve_model_folder, upcast)
from ntrk_lightning.denoiser import ClassifierFreeGuidance, DiffusionModel

WeightsDType = Literal["float32", "float16", "bfloat16"]
#: longest T5 prompt the flow backbones accept (FLUX.1-dev's pipeline default)
MAX_T5_TOKENS = 512

SD3_COMPONENTS = {"transformer": "diffusers", "vae": "diffusers", "text_encoder": "transformers",
                  "tokenizer": "tokenizer", "text_encoder_2": "transformers", "tokenizer_2": "tokenizer",
                  "scheduler": "scheduler"}
SD3_T5_COMPONENTS = {"text_encoder_3": "transformers", "tokenizer_3": "t5_tokenizer"}


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """``mu`` of the resolution-dependent shift: linear in the image token count between
    (base_seq_len, base_shift) and (max_seq_len, max_shift) — the FLUX / SD3 pipelines' rule."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def static_flow_scheduler_config(config: dict[str, Any], image_seq_len: int, cls: Any) -> dict[str, Any]:
    """The scheduler config with any resolution-dependent shift baked into a static ``shift``:
    ``shift = exp(mu)`` with ``use_dynamic_shifting=False`` (identical sigmas for exponential time
    shifting). Only fields ``cls`` knows are kept."""
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in config.items() if k in allowed}
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"time_shift_type {cfg.get('time_shift_type')!r} is not supported (only 'exponential' "
                             "resolution-dependent shifting can be made static)")
        mu = calculate_shift(image_seq_len, int(cfg.get("base_image_seq_len", 256)),
                             int(cfg.get("max_image_seq_len", 4096)), float(cfg.get("base_shift", 0.5)),
                             float(cfg.get("max_shift", 1.15)))
        cfg.update(shift=math.exp(mu), use_dynamic_shifting=False)
    if cfg.get("stochastic_sampling"):
        cfg["stochastic_sampling"] = False  # the core supplies its own noise
    return cfg


class FlowMatchingBackbone(LatentBackbone):
    """What SD3 and FLUX share: a local diffusers pipeline folder with a ``transformer/``, a VAE
    with scaling and shift factors, a flow-matching scheduler config, precision, gradient
    checkpointing, sliced decode, and per-prompt conditioning caches. Subclasses define
    ``components``, ``_load_text``, ``_encode``, ``_velocity_net`` and the image token count."""

    components: dict[str, str] = {}
    kind = "flow"
    cuda_auto_dtype = torch.bfloat16  # what SD3 and FLUX are released and run in
    _hint_repo = ""

    def __init__(self, model: str, height: Optional[int] = None, width: Optional[int] = None,
                 dtype: DTypeName = "auto", weights_dtype: WeightsDType = "float32", vae_dtype: DTypeName = "auto",
                 vae_batch_size: Optional[int] = None, gradient_checkpointing: bool = False,
                 variant: Optional[str] = None, max_sequence_length: int = 256,
                 scheduler_overrides: Optional[dict[str, Any]] = None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, name: Optional[str] = None) -> None:
        super().__init__()
        self.source = model
        self._locate(model, variant, revision, cache_dir)
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.latent_channels = int(self.vae_config.get("latent_channels", 16))
        #: latent side must be a multiple of this (the transformer's patch, FLUX's 2 x 2 packing)
        self._latent_multiple = self._patch_size()
        unit = self.vae_scale_factor * self._latent_multiple
        self._set_size(height, width, self._default_size(), unit,
                       f"{unit} (VAE scale factor {self.vae_scale_factor} x patch {self._latent_multiple})")
        self._set_runtime_options(dtype, weights_dtype, vae_dtype, vae_batch_size, gradient_checkpointing, variant)
        if not 1 <= int(max_sequence_length) <= MAX_T5_TOKENS:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_TOKENS}] (T5 tokens), got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self.scheduler_overrides = dict(scheduler_overrides or {})
        self.name = name or self.folder.resolve().name
        self.transformer: Optional[nn.Module] = None
        self.vae: Optional[nn.Module] = None
        self.velocity_net: Optional[nn.Module] = None
        self.make_scheduler()  # a scheduler config the core cannot use fails now

    def _locate(self, model: str, variant: Optional[str], revision: Optional[str], cache_dir: Optional[str]) -> None:
        """Set ``folder`` and the configs (``model_index``, ``transformer_config``, ``vae_config``,
        ``scheduler_config``) from local files. ``from_diffusers`` overrides this to take them from
        an already-loaded pipeline."""
        self.folder = resolve_model_folder(model, revision, cache_dir, self._hint_repo)
        self.model_index = _read_json(self.folder / "model_index.json") if (self.folder / "model_index.json").is_file() \
            else {}
        check_pipeline_folder(self.folder, self._components(), variant, self._hint_repo)
        # configs are small: read them now, so a wrong size or option fails before any weights load
        self.transformer_config = _read_json(self.folder / "transformer" / "config.json")
        self.vae_config = _read_json(self.folder / "vae" / "config.json")
        self.scheduler_config = _read_json(self.folder / "scheduler" / "scheduler_config.json")

    # ---- subclass hooks ------------------------------------------------------------------------
    def _components(self) -> dict[str, str]:
        return dict(self.components)

    def _patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    def _default_size(self) -> int:
        return int(self.transformer_config.get("sample_size", 128)) * self.vae_scale_factor

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (what a resolution-dependent shift depends on)."""
        f, p = self.vae_scale_factor, self._latent_multiple
        return (self.height // f // p) * (self.width // f // p)

    def _load_text(self) -> None:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _velocity_net(self) -> nn.Module:
        raise NotImplementedError

    # ---- loading -------------------------------------------------------------------------------
    def _from_pretrained(self, cls: Any, sub: str, **kw: Any) -> nn.Module:
        return load_component(cls, self.folder, sub, self.variant, **kw)

    def _text_encoder(self, cls: Any, sub: str) -> nn.Module:
        """A transformers text encoder stored in ``weights_dtype`` (read in that type: T5-XXL is
        19 GB in float32)."""
        return self._from_pretrained(cls, sub, dtype=_DTYPES[self.weights_dtype_name])

    def _load_tokenizer(self, sub: str, cls: Any = None) -> Any:
        return load_tokenizer(self.folder / sub, cls)

    def _transformer_class(self) -> Any:
        raise NotImplementedError

    def _load(self) -> None:
        from diffusers import AutoencoderKL

        w = _DTYPES[self.weights_dtype_name]
        self.transformer = self._from_pretrained(self._transformer_class(), "transformer", torch_dtype=w)
        self.vae = self._from_pretrained(AutoencoderKL, "vae", torch_dtype=torch.float32)
        if int(self.vae.config.latent_channels) * self._packing() != int(self.transformer.config.in_channels):
            raise ValueError(f"{self.folder}: the transformer takes {self.transformer.config.in_channels} input "
                             f"channels but the VAE gives {self.vae.config.latent_channels} latent channels; the "
                             "folder mixes components of different models")
        self._load_text()
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing(self._checkpoint)
            self.vae.enable_gradient_checkpointing(self._checkpoint)
        self.velocity_net = self._velocity_net()
        self._embed_cache.clear()

    def _packing(self) -> int:
        """Transformer input channels per latent channel (FLUX packs 2 x 2 patches: 4)."""
        return 1

    # ---- the core's interface -----------------------------------------------------------------
    def _denoiser(self) -> Callable[..., Tensor]:
        return self.velocity_net

    def model(self) -> DiffusionModel:
        if self.velocity_net is None:
            raise RuntimeError("call load() first")
        return DiffusionModel(denoiser=self._denoiser(), decode=self.decode, sample_shape=self.sample_shape,
                              name=self.name, meta=self.describe())

    def _scheduler_class(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def make_scheduler(self) -> Any:
        """A fresh ``FlowMatchEulerDiscreteScheduler`` from the model's config, the shift static
        (see the module docstring); ``scheduler_overrides`` win."""
        cls = self._scheduler_class()
        cfg = static_flow_scheduler_config(self.scheduler_config, self.image_seq_len(), cls)
        import inspect

        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(self.scheduler_overrides) - allowed
        if unknown:
            raise ValueError(f"scheduler_overrides has fields {cls.__name__} does not know: {sorted(unknown)}")
        cfg.update(self.scheduler_overrides)
        if cfg.get("use_dynamic_shifting"):
            raise ValueError("scheduler_overrides cannot turn on use_dynamic_shifting: the backbone makes the shift "
                             "static for its image size (set `shift` instead)")
        return cls(**cfg)

    # ---- conditioning ---------------------------------------------------------------------------
    def _tokens(self, tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)

    def _embedding_owner(self) -> Optional[nn.Module]:
        return self.transformer

    def _prompt_embeddings(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if self.velocity_net is None:
            raise RuntimeError("call load() first")
        prompts = check_prompts(prompts, len(prompts))
        if not prompts:
            raise ValueError("conditioning needs at least one prompt")
        return _stack(self._embeddings(prompts))

    def describe(self) -> dict[str, Any]:
        sched = self.make_scheduler()
        return {
            "name": self.name, "kind": self.kind, "model": str(self.folder), "source": self.source,
            "variant": self.variant, "height": self.height, "width": self.width,
            "latent_shape": list(self.sample_shape), "dtype": self.dtype_name,
            "weights_dtype": self.weights_dtype_name, "vae_dtype": self.vae_dtype_name,
            "vae_batch_size": self.vae_batch_size, "gradient_checkpointing": self.gradient_checkpointing,
            "max_sequence_length": self.max_sequence_length,
            "scheduler": {"class": type(sched).__name__, "shift": float(sched.config.shift),
                          "overrides": dict(self.scheduler_overrides)},
        }


class SD3Velocity(nn.Module):
    """``v = f(x_t, t, cond)`` around an ``SD3Transformer2DModel`` (one branch, no guidance);
    ``cond`` is a dict with ``prompt_embeds`` (B, L, D) and ``pooled`` (B, P). Float32 out."""

    def __init__(self, transformer: nn.Module, compute_dtype: Callable[[torch.device], torch.dtype]) -> None:
        super().__init__()
        self.transformer = transformer
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        w = next(self.transformer.parameters())
        with compute_context(x.device, self.compute_dtype(x.device)):
            # the timestep stays float32 (as the pipeline passes it): bfloat16 would round 900.4 to 900
            out = self.transformer(hidden_states=x.to(w.dtype), timestep=t.float(),
                                   encoder_hidden_states=cond["prompt_embeds"].to(w.dtype),
                                   pooled_projections=cond["pooled"].to(w.dtype), return_dict=False)[0]
        return upcast(out)


class GuidedVelocity(nn.Module):
    """Classifier-free guidance on the velocity, ``v_u + s (v_c - v_u)``, as an ``nn.Module`` (so
    ``sample()`` finds its device); the conditioning is the backbone's ``(cond, uncond)`` pair."""

    def __init__(self, velocity: nn.Module, guidance_scale: float) -> None:
        super().__init__()
        self.velocity = velocity
        self.guidance_scale = float(guidance_scale)
        self._cfg = ClassifierFreeGuidance(velocity, self.guidance_scale)

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self._cfg(x, t, cond)


class SD3Backbone(FlowMatchingBackbone):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel`` + 16-channel ``AutoencoderKL`` + CLIP-L,
    CLIP-G and T5 text encoders), a rectified-flow model.

    Args:
        model: local diffusers folder (e.g. ``stabilityai/stable-diffusion-3-medium-diffusers``
            downloaded with ``hf download``), or a hub id present in the local Hugging Face cache.
        guidance_scale: classifier-free guidance scale on the velocity (1 = conditional only).
        negative_prompt: the unconditional branch's prompt (default ``""``, encoded).
        use_t5: read the T5 encoder (``None``: when the folder has one). Without it the T5 part of
            the prompt embeddings is zeros, as in diffusers (quality drops on long prompts).
        options: the options of :class:`FlowMatchingBackbone` — height, width (default: the
            transformer's ``sample_size`` x 8, 1024 for SD3-medium; multiples of 16),
            max_sequence_length (T5 tokens, SD3's pipeline default 256), dtype, weights_dtype,
            vae_dtype, vae_batch_size, gradient_checkpointing, variant, scheduler_overrides,
            revision, cache_dir, name: as in
            :class:`~ntrk_lightning.backbones.stable_diffusion.StableDiffusionBackbone`
            (``dtype="auto"`` is bfloat16 on CUDA here).
    """

    components = SD3_COMPONENTS
    kind = "sd3"
    _hint_repo = "stabilityai/stable-diffusion-3-medium-diffusers"

    def __init__(self, model: str, guidance_scale: float = 7.0, negative_prompt: Optional[str] = None,
                 use_t5: Optional[bool] = None, **options: Any) -> None:
        self._use_t5_arg = use_t5
        super().__init__(model, **options)
        self.guidance_scale = checked_guidance_scale(guidance_scale)
        max_grid = self.transformer_config.get("pos_embed_max_size")
        if max_grid:  # SD3 crops a fixed grid of position embeddings: larger images cannot run
            limit = int(max_grid) * self._latent_multiple * self.vae_scale_factor
            for what, v in (("height", self.height), ("width", self.width)):
                if v > limit:
                    raise ValueError(f"{what} {v} exceeds what the transformer's position embedding covers ({limit})")
        self.negative_prompt = negative_prompt
        self.joint_attention_dim = int(self.transformer_config.get("joint_attention_dim", 4096))
        self.text_encoder: Optional[nn.Module] = None
        self.text_encoder_2: Optional[nn.Module] = None
        self.text_encoder_3: Optional[nn.Module] = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self.tokenizer_3: Any = None

    def _folder_has_t5(self) -> bool:
        entry = self.model_index.get("text_encoder_3")
        return bool(entry) and entry[0] is not None

    def _components(self) -> dict[str, str]:
        use_t5 = self._use_t5_arg if self._use_t5_arg is not None else self._folder_has_t5()
        self.use_t5 = bool(use_t5)
        if self.use_t5 and not self._folder_has_t5() and self.model_index:
            raise FileNotFoundError(f"{self.folder}/model_index.json names no T5 encoder (text_encoder_3): pass "
                                    "use_t5=false, or a folder with text_encoder_3/ and tokenizer_3/")
        return {**SD3_COMPONENTS, **(SD3_T5_COMPONENTS if self.use_t5 else {})}

    def _transformer_class(self) -> Any:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def _load_text(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        self.text_encoder = self._text_encoder(CLIPTextModelWithProjection, "text_encoder")
        self.text_encoder_2 = self._text_encoder(CLIPTextModelWithProjection, "text_encoder_2")
        self.tokenizer = self._load_tokenizer("tokenizer")
        self.tokenizer_2 = self._load_tokenizer("tokenizer_2")
        if self.use_t5:
            self.text_encoder_3 = self._text_encoder(T5EncoderModel, "text_encoder_3")
            self.tokenizer_3 = self._load_tokenizer("tokenizer_3", AutoTokenizer)
        pooled = int(self.text_encoder.config.projection_dim) + int(self.text_encoder_2.config.projection_dim)
        expected = int(self.transformer.config.pooled_projection_dim)
        if pooled != expected:
            raise ValueError(f"{self.folder}: the transformer expects {expected}-d pooled text embeddings but the two "
                             f"CLIP encoders give {pooled}; the folder mixes components of different models")

    def _velocity_net(self) -> nn.Module:
        return SD3Velocity(self.transformer, self.compute_dtype)

    def _denoiser(self) -> Callable[..., Tensor]:
        return GuidedVelocity(self.velocity_net, self.guidance_scale)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        dev = self.device
        hidden, pooled = [], []
        with torch.no_grad(), compute_context(dev, self.compute_dtype(dev)):
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = enc(self._tokens(tok, prompts, tok.model_max_length), output_hidden_states=True)
                hidden.append(upcast(out.hidden_states[-2]))  # SD3 conditions on the penultimate layer
                pooled.append(upcast(out.text_embeds))
            if self.text_encoder_3 is not None:
                t5 = upcast(self.text_encoder_3(self._tokens(self.tokenizer_3, prompts, self.max_sequence_length))[0])
            else:  # as diffusers without T5: zeros in its place
                t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=dev)
        clip = torch.cat(hidden, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def conditioning(self, prompts: Sequence[str]) -> Any:
        """``(cond, uncond)`` dicts (``prompt_embeds``, ``pooled``), batched along dim 0."""
        cond = self._prompt_embeddings(prompts)
        neg = self._embeddings([self.negative_prompt or ""])[0]
        return cond, _stack([neg] * len(prompts))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
                "use_t5": self.use_t5}
