"""Example models that use OptLabMixin."""

from .mlp import MLPClassifier

__all__ = ["MLPClassifier"]
