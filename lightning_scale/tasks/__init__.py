"""LightningModules that the recipes train."""

from lightning_scale.tasks.image_classification import ImageClassificationTask
from lightning_scale.tasks.language_modeling import LanguageModelingTask

__all__ = ["LanguageModelingTask", "ImageClassificationTask"]
