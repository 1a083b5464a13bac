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
3. the module computes the summary (collective), and rank 0 writes ``records.jsonl``,
   ``failed.jsonl``, ``metrics.json`` and the report from what is in memory.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ntrk_lightning.fileio import atomic_write, atomic_write_json
from ntrk_lightning.jsonnum import mean_or_none, nan_if_none, plain, read_json
from ntrk_lightning.pipeline import layout, run
from ntrk_lightning.pipeline.data import Item

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
                    pl_module.update_metrics(arm, torch.stack([u for _, u in pairs]), rewards, items)
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
        atomic_write_json(folder / f"{stem}.json", {"keys": {r["key"]: r.get("png_sha256") for r in records}},
                          indent=None)

    def _load_states(self, stem: str) -> dict[str, Any]:
        path = self.output_dir / layout.STATES / f"{stem}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["arms"]
        except Exception as e:  # torch raises many types for a damaged file
            raise run.RunFolderError(f"persisted metric states {path} are unreadable ({type(e).__name__}); delete "
                                     f"{path.with_suffix('.json')} and rerun (its samples are then read back)") from None

    def _write_run_files(self, trainer: pl.Trainer, pl_module: Any, summary: dict[str, Any]) -> Optional[str]:
        """Rank 0: records.jsonl, failed.jsonl, metrics.json and the report; returns the one-line
        verdict when an arm has no finished sample because every one of its samples failed."""
        out, dm = self.output_dir, trainer.datamodule
        arms = list(pl_module.arm_names)
        records, lines = self._all_records(dm.resume, trainer.world_size, arms)
        layout.write_records_jsonl(out, lines)
        wanted = {layout.key(a, it.prompt_index, it.sample_index) for it in dm.all_items(arms) for a in arms}
        failed = [r for r in layout.iter_failed(out, arms) if r.get("key") in wanted]
        layout.write_failed_jsonl(out, failed)
        described = pl_module.describe_run()
        result = metrics_json(out, described, summary, records, failed, arms)
        result["last_run"] = {"world_size": trainer.world_size, "generated_this_run": dm.generated_this_run,
                              "predict_seconds": described["predict_seconds"], "identity": dm.resume.identity,
                              "damaged_regenerated": len(dm.resume.problems),
                              "damaged": list(dm.resume.problems)[:MAX_DAMAGED_LISTED]}
        atomic_write_json(out / layout.METRICS, result)
        dead = [a for a in arms if result["arms"][a]["num_samples"] == 0 and result["arms"][a]["num_failed"] > 0]
        if self.write_report and not dead:
            from ntrk_lightning.report import Run, write_report

            write_report([out], out, title=result["run"], runs=[Run.of(out, records, result)])
        if trainer.loggers:  # --trainer.logger: final metrics per arm and the sample grid
            from ntrk_lightning.pipeline.loggers import log_predict_run

            log_predict_run(trainer.loggers, out, plain(result), records)
        if dead:
            return (f"every sample of arm(s) {', '.join(dead)} failed (non-finite images; see "
                    f"{out / layout.FAILED}): check the weights and the sampler's hyperparameters")
        return None

    def _all_records(self, earlier: Any, world: int, arms: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """(records, their JSON texts): earlier runs' finished records (verified at set-up), the
        other ranks' records of this run (their shards) and this rank's, newest first per key, in
        (arm, prompt, sample) order. The texts are copied, not encoded again."""
        recs, texts = dict(earlier.records), dict(earlier.lines)
        for r in range(1, world):
            for entry in layout.read_shard(self._shard(r)):
                k = layout.record_key(entry.record)
                recs[k], texts[k] = entry.record, entry.text
        for rec, text in zip(self._records, self._lines):
            k = layout.record_key(rec)
            recs[k], texts[k] = rec, text
        by_arm: dict[str, list[layout.Key]] = {a: [] for a in arms}
        for k in recs:
            if k[0] in by_arm:
                by_arm[k[0]].append(k)
        keys = [k for a in arms for k in sorted(by_arm[a])]
        return [recs[k] for k in keys], [texts.get(k) or json.dumps(plain(recs[k])) for k in keys]


def metrics_json(out: Path, described: dict[str, Any], summary: dict[str, Any], records: Sequence[dict[str, Any]],
                 failed: Sequence[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """The content of ``metrics.json`` (``last_run`` aside), from memory."""
    per_arm = {}
    for arm in arms:
        recs = [r for r in records if r["arm"] == arm]
        per_arm[arm] = {
            "sampler": described["samplers"][arm],
            "num_steps": described["steps_per_arm"][arm],
            "num_samples": len(recs),
            "num_failed": sum(1 for r in failed if r["arm"] == arm),
            "nfe_per_sample": mean_or_none([r["nfe"] for r in recs]),
            "grad_evals_per_sample": mean_or_none([r["grad_evals"] for r in recs]),
            "seconds_per_sample": mean_or_none([r["seconds"] for r in recs]),
            "nan_fallbacks": int(sum(r.get("nan_fallbacks", 0) for r in recs)),
            **summary[arm],
        }
    keep = ("model", "num_steps", "primary_reward", "reward", "eval_rewards", "fid_reference", "fid_feature")
    return {"run": described.get("run_name") or out.resolve().name, **{k: described[k] for k in keep},
            "arms": per_arm}
