"""The shipped pixel-space digits rectified-flow model (``digits_flow``) as a :class:`DiffusionModel`.

The same small diffusers ``UNet2DModel`` as ``digits16`` (16/32/64 channels), trained by this
project as a rectified flow on scikit-learn's digits upsampled to 16x16, one channel, pixels in
[-1, 1]: ``x_s = (1 - s) x0 + s eps`` and the network predicts the velocity ``v = eps - x0`` at
timestep ``t = s * 1000`` (diffusers' ``FlowMatchEulerDiscreteScheduler`` convention). Weights (EMA,
float16 on disk) ship in ``ntrk_lightning/weights``; everything here works offline::

    from ntrk_lightning.backbones.digits_flow import load_digits_flow, make_scheduler
    model = load_digits_flow()              # DiffusionModel(sample_shape=(1, 16, 16))
    scheduler = make_scheduler()            # FlowMatchEulerDiscreteScheduler (shift 1.0)
    v = model.denoiser(x_t, t)              # t: float timesteps sigma * 1000, scalar or (B,)
    x0_hat = x_t - sigma * v                # eps_hat = x_t + (1 - sigma) * v
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.backbones.digits_unet import UNetEps, shipped_files, unet_from_files, weights_dir
from ntrk_lightning.denoiser import DiffusionModel, identity_decode

PathLike = Union[str, "os.PathLike[str]"]

#: name -> (weights file, config file) inside the weights folder
SHIPPED_FLOW_MODELS: dict[str, tuple[str, str]] = {
    "digits_flow": ("digits_flow.safetensors", "digits_flow_config.json"),
}

_RETRAIN_HINT = ("Retrain with `ntrk fit -c configs/digits_flow_fit.yaml` (exports to "
                 "ntrk_lightning/weights/), or reinstall the package, which ships the file.")


def _files(name: str, root: Optional[PathLike]) -> tuple[Path, Path]:
    return shipped_files(SHIPPED_FLOW_MODELS, name, root, "digits flow model")


def load_config(name: str = "digits_flow", root: Optional[PathLike] = None) -> dict[str, Any]:
    """The JSON written next to the weights: ``{"unet": UNet2DModel config, "scheduler":
    FlowMatchEulerDiscreteScheduler config, "resolution": 16, ...}``."""
    _, cfg_path = _files(name, root)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"digits flow config not found: {cfg_path}. {_RETRAIN_HINT}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("prediction_type") != "flow_velocity":
        raise ValueError(f"{cfg_path} is not a rectified-flow model (prediction_type "
                         f"{cfg.get('prediction_type')!r}, expected 'flow_velocity')")
    return cfg


def make_scheduler(name: str = "digits_flow", root: Optional[PathLike] = None, **overrides: Any):
    """A fresh ``FlowMatchEulerDiscreteScheduler`` from the exported config of ``name``.

    Static shift (the config's, 1.0 for the shipped model; no resolution-dependent dynamic shift:
    one resolution), so callers only ever ``set_timesteps(num_steps)``; sigmas then run from 1 (pure
    noise) down to 1/1000, then 0. Keyword arguments override any field (e.g. ``shift=2.0``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    saved = dict(load_config(name, root)["scheduler"])
    cfg = {k: saved[k] for k in ("num_train_timesteps", "shift") if k in saved}
    cfg.update(use_dynamic_shifting=False)
    cfg.update(overrides)
    return FlowMatchEulerDiscreteScheduler(**cfg)


def load_flow_unet(name: str = "digits_flow", device: Union[str, torch.device] = "cpu",
                   root: Optional[PathLike] = None, dtype: torch.dtype = torch.float32):
    """The raw diffusers ``UNet2DModel`` (eval mode, parameters frozen, ``dtype``)."""
    w_path, c_path = _files(name, root)
    return unet_from_files(w_path, c_path, load_config(name, root)["unet"], "digits flow", _RETRAIN_HINT, device,
                           dtype)


class UNetVelocity(UNetEps):
    """``v = f(x_t, t)`` around a velocity-trained ``UNet2DModel``: ``t`` holds float timesteps
    ``sigma * 1000`` (a scalar or one per row), the output is ``eps - x0``. Same call convention as
    :class:`UNetEps`; only the meaning of the output differs."""


def _model(velocity_net: UNetVelocity, cfg: dict[str, Any], name: str,
           meta: Optional[dict[str, Any]] = None) -> DiffusionModel:
    res = int(cfg.get("resolution", cfg["unet"]["sample_size"]))
    ch = int(cfg["unet"].get("in_channels", 1))
    return DiffusionModel(denoiser=velocity_net, decode=identity_decode, sample_shape=(ch, res, res),
                          name=name, meta=meta or {})


def load_digits_flow(name: str = "digits_flow", device: Union[str, torch.device] = "cpu",
                     root: Optional[PathLike] = None) -> DiffusionModel:
    """The shipped digits rectified-flow model as a :class:`DiffusionModel` (offline).

    ``denoiser(x, t)`` returns the velocity ``eps - x0`` for ``x`` of shape (B, 1, 16, 16) in the
    model's [-1, 1] pixel space at float timesteps ``t = sigma * 1000``; ``decode`` maps to [0, 1].
    Raises ``FileNotFoundError`` naming the file if the weights or config are missing.
    """
    unet = load_flow_unet(name, device=device, root=root)
    cfg = load_config(name, root)
    w_path, c_path = _files(name, root)
    meta = {
        "resolution": int(cfg.get("resolution", cfg["unet"]["sample_size"])),
        "num_train_timesteps": int(cfg["scheduler"].get("num_train_timesteps", 1000)),
        "scheduler_config": cfg["scheduler"],
        "prediction_type": "flow_velocity",
        "weights": str(w_path),
        "config": str(c_path),
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "pixel_range": (-1.0, 1.0),
        "card": cfg.get("card"),
    }
    return _model(UNetVelocity(unet), cfg, name, meta)


class DigitsFlowBackbone(Backbone):
    """The shipped pixel-space digits rectified-flow model as a Lightning-shell backbone
    (unconditional). Its scheduler is a ``FlowMatchEulerDiscreteScheduler``, so the core samples it
    with its stochastic flow step; the denoiser returns velocities.

    Args:
        model_name: a shipped flow model name (``"digits_flow"``).
        weights_dir: folder with ``<weights>.safetensors`` and its config JSON (default: the
            package's ``ntrk_lightning/weights``).
        shift: overrides the exported static sigma shift (default: the config's, 1.0).
    """

    conditional = False

    def __init__(self, model_name: str = "digits_flow", weights_dir: Optional[str] = None,
                 shift: Optional[float] = None) -> None:
        super().__init__()
        w_path, c_path = _files(model_name, weights_dir)  # unknown name: ValueError now
        for p in (w_path, c_path):
            if not p.is_file():
                raise FileNotFoundError(f"digits flow model file not found: {p}. {_RETRAIN_HINT}")
        if shift is not None and not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.name = model_name
        self.weights_dir = weights_dir
        self.shift = shift
        self.velocity_net: Optional[UNetVelocity] = None
        self._cfg: dict[str, Any] = {}

    def _load(self) -> None:
        self._cfg = load_config(self.name, self.weights_dir)
        self.velocity_net = UNetVelocity(load_flow_unet(self.name, root=self.weights_dir))

    def model(self) -> DiffusionModel:
        if self.velocity_net is None:
            raise RuntimeError("call load() first")
        return _model(self.velocity_net, self._cfg, self.name)

    def make_scheduler(self) -> Any:
        extra = {} if self.shift is None else {"shift": float(self.shift)}
        return make_scheduler(self.name, self.weights_dir, **extra)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "digits-flow", "weights_dir": str(self.weights_dir or weights_dir()),
                "shift": self.shift}
