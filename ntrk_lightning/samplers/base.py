"""What every sampler shares: the sampling context (model, scheduler, reward, noise streams,
counters) and the result record. Pure torch: no Lightning, no I/O, no global state."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from ntrk_lightning.denoiser import CountingDenoiser, index_cond
from ntrk_lightning.noise import NoiseSource

RewardFn = Callable[..., Tensor]


@dataclass
class SampleResult:
    """Output of one sampler call over a batch of B requested samples.

    ``nfe`` and ``grad_evals`` are per returned sample: denoiser rows evaluated (forward) and reward
    gradients taken (backward), divided by B. ``nan_fallbacks`` counts (row, step) pairs whose
    reward gradient was not finite and that fell back to the unguided step;
    ``nan_fallbacks_per_sample`` splits that count over the B returned samples (rows of particles
    or candidates count towards the sample they belong to)."""

    samples: Tensor
    images: Tensor
    rewards: Tensor
    nfe: float
    grad_evals: float
    seconds: float
    nan_fallbacks: int = 0
    sampler: str = ""
    nan_fallbacks_per_sample: Optional[Tensor] = None
    extras: dict = field(default_factory=dict)


class SamplingContext:
    """Everything a sampler needs for one batch. Rows of the working tensor can outnumber the B
    requested samples (particles, candidates); ``rows`` maps each working row to its sample, so
    conditioning and prompts follow."""

    def __init__(
        self,
        denoiser: CountingDenoiser,
        scheduler: Any,
        reward: Optional[RewardFn],
        decode: Callable[[Tensor], Tensor],
        num_steps: int,
        noise: NoiseSource,
        cond: Any = None,
        prompts: Optional[Sequence[str]] = None,
        eta: float = 1.0,
        batch_size: Optional[int] = None,
    ) -> None:
        self.model = denoiser
        self.eta = float(eta)
        self.scheduler = scheduler
        self.reward_fn = reward
        self.decode = decode
        self.num_steps = int(num_steps)
        self.noise = noise
        self.cond = cond
        self.prompts = list(prompts) if prompts is not None else None
        self.batch_size = len(noise) if batch_size is None else int(batch_size)  # requested samples
        self.nan_fallbacks = 0
        self.nan_per_sample = torch.zeros(self.batch_size, dtype=torch.long)
        self.extras: dict = {}  # sampler-specific statistics for the result record
        scheduler.set_timesteps(self.num_steps)
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps]
        self._std = [self._probe_std(t) for t in self.timesteps]

    def count_fallbacks(self, bad: Tensor) -> None:
        """Record rows (a bool mask over the working rows) whose gradient was unusable this step.
        Working row ``i`` belongs to sample ``i // (rows / batch_size)``."""
        bad = bad.detach().to("cpu", torch.bool)
        per = max(1, bad.shape[0] // self.batch_size)
        self.nan_fallbacks += int(bad.sum())
        self.nan_per_sample.index_add_(0, torch.arange(bad.shape[0]) // per, bad.long())

    # ---- scheduler facts -------------------------------------------------------------------
    def _probe_std(self, t: int) -> float:
        """sigma_t of the scheduler's stochastic step, read off the scheduler itself: with zero
        model output and zero sample the step returns exactly sigma_t * variance_noise."""
        zero = torch.zeros(1, dtype=torch.float64)
        out = self.scheduler.step(zero, t, zero, eta=self.eta, variance_noise=torch.ones(1, dtype=torch.float64))
        return float(out.prev_sample.item())

    def std(self, step: int) -> float:
        return self._std[step]

    def alpha_bar(self, t: int) -> float:
        return float(self.scheduler.alphas_cumprod[int(t)])

    def tweedie(self, x: Tensor, eps: Tensor, t: int) -> Tensor:
        """Posterior-mean estimate of x0 from the eps prediction (Tweedie's formula)."""
        a = self.alpha_bar(t)
        return (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)

    def t_tensor(self, t: int, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), int(t), dtype=torch.long, device=device)

    def step(self, eps: Tensor, step: int, x: Tensor, noise: Tensor) -> Tensor:
        """The pretrained stochastic reverse step, with the caller's noise as ``variance_noise``."""
        t = self.timesteps[step]
        return self.scheduler.step(eps, t, x, eta=self.eta, variance_noise=noise).prev_sample

    # ---- model and reward --------------------------------------------------------------------
    def cond_for(self, rows: Tensor) -> Any:
        return index_cond(self.cond, rows)

    def eps(self, x: Tensor, step: int, rows: Tensor) -> Tensor:
        """Denoiser eps without gradient tracking (one NFE per row)."""
        with torch.no_grad():
            return self.model(x, self.t_tensor(self.timesteps[step], x.shape[0], x.device), self.cond_for(rows))

    def reward(self, x0: Tensor, rows: Tensor) -> Tensor:
        """Reward of model-space samples ``x0`` (decoded first); differentiable when x0 is."""
        if self.reward_fn is None:
            raise ValueError("this sampler needs a reward function, got reward=None")
        images = self.decode(x0)
        if self.prompts is None:
            r = self.reward_fn(images)
        else:
            r = self.reward_fn(images, [self.prompts[i] for i in rows.tolist()])
        if r.shape != (x0.shape[0],):
            raise ValueError(f"reward must return shape ({x0.shape[0]},), got {tuple(r.shape)}")
        return r

    def reward_nograd(self, x0: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            return self.reward(x0, rows).float()

    def eps_and_grad(self, x: Tensor, step: int, rows: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
        """Denoiser eps (detached), the reward gradient w.r.t. x_t, and the Tweedie reward.

        ``mode="denoiser"`` backpropagates through the denoiser: grad_x r(x0_hat(x_t)).
        ``mode="tweedie"`` skips the denoiser backward: grad_{x0} r(x0_hat) / sqrt(abar_t), i.e. the
        denoiser Jacobian is approximated by the identity."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "reward-gradient guidance cannot run under torch.inference_mode(); with Lightning use "
                "Trainer(inference_mode=False)")
        t = self.timesteps[step]
        tt = self.t_tensor(t, x.shape[0], x.device)
        with torch.enable_grad():
            if mode == "denoiser":
                xg = x.detach().requires_grad_(True)
                eps = self.model(xg, tt, self.cond_for(rows))
                r = self.reward(self.tweedie(xg, eps, t), rows)
                (g,) = torch.autograd.grad(r.sum(), xg)
            elif mode == "tweedie":
                with torch.no_grad():
                    eps = self.model(x, tt, self.cond_for(rows))
                x0 = self.tweedie(x, eps, t).detach().requires_grad_(True)
                r = self.reward(x0, rows)
                (g,) = torch.autograd.grad(r.sum(), x0)
                g = g / math.sqrt(self.alpha_bar(t))
            else:
                raise ValueError(f"unknown gradient mode {mode!r}; expected 'denoiser' or 'tweedie'")
        self.model.backward_rows += x.shape[0]
        return eps.detach(), g.detach(), r.detach().float()

    def final(self, x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded images and rewards of finished samples (no NFE: the reward sees x_0 itself)."""
        with torch.no_grad():
            images = self.decode(x)
            if self.reward_fn is None:
                return images, torch.full((x.shape[0],), float("nan"))
            r = (self.reward_fn(images) if self.prompts is None
                 else self.reward_fn(images, [self.prompts[i] for i in rows.tolist()]))
        return images, r.float()


def unit_direction(g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample g / ||g|| and a mask of rows whose gradient is unusable (non-finite or zero)."""
    flat = g.flatten(1)
    finite = torch.isfinite(flat).all(1)
    norm = torch.where(finite, flat.norm(dim=1), torch.zeros_like(flat[:, 0]))
    bad = ~finite | (norm <= 0)
    safe = torch.where(bad[:, None], torch.zeros_like(flat), flat / norm.clamp_min(1e-30)[:, None])
    return safe.view_as(g), bad


class Sampler:
    """Base class of sampler specs. Subclasses are dataclasses of hyperparameters with a
    ``run(ctx, x_T)`` method returning the final model-space samples, one per requested sample,
    and a ``name`` used in registries, configs and reports."""

    name: ClassVar[str] = "sampler"
    needs_reward: ClassVar[bool] = True
    needs_gradient: ClassVar[bool] = False
    eta: float = 1.0

    def rows_per_sample(self) -> int:
        """Working rows per requested sample at the start (particles, trajectories)."""
        return 1

    def validate(self) -> None:
        """Raise ValueError on bad hyperparameters; called before any model work."""

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """Hyperparameters as a plain dict (for records and reports)."""
        sig = inspect.signature(type(self))
        d = {"name": self.name}
        for k in sig.parameters:
            v = getattr(self, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        return d
