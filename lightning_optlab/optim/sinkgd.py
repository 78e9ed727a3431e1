"""Stateless multi-normalized gradient descent: SinkGD (paper) and the Sinkhorn-tanh variant.

* ``sinkgd`` / :class:`SinkGD` -- Scetbon et al., "Gradient Multi-Normalization for Stateless
  and Scalable LLM Training" (arXiv 2502.06742): ``sinkhorn_iterations`` alternations of row-
  then column-wise l2 normalization (rows to norm sqrt(n), columns to sqrt(m) for an m x n
  matrix, i.e. unit-RMS entries), then ``p <- p * (1 - lr * weight_decay) - lr * G``.
  Each tensor is read as its matrix view (:mod:`.matrix`: conv kernels flattened to (out, fan_in),
  HF ``Conv1D`` transposed); vectors (1-D, or (C, 1, 1) scales) and scalars to unit RMS.
  The paper uses it on the 2-D hidden matrices and Adam elsewhere; a policy says the same.
* ``sinkhorn_tanh`` / :class:`SinkhornTanh` -- the "Sinkhorn-like" SinkGD of the ablation notes:
  ``n_iter`` rounds of (row l2, column l2, ``tanh(g / tau)``), the result rescaled to the
  gradient's RMS, decoupled weight decay. Defaults lr 3e-4, weight_decay 0.1, tau 0.1,
  n_iter 5, eps 1e-8 (the notes' S1); S2 is tau 0.05 / n_iter 10, S3 tau 0.2 / n_iter 3.

Both keep no state at all (``state_dict()['state']`` is empty). Math in fp32, result cast back
to the parameter dtype. ``cuda_graph`` (default False): with ``"auto"`` (or True) the group step
on CUDA with fp32 weights is replayed as one CUDA graph (:mod:`.stateless_graph`), which keeps a
float32 stack of the gradients and the graph's pool of intermediates between steps -- workspace,
not state, but memory all the same (about 4-5 bytes per parameter; step times with and without
it in ``docs/benchmarks.md``). SinkGD is
chosen for its SGD-like memory, so the default keeps that; ask for the graph where speed matters
more. A NaN/Inf gradient raises
``FloatingPointError`` before anything is changed (see :mod:`.guard`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .cuda_graph import check_cuda_graph_setting, graph_eligible
from .matrix import MatrixView
from .stacks import add_stacked_updates_, from_work, pow2_prescale_stack_, pow2_prescale_stacks_, stack_by_shape
from .steps import decay_factor, full_fp32_matmul, norm_floor_sq, normalize_dim_, rms_stack, upcast
from .matrix import group_views
from .registry import UpdateRule, check_common, register_rule
from .sharded import is_dtensor, on_whole_tensors
from .rule_optimizer import RuleOptimizer
from .stateless_graph import graph_for

SINKGD_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, sinkhorn_iterations=5, weight_decay=0.0, eps=1e-8, cuda_graph=False
)
SINKHORN_TANH_DEFAULTS: dict[str, Any] = dict(
    lr=3e-4, weight_decay=0.1, tau=0.1, n_iter=5, eps=1e-8, cuda_graph=False
)
# what a captured graph bakes in (lr is a device scalar and may change freely)
_SINKGD_GRAPH_KEYS = ("sinkhorn_iterations", "weight_decay", "eps")
_SINKHORN_TANH_GRAPH_KEYS = ("weight_decay", "tau", "n_iter", "eps")


def sinkhorn_scales_(
    squares: Sequence[Tensor], iterations: int, eps: float
) -> tuple[list[Tensor], list[Tensor]]:
    """SinkGD's alternating row/column normalization run on scale vectors only.

    ``squares[k]`` is a stack ``S = X0 * X0`` (B, m, n) of squared (prescaled) matrices ``X0``.
    ``iterations`` alternations of "rows to l2 norm sqrt(n)" then "columns to l2 norm sqrt(m)"
    applied to ``X = diag(r) X0 diag(c)`` change only ``r`` and ``c``, and the norms they need are
    matrix-vector products with ``S``: ``||X_i,:||^2 = r_i^2 (S c^2)_i`` and
    ``||X_:,j||^2 = c_j^2 (S^T r^2)_j``. So each half-step is one batched matvec (one read of
    ``S``, nothing written at full size) and a few vector kernels, foreach'd over all stacks.
    The norm floor keeps its meaning: ``r_i <- r_i sqrt(n) / max(||X_i,:||, eps)``, i.e. on the
    squares ``u_i <- n u_i / max(u_i (S w)_i, eps^2)`` with ``u = r^2``, ``w = c^2``; ``u`` and
    ``w`` are capped (see ``ceiling``), which only binds on (near-)zero rows/columns (a zero row
    of ``X`` stays zero whatever its scale; the original multiplies it by sqrt(n)/eps each time).

    Returns ``(us, ws)``: ``u = r^2`` shaped (B, m, 1) and ``w = c^2`` shaped (B, 1, n) per stack,
    the targets sqrt(n), sqrt(m) included (``X = sqrt(u) * X0 * sqrt(w)``). ``S`` is not changed.
    All-zero rows/columns of ``S`` get scale 0 (their ``X`` is 0 either way). Where ``S``
    differs from the original's squares is underflow: a whole row (column) below ~1e-22 of the
    matrix's max has zero squares in fp32 and gets a zero update, where the original's
    repeated rescaling would lift it into range after a first clamped step.
    """
    if not squares:
        return [], []
    us = [S.new_ones(S.shape[0], S.shape[1], 1) for S in squares]
    ws = [S.new_ones(S.shape[0], 1, S.shape[2]) for S in squares]
    zero = [S.new_zeros(()) for S in squares]
    row_floor = [norm_floor_sq(eps, S.dtype) / S.shape[2] for S in squares]
    col_floor = [norm_floor_sq(eps, S.dtype) / S.shape[1] for S in squares]
    # A zero row's scale grows by n / eps^2 every half-step (harmless on X = 0, not on the
    # vectors): stop it at finfo.max / (4 max(m, n)). A nonzero row of relative size rho needs
    # u ~ n / rho^2, below that ceiling for rho >~ 1e-17 in fp32 -- where its squares in S are
    # still normal numbers (the original's sums of squares lose such rows the same way).
    ceiling = [torch.finfo(S.dtype).max / (4 * max(S.shape[1:])) for S in squares]
    with full_fp32_matmul():
        for _ in range(iterations):
            # rows: t = (S w) / n; u <- u / max(u t, eps^2 / n) = n u / max(u (S w), eps^2)
            ts = [torch.baddbmm(z, S, w.mT, beta=0, alpha=1.0 / S.shape[2]) for z, S, w in zip(zero, squares, ws)]
            row_ts = ts  # kept: the last row sums say which rows of S are all zero
            q = torch._foreach_mul(us, ts)
            torch._foreach_clamp_min_(q, row_floor)
            us = torch._foreach_div(us, q)
            torch._foreach_clamp_max_(us, ceiling)
            # columns: the same with S^T and u
            ts = [torch.baddbmm(z, u.mT, S, beta=0, alpha=1.0 / S.shape[1]) for z, S, u in zip(zero, squares, us)]
            q = torch._foreach_mul(ws, ts)
            torch._foreach_clamp_min_(q, col_floor)
            ws = torch._foreach_div(ws, q)
            torch._foreach_clamp_max_(ws, ceiling)
        col_ts = ts
    # rows/columns of S that are all zero (ts == 0; u, w > 0) get scale 0, so that their
    # (irrelevant, capped) scales cannot turn into inf * 0 = NaN in the final product
    torch._foreach_mul_(us, torch._foreach_sign(row_ts))
    torch._foreach_mul_(ws, torch._foreach_sign(col_ts))
    return us, ws


def sinkgd_factors_(stacks: Sequence[Tensor], iterations: int, eps: float = 1e-8) -> tuple[list[Tensor], list[Tensor]]:
    """SinkGD of stacks of matrices as two scale vectors: ``SinkGD(G0)[b] = r[b] * G[b] * c[b]``.

    Each stack ``G`` (B, m, n) is first multiplied in place by its items' power-of-two prescales
    (so the squares below neither overflow nor underflow; SinkGD is scale-invariant), then
    ``S = G * G`` is formed once and :func:`sinkhorn_scales_` runs the ``iterations`` row/column
    alternations on it (2 * iterations batched matvecs). Returns ``(rows, cols)``: ``r`` shaped
    (B, m, 1), ``c`` (B, 1, n), targets sqrt(n)/sqrt(m) included; zero rows/columns get 0.
    No product of the two is formed: ``r <= ~1.6e17``, ``c`` likewise and ``|G| < 1``, so
    ``(G * r) * c`` stays finite in fp32. Full-size traffic: 1 read (max), 1 read + 1 write
    (prescale), 1 read + 1 write (square), 2 * iterations reads of ``S``; ``S`` is freed on return.
    """
    if not stacks:
        return [], []
    pow2_prescale_stacks_(stacks)
    squares = [G * G for G in stacks]
    rows, cols = sinkhorn_scales_(squares, iterations, eps)
    del squares
    torch._foreach_sqrt_(rows)
    torch._foreach_sqrt_(cols)
    return rows, cols


def sinkgd_stack_(G: Tensor, kind: str, iterations: int, eps: float = 1e-8) -> Tensor:
    """SinkGD's multi-normalization of every item of a stack from :func:`stack_by_shape`, in place.

    Matrices (B, m, n): ``iterations`` alternations of rows to l2 norm sqrt(n), then columns
    to sqrt(m), run on scale vectors by :func:`sinkgd_factors_` and applied in one pass.
    Vectors and scalars: unit RMS (a scalar becomes its sign). Each item is first scaled by an
    exact power of two (scale-invariant, so no effect but on overflow). Returns ``G``.
    (The group step, :func:`sinkgd_stacks_step_`, folds the two factors into the update instead.)
    """
    if kind != "matrix":
        pow2_prescale_stack_(G)
        return G.div_(rms_stack(G, eps))
    (r,), (c,) = sinkgd_factors_([G], iterations, eps)
    return G.mul_(r).mul_(c)


def sinkhorn_tanh_factor_(G: Tensor, kind: str, tau: float, n_iter: int, eps: float = 1e-8) -> Tensor | None:
    """The Sinkhorn-tanh rounds on a stack from :func:`stack_by_shape`, in place, WITHOUT the final
    rescale; returns that rescale per item (``(B, 1, ...)``; None for scalars, which have none):
    ``transform(G0)[b] = factor[b] * G[b]``, so a caller folds it into the update.

    Matrices: ``n_iter`` rounds of (rows to unit l2, columns to unit l2, ``tanh(./tau)``; the
    division by tau folded into the column pass): per round two norm reads and three
    read+write passes. The gradient's RMS (the restore target) comes from the first round's row
    norms (``||G||_F^2 = sum_i ||G_i,:||^2``), not from a pass of its own. Vectors: l1
    normalization in place of rows/columns. Scalars: ``tanh(./tau)`` iterated only.
    """
    if kind == "scalar":
        for _ in range(n_iter):
            G.div_(tau).tanh_()
        return None
    scale = pow2_prescale_stack_(G)
    count = math.prod(G.shape[1:])
    if kind == "matrix":
        norm = torch.linalg.vector_norm(G, dim=-1, keepdim=True)
        reference = torch.linalg.vector_norm(norm, dim=(1, 2), keepdim=True).div_(math.sqrt(count))
        G.div_(norm.clamp_min_(eps))
        normalize_dim_(G, -2, 1.0, eps, extra=tau)
        G.tanh_()
        for _ in range(n_iter - 1):
            normalize_dim_(G, -1, 1.0, eps)
            normalize_dim_(G, -2, 1.0, eps, extra=tau)
            G.tanh_()
    else:
        reference = rms_stack(G, 0.0)
        for _ in range(n_iter):
            norm = torch.linalg.vector_norm(G, 1, dim=-1, keepdim=True).clamp_min_(eps).mul_(tau)
            G.div_(norm)
            G.tanh_()
    # restore the RMS and undo the power-of-two prescale (one small kernel each, on (B, 1, ...))
    return reference.div_(rms_stack(G, eps)).div_(scale)


def sinkhorn_tanh_stack_(G: Tensor, kind: str, tau: float, n_iter: int, eps: float = 1e-8) -> Tensor:
    """The Sinkhorn-tanh transform of every item of a stack from :func:`stack_by_shape`, in place:
    :func:`sinkhorn_tanh_factor_`, then the rescale applied. Returns ``G``."""
    factor = sinkhorn_tanh_factor_(G, kind, tau, n_iter, eps)
    return G if factor is None else G.mul_(factor)


def _single(grad: Tensor, transform, view: MatrixView | None = None) -> Tensor:
    ((kind, _, stack),) = stack_by_shape([upcast(grad).clone()], [view])
    return from_work(grad, transform(stack, kind)[0], view).contiguous()


def sinkgd_update(grad: Tensor, iterations: int, eps: float = 1e-8, view: MatrixView | None = None) -> Tensor:
    """SinkGD's multi-normalized gradient (Scetbon et al., arXiv 2502.06742) of one tensor.

    For an m x n matrix, ``iterations`` alternations of
    ``G <- sqrt(n) * G / ||G_i,:||`` (rows) then ``G <- sqrt(m) * G / ||G_:,j||`` (columns):
    the rows and columns of a matrix with unit-RMS entries. The result has columns of norm
    exactly sqrt(m) and rows converging to sqrt(n) as ``iterations`` grows (Sinkhorn's
    algorithm on the squared entries).

    Non-2-D tensors: kernels of >2 dims are flattened to (out, fan_in) matrices like Muon does
    (``view``: the tensor's :class:`~.matrix.MatrixView`, e.g. HF ``Conv1D`` stored (in, out));
    1-D and 0-D tensors have no row/column structure and are normalized to unit RMS
    (``g / rms(g)``; this is the 1 x n case of the row step, and the sign for a scalar).
    Returns a new tensor (compute dtype) shaped like ``grad``. The group step runs the same
    code (:func:`sinkgd_factors_`, :func:`sinkgd_stack_`) on stacks of same-shaped gradients.
    """
    return _single(grad, lambda G, kind: sinkgd_stack_(G, kind, iterations, eps), view)


def sinkhorn_tanh_update(
    grad: Tensor, tau: float, n_iter: int, eps: float = 1e-8, view: MatrixView | None = None
) -> Tensor:
    """The "Sinkhorn-like" SinkGD transform of the SinkGD ablation notes, of one tensor.

    >=2-D (flattened to (out, fan_in)): for t in 1..n_iter: ``g <- g / ||g||_row``,
    ``g <- g / ||g||_col``, ``g <- tanh(g / tau)``; then the result is rescaled to the RMS of
    the original gradient. 1-D: the same with l1 normalization ``g <- g / ||g||_1`` in place of
    the row/column steps. 0-D: ``tanh(g / tau)`` iterated, no normalization and no RMS restore
    (which would give back ``g`` itself). Norms are clamped at ``eps``: a zero gradient gives a
    zero update. Returns a new tensor (compute dtype) shaped like ``grad``. The group step runs
    the same code (:func:`sinkhorn_tanh_factor_`) on stacks of same-shaped gradients.
    """
    return _single(grad, lambda G, kind: sinkhorn_tanh_stack_(G, kind, tau, n_iter, eps), view)


def sinkgd_stacks_step_(
    params: Sequence[Tensor],
    stacks: Sequence[tuple[str, list[int], Tensor]],
    lr: float | Tensor,
    weight_decay: float,
    iterations: int,
    eps: float = 1e-8,
    views: Sequence[MatrixView] | None = None,
) -> None:
    """``p <- p (1 - lr wd) - lr * SinkGD(g)`` for a group whose gradients are stacked by shape.

    Matrices: :func:`sinkgd_factors_`, the row factor times ``-lr`` folded into one multiply of
    the (prescaled) stack, the column factor into each weight's ``addcmul_``. Full-size traffic
    per step: 1 + 2 + 2 + 2 * iterations passes in the factors, 2 for the row multiply, 3 for
    the update (read p, G; write p), plus 2 for weight decay when it is on. Vectors/scalars:
    :func:`sinkgd_stack_` and ``add_``.
    """
    neg_lr = -lr
    matrices = [(idx, G) for kind, idx, G in stacks if kind == "matrix"]
    updates: list[tuple[list[int], Tensor, Any]] = []
    if matrices:
        rows, cols = sinkgd_factors_([G for _, G in matrices], iterations, eps)
        for (idx, G), r, c in zip(matrices, rows, cols):
            G.mul_(r.mul_(neg_lr))
            updates.append((idx, G, c))
    for kind, idx, G in stacks:
        if kind != "matrix":
            updates.append((idx, sinkgd_stack_(G, kind, iterations, eps), neg_lr))
    add_stacked_updates_(params, updates, decay_factor(lr, weight_decay), views)


def sinkhorn_tanh_stacks_step_(
    params: Sequence[Tensor],
    stacks: Sequence[tuple[str, list[int], Tensor]],
    lr: float | Tensor,
    weight_decay: float,
    tau: float,
    n_iter: int,
    eps: float = 1e-8,
    views: Sequence[MatrixView] | None = None,
) -> None:
    """``p <- p (1 - lr wd) - lr * SinkhornTanh(g)`` for a group whose gradients are stacked by
    shape: :func:`sinkhorn_tanh_factor_` on each stack, the RMS restore, prescale undo and
    ``-lr`` folded into one per-item factor of each weight's ``addcmul_`` (no pass of their own)."""
    neg_lr = -lr
    updates: list[tuple[list[int], Tensor, Any]] = []
    for kind, idx, G in stacks:
        factor = sinkhorn_tanh_factor_(G, kind, tau, n_iter, eps)
        updates.append((idx, G, neg_lr if factor is None else factor.mul_(neg_lr)))
    add_stacked_updates_(params, updates, decay_factor(lr, weight_decay), views)


def _check_count(hp: Mapping[str, Any], key: str, minimum: int) -> None:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_sinkgd(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "sinkhorn_iterations", 1)
    check_cuda_graph_setting(hp["cuda_graph"])


def check_sinkhorn_tanh(hp: Mapping[str, Any]) -> None:
    check_common(hp)
    _check_count(hp, "n_iter", 1)
    tau = hp["tau"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
        raise ValueError(f"tau must be a number > 0, got {tau!r}")
    check_cuda_graph_setting(hp["cuda_graph"])


def _sinkgd_body(params: list, stacks: list, lr: Any, group: dict, views: list) -> None:
    sinkgd_stacks_step_(params, stacks, lr, group["weight_decay"], group["sinkhorn_iterations"], group["eps"], views)


def _sinkhorn_tanh_body(params: list, stacks: list, lr: Any, group: dict, views: list) -> None:
    sinkhorn_tanh_stacks_step_(params, stacks, lr, group["weight_decay"], group["tau"], group["n_iter"], group["eps"],
                               views)


def _on_owned(body, group: dict, views: list, indices: list, params: list, grads: list) -> None:
    """``body`` on the whole tensors of the group's tensors ``indices`` (FSDP2's owner ranks)."""
    mine = [views[i] for i in indices]
    body(params, stack_by_shape(grads, mine), float(group["lr"]), group, mine)


def sinkgd_step(group: dict, params: list, grads: list, states: list) -> None:
    """One SinkGD step over a param group (stateless: ``states`` are left empty).

    Gradients are stacked by shape; matrices run as Sinkhorn on scale vectors
    (:func:`sinkgd_stacks_step_`: batched matrix-vector products over the squared
    gradients, the two scale vectors folded into the update of each weight). On CUDA with fp32
    weights the same function is replayed as a CUDA graph (:mod:`.stateless_graph`, unless
    ``cuda_graph`` is False). Nothing waits on the device.
    """
    views = group_views(group, params)
    if is_dtensor(params[0]):  # FSDP2: the plain step on whole matrices, each on its owner rank
        on_whole_tensors(params, grads, functools.partial(_on_owned, _sinkgd_body, group, views))
        return
    if graph_eligible("sinkgd", group, params):
        graph_for("sinkgd", group, params, _SINKGD_GRAPH_KEYS, _sinkgd_body).step(grads, group)
        return
    _sinkgd_body(params, stack_by_shape(grads, views), float(group["lr"]), group, views)


def sinkhorn_tanh_step(group: dict, params: list, grads: list, states: list) -> None:
    """One Sinkhorn-tanh step over a param group (stateless; batched by shape, graph on CUDA like SinkGD)."""
    views = group_views(group, params)
    if is_dtensor(params[0]):  # FSDP2: the plain step on whole matrices, each on its owner rank
        on_whole_tensors(params, grads, functools.partial(_on_owned, _sinkhorn_tanh_body, group, views))
        return
    if graph_eligible("sinkhorn_tanh", group, params):
        graph_for("sinkhorn_tanh", group, params, _SINKHORN_TANH_GRAPH_KEYS, _sinkhorn_tanh_body).step(grads, group)
        return
    _sinkhorn_tanh_body(params, stack_by_shape(grads, views), float(group["lr"]), group, views)


SINKGD_RULE = register_rule(
    UpdateRule(
        name="sinkgd",
        example=dict(lr=0.01, weight_decay=0.01),
        step=sinkgd_step,
        defaults=SINKGD_DEFAULTS,
        summary="SinkGD (arXiv 2502.06742): stateless alternating row/column l2 normalization",
        check=check_sinkgd,
        stateless=True,
        sharding="gather",
    )
)
SINKHORN_TANH_RULE = register_rule(
    UpdateRule(
        name="sinkhorn_tanh",
        example=dict(lr=0.01),
        step=sinkhorn_tanh_step,
        defaults=SINKHORN_TANH_DEFAULTS,
        summary="Sinkhorn-like SinkGD: (row, column, tanh(g/tau))^n_iter, RMS restored; stateless",
        check=check_sinkhorn_tanh,
        stateless=True,
        sharding="gather",
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
        cuda_graph: ``False`` (default: nothing kept between steps) always runs eagerly;
            ``"auto"`` replays the step as one CUDA graph where that is exact (fp32 weights on
            one CUDA device, every parameter with a gradient; see :mod:`.stateless_graph`;
            faster, with ~4.8 bytes per parameter of workspace kept), eager otherwise; ``True``
            raises where the graph cannot run.
    """

    rule_name = "sinkgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SINKGD_DEFAULTS["lr"],
        sinkhorn_iterations: int = SINKGD_DEFAULTS["sinkhorn_iterations"],
        weight_decay: float = SINKGD_DEFAULTS["weight_decay"],
        eps: float = SINKGD_DEFAULTS["eps"],
        cuda_graph: bool | str = SINKGD_DEFAULTS["cuda_graph"],
    ) -> None:
        super().__init__(
            params, lr=lr, sinkhorn_iterations=sinkhorn_iterations, weight_decay=weight_decay, eps=eps,
            cuda_graph=cuda_graph,
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
        cuda_graph: ``False`` (default), ``"auto"`` or ``True``, as for :class:`SinkGD`.
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
        cuda_graph: bool | str = SINKHORN_TANH_DEFAULTS["cuda_graph"],
    ) -> None:
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, tau=tau, n_iter=n_iter, eps=eps, cuda_graph=cuda_graph
        )
