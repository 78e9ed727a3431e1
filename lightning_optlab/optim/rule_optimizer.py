"""RuleOptimizer: a plain ``torch.optim.Optimizer`` over one registry rule.

The standalone classes (``Muon``, ``SinkGD``, ``SinkhornTanh``, ``AdamWSPAM``, ``SPARKLES``) are
subclasses that only name their rule: ``step`` calls the very function ``ModularOptimizer``
calls for a group of that rule (``get_rule(name).step``), so there is one implementation of
every update, and hyperparameters are validated by the same registry code (unknown names,
bad values and too-small parameters are refused with the same messages), and a NaN/Inf
gradient raises the same ``FloatingPointError`` (:func:`.functional.require_finite_grads`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch

from .registry import GROUP_META_KEYS, get_rule, resolve_hyperparameters


class RuleOptimizer(torch.optim.Optimizer):
    """Base class: ``rule_name`` names the registry rule every param group uses.

    ``params`` may be tensors, ``(name, tensor)`` pairs (``model.named_parameters()``, so
    errors can name parameters) or param-group dicts; hyperparameters given here are the
    defaults of every group and a group may override them.
    """

    rule_name: ClassVar[str]

    def __init__(self, params: Iterable[Any], **hyperparameters: Any) -> None:
        where = type(self).__name__
        defaults = resolve_hyperparameters(self.rule_name, hyperparameters, where=where)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        rule = get_rule(self.rule_name)
        group = dict(param_group)
        label = group.get("name") or f"{type(self).__name__} param group {len(self.param_groups)}"
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and all(isinstance(p, tuple) for p in params):
            group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        names = group.get("param_names")
        given = {k: v for k, v in group.items() if k not in GROUP_META_KEYS}
        group.update(
            resolve_hyperparameters(self.rule_name, {**self.defaults, **given}, where=label)
        )
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.ndim < rule.min_ndim:
                who = repr(names[i]) if names else f"parameter #{i}"
                raise ValueError(
                    f"{label}: {type(self).__name__} ({rule.name!r}) needs parameters with at least "
                    f"{rule.min_ndim} dimensions, but {who} has shape {tuple(p.shape)}. Route 0-/1-D "
                    "parameters (biases, norms, scalars) to another optimizer, e.g. torch.optim.AdamW, "
                    "or use ModularOptimizer with a policy rule {match: {ndim: [0, 1]}, optimizer: adamw}."
                )
        group["params"] = params
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule = get_rule(self.rule_name)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            # A stateless rule gets throwaway dicts, so not even empty entries reach state_dict().
            states = [{} for _ in params] if rule.stateless else [self.state[p] for p in params]
            rule.step(group, params, [p.grad for p in params], states)
        return loss
