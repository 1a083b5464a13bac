"""ntrk-lightning: training-free reward alignment of diffusion models with the Noise-Tilted
Reverse Kernel (NTRK), plus honest baselines, on PyTorch Lightning."""

from ntrk_lightning.api import sample
from ntrk_lightning.denoiser import ClassifierFreeGuidance, DiffusionModel
from ntrk_lightning.diffusers_adapter import from_diffusers
from ntrk_lightning.noise import derive_seed
from ntrk_lightning.samplers import (DAS, DPS, NTRK, RBF, SMC, SVDD, BestOfN, FreeDoM, Plain, PsiSampler, Sampler,
                                    SampleResult, make_sampler)
from ntrk_lightning.whitening import whiten

__version__ = "0.1.0"

__all__ = ["sample", "NTRK", "Plain", "DPS", "BestOfN", "SVDD", "SMC", "FreeDoM", "RBF", "DAS", "PsiSampler",
           "Sampler", "SampleResult", "make_sampler",
           "whiten", "DiffusionModel", "ClassifierFreeGuidance", "derive_seed", "from_diffusers", "__version__"]
