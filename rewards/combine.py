"""Rewards built from other rewards: weighted sums, and any user reward given by import path.

In a config::

    reward:
      class_path: rewards.combine.WeightedSum
      init_args:
        rewards:
          aesthetic: {class_path: rewards.aesthetic.LAIONAestheticReward, init_args: {...}}
          clip: {class_path: rewards.clip_score.CLIPScoreReward, init_args: {...}}
        weights: {aesthetic: 1.0, clip: 0.05}

    reward:
      class_path: rewards.combine.ImportedReward
      init_args:
        target: my_package.my_rewards:sharpness     # a callable (images, prompts) -> (B,)
        differentiable: true
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ntrk_lightning.importing import import_object
from rewards.base import Reward


class WeightedSum(Reward):
    """``sum_k weights[k] * rewards[k](images, prompts)``.

    Differentiable iff every part is (a search sampler can use any mix); needs prompts iff any
    part does. Each part is validated by its own constructor and loaded by :meth:`load`.

    Args:
        rewards: name -> reward.
        weights: name -> weight (exactly the names of ``rewards``; finite numbers).
        name: the reward's name in records (default ``"weighted_sum"``).
    """

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float], name: str = "weighted_sum") -> None:
        super().__init__()
        if not isinstance(rewards, dict) or not rewards:
            raise ValueError("WeightedSum needs at least one reward (rewards: {name: reward})")
        if not isinstance(weights, dict) or set(weights) != set(rewards):
            missing = sorted(set(rewards) - set(weights or {}))
            extra = sorted(set(weights or {}) - set(rewards))
            raise ValueError(f"WeightedSum weights must name exactly its rewards: missing {missing}, unknown {extra}")
        for k, r in rewards.items():
            if not callable(r):
                raise TypeError(f"WeightedSum part {k!r} is not a reward (got {type(r).__name__})")
        bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or not math.isfinite(float(w))}
        if bad:
            raise ValueError(f"WeightedSum weights must be finite numbers, got {bad}")
        # modules are registered so that they follow the reward to the accelerator
        self.parts = nn.ModuleDict({k: r for k, r in rewards.items() if isinstance(r, nn.Module)})
        self._parts = dict(rewards)
        self.weights = {k: float(w) for k, w in weights.items()}
        self.name = name
        self.differentiable = all(bool(getattr(r, "differentiable", True)) for r in rewards.values())
        self.needs_prompts = any(bool(getattr(r, "needs_prompts", False)) for r in rewards.values())

    def _load(self) -> None:
        for r in self._parts.values():
            if isinstance(r, Reward):
                r.load()

    def components(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
        """Each part's (B,) reward, unweighted (for logging or a report)."""
        return {k: r(images, prompts) for k, r in self._parts.items()}

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        total: Optional[Tensor] = None
        for k, r in self._parts.items():
            w = self.weights[k]
            if w == 0.0:
                continue
            v = w * r(images, prompts).float().to(images.device)
            total = v if total is None else total + v
        if total is None:  # every weight zero
            return torch.zeros(images.shape[0], device=images.device)
        return total

    def describe(self) -> dict[str, Any]:
        parts = {k: (r.describe() if hasattr(r, "describe") else {"name": type(r).__name__})
                 for k, r in self._parts.items()}
        return {**super().describe(), "weights": dict(self.weights), "parts": parts}


def _takes_prompts(fn: Callable[..., Any], given: Sequence[str] = ()) -> bool:
    """True when ``fn`` has a second positional parameter (the prompts) that is not one of the
    keyword arguments ``given`` (``f(images, channel=0)`` with ``channel`` given takes no prompts)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.name not in given]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2


class ImportedReward(Reward):
    """A user reward named by import path.

    ``target`` is a callable ``f(images, prompts) -> (B,)`` (``f(images)`` works too: prompts are
    passed when it has a second positional parameter not named in ``init_args``), or a class
    whose instances are such callables; a class is instantiated with ``init_args`` when the reward
    is loaded (so heavy user models load on every rank, like ours), and ``init_args`` given with a
    plain function are passed to it as keyword arguments on every call. An ``nn.Module`` result is
    registered as a submodule, so it moves to the accelerator with the rest; a :class:`Reward`
    result is loaded too.

    Args:
        target: ``"package.module:callable_or_class"``.
        init_args: keyword arguments of the class (or of every call of a function).
        differentiable: whether gradient samplers may follow it (state it honestly: a wrong
            ``True`` yields zero or failing gradients).
        needs_prompts: whether it reads the prompts.
        name: name in records (default: the target's last component).
    """

    def __init__(self, target: str, init_args: Optional[dict[str, Any]] = None, differentiable: bool = True,
                 needs_prompts: bool = False, name: Optional[str] = None) -> None:
        super().__init__()
        obj = import_object(target, "reward target")  # a bad path fails now, before any model work
        if not callable(obj):
            raise ValueError(f"reward target {target!r} is a {type(obj).__name__}, not a callable or class")
        self.target = target
        self.init_args = dict(init_args or {})
        self.differentiable = bool(differentiable)
        self.needs_prompts = bool(needs_prompts)
        self.name = name or target.replace(":", ".").rsplit(".", 1)[-1]
        self._obj = obj
        self._fn: Optional[Callable[..., Tensor]] = None
        self._call_kwargs: dict[str, Any] = {}
        self._with_prompts = True
        self.user_module: Optional[nn.Module] = None

    def _load(self) -> None:
        if inspect.isclass(self._obj):
            try:
                fn = self._obj(**self.init_args)
            except TypeError as e:
                raise ValueError(f"cannot construct reward {self.target!r} with init_args {self.init_args}: {e}") from None
            if not callable(fn):
                raise ValueError(f"instances of {self.target!r} are not callable")
            self._call_kwargs = {}
        else:
            fn = self._obj
            self._call_kwargs = dict(self.init_args)
        if isinstance(fn, nn.Module):
            self.user_module = fn
        if isinstance(fn, Reward):
            fn.load()
        self._fn = fn
        self._with_prompts = _takes_prompts(fn, list(self._call_kwargs))

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        if self._with_prompts:
            r = self._fn(images, prompts, **self._call_kwargs)
        else:
            r = self._fn(images, **self._call_kwargs)
        if not isinstance(r, Tensor):
            r = torch.as_tensor(r, dtype=torch.float32, device=images.device)
        return r.float().reshape(-1) if r.ndim > 1 and r.numel() == images.shape[0] else r.float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.target, "init_args": dict(self.init_args),
                "needs_prompts": self.needs_prompts}
