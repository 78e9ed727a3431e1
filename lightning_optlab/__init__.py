"""lightning_optlab: per-layer optimizer policies, manifold constraints and spectral monitoring
for PyTorch Lightning.

The layers below ``callbacks`` and ``module`` are plain torch; importing them does not import
lightning. ``OptLabMixin`` and the subpackages (``lightning_optlab.callbacks``, ``models``,
``data``, ``manifolds``, ``spectral``) are loaded on first access, so ``import lightning_optlab``
stays plain torch until they are used.
"""

from .optim import ModularOptimizer, available_rules
from .policy import Policy, Rule, build_optimizer, build_param_groups, describe_parameters, explain

__version__ = "0.1.0"

_LAZY = {"OptLabMixin": "lightning_optlab.module"}
_SUBPACKAGES = ("callbacks", "data", "manifolds", "models", "module", "spectral")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lightning_optlab' has no attribute {name!r}")


__all__ = [
    "ModularOptimizer",
    "callbacks",
    "data",
    "manifolds",
    "models",
    "spectral",
    "OptLabMixin",
    "Policy",
    "Rule",
    "available_rules",
    "build_optimizer",
    "build_param_groups",
    "describe_parameters",
    "explain",
]
