"""torch's own optimizers (sgd, adam, adamw, rmsprop) as registry rules.

Each rule calls torch's functional implementation (``torch.optim.adam.adam`` etc.) with the
state layout torch's classes use, so results match ``torch.optim.AdamW`` step for step, state
dicts look the same, and the foreach/fused kernels are used where they pay: fused on CUDA
unless a group asks otherwise (``fused: false``), foreach elsewhere when torch picks it.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch.optim import adam as _adam
from torch.optim import adamw as _adamw
from torch.optim import rmsprop as _rmsprop
from torch.optim import sgd as _sgd
from torch.optim.optimizer import _get_scalar_dtype

from .steps import fused_by_default
from .registry import UpdateRule, check_common, register_rule


def _step_tensor(p: torch.Tensor, on_device: bool) -> torch.Tensor:
    if on_device:
        return torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def _ensure_step_device(state: dict, p: torch.Tensor, on_device: bool) -> None:
    # A checkpoint written on CPU keeps 'step' on CPU when loaded; fused kernels want it on device.
    if on_device and state["step"].device != p.device:
        state["step"] = state["step"].to(p.device)


def _adam_family_launch(group, params, grads, states, *, decoupled: bool):
    """Everything of an Adam/AdamW step up to torch's kernel call (lazy state init included),
    returning the call. Nothing has changed when it returns, except the state of a parameter's
    first step (zeros), which is why :func:`_adam_family_prepare` leaves first steps alone."""
    fused = fused_by_default(group, params)
    on_device = fused or group["capturable"]
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
    for p, state in zip(params, states):
        if not state:
            state["step"] = _step_tensor(p, on_device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        _ensure_step_device(state, p, on_device)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        steps.append(state["step"])
    fn = _adamw.adamw if decoupled else _adam.adam
    return functools.partial(
        fn,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=None if fused else group["foreach"],
        capturable=group["capturable"],
        differentiable=False,
        fused=fused or None,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=group["amsgrad"],
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


def _adam_family_prepare(group, params, grads, states, *, decoupled: bool):
    if not all(states):  # first step: creating the state is a change, so it waits for the check
        return None
    return _adam_family_launch(group, params, grads, states, decoupled=decoupled)


def adam_step(group, params, grads, states) -> None:
    _adam_family_launch(group, params, grads, states, decoupled=False)()


def adamw_step(group, params, grads, states) -> None:
    _adam_family_launch(group, params, grads, states, decoupled=True)()


def adam_prepare(group, params, grads, states):
    return _adam_family_prepare(group, params, grads, states, decoupled=False)


def adamw_prepare(group, params, grads, states):
    return _adam_family_prepare(group, params, grads, states, decoupled=True)


def sgd_step(group, params, grads, states) -> None:
    buffers = [state.get("momentum_buffer") for state in states]
    fused = group["fused"] if group["fused"] is not None else False
    _sgd.sgd(
        params,
        grads,
        buffers,
        has_sparse_grad=False,
        foreach=None if fused else group["foreach"],
        fused=fused or None,
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    if group["momentum"] != 0:
        for state, buf in zip(states, buffers):
            state["momentum_buffer"] = buf


def rmsprop_step(group, params, grads, states) -> None:
    square_avgs, grad_avgs, buffers, steps = [], [], [], []
    for p, state in zip(params, states):
        if not state:
            state["step"] = _step_tensor(p, group["capturable"])
            state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        square_avgs.append(state["square_avg"])
        steps.append(state["step"])
        if group["momentum"] > 0:
            buffers.append(state["momentum_buffer"])
        if group["centered"]:
            grad_avgs.append(state["grad_avg"])
    _rmsprop.rmsprop(
        params,
        grads,
        square_avgs,
        grad_avgs,
        buffers,
        steps,
        foreach=group["foreach"],
        maximize=group["maximize"],
        differentiable=False,
        capturable=group["capturable"],
        has_complex=any(torch.is_complex(p) for p in params),
        lr=group["lr"],
        alpha=group["alpha"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        centered=group["centered"],
    )


def _check_sgd(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")


def _check_rmsprop(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    if not 0 <= hp["alpha"] < 1:
        raise ValueError(f"alpha must be in [0, 1), got {hp['alpha']!r}")


_ADAM_DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
    foreach=None,
    fused=None,
    capturable=False,
)

register_rule(
    UpdateRule(
        name="adam",
        example=dict(lr=0.01, weight_decay=0.01, amsgrad=True),
        complex_params=True,
        sharding="local",
        step=adam_step,
        defaults=_ADAM_DEFAULTS,
        summary="Adam (torch.optim.Adam's functional core; L2-coupled weight decay)",
        check=check_common,
        prepare=adam_prepare,
    )
)
register_rule(
    UpdateRule(
        name="adamw",
        example=dict(lr=0.01, weight_decay=0.01, amsgrad=True),
        complex_params=True,
        sharding="local",
        step=adamw_step,
        defaults={**_ADAM_DEFAULTS, "weight_decay": 1e-2},
        summary="AdamW (torch.optim.AdamW's functional core; decoupled weight decay)",
        check=check_common,
        prepare=adamw_prepare,
    )
)
register_rule(
    UpdateRule(
        name="sgd",
        example=dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01),
        complex_params=True,
        sharding="local",
        step=sgd_step,
        defaults=dict(
            lr=1e-3,
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            foreach=None,
            fused=None,
        ),
        summary="SGD with optional (Nesterov) momentum (torch.optim.SGD's functional core)",
        check=_check_sgd,
    )
)
register_rule(
    UpdateRule(
        name="rmsprop",
        example=dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
        complex_params=True,
        sharding="local",
        step=rmsprop_step,
        defaults=dict(
            lr=1e-2,
            alpha=0.99,
            eps=1e-8,
            weight_decay=0.0,
            momentum=0.0,
            centered=False,
            maximize=False,
            foreach=None,
            capturable=False,
        ),
        summary="RMSProp (torch.optim.RMSprop's functional core)",
        check=_check_rmsprop,
    )
)
