"""One place that maps optimizer names (as written in a policy or YAML) to update rules.

An :class:`UpdateRule` is a plain description: its name, its hyperparameters with their
defaults, the smallest parameter rank it accepts, and ``step`` -- a function that updates one
param group in place::

    step(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None

``group`` holds the hyperparameters (already validated and filled with defaults), ``states``
are the per-parameter state dicts the optimizer keeps (the rule fills them lazily). Rules see a
whole group at once so they can batch work across parameters (foreach kernels, one stacked
Newton-Schulz call for same-shaped matrices).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

StepFn = Callable[[dict, list, list, list], None]
CheckFn = Callable[[Mapping[str, Any]], None]
PrepareFn = Callable[[dict, list, list, list], "Callable[[], None] | None"]

# Keys of a param group that describe it rather than configure its rule.
GROUP_META_KEYS = frozenset(
    {
        "params",
        "param_names",
        "algorithm",
        "name",
        "role",
        "roles",
        # per-parameter matrix view codes (optim.matrix.MatrixView.code), aligned with params
        "matrix_views",
        "constraint",
        "constraint_options",
        "lr_scale",
        "rule_index",
        # runtime objects of a rule (e.g. Muon's CUDA graph); never saved in state_dict
        "_runtime",
        # added by LR schedulers / callbacks after construction
        "initial_lr",
        "base_lr",
    }
)


@dataclass(frozen=True)
class UpdateRule:
    name: str
    step: StepFn
    defaults: Mapping[str, Any]
    min_ndim: int = 0
    summary: str = ""
    check: CheckFn | None = None
    # True when the rule keeps no per-parameter tensors (state_dict carries none).
    stateless: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # Optional ``prepare(group, params, grads, states)``: the part of a step that changes no
    # weight and no state (building argument lists, copying gradients into the rule's own
    # buffers), returning a function that does the rest, or None to run ``step`` whole.
    # ModularOptimizer calls it while its NaN/Inf check is in flight, so after the check's
    # host sync only kernel launches remain and the GPU is not left waiting for Python.
    prepare: PrepareFn | None = None
    # True when the rule is defined on complex parameters (torch's element-wise rules, which
    # treat a complex entry as two reals); the others refuse them when the group is built.
    complex_params: bool = False
    # Sharded parameters (FSDP2's DTensor): "local" when the rule's step on this rank's shards
    # is its step on the whole tensors restricted to them (element-wise rules); "gather" when the
    # rule gathers whole matrices itself (see optim/sharded.py); "refuse" (the default) for the
    # others, which need whole tensors and refuse sharded parameters when the group is built.
    sharding: str = "refuse"
    # Hyperparameters that run every code path of the rule within a few steps on small
    # tensors (resets, clips, kicks): the contract tests over ``available_rules()`` use them.
    example: Mapping[str, Any] = field(default_factory=dict)


_RULES: dict[str, UpdateRule] = {}
_ALIASES: dict[str, str] = {}
_STANDALONE: dict[str, type] = {}


def register_standalone(rule_name: str, cls: type) -> None:
    """Record ``cls`` as the plain-PyTorch optimizer class of ``rule_name`` (RuleOptimizer
    subclasses do this when they are defined)."""
    _STANDALONE[rule_name] = cls


def standalone_optimizer(name: str) -> type | None:
    """The package's standalone ``torch.optim.Optimizer`` class for a rule (``Muon`` for
    ``muon``), or None where the rule is torch's own (use ``torch.optim.*``)."""
    return _STANDALONE.get(get_rule(name).name)


def register_rule(rule: UpdateRule) -> UpdateRule:
    """Add ``rule`` to the registry (its name and aliases must be new)."""
    for key in (rule.name, *rule.aliases):
        if key in _RULES or key in _ALIASES:
            raise ValueError(f"optimizer rule name {key!r} is already registered")
    if "lr" not in rule.defaults:
        raise ValueError(f"rule {rule.name!r} must declare an 'lr' default")
    _RULES[rule.name] = rule
    for alias in rule.aliases:
        _ALIASES[alias] = rule.name
    return rule


def available_rules() -> list[str]:
    return sorted(_RULES)


def get_rule(name: str) -> UpdateRule:
    """The rule registered as ``name``; the error lists the known names and the closest one."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return _RULES[key]
    except KeyError:
        close = difflib.get_close_matches(key, list(_RULES) + list(_ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown optimizer {name!r}. Known optimizers: {', '.join(available_rules())}.{hint}"
        ) from None


def resolve_hyperparameters(
    name: str, given: Mapping[str, Any], where: str = ""
) -> dict[str, Any]:
    """Rule defaults overridden by ``given``; unknown keys and bad values raise, naming ``where``."""
    rule = get_rule(name)
    unknown = [k for k in given if k not in rule.defaults]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(rule.defaults), n=1)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{where + ': ' if where else ''}unknown hyperparameter {', '.join(parts)} for optimizer "
            f"{rule.name!r}. It accepts: {', '.join(sorted(rule.defaults))}."
        )
    for key, value in given.items():
        problem = _numeric_problem(rule.defaults[key], value)
        if problem:
            raise ValueError(
                f"{where + ': ' if where else ''}optimizer {rule.name!r}: {key} must be {problem}, got "
                f"{value!r}; write a number such as {rule.defaults[key]!r}"
            )
    hp = dict(rule.defaults)
    hp.update(given)
    for key in ("betas",):
        if key in hp and isinstance(hp[key], list):
            hp[key] = tuple(hp[key])
    if rule.check is not None:
        try:
            rule.check(hp)
        except ValueError as err:
            raise ValueError(f"{where + ': ' if where else ''}optimizer {rule.name!r}: {err}") from None
    return hp


# ---------------------------------------------------------------------------------------------
# Shared value checks, so every rule reports bad hyperparameters the same way.


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric_problem(default: Any, value: Any) -> str | None:
    """Why ``value`` cannot stand for a numeric ``default`` (None when it can): a bool is an int in
    Python (``lr: true`` would train at 1.0) and NaN/Inf would reach the weights on the first step.
    Keys whose default is not a number (``"auto"``, flags) are left to the rule's own check."""
    if _is_number(default):
        if isinstance(value, bool):
            return "a number, not true/false"
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
    elif isinstance(default, (tuple, list)) and default and all(_is_number(d) for d in default):
        if isinstance(value, (tuple, list)) and any(
            isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)) for v in value
        ):
            return f"{len(default)} finite numbers"
    return None


def check_common(hp: Mapping[str, Any]) -> None:
    """Checks that apply to any rule using the usual hyperparameter names."""
    lr = hp.get("lr")
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if lr is None or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {hp.get('lr')!r}")
    for key in ("eps", "weight_decay"):
        if key in hp and (not isinstance(hp[key], (int, float)) or hp[key] < 0):
            raise ValueError(f"{key} must be a number >= 0, got {hp[key]!r}")
    if "momentum" in hp and (not isinstance(hp["momentum"], (int, float)) or not 0 <= hp["momentum"] < 1):
        raise ValueError(f"momentum must be in [0, 1), got {hp['momentum']!r}")
    if "betas" in hp:
        betas = hp["betas"]
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
