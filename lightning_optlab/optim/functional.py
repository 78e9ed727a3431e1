"""Update rules as plain functions over tensors, built from a few shared steps.

Most optimizers are short chains of the same steps -- decoupled weight decay, momentum,
centralization, row/column/RMS/std normalization, orthogonalization, shape scaling, clipping --
so each step is written once here and each rule is a few lines composing them::

    muon          = momentum (nesterov) -> orthogonalize (batched NS) -> scale by shape
    sinkgd        = (row l2, column l2)^L, rows/columns scaled to unit-RMS entries
    sinkhorn_tanh = (row l2, column l2, tanh(./tau))^n_iter -> restore the gradient's RMS
    adamw_spam    = spike-aware clipping -> AdamW (torch's functional core) -> reset + warm-up
    sparkles      = centralize -> std-normalize -> amplify by momentum -> adaptive step
                    -> (ADOPT clip) -> (random kick) -> stochastic rounding to bf16

Conventions shared by every function here:

* **Precision.** Math runs in at least fp32 (:func:`upcast`): bf16/fp16 tensors are upcast,
  transformed and cast back once (:func:`store_`); fp32/fp64 tensors are worked on in place.
  State tensors keep the parameter's dtype, like torch's own optimizers (so ``state_dict`` /
  ``load_state_dict``, which casts state to the parameter dtype, round-trips exactly).
  The one deliberate exception is Muon's Newton-Schulz iteration, which runs in bf16 on CUDA.
* **Non-finite gradients** are refused in one place, ``ModularOptimizer.step`` (the standalone
  classes are ModularOptimizers with one rule): one fused check of all gradients (:func:`nonfinite_flag`)
  before any rule runs; a NaN/Inf gradient raises ``FloatingPointError`` naming the parameters
  (:func:`require_finite_grads`), before any weight or state is touched. (Under fp16 AMP,
  ``GradScaler`` skips steps with infinite gradients before the optimizer sees them.) The guard
  can be turned off explicitly (``ModularOptimizer(check_finite=False)``) to save its host sync.
* **Scale-invariant normalizations** first multiply the matrix by an exact power of two
  (:func:`pow2_prescale_stack_`) so sums of squares cannot overflow: gradients up to fp32's
  largest value give the same direction as moderate ones.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .matrix import DEFAULT_VIEW, MatrixView
from .newton_schulz import NS_COEFFICIENTS, newton_schulz, ns_dtype, pow2_scales

# ---------------------------------------------------------------------------------------------
# Precision helpers


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: Tensor) -> Tensor:
    """``t`` in :func:`compute_dtype` -- the same object when it already is (so in-place works)."""
    dtype = compute_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def store_(target: Tensor, value: Tensor) -> Tensor:
    """Write ``value`` (computed in fp32) back into ``target`` unless it already is ``target``."""
    if value is not target:
        target.copy_(value)
    return target


# ---------------------------------------------------------------------------------------------
# Non-finite gradients: the one policy, used by every rule of this package.


def _as_real(grads: Sequence[Tensor]) -> list[Tensor]:
    """Complex gradients as (..., 2) real views: the NaN/Inf kernels are defined on reals."""
    return [torch.view_as_real(g) if g.is_complex() else g for g in grads]


def finite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One bool per tensor: all entries finite (used to name the offending parameters).

    The inf-norm is NaN/Inf exactly when an entry is, and, unlike a sum of squares, never
    overflows on large finite gradients.
    """
    norms = torch._foreach_norm(_as_real(grads), float("inf"))
    device = norms[0].device
    # fp64 stays fp64 (a finite 1e300 must not overflow); .to is a no-op for fp32 on one device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.stack([n.to(device=device, dtype=dtype) for n in norms]).isfinite()


