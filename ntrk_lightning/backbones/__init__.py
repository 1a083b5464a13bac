"""Backbones: adapters that give the sampling core its denoiser interface.

Heavy modules (diffusers, Stable Diffusion) are imported lazily by the classes that need them.
"""

from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.backbones.digits_flow import DigitsFlowBackbone
from ntrk_lightning.backbones.digits_unet import DigitsUNetBackbone
from ntrk_lightning.backbones.flux import FluxBackbone
from ntrk_lightning.backbones.gmm import DigitsGMMBackbone
from ntrk_lightning.backbones.sd3 import SD3Backbone
from ntrk_lightning.backbones.stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone

__all__ = ["Backbone", "DigitsFlowBackbone", "DigitsUNetBackbone", "DigitsGMMBackbone", "FluxBackbone", "SD3Backbone",
           "StableDiffusionBackbone", "StableDiffusionXLBackbone"]
