"""LightningDataModule over scikit-learn's bundled digits (nothing is downloaded)."""

from __future__ import annotations

from typing import Literal, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ntrk_lightning.data.digits import digits, split_indices

Split = Literal["train", "test", "all"]


class DigitsDataModule(pl.LightningDataModule):
    """Digits at ``resolution`` (bilinear upsampling of the 8x8 originals), pixels in [-1, 1].

    Batches are ``(images (B, 1, R, R), labels (B,))``. ``train_split`` picks what the model
    trains on; the validation loader always serves the held-out test split of
    ``split_indices(1797, fraction_test, split_seed)``, the same split the classifiers and the
    model card use. Shuffling uses its own generator seeded by ``shuffle_seed`` (or the global
    seed of ``seed_everything`` when None), so a run is reproducible on a given machine.
    """

    def __init__(self, resolution: int = 16, batch_size: int = 128, train_split: Split = "train",
                 fraction_test: float = 0.2, split_seed: int = 0, shuffle_seed: Optional[int] = None,
                 drop_last: bool = False, eval_batch_size: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        if train_split not in ("train", "test", "all"):
            raise ValueError(f"train_split must be 'train', 'test' or 'all', got {train_split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.train_split = train_split
        self.fraction_test = float(fraction_test)
        self.split_seed = int(split_seed)
        self.shuffle_seed = shuffle_seed
        self.drop_last = bool(drop_last)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self._x: Optional[torch.Tensor] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self._x is not None:
            return
        self._x, self._y = digits(self.resolution)
        self.train_idx, self.test_idx = split_indices(len(self._y), self.fraction_test, self.split_seed)

    def subset(self, split: Split) -> TensorDataset:
        self.setup()
        idx = {"train": self.train_idx, "test": self.test_idx,
               "all": torch.arange(len(self._y))}[split]
        return TensorDataset(self._x[idx], self._y[idx])

    def train_dataloader(self) -> DataLoader:
        seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed()
        g = torch.Generator().manual_seed(int(seed) % (2**63))
        return DataLoader(self.subset(self.train_split), batch_size=self.batch_size, shuffle=True,
                          generator=g, drop_last=self.drop_last, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.subset("test"), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    test_dataloader = val_dataloader
