"""Training the shipped digits models with Lightning (``ntrk fit -c configs/digits_*_fit.yaml``)."""

from ntrk_lightning.training.classifier import DigitClassifierModule
from ntrk_lightning.training.data import DigitsDataModule
from ntrk_lightning.training.diffusion import DigitsDiffusionModule
from ntrk_lightning.training.flow import DigitsFlowModule

__all__ = ["DigitClassifierModule", "DigitsDataModule", "DigitsDiffusionModule", "DigitsFlowModule"]
