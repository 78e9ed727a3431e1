"""Rule and Policy: the declarative per-layer optimizer policy.

A policy is an ordered list of rules; for each trainable parameter the first rule that matches
claims it. As a user writes it (YAML or dict), a rule is flat::

    {match: {role: hidden}, optimizer: muon, lr: 0.02, ns_steps: 5, constraint: stiefel}

Keys other than the rule's own fields (``match``, ``optimizer``, ``lr``, ``constraint``,
``constraint_options``, ``lr_scale``, ``name``, ``optional``) are hyperparameters of the named
optimizer and are checked against the registry.

``match`` keys (all given keys must hold; an empty match claims everything left):

* ``role``: one role or a list (embedding, hidden, output, bias, norm)
* ``name``: a glob or list of globs over the full parameter name (``blocks.*.attn.*``)
* ``regex``: a regular expression searched in the full parameter name
* ``module``: a module class name (``Linear``) or dotted path (``torch.nn.Linear``), or a list;
  subclasses match
* ``ndim``: an int, a list of ints, or a comparison string (``">=2"``)
"""

from __future__ import annotations

import fnmatch
import importlib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..manifolds.plan import CONSTRAINT_MIN_NDIM, CONSTRAINTS
from ..optim.registry import get_rule, resolve_hyperparameters
from .roles import ROLES, ParamInfo
from .yaml_text import load_yaml, read_yaml_file

MATCH_KEYS = ("role", "name", "regex", "module", "ndim")
_RULE_FIELDS = (
    "match",
    "optimizer",
    "lr",
    "constraint",
    "constraint_options",
    "lr_scale",
    "name",
    "optional",
    "split_packed",
    "hparams",
)
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Rule:
    """One line of a policy: which parameters, which optimizer, which constraint.

    Args:
        optimizer: registry name of the update rule (``adamw``, ``sgd``, ``muon``...).
        match: what the rule claims (see the module docstring); empty claims all that is left.
        lr: learning rate (the optimizer's default when omitted).
        hparams: the optimizer's other hyperparameters (in YAML they may also be written flat).
        constraint: ``sphere`` or ``stiefel``, applied after each step by ``ManifoldRetraction``.
        constraint_options: options of the constraint (e.g. ``{radius: 1.0}``).
        lr_scale: multiplies ``lr`` for this rule's group.
        name: label of the param group (shown by ``LearningRateMonitor`` and the monitors).
        optional: allow the rule to claim nothing (for policies shared across models).
        split_packed: treat a packed projection (fused QKV, ``MultiheadAttention.in_proj_weight``,
            LSTM/GRU gates) as its separate blocks wherever it is read as a matrix (Muon's
            orthogonalization and shape scale, the Stiefel constraint, the spectral monitors).
    """

    optimizer: str
    match: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    constraint: str | None = None
    constraint_options: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0
    name: str | None = None
    optional: bool = False
    split_packed: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int | None = None) -> "Rule":
        where = f"policy rule #{index}" if index is not None else "policy rule"
        if isinstance(data, Rule):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{where}: expected a mapping like {{match: {{role: hidden}}, optimizer: adamw}}, "
                f"got {type(data).__name__}: {data!r}"
            )
        if "optimizer" not in data:
            raise ValueError(f"{where}: missing 'optimizer' (e.g. optimizer: adamw) in {dict(data)!r}")
        fields = {k: v for k, v in data.items() if k in _RULE_FIELDS}
        hparams = dict(fields.pop("hparams", None) or {})
        hparams.update({k: v for k, v in data.items() if k not in _RULE_FIELDS})
        return cls(**fields, hparams=hparams)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out["match"] = dict(self.match)
        out["optimizer"] = self.optimizer
        if self.lr is not None:
            out["lr"] = self.lr
        out.update(self.hparams)
        if self.constraint is not None:
            out["constraint"] = self.constraint
        if self.constraint_options:
            out["constraint_options"] = dict(self.constraint_options)
        if self.lr_scale != 1.0:
            out["lr_scale"] = self.lr_scale
        if self.optional:
            out["optional"] = True
        if self.split_packed:
            out["split_packed"] = True
        return out

    def label(self, index: int) -> str:
        return self.name or f"rule{index}_{self.optimizer}"

    def describe(self, index: int) -> str:
        return f"policy rule #{index} ({self.label(index)}: match={self.match!r}, optimizer={self.optimizer!r})"

    def hyperparameters(self, index: int) -> dict[str, Any]:
        """The rule's full hyperparameters (registry defaults filled in), validated."""
        given = dict(self.hparams)
        if self.lr is not None:
            given["lr"] = self.lr
        return resolve_hyperparameters(self.optimizer, given, where=self.describe(index))

    def validate(self, index: int) -> None:
        where = self.describe(index)
        try:
            get_rule(self.optimizer)  # unknown names list the known ones
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        if not isinstance(self.match, Mapping):
            raise ValueError(f"{where}: 'match' must be a mapping, got {self.match!r}")
        unknown = [k for k in self.match if k not in MATCH_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: unknown match key(s) {unknown}; a rule matches by {', '.join(MATCH_KEYS)}"
            )
        for role in _as_list(self.match.get("role", [])):
            if role not in ROLES:
                raise ValueError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if "regex" in self.match:
            try:
                re.compile(self.match["regex"])
            except re.error as err:
                raise ValueError(f"{where}: invalid regex {self.match['regex']!r}: {err}") from None
        for spec in _as_list(self.match.get("ndim", [])):
            _ndim_predicate(spec, where)
        for spec in _as_list(self.match.get("module", [])):
            _module_predicate(spec, where)
        if self.constraint is not None and self.constraint not in CONSTRAINTS:
            raise ValueError(
                f"{where}: unknown constraint {self.constraint!r}; use one of {', '.join(CONSTRAINTS)} "
                "or leave it out"
            )
        for flag in ("optional", "split_packed"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{where}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if not isinstance(self.lr_scale, (int, float)) or self.lr_scale <= 0:
            raise ValueError(f"{where}: lr_scale must be a positive number, got {self.lr_scale!r}")
        self.hyperparameters(index)

    def matches(self, info: ParamInfo) -> bool:
        m = self.match
        if "role" in m and info.role not in _as_list(m["role"]):
            return False
        if "name" in m and not any(fnmatch.fnmatchcase(info.name, g) for g in _as_list(m["name"])):
            return False
        if "regex" in m and re.search(m["regex"], info.name) is None:
            return False
        if "module" in m and not any(
            _module_predicate(s, "")(info.module) for s in _as_list(m["module"])
        ):
            return False
        if "ndim" in m and not any(_ndim_predicate(s, "")(info.ndim) for s in _as_list(m["ndim"])):
            return False
        return True


def _ndim_predicate(spec: Any, where: str):
    if isinstance(spec, bool):
        raise ValueError(f"{where}: ndim must be an int or a comparison like '>=2', got {spec!r}")
    if isinstance(spec, int):
        return lambda n: n == spec
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(>=|<=|==|>|<)?\s*(\d+)\s*", spec)
        if m:
            op = _COMPARE[m.group(1) or "=="]
            value = int(m.group(2))
            return lambda n: op(n, value)
    raise ValueError(f"{where}: ndim must be an int or a comparison like '>=2', got {spec!r}")


def _module_predicate(spec: Any, where: str):
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{where}: module must be a class name like 'Linear', got {spec!r}")
    if "." in spec:
        mod_name, _, cls_name = spec.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError):
            raise ValueError(
                f"{where}: module {spec!r} cannot be imported; give a class name like 'Linear' "
                "or an importable path like 'torch.nn.Linear'"
            ) from None
        return lambda module: isinstance(module, cls)
    return lambda module: any(c.__name__ == spec for c in type(module).__mro__)


