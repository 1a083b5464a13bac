"""The LightningModule of ``ntrk predict``: a frozen backbone, rewards and one or more samplers.

``predict_step`` runs every *arm* (a named sampler configuration) on the batch's items through
the functional core (:func:`ntrk_lightning.sample`), scores the results with the evaluation
rewards, updates the metrics and hands images and records to the writer callback. At the end of
the run all ranks add the samples an earlier run had finished (read back from disk, shared out by
index) to their metrics, the metrics are synchronised, and rank 0 writes ``metrics.json``,
``records.jsonl`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ntrk_lightning.api import sample
from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.fileio import atomic_write_json, atomic_write_text, json_safe
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
        for name in eval_rewards:
            if name == GUIDANCE:
                raise ValueError(f"eval reward name {GUIDANCE!r} is reserved for the guidance reward")
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
        #: class paths and init arguments of backbone/rewards as configured (set by the CLI); the
        #: run fingerprint uses them (without them: class names and ``describe()``)
        self.component_specs: Optional[dict[str, Any]] = None

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

        feature = None
        if self.fid_reference is not None or self.diversity:
            feature = M.build_feature(self.fid_feature)
        reference = M.reference_stats(self.fid_reference, feature) if self.fid_reference is not None else None
        for arm in self.arm_names:
            group = nn.ModuleDict({f"reward__{n}": M.RewardStatistics() for n in self.reward_names})
            if reference is not None:
                group["fid"] = M.FrechetDistance(feature, reference=reference)
            if self.diversity:
                group["diversity"] = M.Diversity(feature)
            if self.clip_model is not None:
                group["clip_score"] = M.OpenCLIPScore(self.clip_model, pretrained=self.clip_weights)
            self.metrics[arm] = group
        self._metrics_ready = True

    def configure_callbacks(self) -> list[pl.Callback]:
        from ntrk_lightning.pipeline.writer import SampleWriter

        if self.output_dir is None:
            raise ValueError("GenerationModule needs output_dir (ntrk predict --output_dir DIR)")
        from ntrk_lightning.pipeline.console import StepProgress

        return [SampleWriter(self.output_dir), StepProgress()]

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled() and any(getattr(s, "needs_gradient", False)
                                                     for s in self.samplers.values()):
            raise RuntimeError("reward guidance needs autograd: construct the Trainer with inference_mode=False")
        self._scheduler = self.backbone.make_scheduler()
        self._t_start = time.perf_counter()
        for group in self.metrics.values():
            for m in group.values():
                m.reset()  # ddp_spawn on CPU shares metric storage between ranks

    # ---- generation --------------------------------------------------------------------------
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning notes SIGTERM but its predict loop runs on; stop between batches, so that the
        # finished samples are on disk and a rerun completes the set.
        if getattr(self.trainer, "received_sigterm", False):
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            self._interrupted = True
            raise SIGTERMException()

    def predict_step(self, batch: Sequence[Item], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        outputs = []
        model = self.backbone.model()
        for arm, spec in self.samplers.items():
            items = [it for it in batch if arm in it.arms]
            if not items:
                continue
            prompts = [it.prompt for it in items]
            cond = self.backbone.conditioning(prompts)
            res = sample(model, self._scheduler, self.reward, spec, self.num_steps[arm], seed=[it.seed for it in items],
                         cond=cond, prompts=prompts, device=self.device,
                         callback=step_callback(self._trainer, arm, self.num_steps[arm]))  # per-step progress on a terminal
            n = len(items)
            # a non-finite final image is a failed sample, never a black "finished" one
            finite = torch.isfinite(res.images.detach().reshape(n, -1)).all(dim=1).cpu()
            failed = [self._failed_record(arm, spec, it, res.images[j]) for j, it in enumerate(items)
                      if not bool(finite[j])]
            keep = [j for j in range(n) if bool(finite[j])]
            if not keep:
                outputs.append({"arm": arm, "records": [], "images": None, "failed": failed})
                continue
            if failed:
                idx = torch.tensor(keep, device=res.images.device)
                res_images, res_rewards = res.images.index_select(0, idx), res.rewards.index_select(0, idx.to(res.rewards.device))
                items = [items[j] for j in keep]
                prompts = [it.prompt for it in items]
            else:
                res_images, res_rewards = res.images, res.rewards
            images = res_images.float().clamp(0.0, 1.0)
            rewards = {GUIDANCE: res_rewards.float().cpu()}
            with torch.no_grad():
                for name, r in self.eval_rewards.items():
                    rewards[name] = r(images, prompts).float().cpu()
            u8 = layout.to_uint8(images)
            self._update_metrics(arm, u8, rewards, items)
            records = []
            for j, it in enumerate(items):
                records.append({
                    "arm": arm, "key": layout.key(arm, it.prompt_index, it.sample_index),
                    "prompt_index": it.prompt_index, "prompt": it.prompt, "sample_index": it.sample_index,
                    "seed": it.seed,
                    "image": str(layout.image_path(Path("."), arm, it.prompt_index, it.sample_index)),
                    "sampler": spec.describe(), "num_steps": self.num_steps[arm],
                    "rewards": {k: _num(v[j]) for k, v in rewards.items()},
                    "nfe": res.nfe, "grad_evals": res.grad_evals,
                    "nan_fallbacks": int(res.nan_fallbacks_per_sample[keep[j]]),
                    "seconds": res.seconds / n, "rank": self.global_rank,
                })
            outputs.append({"arm": arm, "records": records, "images": u8, "failed": failed})
        return outputs

    def _failed_record(self, arm: str, spec: Sampler, it: Item, image: Tensor) -> dict[str, Any]:
        x = image.detach()
        return {"arm": arm, "key": layout.key(arm, it.prompt_index, it.sample_index),
                "prompt_index": it.prompt_index, "prompt": it.prompt, "sample_index": it.sample_index,
                "seed": it.seed, "sampler": spec.describe(), "num_steps": self.num_steps[arm],
                "failed": "non-finite final image",
                "nan_values": int(torch.isnan(x).sum()), "inf_values": int(torch.isinf(x).sum()),
                "values": int(x.numel()), "rank": self.global_rank}

    def _update_metrics(self, arm: str, u8: Tensor, rewards: dict[str, Tensor], items: Sequence[Item]) -> None:
        group = self.metrics[arm]
        for name, v in rewards.items():
            group[f"reward__{name}"].update(v.to(self.device, torch.float64))
        if "fid" in group:
            group["fid"].update(u8.to(self.device))
        if "diversity" in group:
            group["diversity"].update(u8.to(self.device),
                                      torch.tensor([it.prompt_index for it in items], device=self.device))
        if "clip_score" in group:
            group["clip_score"].update(u8.to(self.device).float() / 255.0, [it.prompt for it in items])

    # ---- end of run --------------------------------------------------------------------------
    def on_predict_end(self) -> None:
        trainer = self.trainer
        out = Path(self.output_dir)
        self._catch_up(out, trainer.datamodule, trainer.global_rank, trainer.world_size)
        summary = {arm: self._compute(arm) for arm in self.arm_names}  # collective: every rank
        trainer.strategy.barrier()  # every rank's files are on disk
        dm = trainer.datamodule
        run_stats = {"world_size": trainer.world_size,
                     "generated_this_run": sum(len(it.arms) for it in getattr(dm, "items", [])),
                     "predict_seconds": time.perf_counter() - self._t_start,
                     "identity": getattr(dm, "identity", None),
                     "damaged_regenerated": len(getattr(dm, "problems", []) or []),
                     "damaged": list(getattr(dm, "problems", []) or [])[:100]}
        verdict = None
        if trainer.is_global_zero:
            verdict = self._write_run_files(out, summary, run_stats)
            if trainer.loggers:  # --trainer.logger: final metrics per arm and the sample grid
                from ntrk_lightning.pipeline.loggers import log_predict_run

                log_predict_run(trainer.loggers, out)
        if trainer.world_size > 1:
            verdict = trainer.strategy.broadcast(verdict, src=0)
        trainer.strategy.barrier()
        if verdict:
            from ntrk_lightning.pipeline.run import RunFolderError

            raise RunFolderError(verdict)

    def _catch_up(self, out: Path, dm: Any, rank: int, world: int) -> None:
        """Add samples finished by an earlier run to this rank's metrics (rank r takes every W-th).
        They were verified in the data module's ``setup``; a file that changed since then is a
        one-line error naming it."""
        try:
            self._catch_up_files(out, dm, rank, world)
        except (OSError, ValueError, KeyError, TypeError) as e:
            from ntrk_lightning.pipeline.run import RunFolderError

            raise RunFolderError(f"a finished sample in {out} changed during the run ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); rerun the same command") from None

    def _catch_up_files(self, out: Path, dm: Any, rank: int, world: int) -> None:
        done = sorted(getattr(dm, "finished", set()))
        mine = done[rank::world]
        by_arm: dict[str, list[tuple[int, int]]] = {}
        for arm, p, s in mine:
            by_arm.setdefault(arm, []).append((p, s))
        for arm, keys in by_arm.items():
            for start in range(0, len(keys), 256):
                chunk = keys[start:start + 256]
                recs = [_read_json(layout.record_path(out, arm, p, s)) for p, s in chunk]
                u8 = torch.stack([layout.read_image_u8(layout.image_path(out, arm, p, s)) for p, s in chunk])
                rewards = {n: torch.tensor([_from_json(r["rewards"].get(n)) for r in recs], dtype=torch.float64)
                           for n in self.reward_names}
                items = [Item(r["prompt_index"], r.get("prompt", ""), r["sample_index"], int(r["seed"]), (arm,))
                         for r in recs]
                self._update_metrics(arm, u8, rewards, items)

    def _compute(self, arm: str) -> dict[str, Any]:
        group = self.metrics[arm]
        res: dict[str, Any] = {"rewards": {}}
        for name in self.reward_names:
            res["rewards"][name] = _plain(group[f"reward__{name}"].compute())
        for key in ("fid", "diversity", "clip_score"):
            res[key] = _plain(group[key].compute()) if key in group else None
        return res

    def _write_run_files(self, out: Path, summary: dict[str, dict[str, Any]],
                         run_stats: dict[str, Any]) -> Optional[str]:
        """Write records.jsonl, failed.jsonl, metrics.json and the report; returns the one-line
        verdict when an arm has no finished sample because every one of its samples failed."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        wanted = None
        if dm is not None and hasattr(dm, "all_items"):
            wanted = {layout.key(a, it.prompt_index, it.sample_index)
                      for it in dm.all_items(self.arm_names) for a in self.arm_names}
        records = [r for r in layout.iter_records(out, self.arm_names) if wanted is None or r.get("key") in wanted]
        layout.write_records_jsonl(out, records)
        failed = [r for r in layout.iter_failed(out, self.arm_names) if wanted is None or r.get("key") in wanted]
        failed_file = out / layout.FAILED
        if failed:
            atomic_write_text(failed_file, "".join(json.dumps(json_safe(r)) + "\n" for r in failed))
        elif failed_file.exists():
            failed_file.unlink()
        arms = {}
        for arm in self.arm_names:
            recs = [r for r in records if r["arm"] == arm]
            n = len(recs)
            arms[arm] = {
                "sampler": self.samplers[arm].describe(),
                "num_steps": self.num_steps[arm],
                "num_samples": n,
                "num_failed": sum(1 for r in failed if r["arm"] == arm),
                "nfe_per_sample": _mean([r["nfe"] for r in recs]),
                "grad_evals_per_sample": _mean([r["grad_evals"] for r in recs]),
                "seconds_per_sample": _mean([r["seconds"] for r in recs]),
                "nan_fallbacks": int(sum(r.get("nan_fallbacks", 0) for r in recs)),
                **summary[arm],
            }
        name = self.run_name or out.resolve().name
        steps = set(self.num_steps.values())
        result = {"run": name, "model": self.backbone.describe(),
                  "num_steps": steps.pop() if len(steps) == 1 else dict(self.num_steps),
                  "primary_reward": GUIDANCE, "reward": _describe(self.reward),
                  "eval_rewards": {k: _describe(v) for k, v in self.eval_rewards.items()},
                  "fid_reference": self.fid_reference, "fid_feature": self.fid_feature if self.fid_reference else None,
                  "arms": arms,
                  "last_run": run_stats}
        atomic_write_json(out / layout.METRICS, result)
        dead = [a for a in self.arm_names if arms[a]["num_samples"] == 0 and arms[a]["num_failed"] > 0]
        if self.write_report and not dead:
            from ntrk_lightning.report import write_report

            write_report([out], out, title=name)
        if dead:
            return (f"every sample of arm(s) {', '.join(dead)} failed (non-finite images; see "
                    f"{out / layout.FAILED}): check the weights and the sampler's hyperparameters")
        return None

    def teardown(self, stage: str) -> None:
        # Destroying the gloo/NCCL group avoids intermittent aborts at exit.
        if stage == "predict" and torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                if not self._interrupted:  # after a signal the other ranks may be gone
                    torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()


def _num(v: Any) -> float:
    x = float(v)
    return x if math.isfinite(x) else (None if math.isnan(x) else x)  # JSON has no NaN


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


def _from_json(v: Any) -> float:
    return math.nan if v is None else float(v)


def _mean(values: list[float]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else str(k)): _plain(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _describe(r: Any) -> dict[str, Any]:
    d = getattr(r, "describe", None)
    return d() if callable(d) else {"name": type(r).__name__}
