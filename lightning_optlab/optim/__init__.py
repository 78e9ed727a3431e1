"""Update rules and optimizers: plain torch, no lightning import."""

from . import torch_rules  # noqa: F401  (registers sgd, adam, adamw, rmsprop)
from .functional import optimizer_state_bytes, optimizer_state_bytes_by_group
from .modular import ModularOptimizer
from .muon import Muon  # registers muon
from .registry import UpdateRule, available_rules, get_rule, register_rule, resolve_hyperparameters
from .rule_optimizer import RuleOptimizer
from .sinkgd import SinkGD, SinkhornTanh  # registers sinkgd, sinkhorn_tanh
from .sparkles import SPARKLES  # registers sparkles
from .spam import AdamWSPAM  # registers adamw_spam

__all__ = [
    "AdamWSPAM",
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
]
