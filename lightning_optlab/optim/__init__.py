"""Update rules and optimizers: plain torch, no lightning import."""

from . import torch_rules  # noqa: F401  (registers sgd, adam, adamw, rmsprop)
from .modular import ModularOptimizer
from .registry import UpdateRule, available_rules, get_rule, register_rule, resolve_hyperparameters

__all__ = [
    "ModularOptimizer",
    "UpdateRule",
    "available_rules",
    "get_rule",
    "register_rule",
    "resolve_hyperparameters",
]
