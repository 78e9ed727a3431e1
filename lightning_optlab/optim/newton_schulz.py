"""Orthogonalization of gradient matrices: Muon's quintic Newton-Schulz iteration, batched.

``newton_schulz(G)`` maps a matrix (or a stack of same-shaped matrices, leading dims batched) to
an approximation of its polar factor U V^T. Muon's coefficients (3.4445, -4.7750, 2.0315) are
tuned for speed, not for a fixed point at 1: singular values end up in roughly [0.7, 1.2],
which is what Muon wants and not what a Stiefel retraction wants (see ``manifolds``).
``polar_exact`` is the SVD reference.

The two pieces are public because Muon's CUDA-graph step (:mod:`.muon_graph`) runs them on its
own static buffers: :func:`frobenius_normalize_` and :func:`quintic_iterations`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (tensor cores), fp32 elsewhere: bf16 matmuls on CPU are emulated and ~50x slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def pow2_scales(amax: torch.Tensor) -> torch.Tensor:
    """Exact powers of two ``s`` with ``amax * s`` in [0.5, 1) (1 where ``amax`` is 0): the
    prescale that keeps sums of squares from over- or underflowing without changing a
    scale-invariant result."""
    _, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), exponent.neg_())


def frobenius_normalize_(X: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``X <- X / max(||X||_F, eps)`` per matrix of a (..., m, n) stack, in place, computed as if
    ``X`` were first scaled by the power of two ``s`` that puts ``max|x|`` in [0.5, 1) (exact, so
    the result is scale-invariant: a gradient of 1e-12 or 1e12 gets the same update as one of 1,
    and ``eps`` only decides the all-zero matrix).

    Two float32-accumulated reductions (the norm and ``max|x|``) and one same-dtype multiply by
    the scale rounded to ``X``'s dtype (the normalized norm is then 1 to within 2^-9 in bf16,
    which Newton-Schulz does not notice); float32 accumulation because float64 reductions cost
    several times more on GPUs with slow fp64. Where the
    float32 sum of squares under- or overflows (entries below ~1e-19 or above ~1e19 throughout)
    the norm of ``s X`` is replaced by its upper bound ``sqrt(m n)``: every singular value still
    lands in (0, 1] and the update stays finite and close to the unscaled one (cosine >= 0.92
    over 20 random 8 x 12 gradients scaled by 1e-30 ... 1e38, fp32 and bf16, see the tests).
    """
    acc = torch.promote_types(X.dtype, torch.float32)
    dims = (-2, -1)
    norm = torch.linalg.vector_norm(X, dim=dims, keepdim=True, dtype=acc)
    amax = torch.linalg.vector_norm(X, ord=float("inf"), dim=dims, keepdim=True, dtype=acc)
    s = pow2_scales(amax).clamp_max_(2.0**126)  # a subnormal amax would need 2^127 and up
    # below ~sqrt(tiny) the sum of squares has underflowed (1e-18 for a float32 accumulator)
    accurate = norm.isfinite() & (norm >= 10 * torch.finfo(acc).tiny ** 0.5)
    scaled_norm = torch.where(accurate, norm * s, (X.size(-2) * X.size(-1)) ** 0.5)
    return X.mul_(s.div_(scaled_norm.clamp_min_(eps)).to(X.dtype))


def quintic_iterations(
    X: torch.Tensor, steps: int, coefficients: Sequence = NS_COEFFICIENTS
) -> torch.Tensor:
    """``steps`` quintic iterations ``X <- (a I + b A + c A^2) X`` on a normalized (B, m, n) or
    (m, n) ``X`` (``coefficients``: one ``(a, b, c)``, or one per step), with ``A`` the Gram matrix
    of the small side (``X^T X`` and multiplication from
    the right for tall matrices: no transposed copies). Returns a new tensor.

    ``B = b A + c A^2`` is one fused product (float32 accumulation) as in torch.optim.Muon; the
    ``a X`` term is folded into ``B``'s diagonal so the big product is a plain matmul (no
    epilogue read of ``X``), at the accuracy of the unfolded form against a float64 iteration
    in bf16 (folding ``b`` as well would double the error; ``tests/test_muon.py``).
    """
    tall = X.size(-2) > X.size(-1)
    batched = X.ndim == 3
    for a, b, c in coefficient_schedule(coefficients, steps):
        A = X.mT @ X if tall else X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if batched else torch.addmm(A, A, A, beta=b, alpha=c)
        B.diagonal(dim1=-2, dim2=-1).add_(a)
        X = X @ B if tall else B @ X
    return X


