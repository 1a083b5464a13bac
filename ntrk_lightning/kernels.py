"""Stochastic reverse kernels: the pretrained step whose Gaussian noise the caller supplies.

Every sampler talks to a model through one of these, so NTRK and the baselines run unchanged on
diffusion (epsilon-prediction, DDPM/DDIM schedules) and on flow-matching models (velocity
prediction, rectified-flow schedules). Notation, for step ``i`` going from time t to the next time s:

    x_t = alpha_t x0 + sigma_t eps                       (forward noising)
    x0_hat, eps_hat = estimates of x0 and eps from the network output at (x_t, t)
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,     z ~ N(0, I) from the caller
    c   = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)

This is the DDIM(eta) step (Song et al., 2021) for a general (alpha, sigma) schedule: exactly
Gaussian given x_t, with standard deviation ``c`` (:meth:`std`), so replacing ``z`` by any other
standard Gaussian draw leaves the pretrained mean and variance untouched. ``eta = 1`` is the
ancestral (DDPM-like) step, ``eta = 0`` the deterministic one (for rectified flow: the Euler step of
the flow ODE).

* :class:`DDIMKernel` drives a diffusers ``DDIMScheduler`` (alpha_t = sqrt(abar_t),
  sigma_t = sqrt(1 - abar_t); the network predicts eps) through its own ``step(...,
  variance_noise=z)``.
* :class:`FlowKernel` takes the sigma/timestep schedule of a diffusers
  ``FlowMatchEulerDiscreteScheduler`` (including SD3/FLUX's shift) and implements the step itself,
  because that scheduler draws its noise internally. Rectified flow: alpha_t = 1 - t,
  sigma_t = t, the network predicts the velocity v = eps - x0, so x0_hat = x_t - t v and
  eps_hat = x_t + (1 - t) v.

Pure torch: no Lightning, no I/O.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Union

import torch
from torch import Tensor


class DDIMKernel:
    """The DDIM(eta) step of a diffusers ``DDIMScheduler`` (epsilon prediction)."""

    prediction = "epsilon"

    def __init__(self, scheduler: Any, num_steps: int, eta: float) -> None:
        self.scheduler = scheduler
        self.eta = float(eta)
        scheduler.set_timesteps(int(num_steps))
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps]
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        self._std = [self._probe_std(t) for t in self.timesteps]

    def _probe_std(self, t: int) -> float:
        """sigma of the step, read off the scheduler itself: with zero model output and zero sample
        the step returns exactly std * variance_noise (so the kernel never disagrees with it)."""
        zero = torch.zeros(1, dtype=torch.float64)
        out = self.scheduler.step(zero, t, zero, eta=self.eta, variance_noise=torch.ones(1, dtype=torch.float64))
        return float(out.prev_sample.item())

    def std(self, step: int) -> float:
        return self._std[step]

    def model_time(self, step: int, n: int, device: torch.device) -> Tensor:
        """The timestep handed to the network: integer training timesteps."""
        return torch.full((n,), self.timesteps[step], dtype=torch.long, device=device)

    def alpha_sigma(self, step: int) -> tuple[float, float]:
        abar = float(self.scheduler.alphas_cumprod[self.timesteps[step]])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def x0_hat(self, x: Tensor, out: Tensor, step: int) -> Tensor:
        """Tweedie's posterior-mean estimate of x0 from the eps prediction."""
        a, s = self.alpha_sigma(step)
        return (x - s * out) / a

    def eps_hat(self, x: Tensor, out: Tensor, step: int) -> Tensor:
        return out

    def x0_jacobian_scale(self, step: int) -> float:
        """d x0_hat / d x_t with the network output held fixed (the ``tweedie`` gradient mode)."""
        return 1.0 / self.alpha_sigma(step)[0]

    def step(self, out: Tensor, step: int, x: Tensor, noise: Tensor) -> Tensor:
        return self.scheduler.step(out, self.timesteps[step], x, eta=self.eta, variance_noise=noise).prev_sample

    def next_alpha_sigma(self, step: int) -> tuple[float, float]:
        """(alpha, sigma) of the time reverse step ``step`` lands on, as the scheduler's step computes
        it (the fixed stride back; the final alpha below timestep 0)."""
        t = self.timesteps[step]
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        abar = float(self.scheduler.alphas_cumprod[prev]) if prev >= 0 else float(self.scheduler.final_alpha_cumprod)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def renoise(self, x_next: Tensor, step: int, noise: Tensor) -> Tensor:
        """x_t drawn from the forward transition q(x_t | x_s) of step ``step`` (the inverse direction
        of the step), with the caller's standard Gaussian ``noise``."""
        return forward_transition(x_next, self.alpha_sigma(step), self.next_alpha_sigma(step), noise)


