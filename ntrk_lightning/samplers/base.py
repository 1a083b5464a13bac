"""What every sampler shares: the sampling context (model, scheduler, reward, noise streams,
counters) and the result record. Pure torch: no Lightning, no I/O, no global state."""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from ntrk_lightning.denoiser import CountingDenoiser, index_cond
from ntrk_lightning.kernels import Kernel, make_kernel
from ntrk_lightning.noise import NoiseSource
from ntrk_lightning.schedules import check_window

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


StepCallback = Callable[[dict], None]


class SamplingContext:
    """Everything a sampler needs for one batch. Rows of the working tensor can outnumber the B
    requested samples (particles, trajectories, candidates); ``rows`` maps each working row to its
    sample, so conditioning and prompts follow.

    The model is reached through a reverse kernel (:mod:`ntrk_lightning.kernels`): ``out`` below is
    the network's raw output (eps for diffusion models, velocity for flow models) and step ``i``
    counts reverse steps (0 = the noisiest)."""

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
        callback: Optional[StepCallback] = None,
    ) -> None:
        self.model = denoiser
        self.eta = float(eta)
        self.scheduler = scheduler
        self.kernel: Kernel = make_kernel(scheduler, num_steps, eta)
        self.reward_fn = reward
        self.decode = decode
        self.num_steps = int(num_steps)
        self.noise = noise
        self.cond = cond
        self.prompts = list(prompts) if prompts is not None else None
        self.batch_size = len(noise) if batch_size is None else int(batch_size)  # requested samples
        self.callback = callback
        self.nan_fallbacks = 0
        self.nan_per_sample = torch.zeros(self.batch_size, dtype=torch.long)
        self.extras: dict = {}  # sampler-specific statistics for the result record
        self.timesteps = self.kernel.timesteps

    def count_fallbacks(self, bad: Tensor) -> None:
        """Record rows (a bool mask over the working rows) whose gradient was unusable this step.
        Working row ``i`` belongs to sample ``i // (rows / batch_size)``."""
        bad = bad.detach().to("cpu", torch.bool)
        per = max(1, bad.shape[0] // self.batch_size)
        self.nan_fallbacks += int(bad.sum())
        self.nan_per_sample.index_add_(0, torch.arange(bad.shape[0]) // per, bad.long())

    def step_done(self, step: int, x: Tensor, out: Tensor, x_prev: Tensor, sampler: str) -> None:
        """Hand the caller's ``callback`` the state after reverse step ``step`` (k-diffusion style:
        ``x`` is the new state, ``denoised`` the x0 estimate the step was built on)."""
        if self.callback is not None:
            self.callback({"step": step, "num_steps": self.num_steps, "x": x,
                           "denoised": self.x0_hat(x_prev, out, step), "sampler": sampler})

    # ---- kernel facts ----------------------------------------------------------------------
    def std(self, step: int) -> float:
        """Standard deviation of the noise term of reverse step ``step`` (0 for a deterministic step)."""
        return self.kernel.std(step)

    def x0_hat(self, x: Tensor, out: Tensor, step: int) -> Tensor:
        """Posterior-mean estimate of x0 at step ``step`` (Tweedie's formula for eps models,
        x_t - t v for rectified flow)."""
        return self.kernel.x0_hat(x, out, step)

    def step(self, out: Tensor, step: int, x: Tensor, noise: Tensor) -> Tensor:
        """The pretrained stochastic reverse step, with the caller's standard Gaussian ``noise``."""
        return self.kernel.step(out, step, x, noise)

    def initial_noise(self, noise: Optional[NoiseSource] = None) -> Tensor:
        """x_T drawn from ``noise`` (default: the samples' own streams)."""
        return (self.noise if noise is None else noise).randn() * self.kernel.init_noise_sigma

    # ---- model and reward --------------------------------------------------------------------
    def cond_for(self, rows: Tensor) -> Any:
        return index_cond(self.cond, rows)

    def eps(self, x: Tensor, step: int, rows: Tensor) -> Tensor:
        """Network output at step ``step`` without gradient tracking (one NFE per row)."""
        with torch.no_grad():
            return self.model(x, self.kernel.model_time(step, x.shape[0], x.device), self.cond_for(rows))

    def reward(self, x0: Tensor, rows: Tensor) -> Tensor:
        """Reward of model-space samples ``x0`` (decoded first); differentiable when x0 is."""
        return self.reward_of_images(self.decode(x0), rows)

    def reward_of_images(self, images: Tensor, rows: Tensor) -> Tensor:
        """Reward of decoded images, with the prompts of ``rows`` when the run has prompts."""
        if self.reward_fn is None:
            raise ValueError("this sampler needs a reward function, got reward=None")
        if self.prompts is None:
            r = self.reward_fn(images)
        else:
            r = self.reward_fn(images, [self.prompts[i] for i in rows.tolist()])
        if r.shape != (images.shape[0],):
            raise ValueError(f"reward must return shape ({images.shape[0]},), got {tuple(r.shape)}")
        return r

    def reward_nograd(self, x0: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            return self.reward(x0, rows).float()

    def eps_and_grad(self, x: Tensor, step: int, rows: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
        """Network output (detached), the reward gradient w.r.t. x_t, and the reward of x0_hat.

        ``mode="denoiser"`` backpropagates through the network: grad_x r(x0_hat(x_t)).
        ``mode="tweedie"`` skips the network backward: grad_{x0} r(x0_hat) * d x0_hat / d x_t with
        the network output held fixed (1 / sqrt(abar_t) for eps models, 1 for rectified flow),
        i.e. the network Jacobian is approximated by zero."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "reward-gradient guidance cannot run under torch.inference_mode(); with Lightning use "
                "Trainer(inference_mode=False)")
        tt = self.kernel.model_time(step, x.shape[0], x.device)
        with torch.enable_grad():
            if mode == "denoiser":
                xg = x.detach().requires_grad_(True)
                out = self.model(xg, tt, self.cond_for(rows))
                r = self.reward(self.x0_hat(xg, out, step), rows)
                (g,) = torch.autograd.grad(r.sum(), xg)
            elif mode == "tweedie":
                with torch.no_grad():
                    out = self.model(x, tt, self.cond_for(rows))
                x0 = self.x0_hat(x, out, step).detach().requires_grad_(True)
                r = self.reward(x0, rows)
                (g,) = torch.autograd.grad(r.sum(), x0)
                g = g * self.kernel.x0_jacobian_scale(step)
            else:
                raise ValueError(f"unknown gradient mode {mode!r}; expected 'denoiser' or 'tweedie'")
        self.model.backward_rows += x.shape[0]
        return out.detach(), g.detach(), r.detach().float()

    def final(self, x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded images and rewards of finished samples (no NFE: the reward sees x_0 itself)."""
        with torch.no_grad():
            images = self.decode(x)
            if self.reward_fn is None:
                return images, torch.full((x.shape[0],), float("nan"))
            r = self.reward_of_images(images, rows)
        return images, r.float()


#: floor of a gradient norm before dividing (rows with a zero norm are flagged and zeroed anyway)
_MIN_NORM = 1e-30


def unit_direction(g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample g / ||g|| and a mask of rows whose gradient is unusable (non-finite or zero)."""
    flat = g.flatten(1)
    finite = torch.isfinite(flat).all(1)
    norm = torch.where(finite, flat.norm(dim=1), torch.zeros_like(flat[:, 0]))
    bad = ~finite | (norm <= 0)
    safe = torch.where(bad[:, None], torch.zeros_like(flat), flat / norm.clamp_min(_MIN_NORM)[:, None])
    return safe.view_as(g), bad


class Sampler:
    """Base class of sampler specs.

    Subclasses are dataclasses of hyperparameters with a ``run(ctx, x_T, rows=None)`` method that
    returns the final model-space samples, one per requested sample, a ``name`` used in registries,
    configs and reports, and class-level facts for ``ntrk samplers``: ``nfe_formula`` (denoiser
    forward passes per returned sample, S = steps) and ``source`` (the method's paper).

    Validation happens here, in one place, from class-level declarations: every numeric
    hyperparameter must be finite; ``choices`` lists the allowed values of string options,
    ``positive_ints``/``nonnegative``/``unit_interval`` the ranges of numbers, ``eta_min_open``
    whether eta must be > 0 (samplers whose guidance or search acts through the step's noise); a
    ``window`` field is checked as a trajectory fraction. :meth:`check` adds what is specific.
    """

    name: ClassVar[str] = "sampler"
    needs_reward: ClassVar[bool] = True
    needs_gradient: ClassVar[bool] = False
    nfe_formula: ClassVar[str] = "S"
    source: ClassVar[str] = ""
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    positive_ints: ClassVar[tuple[str, ...]] = ()
    nonnegative: ClassVar[tuple[str, ...]] = ()
    unit_interval: ClassVar[tuple[str, ...]] = ()
    eta_min_open: ClassVar[bool] = False
    eta: float = 1.0

    def rows_per_sample(self) -> int:
        """Working rows per requested sample at the start (particles, trajectories)."""
        return 1

    def step_eta(self) -> float:
        """The eta of the reverse kernel this sampler runs on."""
        return float(self.eta)

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) on bad hyperparameters; called before any
        model work."""
        for f in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
            v = getattr(self, f.name)
            values = v if isinstance(v, (tuple, list)) else (v,)
            for item in values:
                if isinstance(item, (int, float)) and not isinstance(item, bool) and not math.isfinite(item):
                    raise ValueError(f"{self.name}: {f.name} must be finite, got {v!r}")
        for opt, allowed in self.choices.items():
            if getattr(self, opt) not in allowed:
                raise ValueError(f"{self.name}: {opt} must be one of {allowed}, got {getattr(self, opt)!r}")
        for opt in self.positive_ints:
            v = getattr(self, opt)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"{self.name}: {opt} must be an integer >= 1, got {v!r}")
        for opt in self.nonnegative:
            v = getattr(self, opt)
            if v is not None and v < 0:
                raise ValueError(f"{self.name}: {opt} must be >= 0, got {v!r}")
        for opt in self.unit_interval:
            v = getattr(self, opt)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{self.name}: {opt} must be in [0, 1], got {v!r}")
        if hasattr(self, "window"):
            try:
                self.window = check_window(self.window)
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        lo_ok = self.eta > 0.0 if self.eta_min_open else self.eta >= 0.0
        if not (lo_ok and self.eta <= 1.0):
            why = " (the step's noise carries the guidance or the search)" if self.eta_min_open else ""
            raise ValueError(f"{self.name}: eta must be in {'(0' if self.eta_min_open else '[0'}, 1]{why}, "
                             f"got {self.eta}")
        self.check()

    def check(self) -> None:
        """Sampler-specific validation beyond the declared ranges (subclasses override)."""

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        """Hyperparameters as a plain dict (for records and reports)."""
        sig = inspect.signature(type(self))
        d: dict[str, Any] = {"name": self.name}
        for k in sig.parameters:
            v = getattr(self, k)
            if isinstance(v, Sampler):
                v = v.describe()
            d[k] = list(v) if isinstance(v, tuple) else v
        return d
