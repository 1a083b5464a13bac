"""``ntrk_lightning.from_diffusers(pipe)``: NTRK on a diffusers pipeline you have already loaded.

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16).to("cuda")
    sd = ntrk_lightning.from_diffusers(pipe)
    res = sd.sample(["a photo of a cat"] * 4, reward, ntrk_lightning.NTRK(), num_steps=25, seed=0)

The result wraps the project's backbone for the pipeline's family, built from the pipeline's own
modules: its UNet, VAE, text encoders and tokenizers are *the same objects* (no reload, no copy;
they are switched to eval mode with ``requires_grad`` off, as for inference). What
:func:`ntrk_lightning.sample` takes is then ``sd.model`` (a ``DiffusionModel``: classifier-free
guided denoiser, differentiable VAE decode, latent shape), ``sd.scheduler`` (a ``DDIMScheduler``
from the pipeline's scheduler config: the core needs its noise-injection point, whatever sampler
the pipeline was configured with) and ``sd.conditioning(prompts)``.

Supported: ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline`` and ``FluxPipeline`` (for the flow-matching two, ``sd.scheduler`` is a
``FlowMatchEulerDiscreteScheduler`` from the pipeline's config: the core runs its own stochastic
step on its sigma schedule). Other families plug in with :func:`register_pipeline` (pipeline class name -> a function building a
:class:`~ntrk_lightning.backbones.base.Backbone` from the pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.backbones.flux import FluxBackbone
from ntrk_lightning.backbones.sd3 import SD3Backbone
from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone
from ntrk_lightning.denoiser import DiffusionModel

#: options of the folder backbones that name files; a loaded pipeline has its modules already
_FILE_OPTIONS = ("model", "vae", "variant", "revision", "cache_dir")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class _OnPipeline:
    """Mixin: a backbone built on a loaded pipeline instead of a folder. Its ``model`` option is
    the pipeline's name; configs and modules come from the pipeline (everything else, the
    adapters, guidance and decode, is the backbone's)."""

    _pipe: Any

    def __init__(self, pipe: Any, **options: Any) -> None:
        self._pipe = pipe
        super().__init__(model=str(getattr(pipe, "name_or_path", None) or type(pipe).__name__), **options)

    def _load_tokenizer(self, sub: str, cls: Any = None) -> Any:
        return getattr(self._pipe, sub)


class _FromPipeline(_OnPipeline):
    """The Stable Diffusion backbones' configs and modules from a loaded pipeline."""

    def _locate(self, model: str, vae: Optional[str], variant: Optional[str], revision: Optional[str],
                cache_dir: Optional[str]) -> None:
        pipe = self._pipe
        self.folder = Path(getattr(pipe, "name_or_path", None) or f"<{type(pipe).__name__}>")
        self.vae_folder = None
        self.unet_config = dict(pipe.unet.config)
        self.vae_config = dict(pipe.vae.config)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.model_index = dict(pipe.config)

    def _from_pretrained(self, cls: Any, sub: str, folder: Optional[Path] = None, **kw: Any) -> Any:
        return getattr(self._pipe, sub)  # the pipeline's own module: shared, never copied


class PipelineStableDiffusionBackbone(_FromPipeline, StableDiffusionBackbone):
    """:class:`StableDiffusionBackbone` on a loaded ``StableDiffusionPipeline``."""


class PipelineStableDiffusionXLBackbone(_FromPipeline, StableDiffusionXLBackbone):
    """:class:`StableDiffusionXLBackbone` on a loaded ``StableDiffusionXLPipeline``."""


class _FlowFromPipeline(_OnPipeline):
    """The same for the flow-matching backbones (SD3, FLUX): a ``transformer`` instead of a UNet."""

    def _locate(self, model: str, variant: Optional[str], revision: Optional[str], cache_dir: Optional[str]) -> None:
        pipe = self._pipe
        self.folder = Path(getattr(pipe, "name_or_path", None) or f"<{type(pipe).__name__}>")
        self.model_index = dict(pipe.config)
        self._components()  # SD3: decides use_t5 from the pipeline's components
        self.transformer_config = dict(pipe.transformer.config)
        self.vae_config = dict(pipe.vae.config)
        self.scheduler_config = dict(pipe.scheduler.config)

    def _from_pretrained(self, cls: Any, sub: str, **kw: Any) -> Any:
        return getattr(self._pipe, sub)


class PipelineSD3Backbone(_FlowFromPipeline, SD3Backbone):
    """:class:`SD3Backbone` on a loaded ``StableDiffusion3Pipeline``."""


class PipelineFluxBackbone(_FlowFromPipeline, FluxBackbone):
    """:class:`FluxBackbone` on a loaded ``FluxPipeline``."""


