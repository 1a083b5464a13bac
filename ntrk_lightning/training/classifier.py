"""Training the digit classifiers: the reward network (``arch="conv"``, whose penultimate layer is
also the FID feature space) and the held-out judge (``arch="mlp"``, another seed).

Two ways, one recipe: :class:`DigitClassifierModule` (``ntrk fit``, the shipped 16x16 weights) and
the plain loop of :mod:`ntrk_lightning.training.classifier_loop` for the small 8x8 classifiers the
tests and benchmarks fit on the fly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.data.digits import real_images
from ntrk_lightning.training import export as ex
from ntrk_lightning.training.classifier_loop import (DEFAULT_EPOCHS, DEFAULT_LABEL_SMOOTHING, DEFAULT_LR,
                                                     DEFAULT_WEIGHT_DECAY, augment_shifts, default_max_shift)
from rewards.digits import Arch, build_classifier, load_classifier_file

_DEFAULT_NAMES = {"reward": "digits_classifier", "judge": "digits_judge"}


class DigitClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``rewards.digits.build_classifier(arch, resolution)`` on digits.

    Same recipe as :func:`~ntrk_lightning.training.classifier_loop.train_classifier`: random integer translations of up to
    ``max_shift`` pixels (default ``resolution // 8``, background padding) drawn from the module's
    own generator seeded ``augment_seed``, label smoothing, AdamW with a per-epoch cosine schedule
    over ``trainer.max_epochs``. Inputs arrive in [-1, 1] and are mapped to [0, 1], the reward
    convention. Validation = the held-out test split (``val/acc``).

    At the end of fit (rank 0) the weights go to ``<export_dir>/<export_name>.safetensors``
    (metadata: arch, resolution, kind) with ``<export_name>_card.json`` and ``MODEL_CARD.md``.
    """

    def __init__(
        self,
        arch: Arch = "conv",
        resolution: int = 16,
        kind: Literal["reward", "judge"] = "reward",
        lr: float = DEFAULT_LR,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
        max_shift: Optional[int] = None,
        augment_seed: int = 0,
        export_dir: Optional[str] = None,
        export_name: Optional[str] = None,
        export_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_classifier(arch, resolution)
        self.max_shift = default_max_shift(resolution) if max_shift is None else int(max_shift)
        self._gen = torch.Generator().manual_seed(int(augment_seed))
        self._t0: Optional[float] = None
        self._train_seconds: Optional[float] = None

    def forward(self, images01: Tensor) -> Tensor:
        return self.model(images01)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        x = augment_shifts(x.cpu(), self._gen, self.max_shift).to(x.device)
        loss = F.cross_entropy(self((x + 1.0) * 0.5), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self((x + 1.0) * 0.5)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, on_epoch=True)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        t_max = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else DEFAULT_EPOCHS
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t0 is not None:
            self._train_seconds = time.perf_counter() - self._t0

    # ---- export -----------------------------------------------------------------------------
    @torch.no_grad()
    def test_accuracy(self) -> dict[str, Any]:
        was = self.model.training
        self.model.eval()
        x, y = real_images(self.hparams.resolution, "test")
        acc = float((self.model(x.to(self.device)).argmax(-1).cpu() == y).float().mean())
        xt, yt = real_images(self.hparams.resolution, "train")
        tr = float((self.model(xt.to(self.device)).argmax(-1).cpu() == yt).float().mean())
        self.model.train(was)
        return {"test_accuracy": acc, "n_test": len(y), "train_accuracy": tr}

    def export(self, export_dir: str | os.PathLike[str]) -> dict[str, Any]:
        hp = self.hparams
        name = hp.export_name or _DEFAULT_NAMES[hp.kind]
        out = Path(export_dir)
        w_path = out / f"{name}.safetensors"
        size = ex.save_weights(self.model.state_dict(), w_path, hp.export_dtype,
                               metadata={"arch": hp.arch, "resolution": str(hp.resolution), "kind": hp.kind})
        # score what ships (float16 round trip included)
        shipped = load_classifier_file(w_path)
        x, y = real_images(hp.resolution, "test")
        with torch.no_grad():
            acc_shipped = float((shipped(x).argmax(-1) == y).float().mean())
        q = self.test_accuracy()
        q["test_accuracy_exported_weights"] = acc_shipped
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        role = ("reward network: target-class logit = reward; .features() (64-d) = FID feature space"
                if hp.kind == "reward" else "held-out judge: never used for guidance")
        card = {
            "title": f"digit classifier, arch={hp.arch} ({hp.kind})",
            "description": f"{role}. Input: images in [0, 1], shape (B, 1, {hp.resolution}, {hp.resolution}). "
                           f"Load with rewards.digits.load_shipped_classifier('{hp.kind}').",
            "files": {w_path.name: f"{size} bytes ({hp.export_dtype})"},
            "data": {"source": "sklearn.datasets.load_digits", "split": getattr(dm, "train_split", None),
                     "augmentation": f"random integer shifts up to {self.max_shift} px"},
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            "training": {"epochs": int(trainer.current_epoch), "optimizer_steps": int(trainer.global_step),
                         "batch_size": getattr(dm, "batch_size", None),
                         "train_seconds": round(self._train_seconds, 1) if self._train_seconds else None,
                         "num_parameters": sum(p.numel() for p in self.model.parameters()),
                         "finished_utc": ex.now_utc()},
            "machine": ex.machine_info(),
            "quality": q,
            "config": {"model": dict(hp), "data": dict(dm.hparams) if dm is not None else None,
                       "trainer": {"max_epochs": trainer.max_epochs}},
        }
        ex.write_card(out, name, card)
        return card

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            card = self.export(self.hparams.export_dir)
            print(f"exported {card['files']} to {self.hparams.export_dir}; "
                  f"test accuracy {card['quality']['test_accuracy']:.4f}", flush=True)
