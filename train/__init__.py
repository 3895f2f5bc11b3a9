"""Training (``zoo.train``): data, the Lightning module, ``fit``. The core ``zoo`` never imports this."""

from .data import ImageGroupedBatchSampler, SkipCounter, VQASample, VQASplit, VQATrainingSet, load_easy_vqa
from .module import TrainConfig, ZooLightningModule, fit

__all__ = ["ImageGroupedBatchSampler", "SkipCounter", "TrainConfig", "VQASample", "VQASplit", "VQATrainingSet",
           "ZooLightningModule", "fit", "load_easy_vqa"]
