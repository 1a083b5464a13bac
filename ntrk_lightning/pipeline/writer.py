"""The prediction writer: the one owner of every file of an ``ntrk predict`` run folder.

During the run every finished sample goes to disk as soon as its batch ends (PNG, then its
record; a failure marker for a sample whose image is not finite), and each rank appends its
records to a JSON-lines shard. Batch-interval writing keeps memory flat (an epoch-interval writer
would hold every image until the end) and makes a kill lose at most the batches in flight.

At the end (:meth:`SampleWriter.on_predict_end`, every rank):

1. samples an earlier run finished reach the metrics: persisted metric states are merged
   (``metric_states/``), and only samples no state file covers (an older folder, a killed run)
   are read back from disk, once;
2. each rank persists the metric states of the samples it generated or read back, so that no
   later run reads them again;
3. the module computes the summary (collective: reward statistics and values, FID, diversity,
   CLIP score, sample costs), and rank 0 writes ``failed.jsonl``, ``metrics.json`` and the report
   from it, and brings ``records.jsonl`` up to date by appending this run's records
   (:mod:`.records_file`).

None of this goes through the samples earlier runs finished one by one (their metric states are
merged whole, their records stay where they are), so the end of a run costs the same at ten
thousand or a million finished samples; only a folder that needs repair (a damaged sample, a
changed request, an older layout) has ``records.jsonl`` rewritten from the record shards.
"""

from __future__ import annotations

import heapq
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from metrics.group import COSTS

from ntrk_lightning.fileio import atomic_write, atomic_write_json, atomic_write_text
from ntrk_lightning.jsonnum import nan_if_none, plain, read_json
from ntrk_lightning.pipeline import layout, records_file, run
from ntrk_lightning.pipeline.data import GRID_SAMPLES, Item

#: finished samples read back from disk per metric update (older folders, killed runs)
REREAD_BATCH = 256
#: damaged samples listed by name in ``metrics.json`` (all are counted)
MAX_DAMAGED_LISTED = 100


