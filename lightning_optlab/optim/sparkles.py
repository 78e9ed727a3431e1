"""SPARKLES: centralized, std-normalized, momentum-amplified adaptive steps with a random kick.

Registry name ``sparkles``; class :class:`SPARKLES`. Defaults are the SPARKLES README's table
(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, centralization 0.5, normalization 0.5,
normalize_channels true, amp_fac 2.0, clip_gradients false with threshold step**0.25,
decouple_weight_decay false, stochastic_threshold 1e-6). The deterministic part is
:func:`.functional.sparkles_update`; per step t of a parameter:

1. ``g <- g - centralization * mean(g)`` (per output channel for >=2-D, global for 1-D);
2. ``g <- (1 - normalization) * g + normalization * g / std(g)`` (channel-wise when
   ``normalize_channels``, else global);
3. ``m <- b1 m + (1 - b1) g``, ``g <- g + amp_fac * m`` (amplification);
4. ``v <- b2 v + (1 - b2) g^2``; step size ``eta = lr / (1 - b1^t)``;
   ``d = g / (sqrt(v / (1 - b2^t)) + eps)``; L2 weight decay adds ``weight_decay * p`` to ``g``
   unless ``decouple_weight_decay`` (then ``p <- p (1 - eta * weight_decay)``);
5. ``clip_gradients``: ``d`` clamped to ``+-t**clip_exponent`` -- ADOPT's clipping, applied as
   ADOPT does to the normalized direction (before ``eta``), where the threshold is on the
   scale of unit-RMS steps; the original code clamps the lr-scaled update, where a bound >= 1
   never acts. A step function is not YAML-writable (nor picklable in a checkpoint), so the
   README's ``clip_lambda(step) = step**0.25`` is given as its exponent ``clip_exponent``;
6. ``p <- p - eta * d``, plus the stochastic parts below.

**The stochastic operator R** (when ``||g_t - g_{t-1}|| < stochastic_threshold``, on the raw
gradients, i.e. the gradient has stopped changing -- a plateau or saddle): a seeded random
perturbation, ``update <- update + eta * xi`` with ``xi ~ N(0, I)`` -- a kick the size of one
adaptive step per coordinate. Chosen over the original's random permutation of the update
because it is unbiased (``E[R(u)] = u``: the expected step is still the optimizer's) while a
permutation moves each coordinate's step to another coordinate, and because it also acts on
1-element and constant updates, which a permutation leaves unchanged.

**Stochastic rounding** (``stochastic_rounding``, on by default): bf16 weights and moments
are written back from the fp32 math rounded up or down at random in proportion to the
remainder (:func:`.functional.stochastic_round_to_bf16`). This is what makes full-bf16
training work: an update below half a bf16 ulp (~0.4% of the weight) is lost every time under
round-to-nearest but accumulates in expectation under stochastic rounding. fp32 weights are
unaffected.

**Reproducibility.** All randomness comes from a generator seeded by
``(seed, the parameter's index in its group, its step)``, all three stored (``seed`` in the
param group, the others in the state), so ``state_dict -> load_state_dict -> continue`` gives
the same numbers as an uninterrupted run, on any device count. ``state['kicks']`` counts the
steps R was applied. A NaN/Inf gradient raises ``FloatingPointError`` before anything is
changed (see :mod:`.functional`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .functional import (
    decoupled_weight_decay_,
    mix_seed,
    
    seeded_generator,
    sparkles_update,
    store_rounded_,
    upcast,
)
from .registry import UpdateRule, check_common, register_rule
from .rule_optimizer import RuleOptimizer

SPARKLES_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    centralization=0.5,
    normalization=0.5,
    normalize_channels=True,
    amp_fac=2.0,
    clip_gradients=False,
    clip_exponent=0.25,
    decouple_weight_decay=False,
    stochastic_threshold=1e-6,
    stochastic_rounding=True,
    seed=0,
)


def check_sparkles(hp: Mapping[str, Any]) -> None:
    check_common(hp)

    def number(key: str) -> float:
        value = hp[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return value

    for key in ("centralization", "normalization"):
        if not 0 <= number(key) <= 1:
            raise ValueError(f"{key} must be in [0, 1], got {hp[key]!r}")
    for key in ("amp_fac", "stochastic_threshold"):
        if number(key) < 0:
            raise ValueError(f"{key} must be a number >= 0, got {hp[key]!r}")
    number("clip_exponent")
    for key in ("normalize_channels", "clip_gradients", "decouple_weight_decay", "stochastic_rounding"):
        if not isinstance(hp[key], bool):
            raise ValueError(f"{key} must be true or false, got {hp[key]!r}")
    if isinstance(hp["seed"], bool) or not isinstance(hp["seed"], int):
        raise ValueError(f"seed must be an integer, got {hp['seed']!r}")


def _stalled(group: dict, grads: list, states: list) -> list[bool]:
    """Which parameters' raw gradients moved less than stochastic_threshold (one sync per group)."""
    threshold = group["stochastic_threshold"]
    flags = [False] * len(grads)
    idx = [i for i, s in enumerate(states) if s["step"] >= 1]
    if threshold <= 0 or not idx:
        return flags
    device = grads[idx[0]].device
    dist = torch.stack(
        [(upcast(grads[i]) - upcast(states[i]["prev_grad"])).norm().to(device) for i in idx]
    )
    for i, small in zip(idx, (dist < threshold).tolist()):
        flags[i] = small
    return flags


