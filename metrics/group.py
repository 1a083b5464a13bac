"""The metric group of one arm, built, fed and summarised the same way by ``ntrk predict`` and
``ntrk evaluate``.

A group is an ``nn.ModuleDict`` with fixed keys: ``reward__<name>`` (:class:`RewardStatistics`
per reward), ``fid`` (:class:`FrechetDistance`), ``diversity`` (:class:`Diversity`) and
``clip_score`` (:class:`OpenCLIPScore`), each present only when asked for. :func:`update_group`
runs the feature network once per batch and hands the same features to FID and diversity;
:func:`summarize_group` returns the summary both commands write (``rewards``, ``fid``,
``diversity`` as ``{"overall", "per_group"}``, ``clip_score``), with JSON-safe numbers.
:func:`shared_reference_stats` lets global rank 0 compute (and cache) the FID reference
statistics before the other ranks read them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ntrk_lightning.jsonnum import finite_or_none

from metrics.clip_score import OpenCLIPScore
from metrics.diversity import Diversity
from metrics.features import extract
from metrics.fid import FrechetDistance
from metrics.reference import ReferenceStats, reference_stats
from metrics.reward_stats import RewardStatistics
from metrics.sample_costs import SampleCosts

REWARD_PREFIX = "reward__"
FID, DIVERSITY, CLIP_SCORE = "fid", "diversity", "clip_score"
#: the :class:`SampleCosts` of a group (``ntrk predict`` adds it; ``ntrk evaluate`` has no costs)
COSTS = "costs"


def reward_key(name: str) -> str:
    return f"{REWARD_PREFIX}{name}"


def build_groups(arms: Sequence[str], reward_names: Sequence[str], feature: Optional[nn.Module] = None,
                 reference: Optional[ReferenceStats] = None, diversity: bool = False,
                 clip: Optional[OpenCLIPScore] = None, costs: bool = False) -> nn.ModuleDict:
    """arm -> metric group (see the module docstring). ``feature`` serves FID (given a
    ``reference``) and diversity; ``clip``'s model is shared by every arm's CLIP score state;
    ``costs`` adds the :class:`SampleCosts` of generated samples."""
    groups = nn.ModuleDict()
    for i, arm in enumerate(arms):
        group = nn.ModuleDict({reward_key(n): RewardStatistics() for n in reward_names})
        if costs:
            group[COSTS] = SampleCosts()
        if reference is not None:
            if feature is None:
                raise ValueError("FID needs a feature extractor")
            group[FID] = FrechetDistance(feature, reference=reference)
        if diversity:
            if feature is None:
                raise ValueError("diversity needs a feature extractor")
            group[DIVERSITY] = Diversity(feature)
        if clip is not None:
            group[CLIP_SCORE] = clip if i == 0 else OpenCLIPScore(model=clip.model, tokenizer=clip.tokenizer)
        groups[arm] = group
    return groups


def reset_groups(groups: nn.ModuleDict) -> None:
    for group in groups.values():
        for m in group.values():
            m.reset()


@torch.no_grad()
def update_group(group: nn.ModuleDict, images: Tensor, rewards: dict[str, Tensor],
                 prompt_groups: Optional[Tensor] = None, prompts: Optional[Sequence[str]] = None,
                 costs: Optional[dict[str, Tensor]] = None) -> None:
    """Add a batch: ``images`` uint8 (B, C, H, W) or float in [0, 1]; ``rewards`` name -> (B,)
    values (names without a statistic in the group are ignored); ``prompt_groups`` (B,) prompt
    indices for per-prompt diversity; ``prompts`` for the CLIP score; ``costs`` the per-sample
    costs (:data:`COST_FIELDS`), needed when the group has them. The feature network runs once,
    for FID and diversity together."""
    if COSTS in group:
        if costs is None:
            raise ValueError("this metric group counts sample costs: update_group needs costs=")
        group[COSTS].update(costs)
    for name, values in rewards.items():
        key = reward_key(name)
        if key in group:
            group[key].update(values.detach().to(torch.float64))
    shared = group[FID] if FID in group else (group[DIVERSITY] if DIVERSITY in group else None)
    if shared is not None:
        feats = extract(shared.feature, images)
        if FID in group:
            group[FID].update(features=feats)
        if DIVERSITY in group:
            group[DIVERSITY].update(groups=prompt_groups, features=feats)
    if CLIP_SCORE in group:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        group[CLIP_SCORE].update(x, list(prompts or [""] * images.shape[0]))


def summarize_group(group: nn.ModuleDict, reward_names: Sequence[str]) -> dict[str, Any]:
    """``{"rewards": {name: stats}, "fid", "diversity": {"overall", "per_group"}, "clip_score"}``
    (+ ``"costs"`` when the group counts them; collective under DDP: every rank calls it);
    absent metrics are ``None``."""
    out: dict[str, Any] = {"rewards": {}}
    for name in reward_names:
        stats = group[reward_key(name)].compute()
        out["rewards"][name] = {k: (v if isinstance(v, int) else finite_or_none(v)) for k, v in stats.items()}
    out[FID] = finite_or_none(group[FID].compute()) if FID in group else None
    if DIVERSITY in group:
        d = group[DIVERSITY].compute()
        out[DIVERSITY] = {"overall": finite_or_none(d["overall"]),
                          "per_group": {str(k): finite_or_none(v) for k, v in d["per_group"].items()}}
    else:
        out[DIVERSITY] = None
    out[CLIP_SCORE] = finite_or_none(group[CLIP_SCORE].compute()) if CLIP_SCORE in group else None
    if COSTS in group:
        out[COSTS] = group[COSTS].compute()
    return out


def reward_values(group: nn.ModuleDict, reward_names: Sequence[str]) -> dict[str, Tensor]:
    """name -> every value of that reward over every rank (collective under DDP), e.g. for the
    report's histograms."""
    return {name: group[reward_key(name)].all_values() for name in reward_names}


def group_states(group: nn.ModuleDict) -> dict[str, dict[str, Any]]:
    """metric name -> its torchmetrics state (tensors on the CPU): what :func:`merge_group_states`
    adds back, e.g. after a resume, without touching the images again."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in group.items():
        out[name] = {k: ([t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu())
                     for k, v in m.metric_state.items()}
    return out


def merge_group_states(group: nn.ModuleDict, states: dict[str, dict[str, Any]]) -> None:
    """Add saved states (from :func:`group_states`) to ``group``; names the group lacks are ignored."""
    for name, state in states.items():
        if name in group:
            m = group[name]
            m.merge_state({k: ([t.to(m.device) for t in v] if isinstance(v, list) else v.to(m.device))
                           for k, v in state.items()})
            m._update_count += 1  # torchmetrics warns when computing a metric that was never fed


def shared_reference_stats(source: Any, feature: nn.Module, is_global_zero: bool, barrier: Callable[[], None],
                           cache_dir: Optional[Any] = None) -> ReferenceStats:
    """FID reference statistics for every rank: global rank 0 computes and caches them first, the
    others wait at ``barrier`` and then read the cache (no rank repeats the work)."""
    stats = reference_stats(source, feature, cache_dir=cache_dir) if is_global_zero else None
    barrier()
    return stats if stats is not None else reference_stats(source, feature, cache_dir=cache_dir)