class SampleWriter(BasePredictionWriter):
    """Writes the run folder of ``ntrk predict`` (see the module docstring and docs/run_format.md)."""

    def __init__(self, output_dir: str | Path, write_report: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.write_report = bool(write_report)
        self.written = 0
        self.run_id = ""
        self._records: list[dict[str, Any]] = []
        self._lines: list[str] = []  # the JSON texts of ``_records``

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.run_id = trainer.strategy.broadcast(run_id, src=0) if trainer.world_size > 1 else run_id
        self._records, self._lines = [], []

    def _shard(self, rank: int) -> Path:
        return self.output_dir / layout.RECORD_SHARDS / f"{run.state_file_stem(self.run_id, rank)}.jsonl"

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        new, shard_lines = [], []
        for arm_out in prediction or []:
            for j, record in enumerate(arm_out["records"]):
                text, line = layout.write_sample(self.output_dir, record, arm_out["images"][j])
                new.append(record)
                self._lines.append(text)
                shard_lines.append(line)
            for record in arm_out.get("failed") or []:
                layout.write_failed(self.output_dir, record)
        if new:
            layout.append_lines(self._shard(trainer.global_rank), shard_lines)
            self._records.extend(new)
            self.written += len(new)

    # ---- end of run ----------------------------------------------------------------------------
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resume = trainer.datamodule.resume
        rank, world = trainer.global_rank, trainer.world_size
        reread = self._reread(resume.reread[rank::world], pl_module)
        self._save_states(rank, pl_module, [*self._records, *reread])
        for stem in resume.state_files[rank::world]:
            pl_module.merge_metric_states(self._load_states(stem))
        summary = pl_module.metrics_summary()  # collective: every rank
        trainer.strategy.barrier()  # every rank's files are on disk
        verdict = self._write_run_files(trainer, pl_module, summary) if trainer.is_global_zero else None
        if world > 1:
            verdict = trainer.strategy.broadcast(verdict, src=0)
        trainer.strategy.barrier()
        if verdict:
            raise run.RunFolderError(verdict)

    def _reread(self, keys: Sequence[layout.Key], pl_module: Any) -> list[dict[str, Any]]:
        """Add finished samples no state file covers to this rank's metrics, reading their record
        and PNG (verified in the data module's ``setup``; a file changed since is a one-line error)."""
        from ntrk_lightning.pipeline.module import costs_of

        records: list[dict[str, Any]] = []
        try:
            for start in range(0, len(keys), REREAD_BATCH):
                chunk = [self._read_finished(k) for k in keys[start:start + REREAD_BATCH]]
                by_arm: dict[str, list[tuple[dict[str, Any], Any]]] = {}
                for rec, u8 in chunk:
                    by_arm.setdefault(rec["arm"], []).append((rec, u8))
                for arm, pairs in by_arm.items():
                    recs = [r for r, _ in pairs]
                    rewards = {n: torch.tensor([nan_if_none(r["rewards"].get(n)) for r in recs], dtype=torch.float64)
                               for n in pl_module.reward_names}
                    items = [Item(r["prompt_index"], r.get("prompt", ""), r["sample_index"], int(r["seed"]), (arm,))
                             for r in recs]
                    pl_module.update_metrics(arm, torch.stack([u for _, u in pairs]), rewards, items, costs_of(recs))
                records.extend(r for r, _ in chunk)
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else ""
            raise run.RunFolderError(f"a finished sample in {self.output_dir} changed during the run "
                                     f"({type(e).__name__}: {reason}); rerun the same command") from None
        return records

    def _read_finished(self, k: layout.Key) -> tuple[dict[str, Any], Any]:
        rec_path = layout.find_record(self.output_dir, *k)
        return read_json(rec_path), layout.read_image_u8(rec_path.with_suffix(".png"))

    def _save_states(self, rank: int, pl_module: Any, records: Sequence[dict[str, Any]]) -> None:
        """Persist this rank's metric states with the samples they cover: the ``.pt`` first, then
        the key list that makes it count (a kill in between leaves a file no run uses)."""
        if not records:
            return
        folder = self.output_dir / layout.STATES
        stem = run.state_file_stem(self.run_id, rank)
        states = pl_module.metric_states()
        atomic_write(folder / f"{stem}.pt", lambda tmp: torch.save({"arms": states}, tmp))
        atomic_write_text(folder / f"{stem}{run.STATE_KEYS_SUFFIX}",
                          run.state_keys_text({r["key"]: r.get("png_sha256") for r in records}))

    def _load_states(self, stem: str) -> dict[str, Any]:
        path = self.output_dir / layout.STATES / f"{stem}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["arms"]
        except Exception as e:  # torch raises many types for a damaged file
            raise run.RunFolderError(f"persisted metric states {path} are unreadable ({type(e).__name__}); delete "
                                     f"{path.with_suffix(run.STATE_KEYS_SUFFIX)} and rerun (its samples are then read back)") from None

    def _write_run_files(self, trainer: pl.Trainer, pl_module: Any, summary: dict[str, Any]) -> Optional[str]:
        """Rank 0: records.jsonl, failed.jsonl, metrics.json and the report; returns the one-line
        verdict when an arm has no finished sample because every one of its samples failed. Its
        cost grows with the samples this run generated, not with those earlier runs finished."""
        out, dm = self.output_dir, trainer.datamodule
        arms = list(pl_module.arm_names)
        new = self._this_run(trainer.world_size)
        update_records_jsonl(out, dm.resume.records_plan, new, arms)
        failed = layout.read_failed(sorted(
            str(layout.failed_path(out, a, it.prompt_index, it.sample_index)) for it in dm.items for a in it.arms
            if (a, it.prompt_index, it.sample_index) not in new
            and layout.failed_path(out, a, it.prompt_index, it.sample_index).is_file()))
        layout.write_failed_jsonl(out, failed)
        described = pl_module.describe_run()
        values = {arm: {n: v.numpy() for n, v in summary[arm].pop("values").items()} for arm in arms}
        result = metrics_json(out, described, summary, failed, arms)
        result["last_run"] = {"world_size": trainer.world_size, "generated_this_run": dm.generated_this_run,
                              "predict_seconds": described["predict_seconds"], "identity": dm.resume.identity,
                              "damaged_regenerated": len(dm.resume.problems),
                              "damaged": list(dm.resume.problems)[:MAX_DAMAGED_LISTED]}
        atomic_write_json(out / layout.METRICS, result)
        dead = [a for a in arms if result["arms"][a]["num_samples"] == 0 and result["arms"][a]["num_failed"] > 0]
        grid = grid_images(dm.resume.first_images, new, arms)
        if self.write_report and not dead:
            from ntrk_lightning.report import Run, write_report

            write_report([out], out, title=result["run"], runs=[Run.from_summary(out, result, values, grid)])
        if trainer.loggers:  # --trainer.logger: final metrics per arm and the sample grid
            from ntrk_lightning.pipeline.loggers import log_predict_run

            log_predict_run(trainer.loggers, out, plain(result), grid)
        if dead:
            return (f"every sample of arm(s) {', '.join(dead)} failed (non-finite images; see "
                    f"{out / layout.FAILED}): check the weights and the sampler's hyperparameters")
        return None

    def _this_run(self, world: int) -> dict[layout.Key, tuple[dict[str, Any], str]]:
        """key -> (record, JSON text) of every sample this run finished: this rank's from memory,
        the other ranks' from their record shards of this run."""
        new: dict[layout.Key, tuple[dict[str, Any], str]] = {}
        for r in range(1, world):
            for entry in layout.read_shard(self._shard(r)):
                new[layout.record_key(entry.record)] = (entry.record, entry.text)
        for rec, text in zip(self._records, self._lines):
            new[layout.record_key(rec)] = (rec, text)
        return new


def _ordered(keys: Any, arms: Sequence[str]) -> list[layout.Key]:
    """Keys in (arm as configured, prompt, sample) order."""
    rank = {a: i for i, a in enumerate(arms)}
    return sorted((k for k in keys if k[0] in rank), key=lambda k: (rank[k[0]], k[1], k[2]))


def update_records_jsonl(out: Path, plan: Optional[records_file.Plan],
                         new: dict[layout.Key, tuple[dict[str, Any], str]], arms: Sequence[str]) -> int:
    """Bring ``records.jsonl`` up to date (:mod:`.records_file`): append this run's records and
    the ``fresh`` ones of the plan, or rewrite the file from every record shard when the plan
    says the file no longer describes the folder (or there is no plan). Returns the count."""
    texts = {k: text for k, (_, text) in new.items()}
    if plan is not None and plan.append:
        found = layout.read_shards(out, after=plan.shards_through) if plan.fresh else {}
        if all(k in found for k in plan.fresh):
            texts.update({k: found[k].text for k in plan.fresh})
            records_file.append_lines(out, [texts[k] for k in _ordered(texts, arms)])
            count = plan.count + len(new)
            records_file.write_index(out, count, plan.digest + records_file.key_digest(new))
            return count
    finished = set(new) | set(plan.finished if plan is not None else ())
    shards = layout.read_shards(out)
    keys = [k for k in _ordered(finished, arms) if k in texts or k in shards]
    layout.write_records_jsonl(out, [texts[k] if k in texts else shards[k].text for k in keys])
    records_file.write_index(out, len(keys), records_file.key_digest(keys))
    return len(keys)


def grid_images(first: dict[str, list[tuple[int, int, str]]], new: dict[layout.Key, tuple[dict[str, Any], str]],
                arms: Sequence[str], n: int = GRID_SAMPLES) -> dict[str, list[str]]:
    """arm -> image paths of its first ``n`` finished samples by (prompt, sample): the earlier
    runs' first ones (found at resume) and this run's."""
    out = {}
    for arm in arms:
        cands = list(first.get(arm, [])) + [(k[1], k[2], rec["image"]) for k, (rec, _) in new.items() if k[0] == arm]
        out[arm] = [img for _, _, img in heapq.nsmallest(n, cands)]
    return out


def metrics_json(out: Path, described: dict[str, Any], summary: dict[str, Any], failed: Sequence[dict[str, Any]],
                 arms: Sequence[str]) -> dict[str, Any]:
    """The content of ``metrics.json`` (``last_run`` aside), from the metric summary (the sample
    costs included): nothing here goes through the records."""
    per_arm = {}
    for arm in arms:
        arm_summary = dict(summary[arm])
        costs = arm_summary.pop(COSTS, None) or {"count": 0, "sum": {}, "mean": {}}
        per_arm[arm] = {
            "sampler": described["samplers"][arm],
            "num_steps": described["steps_per_arm"][arm],
            "num_samples": int(costs["count"]),
            "num_failed": sum(1 for r in failed if r["arm"] == arm),
            "nfe_per_sample": costs["mean"].get("nfe"),
            "grad_evals_per_sample": costs["mean"].get("grad_evals"),
            "seconds_per_sample": costs["mean"].get("seconds"),
            "seconds_total": costs["sum"].get("seconds"),
            "nan_fallbacks": int(costs["sum"].get("nan_fallbacks") or 0),
            **arm_summary,
        }
    keep = ("model", "num_steps", "primary_reward", "reward", "eval_rewards", "fid_reference", "fid_feature")
    return {"run": described.get("run_name") or out.resolve().name, **{k: described[k] for k in keep},
            "arms": per_arm}
