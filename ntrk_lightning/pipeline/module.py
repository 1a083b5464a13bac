"""The LightningModule of ``ntrk predict``: a frozen backbone, rewards and one or more samplers.

``predict_step`` runs every *arm* (a named sampler configuration) on the batch's items through
the functional core (:func:`ntrk_lightning.sample`), scores the results with the evaluation
rewards, updates the metrics and returns images and records for the writer callback
(:class:`~ntrk_lightning.pipeline.writer.SampleWriter`), which owns every file of the run. The
module writes nothing and reads no file: at the end the writer hands it the metric states of
samples an earlier run finished (:meth:`merge_metric_states`, :meth:`update_metrics`) and asks it
for the summary (:meth:`metrics_summary`, :meth:`describe_run`).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ntrk_lightning.api import sample
from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.jsonnum import finite_or_none
from ntrk_lightning.pipeline import layout
from ntrk_lightning.pipeline.console import step_callback
from ntrk_lightning.pipeline.data import Item
from ntrk_lightning.samplers.base import Sampler
from rewards.base import Reward, is_differentiable

GUIDANCE = "reward"  # name of the guidance reward in records and metrics


class GenerationModule(pl.LightningModule):
    """Generate with one or more samplers on a frozen diffusion model.

    Args:
        backbone: the diffusion model (e.g. ``DigitsUNetBackbone``, ``StableDiffusionBackbone``).
        reward: the reward the samplers steer by (and the report's primary reward).
        samplers: arm name -> sampler spec, e.g. ``{"ntrk": NTRK(gamma=0.3), "plain": Plain()}``.
            Every arm generates every item, with the same seeds.
        num_steps: reverse steps S of every arm, or arm name -> S (so that search baselines can
            trade steps for candidates at equal NFE).
        eval_rewards: name -> reward computed on every final image but never used for guidance
            (held-out judges); recorded per sample and summarised in the metrics.
        fid_reference: real images for FID: ``"digits"``/``"digits:R"``, a folder, or a saved
            statistics file (``None``: no FID).
        fid_feature: feature extractor for FID and diversity: ``"inception"``, ``"digits"`` or an
            import path ``"package.module:Class"``.
        diversity: compute the mean pairwise feature distance (per prompt and overall).
        clip_model, clip_weights: open_clip model name and local weights file for the CLIP score
            (``None``: no CLIP score).
        output_dir: run folder (set by ``--output_dir``).
        run_name: name of the run in reports (default: the output folder's name).
        report: write ``report.md`` (and its PNGs) at the end.
    """

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        samplers: dict[str, Sampler],
        num_steps: Union[int, dict[str, int]] = 25,
        eval_rewards: Optional[dict[str, Reward]] = None,
        fid_reference: Optional[str] = None,
        fid_feature: str = "inception",
        diversity: bool = False,
        clip_model: Optional[str] = None,
        clip_weights: Optional[str] = None,
        output_dir: Optional[str] = None,
        run_name: Optional[str] = None,
        report: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(samplers, dict) or not samplers:
            raise ValueError("samplers must map at least one arm name to a sampler spec")
        steps = _steps_per_arm(num_steps, list(samplers))
        eval_rewards = dict(eval_rewards or {})
        if GUIDANCE in eval_rewards:
            raise ValueError(f"eval reward name {GUIDANCE!r} is reserved for the guidance reward")
        _check_arms(samplers, reward)
        if fid_reference is not None:
            from metrics.reference import check_reference_source

            check_reference_source(fid_reference)  # a wrong path fails now, not after generation
        self.backbone = backbone
        self.reward = reward
        self.eval_rewards = nn.ModuleDict(eval_rewards)
        self.samplers = dict(samplers)
        self.num_steps = steps
        self.fid_reference = fid_reference
        self.fid_feature = fid_feature
        self.diversity = bool(diversity)
        self.clip_model, self.clip_weights = clip_model, clip_weights
        self.output_dir = output_dir
        self.run_name = run_name
        self.write_report = bool(report)
        self.metrics = nn.ModuleDict()
        self._scheduler: Any = None
        self._metrics_ready = False
        self._interrupted = False
        self._t_start = time.perf_counter()

    # ---- set-up ----------------------------------------------------------------------------
    @property
    def arm_names(self) -> list[str]:
        return list(self.samplers)

    @property
    def reward_names(self) -> list[str]:
        return [GUIDANCE, *self.eval_rewards.keys()]

    def configure_model(self) -> None:
        """Load weights from local files on every rank (the strategy then moves them)."""
        self.backbone.load()
        self.reward.load() if isinstance(self.reward, Reward) else None
        for r in self.eval_rewards.values():
            r.load()
        if not self._metrics_ready:
            self._build_metrics()

    def _build_metrics(self) -> None:
        import metrics as M
        from metrics.group import build_groups, shared_reference_stats

        feature = None
        if self.fid_reference is not None or self.diversity:
            feature = M.build_feature(self.fid_feature)
        reference = None
        if self.fid_reference is not None:
            trainer = self._trainer
            zero = trainer is None or trainer.is_global_zero
            barrier = trainer.strategy.barrier if trainer is not None else (lambda: None)
            reference = shared_reference_stats(self.fid_reference, feature, zero, barrier)
        clip = M.OpenCLIPScore(self.clip_model, pretrained=self.clip_weights) if self.clip_model is not None else None
        self.metrics = build_groups(self.arm_names, self.reward_names, feature, reference, self.diversity, clip,
                                    costs=True)
        self._metrics_ready = True

    def configure_callbacks(self) -> list[pl.Callback]:
        from ntrk_lightning.pipeline.console import StepProgress
        from ntrk_lightning.pipeline.writer import SampleWriter

        if self.output_dir is None:
            raise ValueError("GenerationModule needs output_dir (ntrk predict --output_dir DIR)")
        return [SampleWriter(self.output_dir, write_report=self.write_report), StepProgress()]

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled() and any(getattr(s, "needs_gradient", False)
                                                     for s in self.samplers.values()):
            raise RuntimeError("reward guidance needs autograd: construct the Trainer with inference_mode=False")
        from metrics.group import reset_groups

        self._scheduler = self.backbone.make_scheduler()
        self._t_start = time.perf_counter()
        reset_groups(self.metrics)  # ddp_spawn on CPU shares metric storage between ranks

    # ---- generation --------------------------------------------------------------------------
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning notes SIGTERM but its predict loop runs on; stop between batches, so that the
        # finished samples are on disk and a rerun completes the set.
        if getattr(self.trainer, "received_sigterm", False):
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            self._interrupted = True
            raise SIGTERMException()

    def predict_step(self, batch: Sequence[Item], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per arm with items in the batch: ``{"arm", "records", "images" (uint8, or None),
        "failed" (failure markers)}`` for the writer; the metrics are updated here."""
        outputs = []
        for arm, spec in self.samplers.items():
            items = [it for it in batch if arm in it.arms]
            if items:
                outputs.append(self._generate_arm(arm, spec, items))
        return outputs

    def _generate_arm(self, arm: str, spec: Sampler, items: list[Item]) -> dict[str, Any]:
        prompts = [it.prompt for it in items]
        res = sample(self.backbone.model(), self._scheduler, self.reward, spec, self.num_steps[arm],
                     seed=[it.seed for it in items], cond=self.backbone.conditioning(prompts), prompts=prompts,
                     device=self.device,
                     callback=step_callback(self._trainer, arm, self.num_steps[arm]))  # per-step progress on a terminal
        n = len(items)
        # a non-finite final image is a failed sample, never a black "finished" one
        finite = torch.isfinite(res.images.detach().reshape(n, -1)).all(dim=1).cpu()
        keep = [j for j in range(n) if bool(finite[j])]
        failed = [self._failed_record(arm, spec, it, res.images[j]) for j, it in enumerate(items) if not bool(finite[j])]
        if not keep:
            return {"arm": arm, "records": [], "images": None, "failed": failed}
        images, rewards = res.images, res.rewards
        if failed:
            idx = torch.tensor(keep, device=res.images.device)
            images, rewards = images.index_select(0, idx), rewards.index_select(0, idx.to(rewards.device))
            items = [items[j] for j in keep]
        images = images.float().clamp(0.0, 1.0)
        scores = self._score(images, [it.prompt for it in items], rewards)
        u8 = layout.to_uint8(images)
        records = [layout.build_record(
            arm, it.prompt_index, it.prompt, it.sample_index, it.seed, spec.describe(), self.num_steps[arm],
            rewards={k: finite_or_none(v[j]) for k, v in scores.items()}, nfe=res.nfe, grad_evals=res.grad_evals,
            nan_fallbacks=int(res.nan_fallbacks_per_sample[keep[j]]), seconds=res.seconds / n, rank=self.global_rank)
            for j, it in enumerate(items)]
        self.update_metrics(arm, u8, scores, items, costs_of(records))
        return {"arm": arm, "records": records, "images": u8, "failed": failed}

    def _score(self, images: Tensor, prompts: list[str], guidance: Tensor) -> dict[str, Tensor]:
        """Reward name -> (B,) float values on the CPU: the guidance reward the sampler returned,
        then every evaluation reward on the final images."""
        scores = {GUIDANCE: guidance.float().cpu()}
        with torch.no_grad():
            for name, r in self.eval_rewards.items():
                scores[name] = r(images, prompts).float().cpu()
        return scores

    def _failed_record(self, arm: str, spec: Sampler, it: Item, image: Tensor) -> dict[str, Any]:
        x = image.detach()
        return layout.build_failed_record(arm, it.prompt_index, it.prompt, it.sample_index, it.seed, spec.describe(),
                                          self.num_steps[arm], nan_values=int(torch.isnan(x).sum()),
                                          inf_values=int(torch.isinf(x).sum()), values=int(x.numel()),
                                          rank=self.global_rank)

    # ---- metrics (the writer's interface) ------------------------------------------------------
    def update_metrics(self, arm: str, u8: Tensor, rewards: dict[str, Tensor], items: Sequence[Item],
                       costs: dict[str, Tensor]) -> None:
        """Add finished samples of ``arm`` to its metrics: uint8 images, reward values, items and
        their costs (:func:`costs_of` their records)."""
        from metrics.group import update_group

        groups = torch.tensor([it.prompt_index for it in items], device=self.device)
        update_group(self.metrics[arm], u8.to(self.device), {k: v.to(self.device) for k, v in rewards.items()},
                     groups, [it.prompt for it in items], costs)

    def metric_states(self) -> dict[str, dict[str, Any]]:
        """arm -> this rank's metric states (to persist them with the samples they cover)."""
        from metrics.group import group_states

        return {arm: group_states(group) for arm, group in self.metrics.items()}

    def merge_metric_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Add persisted metric states (of samples an earlier run finished) to this rank's metrics."""
        from metrics.group import merge_group_states

        for arm, group_state in states.items():
            if arm in self.metrics:
                merge_group_states(self.metrics[arm], group_state)

    def metrics_summary(self) -> dict[str, dict[str, Any]]:
        """arm -> summary over every rank (collective: every rank calls it), with the arm's
        ``costs`` and, under ``values``, every reward value (for the report's histograms)."""
        from metrics.group import reward_values, summarize_group

        return {arm: {**summarize_group(self.metrics[arm], self.reward_names),
                      "values": reward_values(self.metrics[arm], self.reward_names)} for arm in self.arm_names}

    def describe_run(self) -> dict[str, Any]:
        """What ``metrics.json`` says about the configuration (beside the per-arm numbers)."""
        steps = set(self.num_steps.values())
        return {"run_name": self.run_name, "model": self.backbone.describe(),
                "num_steps": steps.pop() if len(steps) == 1 else dict(self.num_steps),
                "primary_reward": GUIDANCE, "reward": _describe(self.reward),
                "eval_rewards": {k: _describe(v) for k, v in self.eval_rewards.items()},
                "fid_reference": self.fid_reference, "fid_feature": self.fid_feature if self.fid_reference else None,
                "samplers": {arm: s.describe() for arm, s in self.samplers.items()},
                "steps_per_arm": dict(self.num_steps),
                "predict_seconds": time.perf_counter() - self._t_start}

    def teardown(self, stage: str) -> None:
        if stage == "predict":
            from ntrk_lightning.pipeline.distributed import destroy_process_group

            destroy_process_group(barrier=not self._interrupted)  # after a signal the other ranks may be gone


def _check_arms(samplers: dict[str, Sampler], reward: Reward) -> None:
    """Arm names, sampler specs and their needs (a gradient sampler needs a differentiable reward)."""
    for arm, spec in samplers.items():
        layout.check_arm_name(arm)
        if not isinstance(spec, Sampler):
            raise TypeError(f"arm {arm!r}: expected a sampler spec, got {type(spec).__name__}")
        spec.validate()
        if getattr(spec, "needs_gradient", False) and not is_differentiable(reward):
            raise ValueError(
                f"arm {arm!r}: sampler {spec.name!r} follows the reward gradient, but the reward "
                f"{getattr(reward, 'name', type(reward).__name__)!r} is not differentiable; use a search "
                "sampler (best_of_n, svdd, smc with proposal=prior) or a differentiable reward")


def _steps_per_arm(num_steps: Union[int, dict[str, int]], arms: list[str]) -> dict[str, int]:
    if isinstance(num_steps, dict):
        missing, extra = set(arms) - set(num_steps), set(num_steps) - set(arms)
        if missing or extra:
            raise ValueError(f"num_steps must name every arm exactly: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        steps = {a: int(num_steps[a]) for a in arms}
    else:
        steps = {a: int(num_steps) for a in arms}
    for a, v in steps.items():
        if v < 1:
            raise ValueError(f"num_steps must be >= 1, got {v} for arm {a!r}")
    return steps


def _describe(r: Any) -> dict[str, Any]:
    d = getattr(r, "describe", None)
    return d() if callable(d) else {"name": type(r).__name__}


def costs_of(records: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """The per-sample costs of finished samples (``metrics.COST_FIELDS``) from their records."""
    from metrics.sample_costs import COST_FIELDS

    return {f: torch.tensor([float(r.get(f) or 0) for r in records], dtype=torch.float64) for f in COST_FIELDS}