class FlowKernel:
    """The DDIM(eta) step for rectified flow, on the schedule of a ``FlowMatchEulerDiscreteScheduler``."""

    prediction = "velocity"

    def __init__(self, scheduler: Any, num_steps: int, eta: float) -> None:
        self.scheduler = scheduler
        self.eta = float(eta)
        scheduler.set_timesteps(int(num_steps))
        # sigmas has num_steps + 1 entries, the last one 0 (the data end)
        self.sigmas: list[float] = [float(s) for s in scheduler.sigmas]
        self.model_timesteps: list[float] = [float(t) for t in scheduler.timesteps]
        self.timesteps = self.model_timesteps
        if len(self.sigmas) != len(self.model_timesteps) + 1:
            raise ValueError("flow scheduler returned inconsistent sigmas/timesteps")
        self.init_noise_sigma = 1.0
        self._coef = [self._coefficients(i) for i in range(len(self.model_timesteps))]

    def _coefficients(self, step: int) -> tuple[float, float, float]:
        """(alpha_s, sqrt(sigma_s^2 - c^2), c) of step ``step``: x_s = a x0 + b eps + c z."""
        t, s = self.sigmas[step], self.sigmas[step + 1]
        a_t, a_s = 1.0 - t, 1.0 - s
        if s <= 0.0:
            return a_s, 0.0, 0.0
        ratio = (a_t * s) / (a_s * t) if t > 0 else 0.0
        c = self.eta * s * math.sqrt(max(0.0, 1.0 - ratio * ratio))
        return a_s, math.sqrt(max(0.0, s * s - c * c)), c

    def std(self, step: int) -> float:
        return self._coef[step][2]

    def model_time(self, step: int, n: int, device: torch.device) -> Tensor:
        """The timestep handed to the network: the scheduler's float timesteps (sigma * 1000)."""
        return torch.full((n,), self.model_timesteps[step], dtype=torch.float32, device=device)

    def alpha_sigma(self, step: int) -> tuple[float, float]:
        t = self.sigmas[step]
        return 1.0 - t, t

    def x0_hat(self, x: Tensor, out: Tensor, step: int) -> Tensor:
        return x - self.sigmas[step] * out

    def eps_hat(self, x: Tensor, out: Tensor, step: int) -> Tensor:
        return x + (1.0 - self.sigmas[step]) * out

    def x0_jacobian_scale(self, step: int) -> float:
        return 1.0

    def step(self, out: Tensor, step: int, x: Tensor, noise: Tensor) -> Tensor:
        a, b, c = self._coef[step]
        x0 = self.x0_hat(x, out, step)
        nxt = a * x0
        if b != 0.0:
            nxt = nxt + b * self.eps_hat(x, out, step)
        if c != 0.0:
            nxt = nxt + c * noise
        return nxt

    def next_alpha_sigma(self, step: int) -> tuple[float, float]:
        """(alpha, sigma) of the time reverse step ``step`` lands on."""
        s = self.sigmas[step + 1]
        return 1.0 - s, s

    def renoise(self, x_next: Tensor, step: int, noise: Tensor) -> Tensor:
        """x_t drawn from the forward transition q(x_t | x_s) of step ``step``, with the caller's noise."""
        return forward_transition(x_next, self.alpha_sigma(step), self.next_alpha_sigma(step), noise)


def forward_transition(x_s: Tensor, at: tuple[float, float], frm: tuple[float, float], noise: Tensor) -> Tensor:
    """A draw of x_t given x_s (s earlier in the forward process than t) for x_u = alpha_u x0 +
    sigma_u eps: x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z.
    For DDPM this is sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) z. Used by time-travel
    samplers (FreeDoM) to re-noise the result of a reverse step back to the step's start."""
    (a_t, s_t), (a_s, s_s) = at, frm
    ratio = a_t / a_s
    return ratio * x_s + math.sqrt(max(0.0, s_t * s_t - ratio * ratio * s_s * s_s)) * noise


Kernel = Union[DDIMKernel, FlowKernel]


def is_flow_scheduler(scheduler: Any) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers the core cannot drive, before any model work."""
    if is_flow_scheduler(scheduler):
        cfg = scheduler.config
        if getattr(cfg, "use_dynamic_shifting", False):
            raise ValueError(
                "flow scheduler has use_dynamic_shifting=True, which needs a resolution-dependent mu: "
                "bake it into a static shift (shift = exp(mu), use_dynamic_shifting=False; same sigmas)")
        for flag in ("invert_sigmas", "stochastic_sampling"):
            if getattr(cfg, flag, False):
                raise ValueError(f"flow scheduler option {flag}=True is not supported by the flow kernel")
        return
    step = getattr(scheduler, "step", None)
    if step is None or "variance_noise" not in inspect.signature(step).parameters:
        raise TypeError(
            f"{type(scheduler).__name__} cannot take the caller's noise; use diffusers.DDIMScheduler "
            "(its step(..., eta, variance_noise=...) is the injection point NTRK needs) or, for "
            "flow-matching models, FlowMatchEulerDiscreteScheduler")
    pred = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(
            f"scheduler prediction_type is {pred!r}: the core works with epsilon predictions; convert "
            "v/x0 outputs to eps in the denoiser adapter and configure prediction_type='epsilon'")


def make_kernel(scheduler: Any, num_steps: int, eta: float) -> Kernel:
    """The reverse kernel for a configured diffusers scheduler (which it sets to ``num_steps``)."""
    check_scheduler(scheduler)
    if is_flow_scheduler(scheduler):
        return FlowKernel(scheduler, num_steps, eta)
    return DDIMKernel(scheduler, num_steps, eta)