POLAR_EXPRESS = "polar_express"


def minimax_quintic(lower: float, upper: float, grid: int = 20000) -> tuple[tuple[float, float, float], float]:
    """The odd quintic ``p(x) = a x + b x^3 + c x^5`` closest to 1 in the max norm on
    ``[lower, upper]``, and that distance ``E`` (Remez exchange on a geometric grid, float64): the
    error ``1 - p`` equioscillates at four points, so ``p`` maps the interval into
    ``[1 - E, 1 + E]``."""
    ends = math.log10(lower), math.log10(upper)
    x = torch.logspace(*ends, grid, dtype=torch.float64)
    ref = torch.logspace(*ends, 4, dtype=torch.float64)
    alternating = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    signs = alternating
    for _ in range(100):
        A = torch.stack([ref, ref ** 3, ref ** 5, signs], 1)
        a, b, c, _ = torch.linalg.solve(A, torch.ones(4, dtype=torch.float64)).tolist()
        err = 1 - (a * x + b * x ** 3 + c * x ** 5)
        d = err.diff()
        turning = torch.nonzero(d[:-1] * d[1:] <= 0).flatten() + 1
        idx = torch.cat([torch.tensor([0]), turning, torch.tensor([grid - 1])])
        pts, vals = [], []
        for i in idx.tolist():  # alternating extrema, the largest of each run of one sign
            v = float(err[i])
            if vals and (v > 0) == (vals[-1] > 0):
                if abs(v) > abs(vals[-1]):
                    pts[-1], vals[-1] = float(x[i]), v
            else:
                pts.append(float(x[i]))
                vals.append(v)
        if len(pts) > 4:
            best = max(range(len(pts) - 3), key=lambda i: min(abs(v) for v in vals[i:i + 4]))
            pts, vals = pts[best:best + 4], vals[best:best + 4]
        new = torch.tensor(pts, dtype=torch.float64)
        if len(pts) != 4 or torch.allclose(new, ref, rtol=1e-13, atol=0):
            break
        ref = new
        signs = alternating if vals[0] > 0 else -alternating
    return (a, b, c), float(err.abs().max())


@lru_cache(maxsize=None)
def polar_express_schedule(steps: int, lower: float = 1e-3, safety: float = 1.01) -> tuple[tuple[float, float, float], ...]:
    """A per-step quintic schedule in the manner of Polar Express (Amsel et al. 2025): each step's
    polynomial is the minimax one (:func:`minimax_quintic`) on the interval the previous steps
    leave, starting from ``[lower, 1]`` (singular values after Frobenius normalization, those
    above ``lower``); each interval's top is widened by ``safety`` so that rounding above it
    (bf16) is still mapped down. Greedy, so each step is optimal given the last; the error after
    the final step is the smallest such a sequence of quintics allows."""
    lo, hi, out = lower, 1.0, []
    for _ in range(steps):
        (a, b, c), E = minimax_quintic(lo, hi * safety)
        out.append((a, b, c))
        lo, hi = 1 - E, 1 + E
    return tuple(out)


