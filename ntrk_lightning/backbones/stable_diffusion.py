"""Stable Diffusion 1.x / 2.x and SDXL from local diffusers folders, as backbones of the core.

    backbone = StableDiffusionBackbone("/models/stable-diffusion-v1-5")    # or a cached hub id
    backbone.load()                                                        # local files only
    model, scheduler = backbone.model(), backbone.make_scheduler()
    cond = backbone.conditioning(["a photo of a cat"] * 4)                 # (cond, uncond)
    res = ntrk_lightning.sample(model, scheduler, reward, NTRK(), 25, seed=[0, 1, 2, 3], cond=cond,
                                prompts=["a photo of a cat"] * 4)

What the core sees (the denoiser interface of ntrk_lightning.denoiser):

* the state is the VAE latent (4, H/8, W/8), kept in float32 (the scheduler's arithmetic);
* the denoiser is classifier-free guidance over the ``UNet2DConditionModel``: ``eps_u + s (eps_c -
  eps_u)``, both branches in one batch of 2B rows (one NFE per sample and step). A v-prediction
  model (SD 2.x 768) is converted to epsilon inside the adapter, ``eps = sqrt(abar) v + sqrt(1 -
  abar) x``, so the scheduler is always an epsilon ``DDIMScheduler``;
* ``decode`` is the VAE decoder of ``latents / scaling_factor`` mapped to [0, 1]: differentiable,
  so a reward's gradient flows through the decoder to the latents (NTRK, DPS); ``vae_batch_size``
  decodes in chunks to bound memory;
* the conditioning of a batch is a pair ``(cond, uncond)`` of prompt embeddings (SD 1.x/2.x: a
  tensor (B, 77, D); SDXL: a dict with ``prompt_embeds``, the pooled ``text_embeds`` and the six
  ``time_ids``), created on the backbone's device and cached per prompt.

Precision: weights are stored in ``weights_dtype`` (float32 by default) and the UNet and text
encoders run under ``torch.autocast`` with ``dtype`` (``auto``: float16 on CUDA, float32
elsewhere); the VAE runs in ``vae_dtype`` (``auto``: float32 when the VAE's config asks for it —
SDXL's VAE overflows in float16 — else ``dtype``). float32 switches autocast *off*, so a
``--trainer.precision 16-mixed`` around the predict step cannot override the backbone's choice;
keep the trainer at its default ``32-true`` and set the backbone's ``dtype`` (docs/cluster.md).
``gradient_checkpointing`` recomputes UNet and VAE-decoder activations in the backward pass of the
reward gradient (diffusers 0.42 checkpoints whenever grad mode is on, in eval mode too).

Offline: ``model`` is a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id already in the local Hugging Face
cache; weights are read with ``local_files_only=True`` (safetensors preferred; ``.bin`` files are
read with ``weights_only``), nothing is downloaded, no remote code runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ntrk_lightning.backbones.base import Backbone, check_prompts
from ntrk_lightning.denoiser import ClassifierFreeGuidance, DiffusionModel

DTypeName = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: weight files diffusers / transformers read (``{v}``: ``.<variant>`` or nothing)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.safetensors.index.json",
                      "diffusion_pytorch_model{v}.bin", "diffusion_pytorch_model{v}.bin.index.json")
_TRANSFORMERS_WEIGHTS = ("model{v}.safetensors", "model{v}.safetensors.index.json", "pytorch_model{v}.bin",
                         "pytorch_model{v}.bin.index.json")
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_T5_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))

#: what each backbone needs: subfolder -> kind
SD_COMPONENTS = {"unet": "diffusers", "vae": "diffusers", "text_encoder": "transformers", "tokenizer": "tokenizer",
                 "scheduler": "scheduler"}
SDXL_COMPONENTS = {**SD_COMPONENTS, "text_encoder_2": "transformers", "tokenizer_2": "tokenizer"}


def _download_hint(repo: str) -> str:
    return (f"On a machine with internet run `hf download {repo} --local-dir DIR` (older huggingface_hub: "
            "`huggingface-cli download ...`; add `--include` patterns to skip files you do not need), copy DIR to "
            "the cluster and pass it (--model.init_args.backbone.init_args.model DIR).")


def _dtype_or_auto(name: str, what: str) -> str:
    if name != "auto" and name not in _DTYPES:
        raise ValueError(f"{what} must be one of 'auto', 'float32', 'float16', 'bfloat16', got {name!r}")
    return name


def upcast(x: Tensor) -> Tensor:
    """Half-precision outputs to float32 (float64 stays: a backbone cast to double, e.g. for a
    finite-difference check, keeps its precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def compute_context(device: torch.device, dtype: torch.dtype) -> ContextManager[Any]:
    """Autocast to ``dtype`` on ``device``; float32 switches autocast off (an outer autocast, e.g.
    Lightning's ``16-mixed``, does not lower it)."""
    try:
        if dtype == torch.float32:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=dtype)
    except RuntimeError:  # a device type without autocast: run as stored
        return contextlib.nullcontext()