def _sd_options(pipe: Any, options: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k in _FILE_OPTIONS if k in options]
    if bad:
        raise TypeError(f"from_diffusers: {', '.join(bad)} name files; the pipeline's modules are used as they are")
    opts = dict(options)
    # the pipeline's weights stay in the type they were loaded in (no cast, no copy)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    opts.setdefault("weights_dtype", _DTYPE_NAMES.get(denoiser.dtype, "float32"))
    opts.setdefault("name", Path(str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)).name)
    return opts


def _build_sd(pipe: Any, options: dict[str, Any]) -> Backbone:
    return PipelineStableDiffusionBackbone(pipe, **_sd_options(pipe, options))


def _build_sdxl(pipe: Any, options: dict[str, Any]) -> Backbone:
    return PipelineStableDiffusionXLBackbone(pipe, **_sd_options(pipe, options))


def _build_sd3(pipe: Any, options: dict[str, Any]) -> Backbone:
    return PipelineSD3Backbone(pipe, **_sd_options(pipe, options))


def _build_flux(pipe: Any, options: dict[str, Any]) -> Backbone:
    return PipelineFluxBackbone(pipe, **_sd_options(pipe, options))


#: pipeline class name -> builder of a loaded backbone sharing the pipeline's modules
_BUILDERS: dict[str, Callable[[Any, dict[str, Any]], Backbone]] = {
    "StableDiffusionPipeline": _build_sd,
    "StableDiffusionXLPipeline": _build_sdxl,
    "StableDiffusion3Pipeline": _build_sd3,
    "FluxPipeline": _build_flux,
}


def register_pipeline(class_name: str, build: Callable[[Any, dict[str, Any]], Backbone]) -> None:
    """Teach :func:`from_diffusers` a pipeline family: ``build(pipe, options)`` returns a
    :class:`Backbone` whose ``load()`` takes the pipeline's modules (e.g. SD3 / FLUX backbones)."""
    _BUILDERS[class_name] = build


def supported_pipelines() -> list[str]:
    return sorted(_BUILDERS)


class DiffusersModel:
    """What ``from_diffusers`` returns: everything :func:`ntrk_lightning.sample` needs.

    Attributes:
        backbone: the loaded backbone (an ``nn.Module`` whose submodules are the pipeline's).
        model: the ``DiffusionModel`` for ``sample()`` (guided denoiser, decode, latent shape).
        scheduler: a ``DDIMScheduler`` from the pipeline's scheduler config (``sample()`` copies it).
    """

    def __init__(self, backbone: Backbone, pipe: Any) -> None:
        self.backbone = backbone
        self.pipeline = pipe
        self.model: DiffusionModel = backbone.model()
        self.scheduler = backbone.make_scheduler()

    def conditioning(self, prompts: Sequence[str]) -> Any:
        """The denoiser's conditioning for a batch of prompts (batched along dim 0)."""
        return self.backbone.conditioning(list(prompts))

    def sample(self, prompts: Sequence[str], reward: Optional[Callable[..., torch.Tensor]], sampler: Any = None,
               num_steps: int = 25, seed: Union[int, Sequence[int]] = 0, **kwargs: Any) -> Any:
        """:func:`ntrk_lightning.sample` for one image per prompt (``seed``: an int, or one per prompt)."""
        from ntrk_lightning.api import sample

        prompts = list(prompts)
        return sample(self.model, self.scheduler, reward, sampler, num_steps,
                      shape=(len(prompts), *self.model.sample_shape), seed=seed,
                      cond=self.conditioning(prompts), prompts=prompts, **kwargs)

    def __repr__(self) -> str:
        return f"DiffusersModel({type(self.pipeline).__name__}, backbone={type(self.backbone).__name__})"


def from_diffusers(pipe: Any, **options: Any) -> DiffusersModel:
    """Wrap an already-loaded diffusers pipeline for :func:`ntrk_lightning.sample`.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or a family added with
            :func:`register_pipeline`). Its modules are shared, not copied.
        options: options of the family's backbone, e.g. ``guidance_scale``, ``negative_prompt``,
            ``height``/``width``, ``dtype`` (compute precision), ``vae_batch_size``,
            ``gradient_checkpointing`` (see :class:`~ntrk_lightning.backbones.StableDiffusionBackbone`).

    Raises:
        ValueError: the pipeline's class is not supported (the message names it).
    """
    names = [c.__name__ for c in type(pipe).__mro__]
    build = next((_BUILDERS[n] for n in names if n in _BUILDERS), None)
    if build is None:
        raise ValueError(f"from_diffusers: {type(pipe).__name__} is not supported (supported: "
                         f"{', '.join(supported_pipelines())}; add a family with "
                         "ntrk_lightning.diffusers_adapter.register_pipeline)")
    backbone = build(pipe, options)
    backbone.load()
    return DiffusersModel(backbone, pipe)