def coefficient_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` quintic steps: one triple for every step, one triple
    per step (a schedule), or ``"polar_express"`` (:func:`polar_express_schedule`)."""
    if isinstance(coefficients, str):
        if coefficients != POLAR_EXPRESS:
            raise ValueError(f"ns_coefficients: the named schedule is {POLAR_EXPRESS!r}, got {coefficients!r}")
        return list(polar_express_schedule(steps))
    def triple(t) -> bool:
        return (isinstance(t, (list, tuple)) and len(t) == 3
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in t))

    if triple(coefficients):
        return [tuple(float(c) for c in coefficients)] * steps
    if not (isinstance(coefficients, (list, tuple)) and len(coefficients) == steps and all(map(triple, coefficients))):
        raise ValueError(f"ns_coefficients: give (a, b, c) or one (a, b, c) per step ({steps} of them), got {coefficients!r}")
    return [tuple(float(c) for c in t) for t in coefficients]


def gram_quintic_iterations(
    X: torch.Tensor, steps: int, coefficients=NS_COEFFICIENTS, restart: int | None = 2
) -> torch.Tensor:
    """The quintic iteration of :func:`quintic_iterations`, run on the ``k x k`` Gram of the small
    side instead of on ``X`` (Gram Newton-Schulz): with ``A = X X^T`` and ``p(A) = a + b A + c A^2``
    every iterate is ``Q X`` for a polynomial ``Q`` of the first Gram, and since they commute,
    ``Q <- p(A) Q`` and ``A <- p(A) A p(A)``; the product with ``X`` happens once at the end.
    Why: for a ``k x n`` matrix a plain step costs ``2 k^2 n + k^3`` multiply-adds and a Gram
    step at most ``4 k^3`` (``A^2``, ``p(A) Q`` and the two products of the symmetric update);
    five steps with a restart after two cost ``4 k^2 n + 16 k^3`` against ``10 k^2 n + 5 k^3``:
    less from ``n`` about ``2 k`` on (29% less at ``n = 4 k``, the MLP matrices of a GPT).
    ``restart``: after this many steps the iterate ``Q X`` is formed and its Gram taken anew (the
    Gram's rounding grows with its condition; a restart resets it, as Dao et al.'s version does;
    None: never). In exact arithmetic the result equals :func:`quintic_iterations`'s.
    """
    schedule = coefficient_schedule(coefficients, steps)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    A = X @ X.mT
    Q = None
    for t, (a, b, c) in enumerate(schedule):
        if restart and t and t % restart == 0 and Q is not None:
            X = Q @ X
            A, Q = X @ X.mT, None
        P = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else P @ Q
        if t + 1 < steps and not (restart and (t + 1) % restart == 0):
            A = P @ (A @ P)
    X = X if Q is None else Q @ X
    return X.mT if tall else X


NS_METHODS = ("plain", "gram", "auto")


def use_gram(method: str, shape) -> bool:
    """Whether ``method`` runs the Gram form on matrices of ``shape`` (``(..., m, n)``): ``"gram"``
    always, ``"plain"`` never, ``"auto"`` where the long side is at least twice the short one
    (where it does less work, see :func:`gram_quintic_iterations`)."""
    if method not in NS_METHODS:
        raise ValueError(f"ns_method must be one of {', '.join(NS_METHODS)}, got {method!r}")
    m, n = shape[-2], shape[-1]
    return method == "gram" or (method == "auto" and max(m, n) >= 2 * min(m, n))


def newton_schulz_(
    X: torch.Tensor, steps: int, coefficients: Sequence = NS_COEFFICIENTS, eps: float = 1e-7,
    method: str = "plain",
) -> torch.Tensor:
    """The quintic iteration on a (B, m, n) or (m, n) ``X`` already in the Newton-Schulz dtype,
    which it consumes: :func:`frobenius_normalize_` in place, then :func:`quintic_iterations` (or
    :func:`gram_quintic_iterations`, per :func:`use_gram`). :func:`newton_schulz` is this on a
    copy; Muon's steps call it on their look-ahead stacks."""
    iterate = gram_quintic_iterations if use_gram(method, X.shape) else quintic_iterations
    return iterate(frobenius_normalize_(X, eps), steps, coefficients)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Sequence = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    method: str = "plain",
) -> torch.Tensor:
    """Approximate polar factor of ``G`` (shape ``(..., m, n)``) by the quintic iteration
    (``method``: ``"plain"``, ``"gram"`` or ``"auto"``, see :func:`use_gram`).

    The input is scaled by its Frobenius norm (an upper bound of the spectral norm, so every
    singular value starts in (0, 1]; see :func:`frobenius_normalize_`), then
    :func:`quintic_iterations` run in ``dtype`` (default: :func:`ns_dtype` of the device).
    Returns a tensor of that dtype and ``G``'s shape; ``G`` is not modified.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    shape = G.shape
    X = G.reshape(-1, *shape[-2:]) if G.ndim > 3 else G
    work = torch.empty(X.shape, dtype=dtype or ns_dtype(G.device), device=G.device)
    return newton_schulz_(work.copy_(X), steps, coefficients, eps, method).reshape(shape)


def polar_exact(G: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U V^T by SVD (float64-capable reference)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


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


def newton_schulz_split(stack: Tensor, world: tuple[int, int], **ns_kwargs) -> Tensor:
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
    # torch 2.14 renames it all_gather_single; earlier releases have only the old name
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, mine)
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
        ortho = newton_schulz_split(stack, world, **kwargs) if world else newton_schulz(stack, **kwargs)
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
