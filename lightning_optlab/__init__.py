"""lightning_optlab: per-layer optimizer policies, manifold constraints and spectral monitoring
for PyTorch Lightning.

The layers below ``callbacks`` and ``module`` are plain torch; importing them does not import
lightning. ``OptLabMixin`` and the callbacks are loaded on first access.
"""

from .optim import ModularOptimizer, available_rules
from .policy import Policy, Rule, build_optimizer, build_param_groups, describe_parameters, explain

__version__ = "0.1.0"

_LAZY = {"OptLabMixin": "lightning_optlab.module"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_optlab' has no attribute {name!r}")


__all__ = [
    "ModularOptimizer",
    "OptLabMixin",
    "Policy",
    "Rule",
    "available_rules",
    "build_optimizer",
    "build_param_groups",
    "describe_parameters",
    "explain",
]
