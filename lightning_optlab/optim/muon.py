"""Muon: momentum, then orthogonalization by the quintic Newton-Schulz iteration, scaled by shape.

Registry name ``muon``; standalone class :class:`Muon`. Hyperparameter names and values are
those of ``torch.optim.Muon`` (``momentum``, ``nesterov``, ``ns_coefficients``, ``ns_steps``,
``eps``, ``adjust_lr_fn``, ``weight_decay``), so its settings carry over verbatim, plus
``ns_dtype``. In float32/float64 Newton-Schulz the steps are torch.optim.Muon's formulas exactly
(tested against a float64 reference to 1e-10); in bf16 both are approximations of that iteration
with different roundings. The differences are on purpose:

* same-shaped matrices of a group are orthogonalized in one stacked call;
* the ``a X`` term of each iteration is folded into the small ``k x k`` product, so the big
  product is a plain matmul (no epilogue read of ``X``). In bf16 that rounds ``a + B_ii`` once
  more; the error against the float64 iteration stays of the order of torch.optim.Muon's own
  bf16 error (``tests/test_muon.py``);
* each tensor is read as its matrix view (:mod:`.matrix`; from the policy's ``matrix_views``):
  conv kernels (ndim > 2) flattened to (out, in * kh * kw) -- torch refuses them --, HF
  ``Conv1D`` weights stored (in, out) transposed, packed projections optionally as their blocks;
  the shape scaling uses that view, so a layer gets the same update however it is stored;
* the Newton-Schulz dtype follows the device (bf16 on CUDA, fp32 on CPU where bf16 matmuls are
  emulated and far slower) unless ``ns_dtype`` says otherwise;
* bf16/fp16 weights are updated in fp32 and cast back once.

Parameters with fewer than 2 dimensions are refused: route biases, norms and scalars to
another rule (``{match: {ndim: [0, 1]}, optimizer: adamw}``). A NaN/Inf gradient raises
``FloatingPointError`` before anything is changed (see :mod:`.guard`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import torch

from .cuda_graph import check_cuda_graph_setting
from .newton_schulz import newton_schulz_split, ns_split_world, resolve_ns_dtype
from .stacks import matrix_buckets
from .steps import (
    ADJUST_LR_FNS,
    decoupled_weight_decay_,
    muon_lookahead_,
    muon_lr_scale,
    store_,
    upcast,
)
from .matrix import group_views
from .muon_graph import graph_eligible, graph_for
from .newton_schulz import NS_COEFFICIENTS, NS_METHODS, POLAR_EXPRESS, coefficient_schedule, newton_schulz_
from .registry import UpdateRule, check_common, register_rule
from .sharded import assign_owners, gather_to_owners, is_dtensor, scatter_from_owners
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
    ns_split="auto",
    cuda_graph="auto",
    ns_method="plain",
)


def check_muon(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    steps = hp["ns_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
        raise ValueError(f"ns_steps must be an integer in [1, 100), got {steps!r}")
    if steps == 0:
        raise ValueError(
            "ns_steps must be an integer in [1, 100), got 0: with no Newton-Schulz iteration Muon is "
            "normalized momentum SGD, not Muon; use ns_steps: 5 (or 3 for a rougher polar factor)"
        )
    coeffs = hp["ns_coefficients"]
    try:
        coefficient_schedule(coeffs, steps)
    except ValueError:
        raise ValueError(
            f"ns_coefficients must be three numbers (a, b, c), one such triple per step ({steps} for "
            f"ns_steps: {steps}), or '{POLAR_EXPRESS}', got {coeffs!r}"
        ) from None
    if hp["ns_method"] not in NS_METHODS:
        raise ValueError(
            f"ns_method must be one of {', '.join(NS_METHODS)} (plain: the quintic on the matrix; gram: on "
            f"the Gram of its small side; auto: gram where the long side is >= 2x the short), got {hp['ns_method']!r}"
        )
    if hp["adjust_lr_fn"] is not None and hp["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(
            f"adjust_lr_fn must be one of {', '.join(ADJUST_LR_FNS)} (or null for 'original'), "
            f"got {hp['adjust_lr_fn']!r}"
        )
    if not isinstance(hp["nesterov"], bool):
        raise ValueError(f"nesterov must be true or false, got {hp['nesterov']!r}")
    resolve_ns_dtype(hp["ns_dtype"], torch.device("cpu"))
    check_cuda_graph_setting(hp["cuda_graph"])
    if hp["ns_split"] not in ("auto", True, False):
        raise ValueError(f"ns_split must be 'auto', true or false, got {hp['ns_split']!r}")


def _ns_settings(group: dict, device: torch.device) -> tuple[torch.dtype, tuple[int, int] | None, dict]:
    """The Newton-Schulz dtype, the rank split (or None) and the iteration's keyword arguments of a group."""
    ns = dict(steps=group["ns_steps"], coefficients=coefficient_schedule(group["ns_coefficients"], group["ns_steps"]),
              eps=group["eps"], method=group["ns_method"])
    return resolve_ns_dtype(group["ns_dtype"], device), ns_split_world(group["ns_split"]), ns


