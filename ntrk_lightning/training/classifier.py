"""Training the digit classifiers: the reward network (``arch="conv"``, whose penultimate layer is
also the FID feature space) and the held-out judge (``arch="mlp"``, another seed).

Two ways, one recipe: :class:`DigitClassifierModule` (``ntrk fit``, the shipped 16x16 weights) and
:func:`train_classifier` / :func:`cached_classifier`, a plain loop for the small 8x8 classifiers the
tests and benchmarks fit on the fly (memoised on disk under ``$NTRK_CACHE``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.data.digits import digits, real_images, split_indices
from ntrk_lightning.fileio import atomic_write, atomic_write_text, cache_dir
from ntrk_lightning.training import export as ex
from rewards.digits import Arch, build_classifier, load_classifier_file

_DEFAULT_NAMES = {"reward": "digits_classifier", "judge": "digits_judge"}

# the recipe both trainers share
DEFAULT_EPOCHS = 60
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_LABEL_SMOOTHING = 0.05


def default_max_shift(resolution: int) -> int:
    """Largest random translation (pixels) of the augmentation: an eighth of the side, at least 1."""
    return max(1, resolution // 8)


def augment_shifts(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
    """Random integer translations (zero = background padding) so the judges see slightly
    off-centre digits as digits; generated samples are rarely pixel-aligned like the data."""
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    shifts = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g)
    r = x.shape[-1]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = pad[i, :, dy : dy + r, dx : dx + r]
    return out


def train_classifier(
    arch: Arch,
    resolution: int,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    split_seed: int = 0,
) -> tuple[nn.Module, dict]:
    """Train on the digits training split; returns the model (eval mode) and test metrics.

    Deterministic for a given seed on a given machine (CPU, fixed generator, no data-loader workers).
    """
    torch.manual_seed(seed)
    x, y = digits(resolution)
    train_idx, test_idx = split_indices(len(y), seed=split_seed)
    model = build_classifier(arch, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=DEFAULT_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    max_shift = default_max_shift(resolution)
    xt, yt = x[train_idx], y[train_idx]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=g)
        for start in range(0, len(perm), batch_size):
            b = perm[start : start + batch_size]
            xb = augment_shifts(xt[b], g, max_shift)
            loss = F.cross_entropy(model((xb + 1.0) * 0.5), yt[b], label_smoothing=DEFAULT_LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model((x[test_idx] + 1.0) * 0.5).argmax(1) == y[test_idx]).float().mean().item()
    return model, {"test_accuracy": acc, "n_test": int(len(test_idx)), "arch": arch,
                   "resolution": resolution, "seed": seed, "epochs": epochs}


_MEMO: dict[str, tuple[nn.Module, dict]] = {}


def cached_classifier(arch: Arch, resolution: int, seed: int, epochs: int = DEFAULT_EPOCHS) -> tuple[nn.Module, dict]:
    """``train_classifier`` memoised in memory and on disk (safetensors + JSON metrics)."""
    from safetensors.torch import load_file, save_file

    key_src = json.dumps({"arch": arch, "res": resolution, "seed": seed, "epochs": epochs, "v": 1})
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    if key in _MEMO:
        m, info = _MEMO[key]
        return copy.deepcopy(m), dict(info)
    path = cache_dir() / f"classifier-{arch}-{resolution}-{seed}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    model = build_classifier(arch, resolution)
    if path.exists() and meta_path.exists():
        model.load_state_dict(load_file(str(path)))
        model.eval()
        info = json.loads(meta_path.read_text())
    else:
        model, info = train_classifier(arch, resolution, seed, epochs=epochs)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp))
        atomic_write_text(meta_path, json.dumps(info))
    for p in model.parameters():
        p.requires_grad_(False)
    _MEMO[key] = (model, info)
    return copy.deepcopy(model), dict(info)


class DigitClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``rewards.digits.build_classifier(arch, resolution)`` on digits.

    Same recipe as :func:`train_classifier`: random integer translations of up to
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
