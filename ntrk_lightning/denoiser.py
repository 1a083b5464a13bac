"""The one small interface through which the sampling core talks to a diffusion model.

A *denoiser* is any callable ``eps = denoiser(x_t, t)`` or ``eps = denoiser(x_t, t, cond)`` that
predicts the noise of ``x_t`` at integer training timestep ``t`` (a 1-D tensor, one entry per row).
Backbones whose network predicts ``v`` or ``x0`` convert to epsilon inside their adapter, so the
core only ever deals with epsilon and a diffusers scheduler configured with
``prediction_type="epsilon"``.

``decode`` maps the model's state space (pixels, latents, vectors) to images in [0, 1] of shape
(B, C, H, W); rewards only ever see decoded images.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

EpsFn = Callable[..., Tensor]
DecodeFn = Callable[[Tensor], Tensor]


def _accepts_cond(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes a third positional argument (the conditioning)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins, some C extensions: assume the general form
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    return has_varargs or len(positional) >= 3


def index_cond(cond: Any, index: Tensor) -> Any:
    """Select rows ``index`` of a conditioning structure (tensor, or tuple/list/dict of them).

    Samplers that replicate samples (best-of-N, SVDD candidates, SMC particles) use this so the
    conditioning follows each row.
    """
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.index_select(0, index.to(cond.device))
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_cond(c, index) for c in cond)
    if isinstance(cond, dict):
        return {k: index_cond(v, index) for k, v in cond.items()}
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}; use tensors")


@dataclass
class CountingDenoiser:
    """Wraps an eps function, counting evaluated rows so every sampler reports honest NFEs.

    ``forward_rows`` counts rows passed through the network forward; ``backward_rows`` counts rows
    whose reward gradient was taken (through the network or through the Tweedie estimate only).
    """

    fn: EpsFn
    forward_rows: int = 0
    backward_rows: int = 0
    _with_cond: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self._with_cond = _accepts_cond(self.fn)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        self.forward_rows += x.shape[0]
        if cond is None or not self._with_cond:
            if cond is not None:
                raise TypeError("conditioning was given but the denoiser takes only (x, t)")
            eps = self.fn(x, t)
        else:
            eps = self.fn(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
        return eps


class ClassifierFreeGuidance:
    """Classifier-free guidance as a denoiser: ``eps_u + scale * (eps_c - eps_u)``.

    ``model_fn(x, t, c)`` is the conditional network; the conditioning handed to this wrapper is a
    pair ``(cond, uncond)`` of equal batch size. Both branches run as one batch of 2B rows, which the
    NFE accounting counts as one evaluation per sample (the usual convention in the guidance
    literature, stated in the README).
    """

    def __init__(self, model_fn: Callable[[Tensor, Tensor, Any], Tensor], scale: float) -> None:
        self.model_fn = model_fn
        self.scale = float(scale)

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        c, u = cond
        if self.scale == 1.0:
            return self.model_fn(x, t, c)
        both = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(u, c))
        eps_u, eps_c = both.chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


def _cat_cond(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, (list, tuple)):
        return type(a)(_cat_cond(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def identity_decode(x: Tensor) -> Tensor:
    """Decode for models whose state already is an image in [-1, 1]: map to [0, 1]."""
    return (x + 1.0) * 0.5


@dataclass
class DiffusionModel:
    """What a backbone hands the core: an eps denoiser and a decode to [0, 1] images.

    ``sample_shape`` is the shape of one sample in model space (e.g. (1, 16, 16) or (4, 64, 64)).
    """

    denoiser: EpsFn
    decode: DecodeFn = identity_decode
    sample_shape: tuple[int, ...] = ()
    name: str = "model"
    meta: dict = field(default_factory=dict)
