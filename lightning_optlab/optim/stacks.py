"""Stacks: the same-shaped tensors of a group in one (B, ...) tensor, so a rule runs a handful
of batched kernels per shape instead of a handful per parameter (on a GPU the per-parameter
form is bound by kernel launches, not by arithmetic), and the updates written back from them.

Scale-invariant normalizations first multiply a stack by an exact power of two
(:func:`pow2_prescale_stack_`) so sums of squares cannot overflow.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor

from .matrix import DEFAULT_VIEW, MatrixView
from .newton_schulz import pow2_scales
from .steps import compute_dtype


def matrix_buckets(shapes: Sequence[Sequence[int]], views: Sequence[MatrixView]) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Parameters grouped by the shape of their matrices: ``[((m, n), [(index, first slot)])]``,
    a split projection taking ``blocks`` consecutive slots of its bucket's stack."""
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (shape, view) in enumerate(zip(shapes, views)):
        slots = buckets.setdefault(view.shape(shape), [])
        slots.append((i, sum(views[k].blocks for k, _ in slots)))
    return list(buckets.items())


STACK_KINDS = ("matrix", "vector", "scalar")


def work_shape(t: Tensor, view: MatrixView | None = None) -> tuple[str, tuple[int, ...]]:
    """How a tensor is stacked: ``("matrix", (fan_out, fan_in))`` for a >=2-D tensor read as its
    matrix ``view`` (default (out, fan_in), conv kernels flattened to (out, in*k); a packed
    projection as one matrix), ``("vector", (n,))`` for 1-D tensors and tensors whose
    view is ``vector`` (a (C, 1, 1) scale), ``("scalar", (1,))`` for 0-D."""
    if t.ndim >= 2 and (view is None or view.is_matrix):
        return "matrix", (view or DEFAULT_VIEW).unsplit().shape(t.shape)
    if t.ndim >= 1:
        return "vector", (t.numel(),)
    return "scalar", (1,)


def as_work(t: Tensor, kind: str, shape: tuple[int, ...], view: MatrixView | None) -> Tensor:
    """``t`` as one item of a :func:`stack_by_shape` stack of ``kind`` and ``shape``: its matrix
    view (a strided view of ``t`` where the layout allows), else ``t`` reshaped."""
    return (view or DEFAULT_VIEW).unsplit().to_matrix(t) if kind == "matrix" else t.reshape(shape)


def stack_by_shape(
    tensors: Sequence[Tensor], views: Sequence[MatrixView] | None = None
) -> list[tuple[str, list[int], Tensor]]:
    """Bucket tensors by (device, dtype, :func:`work_shape`) and stack each bucket into a NEW
    ``(B, *work_shape)`` tensor in :func:`compute_dtype` (safe to transform in place). ``views``
    (aligned with ``tensors``) say how each reads as a matrix (:mod:`.matrix`).

    Returns ``[(kind, indices, stack)]``; ``stack[j]`` holds ``tensors[indices[j]]``.
    """
    views = views or [None] * len(tensors)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        kind, shape = work_shape(t, views[i])
        buckets[(t.device, t.dtype, kind, shape)].append(i)
    out = []
    for (_, dtype, kind, shape), idx in buckets.items():
        stack = torch.stack([as_work(tensors[i], kind, shape, views[i]) for i in idx])
        if stack.dtype != compute_dtype(dtype):
            stack = stack.to(compute_dtype(dtype))
        out.append((kind, idx, stack))
    return out


def from_work(t: Tensor, work: Tensor, view: MatrixView | None = None) -> Tensor:
    """A stack item ``work`` (from :func:`stack_by_shape`) laid out as the stored tensor ``t``."""
    if t.ndim >= 2 and work.ndim == 2:
        return (view or DEFAULT_VIEW).unsplit().from_matrix(work, t.shape)
    return work.view(t.shape)


def pow2_prescale_stack_(x: Tensor) -> Tensor:
    """An exact power-of-two prescale of each ``x[b]`` (max|x[b]| into [0.5, 1)), in place; returns the
    per-item powers of two ``s`` shaped ``(B, 1, ...)`` (an all-zero item gets ``s = 1``)."""
    dims = tuple(range(1, x.ndim))
    s = pow2_scales(torch.linalg.vector_norm(x, float("inf"), dim=dims, keepdim=True))
    x.mul_(s)
    return s


def pow2_prescale_stacks_(stacks: Sequence[Tensor]) -> list[Tensor]:
    """:func:`pow2_prescale_stack_` of several 3-D stacks with one scale computation: per-item
    max (one read of each stack), the powers of two of all items at once, one multiply per stack.
    Returns the scales, shaped (B, 1, 1) per stack."""
    amax = torch.cat([torch.linalg.vector_norm(G, float("inf"), dim=(1, 2)) for G in stacks])
    scales = pow2_scales(amax)
    out, start = [], 0
    for G in stacks:
        s = scales[start : start + G.shape[0]].view(-1, 1, 1).to(G.dtype)  # exact: powers of two
        start += G.shape[0]
        G.mul_(s)
        out.append(s)
    return out


def add_stacked_updates_(
    params: Sequence[Tensor],
    updates: Sequence[tuple[list[int], Tensor, Any]],
    decay: float | Tensor | None,
    views: Sequence[MatrixView] | None = None,
) -> None:
    """``p <- p * decay + U[j] * factor[j]`` for each ``(indices, U, factor)``: ``factor`` a float,
    a 0-d tensor or a stack-shaped tensor broadcasting against ``U[j]`` (e.g. (B, 1, n) column
    scales); ``U[j]`` is in :func:`stack_by_shape`'s layout (``views``: each weight's matrix view).
    Weights in ``U``'s dtype and contiguous are updated in place: the decay as one foreach
    kernel for the group, then one ``add_``/``addcmul_`` per weight straight from ``U`` (no update
    tensor of its own) into a strided view of the weight. Others (bf16/fp16, non-contiguous, a
    view that needs a copy) go through one fp32 copy each, rounded back once."""
    views = views or [None] * len(params)
    direct = [
        params[i] for idx, U, _ in updates for i in idx if params[i].dtype == U.dtype and params[i].is_contiguous()
    ]
    if decay is not None and direct:
        torch._foreach_mul_(direct, decay)
    for idx, U, factor in updates:
        for j, i in enumerate(idx):
            p = params[i]
            exact = p.dtype == U.dtype and p.is_contiguous()
            work = p if exact else p.to(dtype=U.dtype, memory_format=torch.contiguous_format, copy=True)
            if not exact and decay is not None:
                work.mul_(decay)
            target = as_work(work, "matrix" if U.ndim == 3 else "vector", U.shape[1:], views[i])
            if isinstance(factor, Tensor):
                target.addcmul_(U[j], factor[j] if factor.ndim > 0 else factor)
            else:
                target.add_(U[j], alpha=factor)
            if target.untyped_storage().data_ptr() != work.untyped_storage().data_ptr():
                work.copy_(from_work(work, target, views[i]))  # the view was a copy (ConvTranspose)
            if not exact:
                p.copy_(work.view(p.shape))