def resolve_model_folder(model: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                         hint_repo: str = "stable-diffusion-v1-5/stable-diffusion-v1-5") -> Path:
    """A local diffusers folder for ``model``: the folder itself, or the snapshot of a hub id in
    the local Hugging Face cache (never downloads). A clear ``FileNotFoundError`` otherwise."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a local diffusers folder or a hub id in the local Hugging Face cache")
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    looks_like_id = (model.count("/") == 1 and not model.startswith((".", "/", "~")) and not p.suffix)
    if looks_like_id:
        from huggingface_hub import constants, snapshot_download

        try:
            return Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except Exception:
            cache = cache_dir or constants.HF_HUB_CACHE
            raise FileNotFoundError(
                f"{model!r} is not a local folder and not in the local Hugging Face cache ({cache}); nothing is "
                f"downloaded at run time. {_download_hint(model)}") from None
    raise FileNotFoundError(f"diffusers model folder not found: {p}. {_download_hint(hint_repo)}")


def check_pipeline_folder(folder: Path, components: dict[str, str], variant: Optional[str], hint_repo: str) -> None:
    """Every component a backbone reads is present (config + weights), or one clear error."""
    hint = _download_hint(hint_repo)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: {folder / 'model_index.json'} is "
                                f"missing. {hint}")
    v = f".{variant}" if variant else ""
    for sub, kind in components.items():
        d = folder / sub
        if not d.is_dir():
            raise FileNotFoundError(f"{folder} lacks the {sub}/ folder this backbone needs. {hint}")
        if kind in ("diffusers", "transformers"):
            if not (d / "config.json").is_file():
                raise FileNotFoundError(f"missing {d / 'config.json'}. {hint}")
            names = [n.format(v=v) for n in (_DIFFUSERS_WEIGHTS if kind == "diffusers" else _TRANSFORMERS_WEIGHTS)]
            if not any((d / n).is_file() for n in names):
                extra = f" (variant {variant!r}: drop `variant` to use the full-precision files)" if variant else ""
                raise FileNotFoundError(f"no weights in {d}: expected one of {', '.join(names)}{extra}. {hint}")
        elif kind == "tokenizer":
            if not any(all((d / f).is_file() for f in group) for group in _TOKENIZER_FILES):
                raise FileNotFoundError(f"no tokenizer in {d} (tokenizer.json, or vocab.json + merges.txt). {hint}")
        elif kind == "t5_tokenizer":
            if not any(all((d / f).is_file() for f in group) for group in _T5_TOKENIZER_FILES):
                raise FileNotFoundError(f"no T5 tokenizer in {d} (tokenizer.json or spiece.model). {hint}")
        elif kind == "scheduler" and not (d / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"missing {d / 'scheduler_config.json'}. {hint}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def load_component(cls: Any, folder: Path, sub: str, variant: Optional[str] = None, own_folder: Optional[Path] = None,
                   **kw: Any) -> nn.Module:
    """``cls.from_pretrained`` of ``folder/sub`` (or of a separate ``own_folder``), local files only,
    in eval mode; any failure is one ``ValueError`` naming the folder."""
    if "torch_dtype" in kw or cls.__module__.startswith("diffusers"):
        import importlib.util

        # without `accelerate` diffusers falls back to a full init (and says so at every load)
        kw.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    try:
        if own_folder is not None:
            m = cls.from_pretrained(str(own_folder), local_files_only=True, **kw)
        else:
            m = cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, variant=variant, **kw)
    except Exception as e:
        msg = " ".join(str(e).split())[:400]
        raise ValueError(f"cannot load {sub} from {own_folder if own_folder is not None else folder / sub}: "
                         f"{type(e).__name__}: {msg}") from None
    want = kw.get("torch_dtype", kw.get("dtype"))
    if want is not None and not getattr(m, "_keep_in_fp32_modules", None):
        # diffusers 0.42 without `accelerate` leaves some models (SD3's transformer) in float32
        # despite torch_dtype; the storage type is what weights_dtype promises
        if any(p.dtype != want for p in m.parameters() if p.is_floating_point()):
            m = m.to(want)
    return m.eval()


def load_tokenizer(folder: Path, cls: Any = None) -> Any:
    """A tokenizer from a local folder (default class: ``CLIPTokenizer``); one clear error otherwise."""
    if cls is None:
        from transformers import CLIPTokenizer as cls
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from None


def vae_decode(vae: nn.Module, latents: Tensor, dtype: torch.dtype, batch_size: Optional[int] = None) -> Tensor:
    """Images in [0, 1] (float32) of model latents: ``latents / scaling_factor + shift_factor``
    (SD3 / FLUX VAEs have a shift; SD's has none) through ``vae.decode`` under autocast to
    ``dtype``, at most ``batch_size`` latents at once (memory). Differentiable."""
    cfg = vae.config
    z = latents / float(cfg.scaling_factor)
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        z = z + float(shift)
    chunk = batch_size or z.shape[0]
    parts = []
    with compute_context(z.device, dtype):
        for piece in z.split(chunk):
            parts.append(upcast(vae.decode(piece, return_dict=False)[0]))
    images = torch.cat(parts) if len(parts) > 1 else parts[0]
    return (images * 0.5 + 0.5).clamp(0.0, 1.0)


class SDEps(nn.Module):
    """``eps = f(x_t, t, cond)`` around a ``UNet2DConditionModel`` (one branch, no guidance).

    ``cond`` is prompt embeddings (B, L, D), or for SDXL a dict with ``prompt_embeds``,
    ``text_embeds`` and ``time_ids``. Runs under autocast to ``compute_dtype`` (a callable of the
    device, so ``auto`` follows the module to the accelerator) and returns float32 epsilon,
    converting v- or x0-predictions.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str,
                 compute_dtype: Callable[[torch.device], torch.dtype]) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self._alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self._abar_cache: dict[str, Tensor] = {}
        self.compute_dtype = compute_dtype

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        key = str(like.device)
        if key not in self._abar_cache:
            self._abar_cache[key] = self._alphas_cumprod.to(like.device, torch.float32)
        return self._abar_cache[key][t.long()].view(-1, *([1] * (like.dim() - 1)))

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if isinstance(cond, dict):
            emb = cond["prompt_embeds"]
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        else:
            emb, added = cond, None
        w = next(self.unet.parameters())
        dtype = self.compute_dtype(x.device)
        with compute_context(x.device, dtype):
            # inputs in the weights' type (autocast then runs each op in `dtype`)
            out = self.unet(x.to(w.dtype), t, encoder_hidden_states=emb.to(w.dtype),
                            added_cond_kwargs=added, return_dict=False)[0]
        out = upcast(out)
        if self.prediction_type == "epsilon":
            return out
        a = self._abar(t, x)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0  =>  eps = sqrt(a) v + sqrt(1-a) x
            return a.sqrt() * out + (1.0 - a).sqrt() * x
        return (x - a.sqrt() * out) / (1.0 - a).sqrt()  # "sample": out is x0


