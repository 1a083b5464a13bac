"""Training the pixel-space digits diffusion model (an epsilon-prediction DDPM on a small
diffusers ``UNet2DModel``), with EMA weights kept in the module and exported at the end of fit."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.training import export as ex


#: running loss average (progress bar, card): avg <- DECAY * avg + NEW * loss
LOSS_AVG_DECAY, LOSS_AVG_NEW = 0.98, 0.02
#: EMA warm-up: the decay after n updates is min(ema_decay, (1 + n) / (EMA_WARMUP + n))
EMA_WARMUP = 10.0


def _plain_config(cfg: Any) -> dict[str, Any]:
    return ex.jsonable({k: v for k, v in dict(cfg).items() if not str(k).startswith("_")})


def check_unet_options(block_out_channels: Sequence[int], down_block_types: Sequence[str],
                       up_block_types: Sequence[str], ema_decay: float) -> None:
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError("down_block_types, up_block_types and block_out_channels must have equal lengths")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")


class DigitsDiffusionModule(pl.LightningModule):
    """DDPM training of ``UNet2DModel`` on digits in [-1, 1] (batches ``(images, labels)``; the
    labels are ignored: the model is unconditional).

    Loss: MSE between the UNet output and the noise added by ``DDPMScheduler.add_noise`` at
    uniformly drawn timesteps. Optimiser: AdamW with linear warm-up then cosine decay to
    ``min_lr_ratio * lr`` over the run. EMA: ``ema_unet`` follows ``unet`` after every optimiser
    step with decay ``min(ema_decay, (1 + n) / (10 + n))``; it is part of the checkpoint and is what
    gets exported.

    At the end of fit (rank 0) the EMA weights are written to
    ``<export_dir>/<export_name>.safetensors`` with ``<export_name>_config.json`` (UNet and DDPM
    configs) and ``<export_name>_card.json`` + ``MODEL_CARD.md``. When ``eval_samples > 0`` the
    exported file is reloaded and scored (FID in digit-feature space, held-out judge statistics)
    with the classifiers found in ``eval_classifier_dir`` (default: ``export_dir`` if it holds them,
    else the shipped ones).
    """

    def __init__(
        self,
        resolution: int = 16,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 64),
        layers_per_block: int = 1,
        down_block_types: Sequence[str] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        ema_decay: float = 0.999,
        export_dir: Optional[str] = None,
        export_name: str = "digits_unet",
        model_name: str = "digits16",
        export_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
        eval_samples: int = 1000,
        eval_steps: int = 25,
        eval_seed: int = 0,
        eval_classifier_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        check_unet_options(block_out_channels, down_block_types, up_block_types, ema_decay)
        self.save_hyperparameters()
        self._init_unets()
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
            beta_end=beta_end, prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
        )

    def _init_unets(self) -> None:
        """The trained UNet and its EMA copy from the hyperparameters, and a fresh run state
        (shared with the flow module, which trains the same network)."""
        from diffusers import UNet2DModel

        hp = self.hparams
        self.unet = UNet2DModel(
            sample_size=hp.resolution, in_channels=hp.in_channels, out_channels=hp.in_channels,
            block_out_channels=tuple(hp.block_out_channels), layers_per_block=hp.layers_per_block,
            down_block_types=tuple(hp.down_block_types), up_block_types=tuple(hp.up_block_types),
            norm_num_groups=hp.norm_num_groups, attention_head_dim=hp.attention_head_dim, dropout=hp.dropout,
        )
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self._ema_updates = 0
        self._loss_avg: Optional[float] = None
        self._train_seconds: Optional[float] = None
        self._t0: Optional[float] = None

    # ---- training ---------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self(x_t, t), noise)
        v = float(loss.detach())
        self._loss_avg = v if self._loss_avg is None else LOSS_AVG_DECAY * self._loss_avg + LOSS_AVG_NEW * v
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/loss_avg", self._loss_avg, prog_bar=False, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self._ema_updates
        decay = min(self.hparams.ema_decay, (1.0 + n) / (EMA_WARMUP + n))
        with torch.no_grad():
            for pe, p in zip(self.ema_unet.parameters(), self.unet.parameters()):
                pe.lerp_(p.detach(), 1.0 - decay)
            for be, b in zip(self.ema_unet.buffers(), self.unet.buffers()):
                be.copy_(b)
        self._ema_updates += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema_updates"] = self._ema_updates

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_updates = int(checkpoint.get("ema_updates", 0))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.unet.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(0, min(int(hp.warmup_steps), total - 1))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self) -> None:
        if self._t0 is not None:
            self._train_seconds = time.perf_counter() - self._t0

    # ---- export -----------------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        """What ``backbones.digits_unet`` needs to rebuild the model and its scheduler."""
        return {
            "name": self.hparams.model_name,
            "resolution": int(self.hparams.resolution),
            "unet": _plain_config(self.ema_unet.config),
            "scheduler": _plain_config(self.noise_scheduler.config),
            "scheduler_class": "DDPMScheduler",
            "prediction_type": "epsilon",
            "pixel_range": [-1.0, 1.0],
            "card": f"{self.hparams.export_name}_card.json",
        }

    #: safetensors metadata "kind" of the exported weights
    weights_kind = "unet2d-ddpm-eps-ema"

    def card_text(self) -> tuple[str, str, str]:
        """(title, description, what the config JSON holds) for the model card."""
        return ("pixel-space DDPM (epsilon prediction), diffusers UNet2DModel, EMA weights",
                "Unconditional diffusion model of 16x16 one-channel digits in [-1, 1]. "
                "Load with ntrk_lightning.backbones.digits_unet.load_digits_unet("
                f"'{self.hparams.model_name}'); sample with make_scheduler() (DDIM, trailing spacing).",
                "UNet2DModel + DDPMScheduler configs")

    def export(self, export_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Write EMA weights, config, card; evaluate the exported file. Returns the card."""
        hp = self.hparams
        out = Path(export_dir)
        name = hp.export_name
        w_path = out / f"{name}.safetensors"
        c_path = out / f"{name}_config.json"
        size = ex.save_weights(self.ema_unet.state_dict(), w_path, hp.export_dtype,
                               metadata={"model": hp.model_name, "kind": self.weights_kind})
        ex.atomic_write_text(c_path, json.dumps(self.model_config(), indent=2) + "\n")
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        title, description, config_note = self.card_text()
        card: dict[str, Any] = {
            "title": title,
            "description": description,
            "files": {w_path.name: f"{size} bytes ({hp.export_dtype})", c_path.name: config_note},
            "data": {
                "source": "sklearn.datasets.load_digits (bundled, 1797 8x8 images)",
                "preprocessing": f"pixels/8-1 -> [-1,1], bilinear upsampling to {hp.resolution}x{hp.resolution}",
                "split": getattr(dm, "train_split", None),
                "num_train_images": len(dm.subset(dm.train_split)) if dm is not None and hasattr(dm, "subset") else None,
            },
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            "training": {
                "optimizer_steps": int(trainer.global_step),
                "epochs": int(trainer.current_epoch),
                "batch_size": getattr(dm, "batch_size", None),
                "train_seconds": round(self._train_seconds, 1) if self._train_seconds else None,
                "final_loss_ema": round(self._loss_avg, 5) if self._loss_avg is not None else None,
                "ema_updates": self._ema_updates,
                "num_parameters": sum(p.numel() for p in self.unet.parameters()),
                "precision": str(trainer.precision),
                "finished_utc": ex.now_utc(),
            },
            "machine": ex.machine_info(),
            "config": {"model": dict(hp), "data": dict(dm.hparams) if dm is not None else None,
                       "trainer": {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                                   "gradient_clip_val": trainer.gradient_clip_val,
                                   "accumulate_grad_batches": trainer.accumulate_grad_batches}},
        }
        if hp.eval_samples > 0:
            card["quality"] = self._evaluate_export(out)
        ex.write_card(out, name, card)
        return card

    def _eval_classifiers(self, out: Path) -> tuple[Path, Any, Any]:
        """(folder, reward net, judge) for the export's quality check: an explicit folder, the
        export folder when it holds classifiers, else the shipped ones."""
        from rewards.digits import SHIPPED_CLASSIFIERS, load_shipped_classifier, shipped_weights_dir

        hp = self.hparams
        if hp.eval_classifier_dir is not None:
            cdir = Path(hp.eval_classifier_dir)
        elif all((out / f).is_file() for f, _ in SHIPPED_CLASSIFIERS.values()):
            cdir = out
        else:
            cdir = shipped_weights_dir()
        return cdir, load_shipped_classifier("reward", weights_dir=cdir), load_shipped_classifier("judge", weights_dir=cdir)

    def _load_exported(self, out: Path) -> tuple[Any, Any]:
        """(DiffusionModel, scheduler) read back from the exported files in ``out``."""
        from ntrk_lightning.backbones.digits_unet import load_digits_unet, make_scheduler

        return load_digits_unet(self.hparams.model_name, root=out), make_scheduler(self.hparams.model_name, root=out)

    def _evaluate_export(self, out: Path) -> dict[str, Any]:
        """Quality of what ships (the exported file, float16 round trip included): plain samples
        of the library's sampler against real digits, and the held-out judge's statistics."""
        from ntrk_lightning.training.quality import evaluate_digits_model
        from rewards.digits import DigitFeatures

        hp = self.hparams
        cdir, reward_net, judge = self._eval_classifiers(out)
        model, scheduler = self._load_exported(out)
        q = evaluate_digits_model(model, scheduler, DigitFeatures(reward_net), judge, reward_net,
                                  n=hp.eval_samples, num_steps=hp.eval_steps, eta=hp.get("eval_eta", 1.0),
                                  seed=hp.eval_seed)
        q["classifiers_from"] = str(cdir)
        return q

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            card = self.export(self.hparams.export_dir)
            q = card.get("quality", {})
            msg = f"exported {self.hparams.export_name} to {self.hparams.export_dir}"
            if q:
                msg += (f"; FID(samples, real half) = {q['fid_samples_vs_real_half']:.3f}, "
                        f"FID(real halves) = {q['fid_real_half_vs_real_half']:.3f}")
            print(msg, flush=True)