def sparkles_step(group: dict, params: list, grads: list, states: list) -> None:
    """One SPARKLES step over a param group (shared by ModularOptimizer and :class:`SPARKLES`)."""
    if any(not s for s in states):
        slots = {id(p): k for k, p in enumerate(group["params"])}
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["slot"] = slots.get(id(p), 0)
                state["kicks"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    stalled = _stalled(group, grads, states)
    for p, g, state, kick in zip(params, grads, states, stalled):
        t = state["step"] + 1
        p32, m32, v32 = upcast(p), upcast(state["exp_avg"]), upcast(state["exp_avg_sq"])
        update, step_size = sparkles_update(
            g,
            p32,
            m32,
            v32,
            t,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            centralization=group["centralization"],
            normalization=group["normalization"],
            normalize_channels=group["normalize_channels"],
            amp_fac=group["amp_fac"],
            clip_gradients=group["clip_gradients"],
            clip_exponent=group["clip_exponent"],
            decouple_weight_decay=group["decouple_weight_decay"],
        )
        if group["decouple_weight_decay"]:
            decoupled_weight_decay_(p32, step_size, group["weight_decay"])
        rounding = group["stochastic_rounding"] and p.dtype == torch.bfloat16
        gen = None
        if kick or rounding:
            gen = seeded_generator(p.device, mix_seed(group["seed"], state["slot"], t))
        if kick:
            noise = torch.randn(update.shape, generator=gen, device=update.device, dtype=update.dtype)
            update = update.add_(noise, alpha=step_size)
            state["kicks"] += 1
        p32.sub_(update)
        store_rounded_(p, p32, gen if rounding else None)
        store_rounded_(state["exp_avg"], m32, gen if rounding else None)
        store_rounded_(state["exp_avg_sq"], v32, gen if rounding else None)
        state["prev_grad"].copy_(g)
        state["step"] = t


SPARKLES_RULE = register_rule(
    UpdateRule(
        name="sparkles",
        step=sparkles_step,
        defaults=SPARKLES_DEFAULTS,
        summary="SPARKLES: centralize -> std-normalize -> momentum amplification -> adaptive step "
        "-> (ADOPT clip) -> seeded kick on stalls; stochastic rounding for bf16",
        check=check_sparkles,
    )
)


class SPARKLES(RuleOptimizer):
    """SPARKLES for plain PyTorch; the same update as the ``sparkles`` rule (see the module doc).

    Args:
        params: parameters (or ``named_parameters()``, or param groups); bf16 weights welcome.
        lr, betas, eps: as Adam (defaults 1e-3, (0.9, 0.999), 1e-8).
        weight_decay: L2 (added to the gradient) unless ``decouple_weight_decay`` (default 0).
        centralization: strength of gradient centralization (default 0.5).
        normalization: interpolation towards the std-normalized gradient (default 0.5).
        normalize_channels: std per output channel rather than global (default True).
        amp_fac: momentum amplification gamma (default 2.0).
        clip_gradients: ADOPT-style clipping of the normalized step (default False).
        clip_exponent: clipping threshold ``step ** clip_exponent`` (default 0.25).
        decouple_weight_decay: AdamW-style decay (default False).
        stochastic_threshold: kick when the gradient moved less than this (default 1e-6; 0 = never).
        stochastic_rounding: stochastic rounding of bf16 weights/moments (default True).
        seed: seed of all randomness (default 0).
    """

    rule_name = "sparkles"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SPARKLES_DEFAULTS["lr"],
        betas: tuple[float, float] = SPARKLES_DEFAULTS["betas"],
        eps: float = SPARKLES_DEFAULTS["eps"],
        weight_decay: float = SPARKLES_DEFAULTS["weight_decay"],
        centralization: float = SPARKLES_DEFAULTS["centralization"],
        normalization: float = SPARKLES_DEFAULTS["normalization"],
        normalize_channels: bool = SPARKLES_DEFAULTS["normalize_channels"],
        amp_fac: float = SPARKLES_DEFAULTS["amp_fac"],
        clip_gradients: bool = SPARKLES_DEFAULTS["clip_gradients"],
        clip_exponent: float = SPARKLES_DEFAULTS["clip_exponent"],
        decouple_weight_decay: bool = SPARKLES_DEFAULTS["decouple_weight_decay"],
        stochastic_threshold: float = SPARKLES_DEFAULTS["stochastic_threshold"],
        stochastic_rounding: bool = SPARKLES_DEFAULTS["stochastic_rounding"],
        seed: int = SPARKLES_DEFAULTS["seed"],
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            centralization=centralization,
            normalization=normalization,
            normalize_channels=normalize_channels,
            amp_fac=amp_fac,
            clip_gradients=clip_gradients,
            clip_exponent=clip_exponent,
            decouple_weight_decay=decouple_weight_decay,
            stochastic_threshold=stochastic_threshold,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
