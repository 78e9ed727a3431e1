"""ModularOptimizer: one ``torch.optim.Optimizer`` whose param groups each name their own rule.

Lightning's automatic optimization drives exactly one optimizer, and LR schedulers,
``LearningRateMonitor``, gradient clipping, checkpointing and DDP all expect a plain
``torch.optim.Optimizer``. So a per-layer policy becomes param groups of a single optimizer:
each group carries ``algorithm`` (a registry name) and that rule's hyperparameters, and may
carry descriptive keys (``name``, ``role``, ``constraint``, ``lr_scale``, ``param_names``) that
callbacks read. Per-parameter state lives in ``self.state`` as in any torch optimizer, so
``state_dict()`` / ``load_state_dict()`` work unchanged.

Example::

    opt = ModularOptimizer([
        {"params": hidden, "algorithm": "sgd", "lr": 0.1, "momentum": 0.9},
        {"params": others, "algorithm": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    ])
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch

from .guard import nonfinite_flag, require_finite_grads
from .sharded import check_sharding
from .registry import GROUP_META_KEYS, available_rules, get_rule, resolve_hyperparameters


class ModularOptimizer(torch.optim.Optimizer):
    """One optimizer, a rule per param group.

    Args:
        params: param groups (dicts with ``params`` and ``algorithm``), or plain parameters
            when ``algorithm`` is given here.
        algorithm: rule for groups that do not name one.
        check_finite: refuse a step whose gradients hold NaN/Inf (``FloatingPointError`` naming
            the parameters, before any weight or state changes). It costs one fused check and one
            host sync per step; the rules' preparations (``UpdateRule.prepare``) run while the
            check is in flight, so after the sync only kernel launches are left (its cost:
            ``docs/benchmarks.md``, bench_ops' ``check_finite`` rows). ``False`` trades that
            guard for speed: a NaN gradient is then written into the weights, as with torch's
            optimizers.
        **hyperparameters: defaults for groups of ``algorithm`` (e.g. ``lr``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        algorithm: str | None = None,
        *,
        check_finite: bool = True,
        **hyperparameters: Any,
    ) -> None:
        self.check_finite = check_finite
        self._default_algorithm = algorithm
        self._default_hyperparameters = dict(hyperparameters)
        if algorithm is not None:
            resolve_hyperparameters(algorithm, hyperparameters, where=type(self).__name__)
        elif hyperparameters:
            raise ValueError(
                "ModularOptimizer: hyperparameters "
                f"{sorted(hyperparameters)} were given without `algorithm`; name the rule they "
                "belong to, or put them inside each param group"
            )
        super().__init__(params, defaults={})

    def _group_label(self, index: int) -> str:
        return f"param group {index}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        label = group.get("name") or self._group_label(len(self.param_groups))
        algorithm = group.get("algorithm", self._default_algorithm)
        if algorithm is None:
            raise ValueError(
                f"ModularOptimizer: {label} has no 'algorithm'; give each group an "
                "'algorithm' (a registry name such as 'adamw') or pass algorithm=... to the optimizer"
            )
        rule = get_rule(algorithm)
        group["algorithm"] = rule.name
        given = {k: v for k, v in group.items() if k not in GROUP_META_KEYS}
        if algorithm == self._default_algorithm:
            given = {**self._default_hyperparameters, **given}
        group.update(resolve_hyperparameters(rule.name, given, where=label))

        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params and all(isinstance(p, tuple) for p in params):  # model.named_parameters()
            group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        names = group.get("param_names")
        check_sharding(rule, params, names, label)
        for i, p in enumerate(params):
            if p.is_complex() and not rule.complex_params:
                who = repr(names[i]) if names else f"parameter #{i}"
                takes = ", ".join(n for n in available_rules() if get_rule(n).complex_params)
                raise ValueError(
                    f"{label}: optimizer {rule.name!r} is not defined on complex parameters, but "
                    f"{who} is {str(p.dtype).replace('torch.', '')}. Route it to a rule that is "
                    f"({takes}), or store it as real and imaginary parts (torch.view_as_real)."
                )
            if p.ndim < rule.min_ndim:
                who = repr(names[i]) if names else f"parameter #{i}"
                raise ValueError(
                    f"{label}: optimizer {rule.name!r} needs parameters with at least "
                    f"{rule.min_ndim} dimensions, but {who} has shape {tuple(p.shape)}. Route "
                    "0-/1-D parameters (biases, norms, scalars) to another rule, e.g. a policy rule "
                    "{match: {ndim: [0, 1]}, optimizer: adamw} placed before this one, or a separate "
                    "torch.optim.AdamW."
                )
        group["params"] = params
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__}: sparse gradients are not supported "
                        f"({group.get('name', 'a param group')}); use dense embeddings"
                    )
            work.append((group, params, [p.grad for p in params]))
        if not work:
            return loss
        # NaN/Inf policy: refuse the whole step before any weight or state changes, with one
        # reduction and one host sync for all groups (see guard.require_finite_grads).
        # The check is launched first; the rules' preparations (which change nothing) run while
        # it is in flight, so after the sync only kernel launches are left.
        flag = nonfinite_flag([g for _, _, grads in work for g in grads]) if self.check_finite else None
        launches = []
        for group, params, grads in work:
            rule = get_rule(group["algorithm"])
            # A stateless rule gets throwaway dicts, so not even empty entries reach state_dict().
            states = [{} for _ in params] if rule.stateless else [self.state[p] for p in params]
            launch = rule.prepare(group, params, grads, states) if rule.prepare is not None else None
            launches.append(launch or functools.partial(rule.step, group, params, grads, states))
        if flag is not None and bool(flag):
            for group, params, grads in work:
                require_finite_grads(group, params, grads, group["algorithm"])
        for launch in launches:
            launch()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # runtime objects (CUDA graphs, static buffers) are rebuilt on demand, never saved
        state["param_groups"] = [{k: v for k, v in g.items() if k != "_runtime"} for g in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint from a different policy would otherwise load "successfully" whenever
        # the group sizes happen to match, and carry one rule's state into another.
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"ModularOptimizer.load_state_dict: the checkpoint has {len(saved)} param groups, "
                f"this optimizer has {len(self.param_groups)}; resume with the policy the "
                "checkpoint was trained with"
            )
        for i, (old, new) in enumerate(zip(saved, self.param_groups)):
            if old.get("algorithm") != new["algorithm"]:
                raise ValueError(
                    f"ModularOptimizer.load_state_dict: param group {i} "
                    f"({new.get('name', '')}) was {old.get('algorithm')!r} in the checkpoint but "
                    f"is {new['algorithm']!r} now; resume with the policy the checkpoint was "
                    "trained with"
                )
        super().load_state_dict(state_dict)
        # torch casts every state tensor except "step" to its parameter's dtype. Integer state
        # (sparkles' kick counter) must stay integer: bf16 holds integers exactly only up to 256.
        saved_state = state_dict.get("state", {})
        saved_ids = [i for g in saved for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and not (
                    value.is_floating_point() or value.is_complex()
                ):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            hp = {k: v for k, v in group.items() if k not in GROUP_META_KEYS}
            extra = "".join(
                f", {k}={group[k]!r}" for k in ("role", "constraint") if group.get(k) is not None
            )
            lines.append(
                f"  [{i}] {group.get('name', '')}: {group['algorithm']} "
                f"({len(group['params'])} tensors, {n:,} values{extra}) {hp}"
            )
        lines.append(")")
        return "\n".join(lines)
