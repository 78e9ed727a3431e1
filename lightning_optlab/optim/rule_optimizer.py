"""RuleOptimizer: a plain ``torch.optim.Optimizer`` over one registry rule.

The standalone classes (``Muon``, ``SinkGD``, ``SinkhornTanh``, ``AdamWSPAM``, ``SPARKLES``) are
subclasses that only name their rule. A RuleOptimizer is a :class:`ModularOptimizer` whose every
group uses that rule, so the step loop, the hyperparameter validation (unknown names, bad values,
too-small parameters), the checkpoint checks and the NaN/Inf policy
(:func:`.guard.require_finite_grads`) are the same code in both.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

from .modular import ModularOptimizer
from .registry import register_standalone, resolve_hyperparameters


class RuleOptimizer(ModularOptimizer):
    """Base class: ``rule_name`` names the registry rule every param group uses.

    ``params`` may be tensors, ``(name, tensor)`` pairs (``model.named_parameters()``, so
    errors can name parameters) or param-group dicts; hyperparameters given here are the
    defaults of every group and a group may override them.
    """

    rule_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule_name" in cls.__dict__:
            register_standalone(cls.rule_name, cls)

    def __init__(self, params: Iterable[Any], **hyperparameters: Any) -> None:
        super().__init__(params, algorithm=self.rule_name, **hyperparameters)
        # torch.optim convention: `defaults` shows the hyperparameters in effect.
        self.defaults = resolve_hyperparameters(self.rule_name, hyperparameters, where=type(self).__name__)

    def _group_label(self, index: int) -> str:
        return f"{type(self).__name__} param group {index}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("algorithm", self.rule_name) != self.rule_name:
            raise ValueError(
                f"{type(self).__name__} runs {self.rule_name!r} only; use ModularOptimizer to mix rules"
            )
        super().add_param_group(param_group)
