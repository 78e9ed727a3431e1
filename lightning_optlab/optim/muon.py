"""Muon: momentum, then orthogonalization by the quintic Newton-Schulz iteration, scaled by shape.

Registry name ``muon``; standalone class :class:`Muon`. Hyperparameter names and values are
those of ``torch.optim.Muon`` (``momentum``, ``nesterov``, ``ns_coefficients``, ``ns_steps``,
``eps``, ``adjust_lr_fn``, ``weight_decay``), so its settings carry over verbatim, plus
``ns_dtype``. With ``ns_dtype: bfloat16`` and fp32 weights the steps equal ``torch.optim.Muon``'s
to bf16 rounding; the differences are on purpose:

* same-shaped matrices of a group are orthogonalized in one stacked call;
* conv kernels (ndim > 2) are flattened to (out, in * kh * kw) -- torch refuses them -- and
  the shape scaling uses that flattened shape;
* the Newton-Schulz dtype follows the device (bf16 on CUDA, fp32 on CPU where bf16 matmuls are
  emulated and ~50x slower) unless ``ns_dtype`` says otherwise;
* bf16/fp16 weights are updated in fp32 and cast back once.

Parameters with fewer than 2 dimensions are refused: route biases, norms and scalars to
another rule (``{match: {ndim: [0, 1]}, optimizer: adamw}``). A NaN/Inf gradient raises
``FloatingPointError`` before anything is changed (see :mod:`.functional`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .functional import (
    ADJUST_LR_FNS,
    apply_update_,
    muon_lr_scale,
    muon_update,
    require_finite_grads,
    resolve_ns_dtype,
    store_,
    upcast,
)
from .newton_schulz import NS_COEFFICIENTS
from .registry import UpdateRule, check_common, register_rule
from .rule_optimizer import RuleOptimizer

MUON_DEFAULTS: dict[str, Any] = dict(
    lr=0.02,
    momentum=0.95,
    nesterov=True,
    weight_decay=0.0,
    ns_steps=5,
    ns_coefficients=NS_COEFFICIENTS,
    eps=1e-7,
    adjust_lr_fn="original",
    ns_dtype="auto",
)


def check_muon(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    steps = hp["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
        raise ValueError(f"ns_steps must be an integer in [0, 100), got {steps!r}")
    coeffs = hp["ns_coefficients"]
    if (
        not isinstance(coeffs, (list, tuple))
        or len(coeffs) != 3
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coeffs)
    ):
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coeffs!r}")
    if hp["adjust_lr_fn"] is not None and hp["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(
            f"adjust_lr_fn must be one of {', '.join(ADJUST_LR_FNS)} (or null for 'original'), "
            f"got {hp['adjust_lr_fn']!r}"
        )
    if not isinstance(hp["nesterov"], bool):
        raise ValueError(f"nesterov must be true or false, got {hp['nesterov']!r}")
    resolve_ns_dtype(hp["ns_dtype"], torch.device("cpu"))


def muon_step(group: dict, params: list, grads: list, states: list) -> None:
    """One Muon step over a param group (shared by ModularOptimizer and :class:`Muon`)."""
    require_finite_grads(group, params, grads, "muon")
    buffers, work = [], []
    for p, state in zip(params, states):
        if p.ndim < 2:
            raise ValueError(
                f"muon got a parameter of shape {tuple(p.shape)}; it needs matrices or kernels. "
                "Route 0-/1-D parameters to another rule, e.g. {match: {ndim: [0, 1]}, optimizer: adamw}."
            )
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffers.append(state["momentum_buffer"])
        work.append(upcast(state["momentum_buffer"]))
    # None lets orthogonalize pick per device (bf16 on CUDA, fp32 on CPU).
    dtype = None if group["ns_dtype"] in (None, "auto") else resolve_ns_dtype(group["ns_dtype"], params[0].device)
    updates = muon_update(
        grads,
        work,
        momentum=group["momentum"],
        nesterov=group["nesterov"],
        ns_steps=group["ns_steps"],
        ns_coefficients=group["ns_coefficients"],
        eps=group["eps"],
        ns_dtype=dtype,
    )
    lr, wd = group["lr"], group["weight_decay"]
    for p, buf, buf32, update in zip(params, buffers, work, updates):
        store_(buf, buf32)
        rows, cols = update.shape
        apply_update_(p, update, lr, wd, update_lr=lr * muon_lr_scale(rows, cols, group["adjust_lr_fn"]))


MUON_RULE = register_rule(
    UpdateRule(
        name="muon",
        step=muon_step,
        defaults=MUON_DEFAULTS,
        min_ndim=2,
        summary="Muon: nesterov momentum -> quintic Newton-Schulz orthogonalization (batched) -> shape scaling",
        check=check_muon,
    )
)


class Muon(RuleOptimizer):
    """Muon for plain PyTorch; the same update as the ``muon`` rule of ``ModularOptimizer``.

    Args:
        params: matrices / conv kernels (or ``named_parameters()``, or param groups).
        lr: learning rate (default 0.02).
        momentum: momentum coefficient (default 0.95); ``buf <- momentum*buf + (1-momentum)*g``.
        nesterov: use the look-ahead ``(1-momentum)*g + momentum*buf`` (default True).
        weight_decay: decoupled, ``p <- p * (1 - lr * weight_decay)`` (default 0).
        ns_steps: Newton-Schulz iterations (default 5; 3 works for a cheaper, rougher polar).
        ns_coefficients: quintic coefficients (a, b, c) (default (3.4445, -4.7750, 2.0315)).
        eps: floor of the Frobenius norm before the iteration (default 1e-7).
        adjust_lr_fn: shape scaling of the update: ``"original"`` ``sqrt(max(1, rows/cols))``
            (default), ``"match_rms_adamw"`` ``0.2*sqrt(max(rows, cols))`` (AdamW lr and weight
            decay carry over), ``"spectral_unclamped"`` ``sqrt(rows/cols)``.
        ns_dtype: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"bfloat16"``, ``"float32"``...
    """

    rule_name = "muon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = MUON_DEFAULTS["lr"],
        momentum: float = MUON_DEFAULTS["momentum"],
        nesterov: bool = MUON_DEFAULTS["nesterov"],
        weight_decay: float = MUON_DEFAULTS["weight_decay"],
        ns_steps: int = MUON_DEFAULTS["ns_steps"],
        ns_coefficients: tuple[float, float, float] = MUON_DEFAULTS["ns_coefficients"],
        eps: float = MUON_DEFAULTS["eps"],
        adjust_lr_fn: str | None = MUON_DEFAULTS["adjust_lr_fn"],
        ns_dtype: str = MUON_DEFAULTS["ns_dtype"],
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        )
