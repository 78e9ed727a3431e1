"""OptLabMixin: give an existing LightningModule a per-layer optimizer policy.

Example::

    class MyModel(OptLabMixin, L.LightningModule):
        def __init__(self, policy=None, scheduler=None, hidden=256):
            super().__init__(policy=policy, scheduler=scheduler)
            self.save_hyperparameters()
            self.net = ...

    model = MyModel(policy={"rules": [
        {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
        {"match": {}, "optimizer": "adamw", "lr": 3e-3},
    ]})

``configure_optimizers`` then returns one :class:`~lightning_optlab.optim.ModularOptimizer`
built from the policy (plus an LR scheduler when ``scheduler`` is given). A model that keeps its
own ``configure_optimizers`` can call :func:`lightning_optlab.policy.build_param_groups` itself.
When the policy declares a constraint and the trainer has no ``ManifoldRetraction``, the mixin
attaches one (through ``configure_callbacks``), so a declared constraint is never silently ignored.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from .policy import Policy, build_optimizer, explain
from .schedules import build_scheduler, validate_schedule


class OptLabMixin:
    """Mixin for ``LightningModule``: ``configure_optimizers`` from ``self.policy``.

    Args:
        policy: a :class:`~lightning_optlab.policy.Policy`, a dict ``{rules: [...]}``, a list of
            rules, or a YAML file path. Validated when set.
        scheduler: optional LR schedule spec (see :mod:`lightning_optlab.schedules`), e.g.
            ``{name: cosine, warmup_steps: 100}``.
    """

    def __init__(self, *args: Any, policy: Any = None, scheduler: dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.scheduler = scheduler

    @property
    def policy(self) -> Policy | None:
        return self.__dict__.get("_optlab_policy")

    @policy.setter
    def policy(self, value: Any) -> None:
        self.__dict__["_optlab_policy"] = None if value is None else Policy.coerce(value)

    @property
    def scheduler(self) -> dict | None:
        return self.__dict__.get("_optlab_scheduler")

    @scheduler.setter
    def scheduler(self, value: dict | None) -> None:
        self.__dict__["_optlab_scheduler"] = None if value is None else validate_schedule(value)

    def configure_optimizers(self):
        if self.policy is None:
            raise ValueError(
                f"{type(self).__name__} has no optimizer policy: pass policy=... to the constructor "
                "(or `model.init_args.policy` in the YAML config), e.g. "
                "{rules: [{match: {}, optimizer: adamw, lr: 1e-3}]}"
            )
        optimizer = build_optimizer(self, self.policy)
        rank_zero_info(f"lightning_optlab policy for {type(self).__name__}:\n{explain(self, self.policy)}")
        if self.scheduler is None:
            return optimizer
        total = None
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and (self.scheduler.get("total_steps") is None):
            total = int(trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.scheduler, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler["interval"]},
        }

    def configure_callbacks(self):
        callbacks = list(super().configure_callbacks() or [])  # type: ignore[misc]
        if self.policy is None or not self.policy.constraints:
            return callbacks
        from .callbacks.retraction import ManifoldRetraction

        trainer = getattr(self, "_trainer", None)
        present = trainer is not None and any(
            isinstance(cb, ManifoldRetraction) for cb in trainer.callbacks
        )
        if not present and not any(isinstance(cb, ManifoldRetraction) for cb in callbacks):
            rank_zero_info(
                "lightning_optlab: the policy declares constraints "
                f"{sorted(set(self.policy.constraints))}; attaching ManifoldRetraction()"
            )
            callbacks.append(ManifoldRetraction())
        return callbacks
