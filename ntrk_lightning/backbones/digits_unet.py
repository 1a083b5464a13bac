"""The shipped pixel-space digits diffusion model (``digits16``) as a :class:`DiffusionModel`.

A small diffusers ``UNet2DModel`` trained as an epsilon-prediction DDPM (1000 steps) on
scikit-learn's digits upsampled to 16x16, one channel, pixels in [-1, 1]. Weights (EMA, float16
on disk) ship in ``ntrk_lightning/weights``; everything here works offline::

    from ntrk_lightning.backbones.digits_unet import load_digits_unet, make_scheduler
    model = load_digits_unet()              # DiffusionModel(sample_shape=(1, 16, 16))
    scheduler = make_scheduler()            # DDIMScheduler from the training DDPM config
    eps = model.denoiser(x_t, t)            # t: scalar or (B,) long tensor of training timesteps

The digits feature network for FID (``DigitFeatures``) lives with the classifiers it is made of,
in :mod:`rewards.digits`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.denoiser import DiffusionModel, identity_decode

PathLike = Union[str, "os.PathLike[str]"]

#: name -> (weights file, config file) inside the weights folder
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "digits16": ("digits_unet.safetensors", "digits_unet_config.json"),
}

_RETRAIN_HINT = ("Retrain with `ntrk fit -c configs/digits_unet_fit.yaml` (exports to "
                 "ntrk_lightning/weights/), or reinstall the package, which ships the file.")


def weights_dir() -> Path:
    """``ntrk_lightning/weights``, where the shipped models live."""
    return Path(__file__).resolve().parent.parent / "weights"


def shipped_files(table: dict[str, tuple[str, str]], name: str, root: Optional[PathLike],
                  what: str) -> tuple[Path, Path]:
    """(weights file, config file) of the shipped model ``name`` of ``table`` in ``root`` (default:
    the package's weights folder); an unknown name is a ValueError listing the known ones."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; available: {sorted(table)}")
    w, c = table[name]
    base = Path(root) if root is not None else weights_dir()
    return base / w, base / c


def _files(name: str, root: Optional[PathLike]) -> tuple[Path, Path]:
    return shipped_files(SHIPPED_MODELS, name, root, "digits model")


def load_config(name: str = "digits16", root: Optional[PathLike] = None) -> dict[str, Any]:
    """The JSON written next to the weights: ``{"unet": UNet2DModel config, "scheduler": DDPM
    config, "resolution": 16, ...}``."""
    _, cfg_path = _files(name, root)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"digits UNet config not found: {cfg_path}. {_RETRAIN_HINT}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        from ntrk_lightning.fileio import WeightsFileError

        raise WeightsFileError(f"digits UNet config {cfg_path} is unreadable ({e}). {_RETRAIN_HINT}") from None
    return cfg


def make_scheduler(name: str = "digits16", root: Optional[PathLike] = None, **overrides: Any):
    """A fresh ``DDIMScheduler`` built from the training DDPM config of ``name``.

    Defaults: ``prediction_type="epsilon"``, ``clip_sample=True`` (pixels live in [-1, 1]),
    ``timestep_spacing="trailing"`` (the first step starts at t=999, pure noise),
    ``set_alpha_to_one=True``. Keyword arguments override any field. Call
    ``set_timesteps(num_steps)`` (the samplers do) before stepping.
    """
    from diffusers import DDIMScheduler

    ddpm = dict(load_config(name, root)["scheduler"])
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    cfg = {k: ddpm[k] for k in keep if k in ddpm}
    cfg.update(prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
               timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)
    cfg.update(overrides)
    return DDIMScheduler(**cfg)


def load_unet(name: str = "digits16", device: Union[str, torch.device] = "cpu",
              root: Optional[PathLike] = None, dtype: torch.dtype = torch.float32):
    """The raw diffusers ``UNet2DModel`` (eval mode, parameters frozen, ``dtype``)."""
    w_path, c_path = _files(name, root)
    return unet_from_files(w_path, c_path, load_config(name, root)["unet"], "digits UNet", _RETRAIN_HINT, device, dtype)


def unet_from_files(w_path: Path, c_path: Path, unet_config: dict[str, Any], what: str, hint: str,
                    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """A ``UNet2DModel`` built from ``unet_config`` (read from ``c_path``) with the weights of the
    safetensors file ``w_path`` (any float type on disk), in eval mode with frozen parameters. A
    missing, unreadable or mismatched file is one clear error naming it, with ``hint``."""
    from diffusers import UNet2DModel

    from ntrk_lightning.fileio import WeightsFileError, load_safetensors

    if not w_path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {w_path}. {hint}")
    unet = UNet2DModel.from_config(unet_config)
    state = {k: v.to(torch.float32) for k, v in load_safetensors(w_path, hint, f"{what} weights file").items()}
    try:
        unet.load_state_dict(state)
    except RuntimeError as e:  # wrong tensor names or shapes: another model's file
        raise WeightsFileError(f"{what} weights file {w_path} does not fit the config "
                               f"{c_path} ({str(e).splitlines()[0]}). {hint}") from None
    # a dtype argument makes diffusers warn about fp32 modules even when there is nothing to cast
    unet.to(device=device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    unet.eval()
    unet.requires_grad_(False)
    return unet


class UNetEps(nn.Module):
    """``eps = f(x_t, t)`` around a ``UNet2DModel``; ``t`` may be a Python/0-d scalar or a 1-D
    tensor with one timestep per row (length 1 is broadcast)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Union[Tensor, int, float]) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.ndim == 1 and t.shape[0] == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        elif t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match a batch of {x.shape[0]}")
        return self.unet(x, t).sample


def load_digits_unet(name: str = "digits16", device: Union[str, torch.device] = "cpu",
                     root: Optional[PathLike] = None) -> DiffusionModel:
    """The shipped digits diffusion model as a :class:`DiffusionModel` (offline).

    ``denoiser(x, t)`` returns the epsilon prediction for ``x`` of shape (B, 1, 16, 16) in the
    model's [-1, 1] pixel space; ``decode`` maps to [0, 1]. Raises ``FileNotFoundError`` naming the
    file if the weights or config are missing.
    """
    unet = load_unet(name, device=device, root=root)
    cfg = load_config(name, root)
    res = int(cfg.get("resolution", cfg["unet"]["sample_size"]))
    ch = int(cfg["unet"].get("in_channels", 1))
    w_path, c_path = _files(name, root)
    meta = {
        "resolution": res,
        "num_train_timesteps": int(cfg["scheduler"].get("num_train_timesteps", 1000)),
        "scheduler_config": cfg["scheduler"],
        "weights": str(w_path),
        "config": str(c_path),
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "pixel_range": (-1.0, 1.0),
        "card": cfg.get("card"),
    }
    return DiffusionModel(denoiser=UNetEps(unet), decode=identity_decode, sample_shape=(ch, res, res),
                          name=name, meta=meta)


class DigitsUNetBackbone(Backbone):
    """The shipped pixel-space digits model as a Lightning-shell backbone (unconditional).

    Args:
        model_name: a shipped model name (``"digits16"``).
        weights_dir: folder with ``<weights>.safetensors`` and its config JSON (default: the
            package's ``ntrk_lightning/weights``).
    """

    conditional = False

    def __init__(self, model_name: str = "digits16", weights_dir: Optional[str] = None) -> None:
        super().__init__()
        w_path, c_path = _files(model_name, weights_dir)  # unknown name: ValueError now
        for p in (w_path, c_path):
            if not p.is_file():
                raise FileNotFoundError(f"digits model file not found: {p}. {_RETRAIN_HINT}")
        self.name = model_name
        self.weights_dir = weights_dir
        self.eps_net: Optional[UNetEps] = None
        self._shape: tuple[int, ...] = ()

    def _load(self) -> None:
        unet = load_unet(self.name, root=self.weights_dir)
        self.eps_net = UNetEps(unet)
        cfg = load_config(self.name, self.weights_dir)
        res = int(cfg.get("resolution", cfg["unet"]["sample_size"]))
        self._shape = (int(cfg["unet"].get("in_channels", 1)), res, res)

    def model(self) -> DiffusionModel:
        if self.eps_net is None:
            raise RuntimeError("call load() first")
        return DiffusionModel(denoiser=self.eps_net, decode=identity_decode, sample_shape=self._shape,
                              name=self.name)

    def make_scheduler(self) -> Any:
        return make_scheduler(self.name, self.weights_dir)

    def weight_files(self) -> list[Path]:
        """The files whose content decides the samples (the run fingerprint hashes them)."""
        return list(_files(self.name, self.weights_dir))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "digits-unet", "weights_dir": str(self.weights_dir or weights_dir())}