@dataclass
class Policy:
    """An ordered list of rules; the first rule that matches a parameter claims it."""

    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.rules, (list, tuple)):
            raise ValueError(f"policy 'rules' must be a list of rules, got {self.rules!r}")
        self.rules = [Rule.from_dict(r, i) for i, r in enumerate(self.rules)]

    @classmethod
    def coerce(cls, value: Any) -> "Policy":
        """A Policy from a Policy, a dict ``{rules: [...]}``, a list of rules, or YAML (path or text)."""
        if isinstance(value, Policy):
            policy = value
        elif isinstance(value, Mapping):
            unknown = [k for k in value if k != "rules"]
            if unknown:
                raise ValueError(
                    f"policy: unknown key(s) {unknown}; a policy is {{rules: [...]}}"
                )
            policy = cls(rules=list(value.get("rules") or []))
        elif isinstance(value, (list, tuple)):
            policy = cls(rules=list(value))
        elif isinstance(value, (str, Path)):
            policy = cls.from_yaml(value)
        else:
            raise ValueError(
                f"policy must be a Policy, a dict {{rules: [...]}}, a list of rules or a YAML file; "
                f"got {type(value).__name__}"
            )
        policy.validate()
        return policy

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Policy":
        """Read a policy from a YAML file path, or from YAML text."""
        text = str(source)
        looks_like_path = isinstance(source, Path) or (
            "\n" not in text and text.strip().endswith((".yaml", ".yml"))
        )
        data = read_yaml_file(source) if looks_like_path else load_yaml(text, "policy YAML text")
        origin = f"policy file {str(source)!r}" if looks_like_path else "policy YAML text"
        if isinstance(data, Mapping) and "policy" in data and "rules" not in data:
            data = data["policy"]
        if not isinstance(data, (Mapping, list)):
            raise ValueError(f"{origin}: expected {{rules: [...]}} or a list of rules, got {data!r}")
        try:
            return cls.coerce(data)
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    def validate(self) -> None:
        if not self.rules:
            raise ValueError("policy has no rules; add at least one, e.g. {match: {}, optimizer: adamw}")
        labels = [r.label(i) for i, r in enumerate(self.rules)]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"policy: rule names must be unique, {dupes} appear more than once")
        for i, rule in enumerate(self.rules):
            rule.validate(i)

    @property
    def constraints(self) -> list[str]:
        return [r.constraint for r in self.rules if r.constraint]


def as_rules(rules: Sequence[Any]) -> list[Rule]:
    return [Rule.from_dict(r, i) for i, r in enumerate(rules)]