class GuidedEps(nn.Module):
    """Classifier-free guidance over :class:`SDEps`, as an ``nn.Module`` (so ``sample()`` finds its
    device); the conditioning is the backbone's ``(cond, uncond)`` pair."""

    def __init__(self, eps: SDEps, guidance_scale: float) -> None:
        super().__init__()
        self.eps = eps
        self.guidance_scale = float(guidance_scale)
        self._cfg = ClassifierFreeGuidance(eps, self.guidance_scale)

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self._cfg(x, t, cond)


#: prompt-embedding cache of a latent backbone: past this many entries only the newest are kept
EMBED_CACHE_MAX = 4096
EMBED_CACHE_KEEP = 1024


def checked_guidance_scale(guidance_scale: float) -> float:
    if float(guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    return float(guidance_scale)


class LatentBackbone(Backbone):
    """What the latent text-to-image backbones share (SD 1.x/2.x, SDXL, and through
    :class:`~ntrk_lightning.backbones.sd3.FlowMatchingBackbone` SD3 and FLUX): image size in
    multiples of the latent grid, precision options, gradient checkpointing, sliced VAE decode and
    a per-prompt embedding cache. Subclasses set ``vae_scale_factor``, ``latent_channels``,
    ``vae_config`` and ``vae``, and encode prompts in ``_encode``."""

    conditional = True
    #: compute type of ``dtype="auto"`` on CUDA
    cuda_auto_dtype: torch.dtype = torch.float16

    def _set_size(self, height: Optional[int], width: Optional[int], default: int, unit: int, unit_text: str) -> None:
        self.height = int(height) if height is not None else default
        self.width = int(width) if width is not None else default
        for what, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % unit:
                raise ValueError(f"{what} must be a positive multiple of {unit_text}, got {v}")

    def _set_runtime_options(self, dtype: str, weights_dtype: str, vae_dtype: str, vae_batch_size: Optional[int],
                             gradient_checkpointing: bool, variant: Optional[str]) -> None:
        """Check and keep the precision, decode-slicing, checkpointing and weights-variant options."""
        self.dtype_name = _dtype_or_auto(dtype, "dtype")
        if weights_dtype not in _DTYPES:
            raise ValueError(f"weights_dtype must be 'float32', 'float16' or 'bfloat16', got {weights_dtype!r}")
        self.weights_dtype_name = weights_dtype
        if weights_dtype != "float32" and dtype not in ("auto", weights_dtype):
            raise ValueError(f"weights stored in {weights_dtype} must run in {weights_dtype} (dtype={dtype!r}); "
                             "use weights_dtype='float32' for another compute type")
        self.vae_dtype_name = _dtype_or_auto(vae_dtype, "vae_dtype")
        if vae_batch_size is not None and int(vae_batch_size) < 1:
            raise ValueError(f"vae_batch_size must be >= 1, got {vae_batch_size}")
        self.vae_batch_size = int(vae_batch_size) if vae_batch_size is not None else None
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.variant = variant
        self.checkpoint_calls = 0  # incremented by every checkpointed block call (tests, describe)
        self._embed_cache: dict[tuple[str, str, int], Any] = {}

    # ---- precision ---------------------------------------------------------------------------
    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype_name != "auto":
            return _DTYPES[self.dtype_name]
        if self.weights_dtype_name != "float32":
            return _DTYPES[self.weights_dtype_name]
        return self.cuda_auto_dtype if device.type == "cuda" else torch.float32

    def vae_compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.vae_dtype_name != "auto":
            return _DTYPES[self.vae_dtype_name]
        c = self.compute_dtype(device)
        if c == torch.float16 and self.vae_config.get("force_upcast", False):
            return torch.float32
        return c

    def _checkpoint(self, module: Callable[..., Any], *args: Any) -> Any:
        """Activation checkpointing for diffusers blocks (counted, so that tests and users can see
        it is active; non-reentrant, so frozen weights and float32 latents both work)."""
        self.checkpoint_calls += 1
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    # ---- the core's interface -----------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.latent_channels, self.height // f, self.width // f)

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode of ``latents / scaling_factor (+ shift_factor)`` to float32 images in [0, 1]
        (differentiable; in chunks of ``vae_batch_size``)."""
        if self.vae is None:
            raise RuntimeError("call load() first")
        return vae_decode(self.vae, latents, self.vae_compute_dtype(latents.device), self.vae_batch_size)

    # ---- conditioning ---------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Any:
        raise NotImplementedError

    def _embedding_owner(self) -> Optional[nn.Module]:
        """The loaded module whose identity keys the embedding cache (reloaded weights: new keys)."""
        raise NotImplementedError

    def _embeddings(self, prompts: Sequence[str]) -> list[Any]:
        """Per-prompt embeddings (cached per device: every arm of a run asks for the same prompts)."""
        dev = self.device
        owner = id(self._embedding_owner())
        key = lambda p: (p, str(dev), owner)  # noqa: E731
        todo = sorted({p for p in prompts if key(p) not in self._embed_cache})
        if todo:
            enc = self._encode(todo)
            for i, p in enumerate(todo):
                self._embed_cache[key(p)] = _index(enc, i)
        if len(self._embed_cache) > EMBED_CACHE_MAX:  # bounded: long prompt lists stream through
            for k in list(self._embed_cache)[:-EMBED_CACHE_KEEP]:
                del self._embed_cache[k]
        return [self._embed_cache[key(p)] for p in prompts]


class StableDiffusionBackbone(LatentBackbone):
    """Stable Diffusion 1.x / 2.x (``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder).

    Args:
        model: local diffusers folder, or a hub id present in the local Hugging Face cache.
        guidance_scale: classifier-free guidance scale s (1 = conditional branch only).
        negative_prompt: the unconditional branch's prompt (``None``: the empty prompt; SDXL
            pipelines that set ``force_zeros_for_empty_prompt`` use zero embeddings instead).
        height, width: image size (default: the UNet's ``sample_size`` x the VAE scale factor,
            512 for SD 1.5, 768 for SD 2.x 768-v, 1024 for SDXL); multiples of the VAE factor.
        dtype: compute precision of the UNet and text encoders (autocast); ``auto`` = float16 on
            CUDA, float32 elsewhere (or ``weights_dtype`` when that is a half type).
        weights_dtype: storage type of the UNet and text encoders (float16/bfloat16 halve memory).
        vae_dtype: compute precision of the VAE (``auto``: float32 if its config sets
            ``force_upcast`` and the compute type is float16, else ``dtype``). The VAE is stored in
            float32 (84M parameters).
        vae: optional separate local VAE folder (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
        vae_batch_size: decode at most this many latents at once (memory; ``None``: whole batch).
        gradient_checkpointing: recompute UNet / VAE-decoder activations in the reward backward.
        variant: weights variant to read (``"fp16"`` reads ``*.fp16.safetensors``).
        prediction_type: override the network's parameterisation (default: the scheduler config's).
        scheduler_overrides: fields of the DDIM scheduler to override (e.g. ``timestep_spacing``).
        revision, cache_dir: for hub ids in the local cache.
        name: model name in records (default: the folder's name).
    """

    components: dict[str, str] = SD_COMPONENTS
    kind = "stable-diffusion"
    _hint_repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    def __init__(self, model: str, guidance_scale: float = 7.5, negative_prompt: Optional[str] = None,
                 height: Optional[int] = None, width: Optional[int] = None, dtype: DTypeName = "auto",
                 weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
                 vae_dtype: DTypeName = "auto", vae: Optional[str] = None, vae_batch_size: Optional[int] = None,
                 gradient_checkpointing: bool = False, variant: Optional[str] = None,
                 prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = None,
                 scheduler_overrides: Optional[dict[str, Any]] = None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, name: Optional[str] = None) -> None:
        super().__init__()
        self.source = model
        self._locate(model, vae, variant, revision, cache_dir)
        self._check_unet()
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        default = int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor
        self._set_size(height, width, default, self.vae_scale_factor, f"the VAE scale factor {self.vae_scale_factor}")
        self.latent_channels = int(self.unet_config.get("in_channels", 4))
        self.guidance_scale = checked_guidance_scale(guidance_scale)
        self.negative_prompt = negative_prompt
        self._set_runtime_options(dtype, weights_dtype, vae_dtype, vae_batch_size, gradient_checkpointing, variant)
        self._set_prediction(prediction_type, scheduler_overrides)
        self.name = name or self.folder.resolve().name
        self.unet: Optional[nn.Module] = None
        self.vae: Optional[nn.Module] = None
        self.text_encoder: Optional[nn.Module] = None
        self.tokenizer: Any = None
        self.eps_net: Optional[SDEps] = None
        self.make_scheduler()  # a scheduler config the core cannot use fails now

    def _check_unet(self) -> None:
        """The UNet is of the family this class drives (SDXL's needs pooled embeddings and time ids)."""
        if self.unet_config.get("addition_embed_type") == "text_time":
            raise ValueError(f"{self.folder} is an SDXL model (its UNet needs pooled text embeddings and time ids): "
                             "use ntrk_lightning.backbones.StableDiffusionXLBackbone")

    def _set_prediction(self, prediction_type: Optional[str], scheduler_overrides: Optional[dict[str, Any]]) -> None:
        """The network's parameterisation (default: the scheduler config's) and the DDIM overrides."""
        self.prediction_type = prediction_type or self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        overrides = dict(scheduler_overrides or {})
        if "prediction_type" in overrides:
            raise ValueError("scheduler_overrides cannot set prediction_type: the core needs epsilon (the adapter "
                             "converts); set the backbone's prediction_type to describe the network instead")
        self.scheduler_overrides = overrides

    def _locate(self, model: str, vae: Optional[str], variant: Optional[str], revision: Optional[str],
                cache_dir: Optional[str]) -> None:
        """Set ``folder``, ``vae_folder`` and the configs (``unet_config``, ``vae_config``,
        ``scheduler_config``, ``model_index``) from local files. ``from_diffusers`` overrides this
        to take them from an already-loaded pipeline."""
        self.folder = resolve_model_folder(model, revision, cache_dir, self._hint_repo)
        check_pipeline_folder(self.folder, self.components, variant, self._hint_repo)
        self.vae_folder: Optional[Path] = None
        if vae is not None:
            vf = Path(vae).expanduser()
            if not vf.is_dir():
                vf = resolve_model_folder(vae, None, cache_dir, "madebyollin/sdxl-vae-fp16-fix")
            if not (vf / "config.json").is_file() or not any(
                    (vf / n.format(v="")).is_file() for n in _DIFFUSERS_WEIGHTS):
                raise FileNotFoundError(f"{vf} is not a diffusers AutoencoderKL folder (config.json + "
                                        f"diffusion_pytorch_model.safetensors). {_download_hint('madebyollin/sdxl-vae-fp16-fix')}")
            self.vae_folder = vf
        # configs are small: read them now, so a wrong size or option fails before any weights load
        self.unet_config = _read_json(self.folder / "unet" / "config.json")
        self.vae_config = _read_json((self.vae_folder or self.folder / "vae") / "config.json")
        self.scheduler_config = _read_json(self.folder / "scheduler" / "scheduler_config.json")
        self.model_index = _read_json(self.folder / "model_index.json")

    # ---- loading -------------------------------------------------------------------------------
    def _from_pretrained(self, cls: Any, sub: str, folder: Optional[Path] = None, **kw: Any) -> nn.Module:
        return load_component(cls, self.folder, sub, self.variant, folder, **kw)

    def _load_tokenizer(self, sub: str) -> Any:
        return load_tokenizer(self.folder / sub)

    def _load_text(self) -> None:
        from transformers import CLIPTextModel

        self.text_encoder = _cast(self._from_pretrained(CLIPTextModel, "text_encoder"), _DTYPES[self.weights_dtype_name])
        self.tokenizer = self._load_tokenizer("tokenizer")

    def _load(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        w = _DTYPES[self.weights_dtype_name]
        self.unet = self._from_pretrained(UNet2DConditionModel, "unet", torch_dtype=w)
        self.vae = self._from_pretrained(AutoencoderKL, "vae", self.vae_folder, torch_dtype=torch.float32)
        self._load_text()
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(self._checkpoint)
            self.vae.enable_gradient_checkpointing(self._checkpoint)
        sched = self.make_scheduler()
        self.eps_net = SDEps(self.unet, sched.alphas_cumprod, self.prediction_type, self.compute_dtype)
        self._embed_cache.clear()

    # ---- the core's interface -----------------------------------------------------------------
    def model(self) -> DiffusionModel:
        if self.eps_net is None:
            raise RuntimeError("call load() first")
        return DiffusionModel(denoiser=GuidedEps(self.eps_net, self.guidance_scale), decode=self.decode,
                              sample_shape=self.sample_shape, name=self.name, meta=self.describe())

    def make_scheduler(self) -> Any:
        """A fresh epsilon ``DDIMScheduler`` from the model's scheduler config.

        Kept from the model: betas, training steps, ``timestep_spacing``/``steps_offset``.
        Set here: ``prediction_type="epsilon"`` (the adapter converts), ``set_alpha_to_one=True``
        (the last DDIM step returns the x0 estimate: deterministic, as the NFE accounting assumes),
        ``clip_sample=False`` (latents are not bounded). ``scheduler_overrides`` win."""
        import inspect

        from diffusers import DDIMScheduler

        allowed = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
        cfg = {k: v for k, v in self.scheduler_config.items() if k in allowed}
        cfg.update(prediction_type="epsilon", set_alpha_to_one=True, clip_sample=False, thresholding=False)
        unknown = set(self.scheduler_overrides) - allowed
        if unknown:
            raise ValueError(f"scheduler_overrides has fields DDIMScheduler does not know: {sorted(unknown)}")
        cfg.update(self.scheduler_overrides)
        sched = DDIMScheduler(**cfg)
        if float(sched.alphas_cumprod.min()) <= 0.0:
            raise ValueError("this scheduler config has zero terminal SNR (alpha_bar = 0): the Tweedie estimate the "
                             "samplers use divides by sqrt(alpha_bar); set scheduler_overrides "
                             "{rescale_betas_zero_snr: false}")
        return sched

    # ---- conditioning ---------------------------------------------------------------------------
    def _tokens(self, tokenizer: Any, prompts: list[str], device: torch.device) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(device)

    def _encode(self, prompts: list[str]) -> Any:
        """Embeddings of ``prompts`` (float32, on the backbone's device): a (B, L, D) tensor."""
        dev = self.device
        ids = self._tokens(self.tokenizer, prompts, dev)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        with torch.no_grad(), compute_context(dev, self.compute_dtype(dev)):
            h = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return upcast(h)

    def _zeros_for_empty_negative(self) -> bool:
        return False

    def _embedding_owner(self) -> Optional[nn.Module]:
        return self.text_encoder

    def conditioning(self, prompts: Sequence[str]) -> Any:
        """``(cond, uncond)`` for a batch of prompts, batched along dim 0, on the backbone's device."""
        if self.text_encoder is None:
            raise RuntimeError("call load() first")
        prompts = check_prompts(prompts, len(prompts))
        if not prompts:
            raise ValueError("conditioning needs at least one prompt")
        cond = _stack(self._embeddings(prompts))
        if self.negative_prompt is None and self._zeros_for_empty_negative():
            neg = _zeros_like(_index(cond, 0))
        else:
            neg = self._embeddings([self.negative_prompt or ""])[0]
        uncond = _stack([neg] * len(prompts))
        return cond, uncond

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "model": str(self.folder), "source": self.source,
            "variant": self.variant, "vae": str(self.vae_folder) if self.vae_folder else None,
            "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
            "height": self.height, "width": self.width, "latent_shape": list(self.sample_shape),
            "prediction_type": self.prediction_type, "dtype": self.dtype_name,
            "weights_dtype": self.weights_dtype_name, "vae_dtype": self.vae_dtype_name,
            "vae_batch_size": self.vae_batch_size, "gradient_checkpointing": self.gradient_checkpointing,
            "scheduler": {"class": "DDIMScheduler", "timestep_spacing": self.make_scheduler().config.timestep_spacing,
                          "overrides": dict(self.scheduler_overrides)},
        }


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """SDXL: two text encoders (penultimate hidden states concatenated; pooled projection of the
    second), and the six micro-conditioning ``time_ids`` (original size, crop top-left, target
    size). Same options as :class:`StableDiffusionBackbone`, plus:

    Args:
        original_size: the ``original_size`` micro-conditioning (default: (height, width)).
        crops_coords_top_left: the crop micro-conditioning (default (0, 0)).
    """

    components = SDXL_COMPONENTS
    kind = "sdxl"
    _hint_repo = "stabilityai/stable-diffusion-xl-base-1.0"

    def __init__(self, model: str, guidance_scale: float = 5.0, original_size: Optional[tuple[int, int]] = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), **options: Any) -> None:
        super().__init__(model, guidance_scale=guidance_scale, **options)
        self.original_size = tuple(int(v) for v in (original_size or (self.height, self.width)))
        self.crops_coords_top_left = tuple(int(v) for v in crops_coords_top_left)
        if len(self.original_size) != 2 or len(self.crops_coords_top_left) != 2:
            raise ValueError("original_size and crops_coords_top_left are (height, width) / (top, left) pairs")
        self.text_encoder_2: Optional[nn.Module] = None
        self.tokenizer_2: Any = None

    def _load_text(self) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        w = _DTYPES[self.weights_dtype_name]
        self.text_encoder = _cast(self._from_pretrained(CLIPTextModel, "text_encoder"), w)
        self.text_encoder_2 = _cast(self._from_pretrained(CLIPTextModelWithProjection, "text_encoder_2"), w)
        self.tokenizer = self._load_tokenizer("tokenizer")
        self.tokenizer_2 = self._load_tokenizer("tokenizer_2")
        expected = int(self.unet.config.projection_class_embeddings_input_dim)
        got = 6 * int(self.unet.config.addition_time_embed_dim) + int(self.text_encoder_2.config.projection_dim)
        if expected != got:
            raise ValueError(f"{self.folder}: the UNet expects {expected} added-embedding inputs but the text encoder "
                             f"and time ids give {got}; the folder mixes components of different models")

    def _check_unet(self) -> None:
        if self.unet_config.get("addition_embed_type") != "text_time":
            raise ValueError(f"{self.folder} is not an SDXL base model (its UNet has addition_embed_type="
                             f"{self.unet_config.get('addition_embed_type')!r}, expected 'text_time'); use "
                             "StableDiffusionBackbone for SD 1.x/2.x")

    def _zeros_for_empty_negative(self) -> bool:
        return bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    def _encode(self, prompts: list[str]) -> Any:
        dev = self.device
        hidden = []
        pooled = None
        with torch.no_grad(), compute_context(dev, self.compute_dtype(dev)):
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = enc(self._tokens(tok, prompts, dev), output_hidden_states=True)
                hidden.append(upcast(out.hidden_states[-2]))  # SDXL conditions on the penultimate layer
                if enc is self.text_encoder_2:
                    pooled = upcast(out.text_embeds)
        time_ids = torch.tensor([[*self.original_size, *self.crops_coords_top_left, self.height, self.width]],
                                dtype=torch.float32, device=dev).expand(len(prompts), -1)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "original_size": list(self.original_size),
                "crops_coords_top_left": list(self.crops_coords_top_left)}


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return module if dtype == torch.float32 else module.to(dtype)


def _index(x: Any, i: int) -> Any:
    if isinstance(x, dict):
        return {k: v[i] for k, v in x.items()}
    return x[i]


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return torch.stack(items)


def _zeros_like(x: Any) -> Any:
    if isinstance(x, dict):
        # SDXL zero-negative: zero text embeddings, but the same micro-conditioning time ids
        return {k: (v.clone() if k == "time_ids" else torch.zeros_like(v)) for k, v in x.items()}
    return torch.zeros_like(x)