def muon_step(group: dict, params: list, grads: list, states: list) -> None:
    """One Muon step over a param group (shared by ModularOptimizer and :class:`Muon`):
    decoupled weight decay, then per matrix shape the momentum look-ahead on the stacked
    gradients and buffers, Newton-Schulz on the stack, and the shape-scaled update (one foreach
    kernel per shape). Where it is exact, the same specification replays as a CUDA graph on
    static stacks (:mod:`.muon_graph`)."""
    for p, state in zip(params, states):
        if p.ndim < 2:
            raise ValueError(
                f"muon got a parameter of shape {tuple(p.shape)}; it needs matrices or kernels. "
                "Route 0-/1-D parameters to another rule, e.g. {match: {ndim: [0, 1]}, optimizer: adamw}."
            )
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if is_dtensor(params[0]):
        _muon_step_sharded(group, params, grads, states)
        return
    if graph_eligible(group, params, ns_split_world(group["ns_split"])):
        graph_for(group, params).step(grads, states, group)
        return
    # The same specification as the CUDA graph (.muon_graph), on stacks built for this step:
    # per matrix shape, the look-ahead (muon_lookahead_) into the Newton-Schulz dtype, the
    # iteration (newton_schulz_, split across ranks under DDP), the shape-scaled update.
    buffers = [state["momentum_buffer"] for state in states]
    work = [upcast(b) for b in buffers]  # the buffers themselves for fp32
    weights = [upcast(p) for p in params]
    views = group_views(group, params)
    device = params[0].device
    dtype, world, ns = _ns_settings(group, device)
    lr = group["lr"]
    decoupled_weight_decay_(weights, lr, group["weight_decay"])
    for shape, slots in matrix_buckets([p.shape for p in params], views):
        def stacked(tensors):
            return torch.cat([views[i].to_matrix(upcast(tensors[i])).reshape(-1, *shape) for i, _ in slots])

        def per_parameter(stack):  # a bucket's stack back in each parameter's stored layout
            return [views[i].from_matrix(stack[start : start + views[i].blocks], params[i].shape) for i, start in slots]

        G, buf = stacked(grads), stacked(work)
        X = muon_lookahead_(G, buf, group["momentum"], group["nesterov"], out=torch.empty(G.shape, dtype=dtype, device=device))
        torch._foreach_copy_([work[i] for i, _ in slots], per_parameter(buf))  # the blended momentum kept
        ortho = newton_schulz_split(X, world, dtype=dtype, **ns) if world else newton_schulz_(X, **ns)
        torch._foreach_add_([weights[i] for i, _ in slots], per_parameter(ortho.to(weights[0].dtype)),
                            alpha=-lr * muon_lr_scale(*shape, group["adjust_lr_fn"]))
    for target, value in zip(params + buffers, weights + work):
        store_(target, value)  # casts back bf16/fp16 weights and buffers; no-op for fp32


