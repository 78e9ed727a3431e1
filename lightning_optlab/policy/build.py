"""Policy + model -> param groups of one ModularOptimizer.

Each rule becomes one param group carrying its ``algorithm``, hyperparameters (``lr`` already
multiplied by ``lr_scale``), ``constraint``, and, for the callbacks, ``param_names`` and
``roles`` aligned with ``params``.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any, Mapping

from torch import nn

from ..optim.matrix import MatrixView
from ..optim.modular import ModularOptimizer
from ..optim.registry import get_rule
from .roles import ParamInfo, describe_parameters
from .rules import CONSTRAINT_MIN_NDIM, Policy, Rule


def assign_rules(
    model: nn.Module, policy: Any, roles: Mapping[str, str] | None = None
) -> tuple[Policy, list[ParamInfo], list[int]]:
    """For each trainable parameter, the index of the first rule that claims it.

    Raises with the offending names when a rule claims nothing or a parameter is left unclaimed.
    """
    policy = Policy.coerce(policy)
    infos = describe_parameters(model, roles)
    owner: list[int | None] = []
    matched_any = [False] * len(policy.rules)
    for info in infos:
        claim = None
        for i, rule in enumerate(policy.rules):
            if rule.matches(info):
                matched_any[i] = True
                if claim is None:
                    claim = i
        owner.append(claim)

    claimed = {i for i in owner if i is not None}
    for i, rule in enumerate(policy.rules):
        if i in claimed or rule.optional:
            continue
        if matched_any[i]:
            earlier = sorted(
                {owner[k] for k, info in enumerate(infos) if rule.matches(info)} - {None}
            )
            raise ValueError(
                f"{rule.describe(i)} claims no parameter: every parameter it matches was already "
                f"claimed by earlier rule(s) {', '.join(policy.rules[j].label(j) for j in earlier)} "
                "(the first matching rule wins). Move it up, narrow the earlier rule, or set optional: true."
            )
        raise ValueError(
            f"{rule.describe(i)} claims no parameter. "
            f"{_why_unclaimed(model, rule, infos, owner, policy, roles) or _suggest(rule.match, infos)}"
        )

    left = [info for info, o in zip(infos, owner) if o is None]
    if left:
        listed = ", ".join(f"{x.name} (role {x.role}, shape {list(x.shape)})" for x in left[:20])
        more = f" and {len(left) - 20} more" if len(left) > 20 else ""
        raise ValueError(
            f"policy leaves {len(left)} trainable parameter(s) unclaimed: {listed}{more}. Add a rule "
            "for them, e.g. a last catch-all rule {match: {}, optimizer: adamw}, or freeze them."
        )
    return policy, infos, owner  # type: ignore[return-value]


def _why_unclaimed(
    model: nn.Module,
    rule: Rule,
    infos: list[ParamInfo],
    owner: list[int | None],
    policy: Policy,
    roles: Mapping[str, str] | None,
) -> str | None:
    """The reason a rule that matches no trainable parameter still names real ones: the tensors
    it matches are frozen, or they are other names of a tied tensor claimed under its first name."""
    for info, o in zip(infos, owner):
        for alias in info.tied:
            module_name = alias.rpartition(".")[0]
            as_alias = replace(
                info, name=alias, module_name=module_name, module=model.get_submodule(module_name)
            )
            if rule.matches(as_alias):
                claimed_by = f" by {policy.rules[o].label(o)}" if o is not None else ""
                return (
                    f"{alias} is tied to {info.name} (one tensor), which is claimed as {info.name} "
                    f"(role {info.role}){claimed_by}. Match {info.name} (or its role) instead."
                )
    frozen = [
        x.name for x in describe_parameters(model, roles, include_frozen=True)
        if not x.param.requires_grad and rule.matches(x)
    ]
    if frozen:
        more = f" and {len(frozen) - 5} more" if len(frozen) > 5 else ""
        return (
            f"Every parameter it matches is frozen (requires_grad=False): {', '.join(frozen[:5])}{more}. "
            "Unfreeze them before the optimizer is built, or set optional: true."
        )
    return None


def _suggest(match: Mapping[str, Any], infos: list[ParamInfo]) -> str:
    names = [x.name for x in infos]
    hints = []
    for key in ("name", "regex"):
        for pattern in match.get(key, []) if isinstance(match.get(key), list) else [match.get(key)]:
            if pattern:
                close = difflib.get_close_matches(str(pattern), names, n=3, cutoff=0.3)
                if close:
                    hints.append(f"close parameter names for {pattern!r}: {', '.join(close)}")
    present_roles = sorted({x.role for x in infos})
    present_modules = sorted({type(x.module).__name__ for x in infos})
    present_ndims = sorted({x.ndim for x in infos})
    hints.append(
        f"This model has roles {present_roles}, module types {present_modules}, ndims {present_ndims}"
    )
    return ". ".join(h[0].upper() + h[1:] for h in hints) + ". Fix the match, or set optional: true if the rule is meant for other models."


def _check_shapes(policy: Policy, infos: list[ParamInfo], owner: list[int]) -> None:
    for info, i in zip(infos, owner):
        rule = policy.rules[i]
        min_ndim = get_rule(rule.optimizer).min_ndim
        if info.ndim < min_ndim:
            raise ValueError(
                f"{rule.describe(i)} claims {info.name} of shape {list(info.shape)}, but optimizer "
                f"{rule.optimizer!r} needs at least {min_ndim} dimensions. Route 0-/1-D parameters "
                "to another rule placed before it, e.g. {match: {ndim: [0, 1]}, optimizer: adamw}."
            )
        if min_ndim >= 2 and not info.view.is_matrix:
            raise ValueError(
                f"{rule.describe(i)} claims {info.name} of shape {list(info.shape)}, a vector "
                f"(fewer than 2 non-singleton dims, role {info.role!r}), but optimizer "
                f"{rule.optimizer!r} needs matrices. Match by role (e.g. role: hidden) instead of "
                "ndim, or route it to an element-wise rule placed before this one."
            )
        if rule.constraint and info.ndim < CONSTRAINT_MIN_NDIM[rule.constraint]:
            raise ValueError(
                f"{rule.describe(i)} puts constraint {rule.constraint!r} on {info.name} of shape "
                f"{list(info.shape)}, which needs at least {CONSTRAINT_MIN_NDIM[rule.constraint]} "
                "dimensions. Narrow the rule's match (e.g. ndim: '>=2') or drop the constraint."
            )
        if rule.constraint and info.param.is_complex():
            raise ValueError(
                f"{rule.describe(i)} puts constraint {rule.constraint!r} on {info.name}, a complex "
                "tensor; the sphere and Stiefel retractions are defined on real ones. Narrow the "
                "rule's match or drop the constraint."
            )
        if rule.constraint == "stiefel" and not info.view.is_matrix:
            raise ValueError(
                f"{rule.describe(i)} puts constraint 'stiefel' on {info.name} of shape "
                f"{list(info.shape)}, a vector (fewer than 2 non-singleton dims): it cannot have "
                "orthonormal columns. Narrow the rule's match (e.g. role: hidden) or use 'sphere'."
            )


def rule_view(rule: Rule, info: ParamInfo) -> MatrixView:
    """The matrix view a rule works on: packed projections split only where it asks."""
    return info.view if rule.split_packed else info.view.unsplit()


def describe_view(view: MatrixView, shape: tuple[int, ...], packed: int = 1) -> str:
    """A matrix view for the explain table: ``2304x768``, ``3 x 768x768``, ``vector``..."""
    if not view.is_matrix or len(shape) < 2:
        return "vector"
    rows, cols = view.shape(shape)
    text = f"{view.blocks} x {rows}x{cols}" if view.blocks > 1 else f"{rows}x{cols}"
    notes = []
    if view.layout == "in_out":
        notes.append("stored in,out")
    elif view.layout == "table":
        notes.append("table")
    if view.blocks == 1 and packed > 1:
        notes.append(f"packed {packed}")
    return text + (f" ({', '.join(notes)})" if notes else "")


def build_param_groups(
    model: nn.Module, policy: Any, roles: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Param groups (one per rule that claims parameters) for :class:`ModularOptimizer`.

    ``policy`` may be a :class:`Policy`, a dict, a list of rules or a YAML path/text. ``roles``
    overrides inferred roles by name glob. A model with its own ``configure_optimizers`` can call
    this directly and pass the groups to any optimizer that understands them.
    """
    policy, infos, owner = assign_rules(model, policy, roles)
    _check_shapes(policy, infos, owner)
    groups = []
    for i, rule in enumerate(policy.rules):
        members = [info for info, o in zip(infos, owner) if o == i]
        if not members:
            continue
        hp = rule.hyperparameters(i)
        hp["lr"] = hp["lr"] * rule.lr_scale
        roles_in_group = [m.role for m in members]
        groups.append(
            {
                "params": [m.param for m in members],
                "param_names": [m.name for m in members],
                "roles": roles_in_group,
                "matrix_views": [rule_view(rule, m).code for m in members],
                "role": roles_in_group[0] if len(set(roles_in_group)) == 1 else "mixed",
                "name": rule.label(i),
                "rule_index": i,
                "algorithm": get_rule(rule.optimizer).name,
                "constraint": rule.constraint,
                "constraint_options": dict(rule.constraint_options),
                "lr_scale": rule.lr_scale,
                **hp,
            }
        )
    return groups


def build_optimizer(
    model: nn.Module, policy: Any, roles: Mapping[str, str] | None = None
) -> ModularOptimizer:
    """A :class:`ModularOptimizer` over ``model``'s parameters as ``policy`` assigns them."""
    return ModularOptimizer(build_param_groups(model, policy, roles))


def explain(model: nn.Module, policy: Any, roles: Mapping[str, str] | None = None) -> str:
    """The routing table of ``model`` under ``policy``: for every trainable parameter its name
    (with the names it is tied to), shape, matrix view, role, rule, optimizer and constraint.

    Nothing is trained or built beyond the policy check, so a new model's routing is checked in
    seconds (``optlab explain --config FILE`` prints the same table for a config).
    """
    policy, infos, owner = assign_rules(model, policy, roles)
    rows = [("parameter", "shape", "matrix", "role", "rule", "optimizer", "constraint")]
    for info, i in zip(infos, owner):
        rule = policy.rules[i]
        name = info.name + (f" (= {', '.join(info.tied)})" if info.tied else "")
        rows.append(
            (name, "x".join(map(str, info.shape)) or "scalar",
             describe_view(rule_view(rule, info), info.shape, info.view.blocks), info.role,
             rule.label(i), rule.optimizer, rule.constraint or "-")
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
