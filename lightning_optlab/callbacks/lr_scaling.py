"""ModularLRScaling: per-param-group learning-rate budgeting on top of any scheduler."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.callbacks.callback import Callback

from ._logging import log_scalars
from ._tracking import check_every_n_steps, group_name

DEPTH_SCALINGS = ("constant", "inv_sqrt", "linear")
ADAPTATIONS = (None, "grad_norm", "trust_ratio")


def depth_factor(depth: int, num_groups: int, scaling: str, min_factor: float = 0.1) -> float:
    """``f(depth)`` for depth 1..num_groups: 1, ``1/sqrt(depth)``, or linear from 1 to ``min_factor``."""
    if scaling == "constant":
        return 1.0
    if scaling == "inv_sqrt":
        return 1.0 / math.sqrt(depth)
    if scaling == "linear":
        return 1.0 if num_groups <= 1 else 1.0 - (1.0 - min_factor) * (depth - 1) / (num_groups - 1)
    raise ValueError(f"depth_scaling={scaling!r}: use one of {list(DEPTH_SCALINGS)}")


class ModularLRScaling(Callback):
    r"""Scale each param group's learning rate by depth and, optionally, by gradient statistics.

    The multiplier of group ``g`` is ``f(depth_g) * a_g``:

    * ``f`` (``depth_scaling``): ``constant`` (1), ``inv_sqrt`` (``1/sqrt(depth)``) or ``linear``
      (from 1 at depth 1 down to ``min_factor`` at the deepest group).
      Depth of a group: groups are ordered by where their first parameter appears in the model
      (``named_parameters()`` order, which is registration order) and numbered from 1; with a
      role policy that is embedding/input < hidden < output, with one rule per block it is the
      block order. ``depths={group name: depth}`` overrides. The unit is the param group (one per
      policy rule) because the learning rate is a group setting: for per-layer budgets, write
      one rule per layer (e.g. ``match: {name: "blocks.3.*"}``).
    * ``a`` (``adaptation``), smoothed by an EMA (``ema``) and clipped to
      ``[min_multiplier, max_multiplier]``:

      - ``None``: 1.
      - ``grad_norm``: balance ``u_g = lr_g * f_g * ||G_g||_F`` (the update norm of a rule whose step
        is proportional to the gradient, e.g. SGD) so that group g gets ``target_shares[g]`` of
        the total (equal shares by default): ``a_g = target_g / (u_g / sum u)``.
      - ``trust_ratio`` (LARS-style adaptive per-layer lr): keep ``lr_g * f_g * a_g * ||G_g|| / ||W_g||``
        at ``target_ratio``: ``a_g = target_ratio * ||W_g|| / (lr_g * f_g * ||G_g||)``.

      Norms are taken in ``on_before_optimizer_step`` (accumulated, unscaled gradients). On CUDA
      they are copied to the host asynchronously and used from the next step on (no
      synchronization); on CPU they are used at once.

    Composition with schedulers: the multiplier is applied to whatever ``lr`` the group has at
    ``on_before_optimizer_step`` (the scheduler's value) and the scheduler's value is put back
    by an optimizer step post-hook right after the step, before Lightning steps the scheduler.
    So any scheduler (including chainable ones that read the current ``lr``) sees only its own
    values, ``LearningRateMonitor`` logs the scheduler's lr (not the scaled one), and checkpoints
    hold the scheduler's lr; this callback's state (the EMA of each adaptive factor) is in its
    ``state_dict`` and is restored on resume. If AMP skips a step, the post-hook does not run and
    the lr is put back at ``on_train_batch_end`` unless something else changed it meanwhile.

    Tags: ``lr_scaling/{group}/effective_lr`` (the lr the step used), ``lr_scaling/{group}/multiplier``,
    ``lr_scaling/{group}/depth`` (logged every ``log_every_n_steps``).

    Args:
        depth_scaling: ``constant``, ``inv_sqrt`` or ``linear``.
        min_factor: the ``linear`` factor of the deepest group.
        adaptation: ``None``, ``grad_norm`` or ``trust_ratio``.
        target_shares: ``{group name: share}`` for ``grad_norm`` (normalized; default equal).
        target_ratio: the update-to-weight ratio for ``trust_ratio``.
        ema: smoothing of the adaptive factor (0 = no smoothing).
        min_multiplier, max_multiplier: bounds of the adaptive factor.
        groups: names of the groups to scale (default: all); others keep multiplier 1.
        depths: ``{group name: depth}`` overriding the inferred depth.
        log_every_n_steps: log interval (default: the trainer's ``log_every_n_steps``).

    Example::

        trainer = Trainer(callbacks=[ModularLRScaling(depth_scaling="inv_sqrt", adaptation="grad_norm")])
    """

    def __init__(
        self,
        depth_scaling: str = "constant",
        min_factor: float = 0.1,
        adaptation: str | None = None,
        target_shares: Mapping[str, float] | None = None,
        target_ratio: float = 1e-3,
        ema: float = 0.9,
        min_multiplier: float = 0.1,
        max_multiplier: float = 10.0,
        groups: Sequence[str] | None = None,
        depths: Mapping[str, int] | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        if depth_scaling not in DEPTH_SCALINGS:
            raise ValueError(f"ModularLRScaling(depth_scaling={depth_scaling!r}): use one of {list(DEPTH_SCALINGS)}")
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"ModularLRScaling(adaptation={adaptation!r}): use one of {list(ADAPTATIONS)}")
        if not 0 < min_factor <= 1:
            raise ValueError(f"ModularLRScaling(min_factor={min_factor}): must be in (0, 1], e.g. 0.1")
        if not 0 <= ema < 1:
            raise ValueError(f"ModularLRScaling(ema={ema}): must be in [0, 1), e.g. 0.9")
        if not 0 < min_multiplier <= 1 <= max_multiplier:
            raise ValueError(
                f"ModularLRScaling(min_multiplier={min_multiplier}, max_multiplier={max_multiplier}): "
                "need 0 < min_multiplier <= 1 <= max_multiplier"
            )
        if target_ratio <= 0:
            raise ValueError(f"ModularLRScaling(target_ratio={target_ratio}): must be > 0, e.g. 1e-3")
        if log_every_n_steps is not None:
            check_every_n_steps("ModularLRScaling", log_every_n_steps, "log_every_n_steps")
        self.depth_scaling = depth_scaling
        self.min_factor = min_factor
        self.adaptation = adaptation
        self.target_shares = dict(target_shares or {})
        self.target_ratio = target_ratio
        self.ema = ema
        self.min_multiplier = min_multiplier
        self.max_multiplier = max_multiplier
        self.groups = list(groups) if groups is not None else None
        self.depths = dict(depths or {})
        self.log_every_n_steps = log_every_n_steps
        #: EMA of the adaptive factor per group name
        self.adaptive: dict[str, float] = {}
        self._names: list[str] = []
        self._depth_factor: list[float] = []
        self._group_depth: list[int] = []
        self._applied: dict[int, tuple[float, float]] = {}
        self._pending = None
        self._handle = None
        self._optimizer = None
        #: the lr each group used at the latest step
        self.last_effective_lr: dict[str, float] = {}

    # --- set-up ------------------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.optimizers:
            return
        opt = trainer.optimizers[0]
        self._optimizer = opt
        self._names = [group_name(g, i) for i, g in enumerate(opt.param_groups)]
        unknown = [n for n in list(self.target_shares) + list(self.depths) + (self.groups or []) if n not in self._names]
        if unknown:
            raise ValueError(
                f"ModularLRScaling: group name(s) {sorted(set(unknown))} are not param groups of the optimizer; "
                f"its groups are {self._names} (names come from the policy rules' `name`)"
            )
        order = {id(p): k for k, p in enumerate(pl_module.parameters())}
        first = [min((order.get(id(p), 1 << 30) for p in g["params"]), default=1 << 30) for g in opt.param_groups]
        ranked = sorted(range(len(first)), key=lambda i: first[i])
        depth = {i: r + 1 for r, i in enumerate(ranked)}
        self._group_depth = [self.depths.get(n, depth[i]) for i, n in enumerate(self._names)]
        num = max(self._group_depth) if self._group_depth else 1
        self._depth_factor = [
            depth_factor(d, num, self.depth_scaling, self.min_factor) if self._scaled(n) else 1.0
            for d, n in zip(self._group_depth, self._names)
        ]
        if self.log_every_n_steps is None:
            self.log_every_n_steps = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        self._handle = opt.register_step_post_hook(self._restore)

    def _scaled(self, name: str) -> bool:
        return self.groups is None or name in self.groups

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.on_train_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"adaptive": dict(self.adaptive)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adaptive = {k: float(v) for k, v in state_dict.get("adaptive", {}).items()}

    # --- per step ------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        opt = self._optimizer
        if opt is None:
            return
        if self.adaptation is not None:
            self._measure(opt)
            self._update_adaptive(opt)
        for i, group in enumerate(opt.param_groups):
            base = group["lr"]
            mult = self._depth_factor[i] * (self.adaptive.get(self._names[i], 1.0) if self._scaled(self._names[i]) else 1.0)
            eff = base * mult
            group["lr"] = eff
            self._applied[i] = (base, eff)
            self.last_effective_lr[self._names[i]] = eff
        step = trainer.global_step
        if (step + 1) % self.log_every_n_steps == 0:
            metrics = {}
            for i, name in enumerate(self._names):
                base, eff = self._applied[i]
                metrics[f"lr_scaling/{name}/effective_lr"] = eff
                metrics[f"lr_scaling/{name}/multiplier"] = eff / base if base else float("nan")
                metrics[f"lr_scaling/{name}/depth"] = float(self._group_depth[i])
            log_scalars(trainer, metrics, step)

    def _restore(self, *args: Any) -> None:
        opt = self._optimizer
        if opt is None:
            return
        for i, (base, eff) in self._applied.items():
            if opt.param_groups[i]["lr"] == eff:  # leave it if something else set a new lr
                opt.param_groups[i]["lr"] = base
        self._applied.clear()

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._restore()  # only does something when AMP skipped the step (no post-hook)

    def _measure(self, opt: torch.optim.Optimizer) -> None:
        """Squared gradient and weight norms per group, as one tensor (copied async on CUDA)."""
        if self._pending is not None and self._pending[0] is not None and not self._pending[0].query():
            return  # the previous copy has not landed; keep measuring later
        rows = []
        device = None
        for group in opt.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                rows.append(torch.zeros(2))
                continue
            device = ps[0].device
            g2 = torch.stack([p.grad.detach().float().pow(2).sum() for p in ps]).sum()
            w2 = torch.stack([p.detach().float().pow(2).sum() for p in ps]).sum()
            rows.append(torch.stack([g2, w2]))
        if device is not None and device.type == "cuda":
            norms = torch.stack([r.to(device) for r in rows])
            host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
            host.copy_(norms, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._pending = (ev, host)
        else:
            self._pending = (None, torch.stack([r.cpu() for r in rows]))

    def _update_adaptive(self, opt: torch.optim.Optimizer) -> None:
        if self._pending is None:
            return
        ev, host = self._pending
        if ev is not None and not ev.query():
            return
        self._pending = None
        g = host[:, 0].clamp_min(0).sqrt().tolist()
        w = host[:, 1].clamp_min(0).sqrt().tolist()
        idx = [i for i, n in enumerate(self._names) if self._scaled(n) and g[i] > 0]
        if not idx:
            return
        raw: dict[int, float] = {}
        if self.adaptation == "grad_norm":
            u = {i: opt.param_groups[i]["lr"] * self._depth_factor[i] * g[i] for i in idx}
            total = sum(u.values())
            shares = {i: self.target_shares.get(self._names[i], 1.0) for i in idx}
            norm = sum(shares.values())
            for i in idx:
                if u[i] > 0 and total > 0:
                    raw[i] = (shares[i] / norm) / (u[i] / total)
        else:  # trust_ratio
            for i in idx:
                lr = opt.param_groups[i]["lr"] * self._depth_factor[i]
                if lr > 0 and w[i] > 0:
                    raw[i] = self.target_ratio * w[i] / (lr * g[i])
        for i, r in raw.items():
            r = min(max(r, self.min_multiplier), self.max_multiplier)
            name = self._names[i]
            prev = self.adaptive.get(name)
            self.adaptive[name] = r if prev is None else self.ema * prev + (1 - self.ema) * r