def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
    """A device tensor that is nonzero when some gradient entry is NaN/Inf: GradScaler's fused
    non-finite check (one kernel per device and dtype, multiplying by exactly 1.0). No host sync:
    ``bool()`` of it is the one sync of the step (``ModularOptimizer.step``).

    Why not a read-only max-norm (:func:`finite_flags`, which would skip the write-back): its
    per-tensor results must be stacked on the host, which measured several times slower
    (``docs/benchmarks.md``, bench_ops).
    """
    by_key: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in _as_real(grads):
        by_key[(g.device, g.dtype)].append(g)
    flags = []
    for (device, dtype), tensors in by_key.items():
        if device.type == "cuda" and dtype == torch.bfloat16:
            # GradScaler's CUDA kernel has no bf16 version: the max-norm way for these
            found = finite_flags(tensors).all().logical_not().float().reshape(1)
        else:
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        flags.append(found if found.device == grads[0].device else found.to(grads[0].device))
    return flags[0] if len(flags) == 1 else torch.stack(flags).any()


def fused_by_default(group: Mapping[str, Any], params: list[torch.Tensor]) -> bool:
    """torch's fused kernels are the fastest on CUDA; use them unless the group says otherwise."""
    if group.get("fused") is not None:
        return bool(group["fused"])
    if group.get("foreach") or group.get("differentiable"):
        return False
    return all(p.is_cuda and p.is_floating_point() for p in params)


def require_finite_grads(
    group: Mapping, params: Sequence[Tensor], grads: Sequence[Tensor], rule: str
) -> None:
    """Raise ``FloatingPointError`` naming the parameters whose gradient has a NaN or Inf.

    ``ModularOptimizer.step`` (and so every standalone class) checks all groups' gradients in one
    reduction and one host sync before any rule runs, so a refused step changes no weight and no
    state of any group; this function is what builds the error once a bad gradient is found.
    """
    if not grads:
        return
    flags = finite_flags(grads)
    if bool(flags.all()):
        return
    bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
    all_params = list(group.get("params", []))
    names = group.get("param_names")
    label = group.get("name")
    described = []
    for i in bad[:10]:
        p = params[i]
        index = next((k for k, q in enumerate(all_params) if q is p), None)
        if names is not None and index is not None:
            who = f"{names[index]!r}"
        else:
            who = f"parameter #{index if index is not None else i}"
        kinds = []
        if torch.isnan(grads[i]).any():
            kinds.append("NaN")
        if torch.isinf(grads[i]).any():
            kinds.append("Inf")
        described.append(f"{who} (shape {list(p.shape)}, {'/'.join(kinds)})")
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    where = f" in param group {label!r}" if label else ""
    raise FloatingPointError(
        f"optimizer {rule!r}: non-finite gradient{where} for {', '.join(described)}{more}. "
        "The step was refused and no weight was changed. Usual causes: a learning rate that "
        "diverged the loss, fp16 without a GradScaler, a log/div of zero in the loss. Lower the "
        "lr, clip gradients (Trainer(gradient_clip_val=...)), or use bf16."
    )


# ---------------------------------------------------------------------------------------------
# Shared steps


