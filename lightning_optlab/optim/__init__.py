"""Update rules and optimizers: plain torch, no lightning import.

The built-in rules are the modules in ``BUILTIN_RULE_MODULES``, imported here in that order; each
registers its rules (``register_rule``) and, where it has one, its standalone class. A new rule is
one such module: add its name to the list, or import it before building a policy.
"""

import importlib

from .memory import optimizer_state_bytes, optimizer_state_bytes_by_group
from .modular import ModularOptimizer
from .registry import (
    UpdateRule,
    available_rules,
    get_rule,
    register_rule,
    resolve_hyperparameters,
    standalone_optimizer,
)
from .rule_optimizer import RuleOptimizer

BUILTIN_RULE_MODULES = ("torch_rules", "muon", "sinkgd", "spam", "sparkles")
for _module in BUILTIN_RULE_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from .muon import Muon  # noqa: E402
from .sinkgd import SinkGD, SinkhornTanh  # noqa: E402
from .sparkles import SPARKLES  # noqa: E402
from .spam import AdamWSPAM  # noqa: E402

__all__ = [
    "AdamWSPAM",
    "BUILTIN_RULE_MODULES",
    "ModularOptimizer",
    "Muon",
    "RuleOptimizer",
    "SPARKLES",
    "SinkGD",
    "SinkhornTanh",
    "UpdateRule",
    "available_rules",
    "get_rule",
    "optimizer_state_bytes",
    "optimizer_state_bytes_by_group",
    "register_rule",
    "resolve_hyperparameters",
    "standalone_optimizer",
]
