"""The Lightning shell: ``ntrk predict`` (generation module, prompt data module, writer) and the CLI."""

from ntrk_lightning.pipeline.data import Item, PromptDataModule
from ntrk_lightning.pipeline.module import GenerationModule
from ntrk_lightning.pipeline.writer import SampleWriter

__all__ = ["GenerationModule", "PromptDataModule", "SampleWriter", "Item"]