def _muon_step_sharded(group: dict, params: list, grads: list, states: list) -> None:
    """:func:`muon_step` on FSDP2 shards (DTensor parameters, gradients and momentum): decay and
    momentum on this rank's rows; each matrix's look-ahead (the Newton-Schulz input) brought
    whole to its owner rank by one all-to-all (owners balanced by the iteration's cost), the
    owner's matrices orthogonalized by shape, one all-to-all back, each rank's rows of the update
    applied. The same specification as the unsharded step; the momentum stays sharded."""
    shards = [p.to_local() for p in params] + [state["momentum_buffer"].to_local() for state in states]
    local, work = [upcast(t) for t in shards[: len(params)]], [upcast(t) for t in shards[len(params):]]
    views = group_views(group, params)
    device = local[0].device
    dtype, _, ns = _ns_settings(group, device)
    lr = group["lr"]
    decoupled_weight_decay_(local, lr, group["weight_decay"])
    looks = [muon_lookahead_(upcast(g.to_local()), buf, group["momentum"], group["nesterov"],
                             out=torch.empty(g.to_local().shape, dtype=dtype, device=device))
             for g, buf in zip(grads, work)]
    shapes = [views[i].shape(p.shape) for i, p in enumerate(params)]
    owners = assign_owners(params, [views[i].blocks * m * n * min(m, n) for i, (m, n) in enumerate(shapes)])
    whole = gather_to_owners(params, looks, owners)
    mine = sorted(whole)
    updates = {}
    for shape, slots in matrix_buckets([params[i].shape for i in mine], [views[i] for i in mine]):
        X = torch.cat([views[mine[k]].to_matrix(whole[mine[k]]).reshape(-1, *shape) for k, _ in slots])
        ortho = newton_schulz_(X, **ns)
        for k, start in slots:
            i = mine[k]
            updates[i] = views[i].from_matrix(ortho[start : start + views[i].blocks], params[i].shape)
    for i, part in enumerate(scatter_from_owners(params, updates, owners, dtype=dtype)):
        local[i].add_(part.to(local[i].dtype), alpha=-lr * muon_lr_scale(*shapes[i], group["adjust_lr_fn"]))
    for target, value in zip(shards, local + work):
        store_(target, value)  # casts back bf16/fp16 shards; no-op for fp32


def muon_prepare(group: dict, params: list, grads: list, states: list):
    """With the CUDA graph: copy the gradients into its static stacks while the optimizer's
    NaN/Inf check is in flight (no weight or state value changes); the replay is left. Else
    None (the plain step runs after the check)."""
    if not all(states) or is_dtensor(params[0]):
        return None
    if not graph_eligible(group, params, ns_split_world(group["ns_split"])):
        return None
    graph = graph_for(group, params)
    graph.load(grads, states)
    return functools.partial(graph.run, group)


MUON_RULE = register_rule(
    UpdateRule(
        name="muon",
        example=dict(lr=0.02, weight_decay=0.01),
        step=muon_step,
        defaults=MUON_DEFAULTS,
        min_ndim=2,
        summary="Muon: nesterov momentum -> quintic Newton-Schulz orthogonalization (batched) -> shape scaling",
        check=check_muon,
        prepare=muon_prepare,
        sharding="gather",
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
        ns_coefficients: quintic coefficients (a, b, c) (default (3.4445, -4.7750, 2.0315)), or one
            triple per step (a schedule), or ``"polar_express"`` (a minimax schedule for
            ``ns_steps``, :func:`~.newton_schulz.polar_express_schedule`).
        ns_method: ``"plain"`` (default: the quintic on the matrix), ``"gram"`` (the same iteration
            on the Gram of the small side, one product with the matrix at the end; less work
            from a 2:1 aspect ratio on), ``"auto"`` (``"gram"`` for matrices at least 2:1).
        eps: floor of the Frobenius norm before the iteration (default 1e-7).
        adjust_lr_fn: shape scaling of the update: ``"original"`` ``sqrt(max(1, rows/cols))``
            (default), ``"match_rms_adamw"`` ``0.2*sqrt(max(rows, cols))`` (AdamW lr and weight
            decay carry over), ``"spectral_unclamped"`` ``sqrt(rows/cols)``.
        ns_dtype: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"bfloat16"``, ``"float32"``...
        ns_split: ``"auto"`` (default) splits the Newton-Schulz work across ranks when a
            process group is initialized (DDP: same gradients everywhere, each rank
            orthogonalizes its share, an all-gather assembles them); ``False`` never splits.
        cuda_graph: ``"auto"`` (default) replays the whole step as one CUDA graph where that is
            exact: fp32 weights on CUDA, no rank split, every parameter with a gradient (see
            :mod:`.muon_graph`); eager otherwise. ``False`` always runs eagerly.
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
        ns_split: bool | str = MUON_DEFAULTS["ns_split"],
        cuda_graph: bool | str = MUON_DEFAULTS["cuda_graph"],
        ns_method: str = MUON_DEFAULTS["ns_method"],
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
            ns_split=ns_split,
            cuda_graph=cuda_graph,
            ns_method=ns_method,
        )