def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries (0-D tensor)."""
    return x.square().mean().sqrt()


def spike_clip_foreach(grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], threshold: float) -> list[Tensor]:
    """SPAM's spike clip (g clipped to sign(g)*sqrt(theta*v) where g^2 > theta*v) of each pair as five foreach kernels for the whole list; new tensors
    (the gradients are not modified)."""
    bound = torch._foreach_mul(list(exp_avg_sqs), threshold)
    torch._foreach_sqrt_(bound)
    clipped = torch._foreach_maximum(list(grads), torch._foreach_neg(bound))
    torch._foreach_minimum_(clipped, bound)
    return clipped


# ---------------------------------------------------------------------------------------------
# Orthogonalization and shape scaling (Muon)

ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")


def muon_lr_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Factor on lr for a (rows, cols) update; the vocabulary of ``torch.optim.Muon``'s ``adjust_lr_fn``.

    * ``original`` (Keller Jordan; also ``None``): ``sqrt(max(1, rows / cols))``
    * ``match_rms_adamw`` (Moonshot): ``0.2 * sqrt(max(rows, cols))`` -- the update's RMS
      matches AdamW's, so AdamW learning rates and weight decay carry over
    * ``spectral_unclamped`` (Bernstein): ``sqrt(rows / cols)``
    """
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def ns_split_world(split: bool | str | None) -> tuple[int, int] | None:
    """(rank, world) when Newton-Schulz work should be split across ranks, else None.

    ``"auto"`` splits whenever a process group with more than one rank is initialized: under
    DDP every rank holds the same averaged gradients and momenta, so each rank can
    orthogonalize a share of the matrices and all-gather the results (identical bits on every
    rank). Pass ``False`` where ranks hold different gradients on purpose (local SGD).
    """
    if split is False or split is None or split == "off":
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if split is True:
            raise RuntimeError("ns_split=True needs an initialized torch.distributed process group")
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def _newton_schulz_split(stack: Tensor, world: tuple[int, int], **ns_kwargs) -> Tensor:
    """Each rank orthogonalizes its slice of ``stack`` (padded to a multiple of the world size);
    an all-gather assembles the whole, so every rank ends with the same result."""
    import torch.distributed as dist

    rank, size = world
    count = stack.shape[0]
    per_rank = -(-count // size)
    if per_rank * size > count:
        stack = torch.cat([stack, stack.new_zeros((per_rank * size - count, *stack.shape[1:]))])
    mine = newton_schulz(stack[rank * per_rank : (rank + 1) * per_rank], **ns_kwargs).contiguous()
    gathered = mine.new_empty((per_rank * size, *mine.shape[1:]))
    dist.all_gather_into_tensor(gathered, mine)
    return gathered[:count]


def orthogonalize(
    matrices: Sequence[Tensor],
    steps: int = 5,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    split: bool | str | None = None,
) -> list[Tensor]:
    """Newton-Schulz polar factor of each matrix; same-shaped matrices in ONE stacked call.

    Each entry is a matrix (m, n) or a batch of them (b, m, n), e.g. a packed projection split
    into its blocks (:meth:`~.matrix.MatrixView.to_matrix`). Matrices are bucketed by
    (device, shape), each bucket stacked into a ``(B, m, n)`` tensor and orthogonalized together
    (a few large batched matmuls instead of B small ones); each result has its entry's shape.
    ``dtype`` defaults to :func:`ns_dtype` of the device (bf16 on CUDA, fp32 on CPU);
    ``out_dtype`` casts each bucket's result once (default: leave it in ``dtype``); ``split``
    shares the buckets' matrices out across ranks (see :func:`ns_split_world`).
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        if m.ndim not in (2, 3):
            raise ValueError(f"orthogonalize expects matrices or batches of them, got shape {tuple(m.shape)}")
        buckets[(m.device, tuple(m.shape[-2:]))].append(i)
    out: list[Tensor | None] = [None] * len(matrices)
    world = ns_split_world(split)
    for (device, shape), idx in buckets.items():
        parts = [matrices[i].reshape(-1, *shape) for i in idx]
        stack = parts[0] if len(parts) == 1 else torch.cat(parts)  # newton_schulz leaves it as is
        kwargs = dict(steps=steps, coefficients=tuple(float(c) for c in coefficients), eps=eps,
                      dtype=dtype or ns_dtype(device))
        ortho = _newton_schulz_split(stack, world, **kwargs) if world else newton_schulz(stack, **kwargs)
        if out_dtype is not None:
            ortho = ortho.to(out_dtype)
        start = 0
        for i, part in zip(idx, parts):
            count = part.shape[0]
            out[i] = ortho[start : start + count].reshape(matrices[i].shape)
            start += count
    return out  # type: ignore[return-value]


def resolve_ns_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None -> :func:`ns_dtype` of the device; ``"bfloat16"``/``"float32"``/... or a torch dtype."""
    if name is None or name == "auto":
        return ns_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"ns_dtype must be 'auto' or a floating dtype name like 'bfloat16', got {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Rule updates (directions; the group steps in muon.py, sinkgd.py, spam.py, sparkles.py apply them)


def muon_lookahead_(G: Tensor, buf: Tensor, momentum: float, nesterov: bool, out: Tensor) -> Tensor:
    """Muon's momentum on one stack of matrices: ``buf <- lerp(buf, G, 1 - momentum)`` in place,
    then ``out <- lerp(G, buf, momentum)`` (nesterov) or ``buf``, stored in ``out``'s dtype (the
    Newton-Schulz input, rounded once). The eager step and the CUDA graph both run this."""
    buf.lerp_(G, 1 - momentum)
    if nesterov:
        return torch.lerp(G, buf, momentum, out=out)
    return out.copy_(buf)


def matrix_buckets(shapes: Sequence[Sequence[int]], views: Sequence[MatrixView]) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Parameters grouped by the shape of their matrices: ``[((m, n), [(index, first slot)])]``,
    a split projection taking ``blocks`` consecutive slots of its bucket's stack."""
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (shape, view) in enumerate(zip(shapes, views)):
        slots = buckets.setdefault(view.shape(shape), [])
        slots.append((i, sum(views[k].blocks for k, _ in slots)))
    return list(buckets.items())


# Stacks: same-shaped tensors of a group in one (B, ...) tensor, so a rule runs a handful of
# batched kernels per shape instead of a handful per parameter (on a GPU the per-parameter
# form is bound by kernel launches, not by arithmetic).

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


def _rms_stack(x: Tensor, eps: float) -> Tensor:
    """max(rms(x[b]), eps) per item, shaped (B, 1, ...)."""
    dims = tuple(range(1, x.ndim))
    count = math.prod(x.shape[1:])
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True).div_(math.sqrt(count)).clamp_min_(eps)


