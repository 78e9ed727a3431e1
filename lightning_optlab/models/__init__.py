"""Example models that use OptLabMixin."""

from .mlp import MLPClassifier

__all__ = ["MLPClassifier"]

from .gpt import GPT  # noqa: E402

__all__ += ["GPT"]
