"""SPARKLES: centralized, std-normalized, momentum-amplified adaptive steps with a random kick.

Registry name ``sparkles``; class :class:`SPARKLES`. Defaults are the SPARKLES README's table
(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, centralization 0.5, normalization 0.5,
normalize_channels true, amp_fac 2.0, clip_gradients false with threshold step**0.25,
decouple_weight_decay false, stochastic_threshold 1e-6). Per step t of a parameter (the group
step below computes these formulas batched over same-shaped parameters):

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
remainder (:func:`.steps.stochastic_round_to_bf16_`). This is what makes full-bf16
training work: an update below half a bf16 ulp (~0.4% of the weight) is lost every time under
round-to-nearest but accumulates in expectation under stochastic rounding. fp32 weights are
unaffected.

**Batched, without host syncs** (a per-parameter loop is launch-bound on a GPU). The group runs in lanes of one device and one
compute dtype; in a lane, steps 1-2 run on stacks of same-shaped gradients
(:func:`.stacks.stack_by_shape`'s layout, bucketed also by how step 2 reduces the original
shape), steps 3-6 as foreach kernels over all the lane's tensors, bf16/fp16 weights and moments
go through one flat fp32 buffer (upcast once, rounded and written back once), and whether a
parameter stalled is decided on the device: the noise is drawn for the whole lane and
multiplied by the 0/1 stall flag (``torch.where`` semantics), so the kernel count does not grow
with the parameter count and nothing waits for the GPU.

**Reproducibility.** All randomness of a lane's step comes from two streams seeded by
``(seed, slot, t)`` of the lane's first stepping parameter (``slot`` its index in the group,
``t`` its step) -- the kick noise, laid out bucket by bucket, and, with a second seed
component, the stochastic-rounding bits. ``seed`` is in the param group and ``slot``/``step``
in the state, so ``state_dict -> load_state_dict -> continue`` gives the same numbers as an
uninterrupted run, on any device count (every DDP rank draws the same). A pair ``(slot, t)``
occurs once in a run, so no two steps share a stream. (Until issue 8 each parameter had its own
generator seeded by its own ``(seed, slot, t)``: the same distribution, other draws, and one
generator call per parameter per step.)

**``state['kicks']``** counts the steps R was applied, as a 0-d int64 tensor on the
parameter's device: the stall decision lives on the device, and counting it on the host would
cost a sync per step (read it with ``int(state['kicks'])``). It costs 8 bytes per parameter
tensor. ``load_state_dict`` casts every state tensor but ``step`` to the parameter's dtype;
the next step turns the counter back into int64, exact while the count is representable in
that dtype (fp32: 2^24; bf16: 256).

A NaN/Inf gradient raises ``FloatingPointError`` before anything is changed (see
:mod:`.guard`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .stacks import as_work, from_work, work_shape
from .steps import (
    centralize_,
    compute_dtype,
    mix_seed,
    seeded_generator,
    std_normalize_,
    stochastic_round_to_bf16_,
)
from .matrix import group_views
from .registry import UpdateRule, check_common, register_rule
from .sharded import is_dtensor, on_whole_tensors
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

# second seed component of the stochastic-rounding stream (the kick stream has none)
_ROUNDING_STREAM = 1


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


def _normalization_mode(shape: tuple, normalization: float, channelwise: bool) -> str | None:
    """How step 2 reduces a gradient of this (original) shape: ``"channel"`` (std per output
    channel), ``"global"`` (one std) or None (unchanged), decided on the original shape (a conv
    kernel with a size-1 dim is normalized globally; tensors of one or two entries are left)."""
    if normalization == 0:
        return None
    if len(shape) >= 2 and channelwise and all(d > 1 for d in shape[1:]):
        return "channel"
    return "global" if math.prod(shape) > 2 else None


def _init_states(group: dict, params: list, states: list) -> None:
    slots = None
    for p, state in zip(params, states):
        if not state:
            if slots is None:
                slots = {id(q): k for k, q in enumerate(group["params"])}
            state["step"] = 0
            state["slot"] = slots.get(id(p), 0)
            # a device counter: incremented by the device-side stall decision, never read on the host
            state["kicks"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["kicks"].dtype != torch.int64:
            # load_state_dict casts every state tensor but "step" to the parameter's dtype
            state["kicks"] = state["kicks"].round().to(torch.int64)


def sparkles_step(group: dict, params: list, grads: list, states: list) -> None:
    """One SPARKLES step over a param group (shared by ModularOptimizer and :class:`SPARKLES`).

    Batched: parameters are split into lanes by (device, compute dtype); each lane runs a fixed
    number of kernels whatever its parameter count (see the module doc), with no host sync.
    """
    _init_states(group, params, states)
    if params and is_dtensor(params[0]):  # FSDP2: the plain step on gathered whole tensors and state
        on_whole_tensors(params, grads, lambda _, P, G, S: sparkles_step(group, P, G, S), states)
        return
    lanes: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else compute_dtype(p.dtype)
        lanes[(p.device, dtype)].append(i)
    for (device, dtype), idx in lanes.items():
        _sparkles_lane(
            group, [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], device, dtype
        )


def _sparkles_lane(group: dict, params: list, grads: list, states: list, device, dtype) -> None:
    """SPARKLES on parameters of one device whose math runs in one dtype (fp32 or fp64)."""
    beta1, beta2 = group["betas"]
    eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
    decouple = group["decouple_weight_decay"]
    threshold = group["stochastic_threshold"]
    steps = [s["step"] + 1 for s in states]
    # a parameter can stall from its second step on (it needs a previous gradient)
    may_kick = [t >= 2 for t in steps] if threshold > 0 else [False] * len(steps)
    kicking = any(may_kick)

    # -- steps 1-2 on same-shaped stacks; the stall distance from the raw gradients first
    buckets: dict[tuple, list[int]] = defaultdict(list)
    views = group_views(group, params)
    for i, g in enumerate(grads):
        kind, shape = work_shape(g, views[i])
        # step 2 decides on the shape with the output channel first (HF Conv1D's dims swapped)
        oriented = views[i].oriented(g.shape) if kind == "matrix" else tuple(g.shape)
        mode = _normalization_mode(oriented, group["normalization"], group["normalize_channels"])
        buckets[(kind, shape, mode, g.numel() > 1)].append(i)
    directions: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    stacks = []
    for (kind, shape, mode, multi), idx in buckets.items():
        G = torch.stack([as_work(grads[i], kind, shape, views[i]) for i in idx])
        if G.dtype != dtype:
            G = G.to(dtype)
        stalled = None
        if kicking:
            prev = torch.stack([as_work(states[i]["prev_grad"], kind, shape, views[i]) for i in idx])
            prev = prev.sub_(G).neg_() if prev.dtype == dtype else G - prev  # exact for bf16 too
            distance = torch.linalg.vector_norm(prev, dim=tuple(range(1, G.ndim)))
            stalled = distance < threshold
            if not all(may_kick[i] for i in idx):
                stalled &= torch.tensor([may_kick[i] for i in idx], device=device)
        if group["centralization"] != 0 and multi:
            centralize_(G, group["centralization"])
        if mode is not None:
            std_normalize_(G, group["normalization"], mode, eps)
        for j, i in enumerate(idx):
            directions[i] = from_work(grads[i], G[j], views[i])
        stacks.append((idx, G, stalled))

    # -- weights and moments in the compute dtype: fp32/fp64 ones in place, bf16/fp16 ones
    # through one flat fp32 buffer per dtype (upcast once, written back once)
    targets = [t for p, s in zip(params, states) for t in (p, s["exp_avg"], s["exp_avg_sq"])]
    work = list(targets)
    low: dict[torch.dtype, list[int]] = defaultdict(list)
    for k, t in enumerate(targets):
        if t.dtype != dtype:
            low[t.dtype].append(k)
    flats = []
    for low_dtype, ks in low.items():
        flat = torch.cat([targets[k].reshape(-1) for k in ks]).to(dtype)
        work_views = flat.split([targets[k].numel() for k in ks])
        for k, view in zip(ks, work_views):
            work[k] = view.view(targets[k].shape)
        flats.append((low_dtype, ks, flat))
    p32, m32, v32 = work[0::3], work[1::3], work[2::3]

    # -- steps 3-6 as foreach kernels over the whole lane
    uniform = all(t == steps[0] for t in steps)
    step_sizes = [lr / (1 - beta1**t) for t in steps]
    torch._foreach_lerp_(m32, directions, 1 - beta1)
    torch._foreach_add_(directions, m32, alpha=group["amp_fac"])
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, directions, directions, value=1 - beta2)
    if wd != 0 and not decouple:
        torch._foreach_add_(directions, p32, alpha=wd)
    denom = torch._foreach_sqrt(v32)
    if uniform:
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** steps[0]))
    else:
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(directions, denom)
    del denom
    if group["clip_gradients"]:
        bounds = [float(t) ** group["clip_exponent"] for t in steps]
        torch._foreach_clamp_min_(directions, [-b for b in bounds])
        torch._foreach_clamp_max_(directions, bounds)

    # -- the kick, decided on the device: d <- d + stalled * xi (so update = eta (d + xi) when stalled).
    # The noise is drawn whether or not anything stalled (skipping it would need the host to read
    # the decision); on the CPU that read is free, so a step without a stall skips the draw there
    # (same numbers: each step's stream is seeded afresh).
    if kicking and device.type == "cpu":
        kicking = bool(torch.stack([stalled.any() for _, _, stalled in stacks]).any())
    if kicking:
        total = sum(G.numel() for _, G, _ in stacks)
        gen = seeded_generator(device, mix_seed(group["seed"], states[0]["slot"], steps[0]))
        noise = torch.randn(total, generator=gen, device=device, dtype=torch.float32)
        offset = 0
        for idx, G, stalled in stacks:
            xi = noise[offset : offset + G.numel()].view(G.shape)
            offset += G.numel()
            if xi.dtype != G.dtype:
                xi = xi.to(G.dtype)
            G.addcmul_(xi, stalled.view(-1, *([1] * (G.ndim - 1))).to(G.dtype))
            torch._foreach_add_([states[i]["kicks"] for i in idx], list(stalled.to(torch.int64).unbind()))

    if decouple and wd != 0:
        torch._foreach_mul_(p32, [1 - eta * wd for eta in step_sizes])
    if uniform:
        torch._foreach_add_(p32, directions, alpha=-step_sizes[0])
    else:
        torch._foreach_mul_(directions, step_sizes)
        torch._foreach_sub_(p32, directions)

    # -- write back: bf16 stochastically rounded (one draw for the lane), others plainly
    for low_dtype, ks, flat in flats:
        if low_dtype == torch.bfloat16 and group["stochastic_rounding"] and any(
            params[k // 3].dtype == torch.bfloat16 for k in ks
        ):
            gen = seeded_generator(device, mix_seed(group["seed"], states[0]["slot"], steps[0], _ROUNDING_STREAM))
            flat = stochastic_round_to_bf16_(flat, gen)
        sources = flat.split([targets[k].numel() for k in ks])
        torch._foreach_copy_([targets[k] for k in ks], [s.view(targets[k].shape) for s, k in zip(sources, ks)])
    torch._foreach_copy_([s["prev_grad"] for s in states], list(grads))
    for s, t in zip(states, steps):
        s["step"] = t


SPARKLES_RULE = register_rule(
    UpdateRule(
        name="sparkles",
        example=dict(lr=0.01, stochastic_threshold=1e3, weight_decay=0.01, clip_gradients=True),
        step=sparkles_step,
        defaults=SPARKLES_DEFAULTS,
        summary="SPARKLES: centralize -> std-normalize -> momentum amplification -> adaptive step "
        "-> (ADOPT clip) -> seeded kick on stalls; stochastic rounding for bf16",
        check=check_sparkles,
        sharding="gather",  # FSDP2: the whole tensors and state gathered (optim/sharded.py)
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
