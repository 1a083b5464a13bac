"""The functional entry point: ``ntrk_lightning.sample``. No Lightning needed."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ntrk_lightning.denoiser import CountingDenoiser, DiffusionModel, identity_decode
from ntrk_lightning.kernels import check_scheduler
from ntrk_lightning.noise import NoiseSource, sample_seeds
from ntrk_lightning.samplers import NTRK, Sampler, SampleResult, SamplingContext
from ntrk_lightning.samplers.base import StepCallback


def sample(
    denoiser: Union[Callable[..., Tensor], DiffusionModel],
    scheduler: Any,
    reward: Optional[Callable[..., Tensor]],
    sampler: Optional[Sampler] = None,
    num_steps: int = 25,
    shape: Optional[Sequence[int]] = None,
    seed: Union[int, Sequence[int]] = 0,
    *,
    decode: Optional[Callable[[Tensor], Tensor]] = None,
    cond: Any = None,
    prompts: Optional[Sequence[str]] = None,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    callback: Optional[StepCallback] = None,
) -> SampleResult:
    """Draw a batch of samples from a pretrained diffusion model steered by a reward.

    Args:
        denoiser: ``out = f(x_t, t)`` or ``f(x_t, t, cond)``, or a :class:`DiffusionModel` (its
            ``decode``/``sample_shape`` are used). With a ``DDIMScheduler`` ``out`` is the eps
            prediction and ``t`` a 1-D long tensor of training timesteps; with a
            ``FlowMatchEulerDiscreteScheduler`` ``out`` is the velocity (eps - x0) and ``t`` the
            scheduler's float timesteps (sigma * 1000).
        scheduler: a configured diffusers ``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler``
            (copied; yours is not modified).
        reward: differentiable ``r = reward(images)`` (or ``reward(images, prompts)`` when
            ``prompts`` is given) mapping decoded images in [0, 1] to a (B,) tensor.
            May be ``None`` for the plain sampler.
        sampler: a sampler spec, e.g. ``NTRK(gamma=1.0)`` (default) or ``Plain()``.
        num_steps: reverse steps S.
        shape: full batch shape (B, *sample_shape); B may be omitted for a DiffusionModel when
            ``seed`` is a list.
        seed: an int (sample i gets a seed derived from (seed, 0, i)) or one seed per sample, so a
            sample does not depend on which batch it was drawn in.
        decode: maps model space to images in [0, 1]; default ``(x + 1) / 2``.
        cond: conditioning for the denoiser, batched along dim 0 (tensor or tuple/dict of them).
        prompts: one string per sample, handed to the reward.
        device, dtype: where and in which precision the state lives (default: the denoiser's
            parameters' device if it is a module, else CPU).
        callback: called after every reverse step with a dict ``{"step", "num_steps", "x",
            "denoised", "sampler"}`` (k-diffusion style; for progress bars and previews).

    Returns:
        SampleResult with ``samples`` (model space), ``images``, ``rewards``, ``nfe`` and
        ``grad_evals`` per sample, ``seconds`` and ``nan_fallbacks``.
    """
    sampler = _checked_sampler(sampler)
    eps_fn, decode, sample_shape = _unpack_model(denoiser, decode)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    seeds, shape = _seeds_and_shape(seed, shape, sample_shape)
    if sampler.needs_reward and reward is None:
        raise ValueError(f"sampler {sampler.name!r} needs a reward function")
    if prompts is not None and len(prompts) != shape[0]:
        raise ValueError(f"{len(prompts)} prompts for a batch of {shape[0]}")
    check_scheduler(scheduler)
    device = _device_of(eps_fn) if device is None else torch.device(device)

    counting = CountingDenoiser(eps_fn)
    k = sampler.rows_per_sample()
    noise = NoiseSource(seeds, shape[1:], device, dtype)
    ctx = SamplingContext(counting, copy.deepcopy(scheduler), reward, decode, num_steps,
                          noise if k == 1 else noise.spawn(k), cond=cond, prompts=prompts,
                          eta=sampler.step_eta(), batch_size=shape[0], callback=callback)
    start = time.perf_counter()
    x0 = sampler.run(ctx, ctx.initial_noise())
    images, rewards = ctx.final(x0, torch.arange(shape[0]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return SampleResult(
        samples=x0.detach(), images=images.detach(), rewards=rewards.detach(),
        nfe=counting.forward_rows / shape[0], grad_evals=counting.backward_rows / shape[0],
        seconds=seconds, nan_fallbacks=ctx.nan_fallbacks, sampler=sampler.name,
        nan_fallbacks_per_sample=ctx.nan_per_sample.clone(),
        extras=ctx.extras,
    )


def _checked_sampler(sampler: Optional[Sampler]) -> Sampler:
    """The sampler spec (default ``NTRK()``), validated before any model work."""
    sampler = NTRK() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a Sampler spec (e.g. NTRK(...)), got {type(sampler).__name__}")
    sampler.validate()
    return sampler


Decode = Callable[[Tensor], Tensor]


def _unpack_model(denoiser: Union[Callable[..., Tensor], DiffusionModel],
                  decode: Optional[Decode]) -> tuple[Callable[..., Tensor], Decode, tuple]:
    """(network callable, decode, per-sample shape or ``()``): a DiffusionModel brings its own decode
    and shape; an explicit ``decode`` wins; a bare callable decodes with ``identity_decode``."""
    if isinstance(denoiser, DiffusionModel):
        return denoiser.denoiser, decode or denoiser.decode or identity_decode, tuple(denoiser.sample_shape)
    return denoiser, decode or identity_decode, ()


def _seeds_and_shape(seed: Union[int, Sequence[int]], shape: Optional[Sequence[int]],
                     sample_shape: tuple) -> tuple[list[int], tuple[int, ...]]:
    """One seed per sample and the full batch shape, from whichever of the two the caller gave."""
    if isinstance(seed, int):
        if shape is None:
            raise ValueError("give shape=(B, ...) or one seed per sample")
        seeds = sample_seeds(seed, int(shape[0]))
    else:
        seeds = [int(s) for s in seed]
    if shape is None:
        if not sample_shape:
            raise ValueError("shape is required for a plain denoiser callable")
        shape = (len(seeds), *sample_shape)
    shape = tuple(int(s) for s in shape)
    if shape[0] != len(seeds):
        raise ValueError(f"shape has batch {shape[0]} but {len(seeds)} seeds were given")
    if shape[0] < 1:
        raise ValueError("batch must hold at least one sample")
    return seeds, shape


def _device_of(eps_fn: Callable[..., Tensor]) -> torch.device:
    """The device of the network's first parameter; CPU for a parameter-free callable."""
    params = getattr(eps_fn, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")
