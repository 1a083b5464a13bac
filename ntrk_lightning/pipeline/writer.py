"""Prediction writer: every finished sample goes to disk as soon as its batch ends.

Batch-interval writing keeps memory flat (an epoch-interval writer would hold every image until
the end, PITFALLS) and makes a kill lose at most the batches in flight. Files are written
atomically; the PNG precedes the record that marks a sample finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from ntrk_lightning.pipeline import layout


class SampleWriter(BasePredictionWriter):
    """Writes ``images/<arm>/<stem>.png`` and ``.json`` for every sample of every batch."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        for arm_out in prediction or []:
            images = arm_out["images"]
            for j, record in enumerate(arm_out["records"]):
                layout.write_sample(self.output_dir, record, images[j])
                self.written += 1
