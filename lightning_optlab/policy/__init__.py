"""Declarative per-layer policy: rules -> param groups of one ModularOptimizer."""

from .build import assign_rules, build_optimizer, build_param_groups, explain
from .roles import ROLES, ParamInfo, describe_parameters
from .rules import CONSTRAINTS, MATCH_KEYS, Policy, Rule

__all__ = [
    "CONSTRAINTS",
    "MATCH_KEYS",
    "ROLES",
    "ParamInfo",
    "Policy",
    "Rule",
    "assign_rules",
    "build_optimizer",
    "build_param_groups",
    "describe_parameters",
    "explain",
]
