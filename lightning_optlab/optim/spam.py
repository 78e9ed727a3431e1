"""AdamW-SPAM: AdamW with SPAM's spike-aware clipping and periodic momentum reset.

Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training" (ICLR 2025);
the S0 control of the SinkGD ablation. Registry name ``adamw_spam``; class :class:`AdamWSPAM`.
Per step t of a parameter:

1. **Momentum reset.** Every ``reset_interval`` steps (t = reset_interval + 1,
   2 * reset_interval + 1, ...) both moments are zeroed and Adam's bias correction restarts
   (zeroed moments are exactly Adam's initial condition, so the first moments after a reset
   are bias-corrected estimates again rather than ~0).
2. **Spike-aware clipping.** Entries with ``g^2 > spike_threshold * v`` (``v`` the second
   moment before this step) are set to ``sign(g) * sqrt(spike_threshold * v)``. Clipping is
   off for the first ``spike_clip_delay`` steps after the start and after every reset, while
   ``v`` holds too few gradients to say what a spike is (with ``v = 0`` every gradient would
   be clipped to zero). ``spike_threshold: 0`` disables clipping.
3. **AdamW** -- torch's own functional ``adamw`` (the same math as ``torch.optim.AdamW``) --
   with ``lr * warmup``, where ``warmup`` rises from ~0 to 1 along a cosine over the
   ``warmup_steps`` steps after each reset (1 before the first reset).

Math in fp32 (bf16/fp16 weights and state are upcast and cast back); state tensors keep the
parameter dtype like torch's AdamW. ``reset_interval: 0`` disables resets. A NaN/Inf gradient
raises ``FloatingPointError`` before anything is changed (see :mod:`.guard`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch.optim import adamw as _adamw
from torch.optim.optimizer import _get_scalar_dtype

from .steps import fused_by_default, spam_warmup_factor, spike_clip_foreach, upcast
from .registry import UpdateRule, check_common, register_rule
from .rule_optimizer import RuleOptimizer

ADAMW_SPAM_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    spike_threshold=5000.0,
    reset_interval=500,
    warmup_steps=150,
    spike_clip_delay=20,
)


def check_adamw_spam(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    for key in ("reset_interval", "warmup_steps", "spike_clip_delay"):
        value = hp[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    theta = hp["spike_threshold"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta < 0:
        raise ValueError(f"spike_threshold must be a number >= 0 (0 disables clipping), got {theta!r}")


def _schedule(group: dict, states: list) -> tuple[list[tuple[int, int, int, int]], list[int], dict]:
    """Per parameter (total_steps, steps_since_reset, resets, reset happening now), the indices
    resetting now, and the parameters bucketed by (warm-up factor, clipping on/off) -- computed
    from the python-side counters without changing them (see :func:`_commit`)."""
    interval, theta, delay = group["reset_interval"], group["spike_threshold"], group["spike_clip_delay"]
    rows, resetting = [], []
    buckets: dict[tuple[float, bool], list[int]] = defaultdict(list)
    for i, state in enumerate(states):
        k = state.get("steps_since_reset")
        if k is None:  # a checkpoint written before the python-side counter: read it once
            k = int(state["step"].item())
        t = state["total_steps"] + 1
        resets = state["resets"]
        reset = interval > 0 and t > 1 and (t - 1) % interval == 0
        if reset:
            resetting.append(i)
            resets += 1
            k = 0
        k += 1
        rows.append((t, k, resets))
        clip = theta > 0 and k > delay
        buckets[(spam_warmup_factor(k, group["warmup_steps"], resets), clip)].append(i)
    return rows, resetting, buckets


def _init_state(params: list, states: list) -> None:
    for p, state in zip(params, states):
        if not state:
            # steps since the last reset (Adam's bias correction); on the parameter's device,
            # as torch's fused AdamW keeps it
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
            state["total_steps"] = 0
            state["resets"] = 0
            state["steps_since_reset"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # a checkpoint loaded with the step on the CPU
            state["step"] = state["step"].to(p.device)


def _clipped_grads(group: dict, params: list, grads: list, states: list, buckets: dict) -> dict:
    """Each bucket's (clipped where due) gradients in the compute dtype: new tensors, no state
    or weight touched."""
    out = {}
    for (warmup, clip), idx in buckets.items():
        gs = [upcast(grads[i]) for i in idx]
        if clip:
            gs = spike_clip_foreach(gs, [upcast(states[i]["exp_avg_sq"]) for i in idx], group["spike_threshold"])
        out[(warmup, clip)] = gs
    return out


def _apply(group: dict, params: list, states: list, rows: list, buckets: dict, clipped: dict) -> None:
    """Commit the counters and run torch's AdamW per bucket (resets are zeroed by the caller)."""
    for state, (t, k, resets) in zip(states, rows):
        state["total_steps"], state["steps_since_reset"], state["resets"] = t, k, resets
    beta1, beta2 = group["betas"]
    for (warmup, clip), idx in buckets.items():
        ps = [upcast(params[i]) for i in idx]
        ms = [upcast(states[i]["exp_avg"]) for i in idx]
        vs = [upcast(states[i]["exp_avg_sq"]) for i in idx]
        # torch's fused AdamW on CUDA; on the CPU torch's default (same math, and the same
        # rounding as torch.optim.AdamW() there, which the tests compare against)
        fused = fused_by_default(group, ps)
        _adamw.adamw(
            ps,
            clipped[(warmup, clip)],
            ms,
            vs,
            [],
            [states[i]["step"] for i in idx],
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=fused or None,
            has_complex=False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"] * warmup,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        targets, values = [], []
        for i, p32, m32, v32 in zip(idx, ps, ms, vs):
            for target, value in ((params[i], p32), (states[i]["exp_avg"], m32), (states[i]["exp_avg_sq"], v32)):
                if value is not target:
                    targets.append(target)
                    values.append(value)
        if targets:
            torch._foreach_copy_(targets, values)


def adamw_spam_step(group: dict, params: list, grads: list, states: list) -> None:
    """One AdamW-SPAM step over a param group (shared by ModularOptimizer and :class:`AdamWSPAM`).

    The schedule (resets, warm-up, clipping on/off) is decided on python-side counters, so the
    step never waits on the device; the clipping runs as foreach kernels and Adam on CUDA as
    torch's fused AdamW kernel (one multi-tensor kernel per device and dtype). Parameters that
    stepped equally often share a warm-up factor and the clipping switch: one torch adamw call
    each (usually one for the whole group).
    """
    _init_state(params, states)
    rows, resetting, buckets = _schedule(group, states)
    if resetting:  # zeroed before this step's clipping reads the moments
        torch._foreach_zero_([x for i in resetting for x in (states[i]["exp_avg"], states[i]["exp_avg_sq"], states[i]["step"])])
    clipped = _clipped_grads(group, params, grads, states, buckets)
    _apply(group, params, states, rows, buckets, clipped)


def adamw_spam_prepare(group: dict, params: list, grads: list, states: list):
    """While the optimizer's NaN/Inf check is in flight: the schedule and the spike clipping
    (new tensors: no weight or state changes); the AdamW kernels are left. Not on a parameter's
    first step (creating state is a change) nor on a reset step (the clip reads zeroed moments)."""
    if not all(states):
        return None
    rows, resetting, buckets = _schedule(group, states)
    if resetting:
        return None
    clipped = _clipped_grads(group, params, grads, states, buckets)
    return lambda: _apply(group, params, states, rows, buckets, clipped)


ADAMW_SPAM_RULE = register_rule(
    UpdateRule(
        name="adamw_spam",
        example=dict(lr=0.01, reset_interval=3, warmup_steps=2, spike_clip_delay=1, spike_threshold=4.0),
        step=adamw_spam_step,
        defaults=ADAMW_SPAM_DEFAULTS,
        summary="AdamW + SPAM: spike-aware clipping, momentum reset every reset_interval with cosine warm-up",
        check=check_adamw_spam,
        aliases=("spam",),
        prepare=adamw_spam_prepare,
        sharding="local",  # every operation is element-wise (the clip threshold too)
    )
)


class AdamWSPAM(RuleOptimizer):
    """AdamW-SPAM for plain PyTorch; the same update as the ``adamw_spam`` rule.

    Args:
        params: parameters (or ``named_parameters()``, or param groups).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults 1e-3, (0.9, 0.999),
            1e-8, 1e-2).
        spike_threshold: theta; ``g^2 > theta * v`` is a spike, clipped to ``sqrt(theta * v)``
            (default 5000; 0 disables).
        reset_interval: steps between momentum resets (default 500; 0 disables).
        warmup_steps: cosine LR warm-up after each reset (default 150).
        spike_clip_delay: steps after the start/a reset before clipping turns on (default 20).
    """

    rule_name = "adamw_spam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = ADAMW_SPAM_DEFAULTS["lr"],
        betas: tuple[float, float] = ADAMW_SPAM_DEFAULTS["betas"],
        eps: float = ADAMW_SPAM_DEFAULTS["eps"],
        weight_decay: float = ADAMW_SPAM_DEFAULTS["weight_decay"],
        spike_threshold: float = ADAMW_SPAM_DEFAULTS["spike_threshold"],
        reset_interval: int = ADAMW_SPAM_DEFAULTS["reset_interval"],
        warmup_steps: int = ADAMW_SPAM_DEFAULTS["warmup_steps"],
        spike_clip_delay: int = ADAMW_SPAM_DEFAULTS["spike_clip_delay"],
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            spike_clip_delay=spike_clip_delay,
        )