def _normalize_dim_(G: Tensor, dim: int, target_norm: float, eps: float, extra: float = 1.0) -> Tensor:
    """G <- G * target_norm / max(||G||_dim, eps) / extra, in place (one reduction, two small
    ops, one pass over G). ``extra`` folds a following division (tanh's tau) into the pass."""
    norm = torch.linalg.vector_norm(G, dim=dim, keepdim=True).clamp_min_(eps)
    factor = extra / target_norm
    if factor != 1.0:
        norm.mul_(factor)
    return G.div_(norm)


@contextlib.contextmanager
def full_fp32_matmul():
    """Float32 matmuls at full precision inside the block (no TF32 / bf16 shortcuts a user may
    have enabled with ``torch.set_float32_matmul_precision``), restored after. Used where a
    matmul measures something: the Sinkhorn matrix-vector products below compute norms, and the
    Stiefel retraction's Gram matrices distances, which TF32's 10-bit mantissa would get wrong
    in the fourth digit."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _norm_floor_sq(eps: float, dtype: torch.dtype) -> float:
    """eps**2, the floor of the squared row/column norms, kept above ``tiny**0.75`` of the dtype
    (fp32: eps >= ~5e-15) so that the scale vectors (<= n / eps**2) stay finite."""
    return max(eps * eps, torch.finfo(dtype).tiny ** 0.75)


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
    row_floor = [_norm_floor_sq(eps, S.dtype) / S.shape[2] for S in squares]
    col_floor = [_norm_floor_sq(eps, S.dtype) / S.shape[1] for S in squares]
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


def _pow2_prescale_stacks_(stacks: Sequence[Tensor]) -> list[Tensor]:
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
    _pow2_prescale_stacks_(stacks)
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
        return G.div_(_rms_stack(G, eps))
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
        _normalize_dim_(G, -2, 1.0, eps, extra=tau)
        G.tanh_()
        for _ in range(n_iter - 1):
            _normalize_dim_(G, -1, 1.0, eps)
            _normalize_dim_(G, -2, 1.0, eps, extra=tau)
            G.tanh_()
    else:
        reference = _rms_stack(G, 0.0)
        for _ in range(n_iter):
            norm = torch.linalg.vector_norm(G, 1, dim=-1, keepdim=True).clamp_min_(eps).mul_(tau)
            G.div_(norm)
            G.tanh_()
    # restore the RMS and undo the power-of-two prescale (one small kernel each, on (B, 1, ...))
    return reference.div_(_rms_stack(G, eps)).div_(scale)


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


# Group steps of the stateless rules over stacks in :func:`stack_by_shape`'s layout. The eager
# step (fresh stacks) and the CUDA-graph step (static stacks the gradients are copied into,
# see .stateless_graph) run exactly these functions; ``lr`` is a float or a 0-d tensor on the
# device (the graph's, so a scheduler's new lr needs no recapture). The stacks are consumed.


def decay_factor(lr: float | Tensor, weight_decay: float) -> float | Tensor | None:
    """Decoupled weight decay's factor ``1 - lr * wd`` (None when ``wd`` is 0); ``lr`` may be a
    device scalar (a CUDA graph's, so a scheduler's new lr needs no recapture)."""
    if weight_decay == 0:
        return None
    return 1 - lr * weight_decay


def decoupled_weight_decay_(weights: Sequence[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """``p <- p * (1 - lr * wd)`` for every weight, one foreach kernel (AdamW's decay, applied
    before the update as torch.optim.AdamW and torch.optim.Muon do)."""
    factor = decay_factor(lr, weight_decay)
    if factor is not None and weights:
        torch._foreach_mul_(list(weights), factor)


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


def spam_warmup_factor(steps_since_reset: int, warmup_steps: int, resets: int) -> float:
    """SPAM's LR factor after a momentum reset: cosine from ~0 up to 1 over ``warmup_steps``.

    ``0.5 * (1 - cos(pi * k / (warmup_steps + 1)))`` on the k-th step after a reset
    (k = 1..warmup_steps), 1 afterwards and before the first reset (training starts at full
    rate; the user's own schedule handles the start).
    """
    if resets == 0 or warmup_steps <= 0 or steps_since_reset > warmup_steps:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * steps_since_reset / (warmup_steps + 1)))


# ---------------------------------------------------------------------------------------------
# Seeded randomness (SPARKLES): reproducible from (seed, parameter slot, step) alone

_MASK64 = (1 << 64) - 1
_GENERATORS: dict[torch.device, torch.Generator] = {}


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 finalizer over each value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A (cached, re-seeded) generator on ``device``; the same seed gives the same stream."""
    device = torch.device(device)
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stochastic_round_to_bf16_(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A contiguous fp32 ``x`` (consumed) rounded to bf16 up or down at random, with P(up) = the
    remainder's fraction: unbiased (E[result] = x), so many updates smaller than half a bf16 ulp
    still move a bf16 weight on average, where round-to-nearest would drop every one of them.

    On the bits, in place: add 16 random low bits to the fp32 pattern and truncate them. That
    cannot change an infinity or a quiet NaN (their low 16 bits are zero, nothing carries); only a
    NaN whose payload sits in the low 16 bits alone could turn into an infinity, so NaNs are put
    back explicitly.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    nan = x.isnan()
    x.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return x.masked_fill_(nan, float("nan")).to(torch.bfloat16)


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """:func:`stochastic_round_to_bf16_` of a float32 copy of ``x`` (``x`` is left alone)."""
    return stochastic_round_to_bf16_(x.to(torch.float32, memory_format=torch.contiguous_format, copy=True), generator)


# ---------------------------------------------------------------------------------------------
# Memory


def optimizer_state_bytes_by_group(optimizer: torch.optim.Optimizer) -> list[int]:
    """Bytes held by each param group's per-parameter state tensors, aligned with
    ``optimizer.param_groups`` (each storage counted once, in the first group holding it)."""
    seen: set[tuple] = set()

    def visit(value) -> int:
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr())
            if key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(value, Mapping):
            return sum(visit(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(visit(v) for v in value)
        return 0

    return [sum(visit(optimizer.state.get(p, {})) for p in group["params"]) for group in optimizer.param_groups]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (each storage counted once)."""
    return sum(optimizer_state_bytes_by_group(optimizer))
