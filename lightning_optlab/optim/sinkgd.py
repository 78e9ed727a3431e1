"""Stateless multi-normalized gradient descent: SinkGD (paper) and the Sinkhorn-tanh variant.

* ``sinkgd`` / :class:`SinkGD` -- Scetbon et al., "Gradient Multi-Normalization for Stateless
  and Scalable LLM Training" (arXiv 2502.06742): ``sinkhorn_iterations`` alternations of row-
  then column-wise l2 normalization (rows to norm sqrt(n), columns to sqrt(m) for an m x n
  matrix, i.e. unit-RMS entries), then ``p <- p * (1 - lr * weight_decay) - lr * G``.
  Conv kernels are flattened to (out, fan_in); 1-D/0-D tensors are normalized to unit RMS.
  The paper uses it on the 2-D hidden matrices and Adam elsewhere; a policy says the same.
* ``sinkhorn_tanh`` / :class:`SinkhornTanh` -- the "Sinkhorn-like" SinkGD of the ablation notes:
  ``n_iter`` rounds of (row l2, column l2, ``tanh(g / tau)``), the result rescaled to the
  gradient's RMS, decoupled weight decay. Defaults lr 3e-4, weight_decay 0.1, tau 0.1,
  n_iter 5, eps 1e-8 (the notes' S1); S2 is tau 0.05 / n_iter 10, S3 tau 0.2 / n_iter 3.

Both keep no state at all (``state_dict()['state']`` is empty): memory as plain SGD. Math in
fp32, result cast back to the parameter dtype. A NaN/Inf gradient raises ``FloatingPointError``
before anything is changed (see :mod:`.functional`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .functional import (
    apply_stacked_updates_,
    sinkgd_matrices_,
    sinkgd_stack_,
    sinkhorn_tanh_stack_,
    stack_by_shape,
)
from .registry import UpdateRule, check_common, register_rule
from .rule_optimizer import RuleOptimizer

SINKGD_DEFAULTS: dict[str, Any] = dict(lr=1e-3, sinkhorn_iterations=5, weight_decay=0.0, eps=1e-8)
SINKHORN_TANH_DEFAULTS: dict[str, Any] = dict(lr=3e-4, weight_decay=0.1, tau=0.1, n_iter=5, eps=1e-8)


def _check_count(hp: Mapping[str, Any], key: str, minimum: int) -> None:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_sinkgd(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "sinkhorn_iterations", 1)


def check_sinkhorn_tanh(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "n_iter", 1)
    tau = hp["tau"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")


def sinkgd_step(group: dict, params: list, grads: list, states: list) -> None:
    """One SinkGD step over a param group (stateless: ``states`` are left empty).

    Matrices run as Sinkhorn on scale vectors (:func:`.functional.sinkgd_matrices_`: batched
    matrix-vector products over the squared gradients of each shape, then one foreach update
    of all weights); vectors/scalars are stacked by shape. Nothing waits on the device.
    """
    iterations, eps, lr, wd = group["sinkhorn_iterations"], group["eps"], group["lr"], group["weight_decay"]
    matrices = [i for i, g in enumerate(grads) if g.ndim >= 2]
    if matrices:
        sinkgd_matrices_([params[i] for i in matrices], [grads[i] for i in matrices], lr, wd, iterations, eps)
    rest = [i for i, g in enumerate(grads) if g.ndim < 2]
    if rest:
        updates = stack_by_shape([grads[i] for i in rest])
        for kind, _, G in updates:
            sinkgd_stack_(G, kind, iterations, eps)
        apply_stacked_updates_([params[i] for i in rest], updates, lr, wd)


def sinkhorn_tanh_step(group: dict, params: list, grads: list, states: list) -> None:
    """One Sinkhorn-tanh step over a param group (stateless; batched by shape like SinkGD)."""
    tau, n_iter, eps = group["tau"], group["n_iter"], group["eps"]
    updates = stack_by_shape(grads)
    for kind, _, G in updates:
        sinkhorn_tanh_stack_(G, kind, tau, n_iter, eps)
    apply_stacked_updates_(params, updates, group["lr"], group["weight_decay"])


SINKGD_RULE = register_rule(
    UpdateRule(
        name="sinkgd",
        step=sinkgd_step,
        defaults=SINKGD_DEFAULTS,
        summary="SinkGD (arXiv 2502.06742): stateless alternating row/column l2 normalization",
        check=check_sinkgd,
        stateless=True,
    )
)
SINKHORN_TANH_RULE = register_rule(
    UpdateRule(
        name="sinkhorn_tanh",
        step=sinkhorn_tanh_step,
        defaults=SINKHORN_TANH_DEFAULTS,
        summary="Sinkhorn-like SinkGD: (row, column, tanh(g/tau))^n_iter, RMS restored; stateless",
        check=check_sinkhorn_tanh,
        stateless=True,
    )
)


class SinkGD(RuleOptimizer):
    """SinkGD for plain PyTorch; the same update as the ``sinkgd`` rule.

    Args:
        params: parameters (or ``named_parameters()``, or param groups).
        lr: learning rate (default 1e-3; the paper's recipe is 0.05 x the Adam lr).
        sinkhorn_iterations: row/column alternations L (default 5).
        weight_decay: decoupled, ``p <- p * (1 - lr * weight_decay)`` (default 0).
        eps: floor of the row/column norms (default 1e-8); a zero gradient gives a zero update.
    """

    rule_name = "sinkgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SINKGD_DEFAULTS["lr"],
        sinkhorn_iterations: int = SINKGD_DEFAULTS["sinkhorn_iterations"],
        weight_decay: float = SINKGD_DEFAULTS["weight_decay"],
        eps: float = SINKGD_DEFAULTS["eps"],
    ) -> None:
        super().__init__(
            params, lr=lr, sinkhorn_iterations=sinkhorn_iterations, weight_decay=weight_decay, eps=eps
        )


class SinkhornTanh(RuleOptimizer):
    """Sinkhorn-tanh SinkGD for plain PyTorch; the same update as the ``sinkhorn_tanh`` rule.

    Args:
        params: parameters (or ``named_parameters()``, or param groups).
        lr: learning rate (default 3e-4).
        weight_decay: decoupled, ``p <- p - weight_decay * lr * p`` before the step (default 0.1).
        tau: tanh temperature; smaller is sharper (default 0.1).
        n_iter: (row, column, tanh) rounds (default 5).
        eps: floor of every norm (default 1e-8).
    """

    rule_name = "sinkhorn_tanh"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SINKHORN_TANH_DEFAULTS["lr"],
        weight_decay: float = SINKHORN_TANH_DEFAULTS["weight_decay"],
        tau: float = SINKHORN_TANH_DEFAULTS["tau"],
        n_iter: int = SINKHORN_TANH_DEFAULTS["n_iter"],
        eps: float = SINKHORN_TANH_DEFAULTS["eps"],
    ) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, tau=tau, n_iter=n_iter, eps=eps)
