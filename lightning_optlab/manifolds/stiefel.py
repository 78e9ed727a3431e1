"""Stiefel constraint: matrices with orthonormal columns (tall) or orthonormal rows (wide).

For ``W`` of shape (m, n) the manifold is ``W^T W = I_n`` when m >= n and ``W W^T = I_m`` when
m < n, i.e. all min(m, n) singular values equal 1. The nearest such matrix in Frobenius norm is
the polar factor ``U V^T`` of ``W = U S V^T``; :func:`stiefel_retract` approximates it by a
Newton-Schulz iteration (matmuls only, batched over same-shaped matrices) and
:func:`stiefel_retract_exact` computes it by SVD as the reference.

The iteration is the classical cubic Newton-Schulz iteration for the polar factor,
``X <- 1.5 X - 0.5 (X X^T) X``, which acts on each singular value as ``s <- 1.5 s - 0.5 s^3``:

* its fixed point is exactly 1 with derivative 0 there, so near the manifold it converges
  quadratically (error e -> 1.5 e^2): a weight one optimizer step away (s = 1 +- 0.05) is on the
  manifold to float32 precision after 3 iterations. Muon's quintic (3.4445, -4.7750, 2.0315) is
  tuned to inflate small singular values fast and has no fixed point at 1 (it oscillates in about
  [0.7, 1.2]); used as a retraction it would move weights *off* the manifold by ~0.3 every step.
* it converges for every singular value in (0, sqrt(3)), and the map is odd, so a zero singular
  value stays zero (see "rank-deficient inputs" below).
* for the same cost per unit of convergence the quintic of the same family
  ((15 s - 10 s^3 + 3 s^5) / 8: cubic convergence, 3 matmuls) is no faster (2 vs 3 matmuls per
  iteration, order 2 vs 3) and has a smaller basin (0, 1.53); the cubic is the simpler choice.

Pre-scaling. The iteration needs every singular value below sqrt(3). Scaling by the Frobenius
norm (as Muon does for gradients) is wrong for weights: a weight that is one optimizer step off the
manifold has all singular values near 1, and dividing by ||W||_F ~ sqrt(n) would push them to
~1/sqrt(n), costing ~log_1.5(sqrt(n)) extra iterations. Instead the first Gram matrix
``A = X X^T`` (computed anyway) gives a cheap upper bound of the largest singular value,
``s_max^2 <= min(max row sum of |A|, ||A||_F)`` (Gershgorin / Frobenius bounds on lambda_max(A));
a matrix is rescaled by 1/bound only when the bound exceeds 1.5, so near-manifold weights are
iterated unscaled and arbitrary matrices (e.g. at fit start) start with all singular values in
(0, 1].

Ill-conditioned inputs. After pre-scaling, a singular value s < 1 grows by about 1.5x per
iteration until it is near 1, then converges quadratically. With a fixed number of ``steps`` a
relative singular value below about 1.5**-(steps - 3) is therefore *not* brought to 1: the
result is then not on the manifold, and :func:`stiefel_distance` says how far it is. Pass
``tol`` (stop once the distance is below it, at most ``steps`` iterations) with a larger
``steps``, or use :func:`stiefel_retract_exact`.

Rank-deficient inputs. Every iterate is ``W p(W^T W)`` for a polynomial p, so it stays in the
row and column spaces of W: in exact arithmetic zero singular values stay exactly zero and no
direction of the null space is created; the result is the partial isometry ``U_r V_r^T`` of the
nonzero part (for enough steps), at Stiefel distance ``sqrt(#zero singular values / k)``.
In floating point the null space receives rounding noise (~1e-7 relative in float32) that the
iteration amplifies by 1.5x per step. Measured in float32 (64 x 128, rank 8): the largest "zero"
singular value is 3e-7 after 5 iterations, 2e-6 after 10, 1e-4 after 20, 7e-3 after 30, 0.4 after
40, and 1.0 after 50, i.e. beyond ~35 iterations arbitrary directions *are* created. A zero matrix is returned as zero. The SVD
reference instead completes U and V with an arbitrary orthonormal basis of the null space, so it
is on the manifold but not unique.

Conventions. A tensor argument of shape (..., m, n) is a matrix or a stack of matrices (leading
dims batched, as in ``torch.linalg``). A list/tuple argument holds *parameters*: each is flattened
to 2-D as (out, in * k * ...) (conv kernels), the ones of equal flattened shape are retracted in
one batched call, and each result has its parameter's shape and dtype. 1-D tensors are refused.
All computation is float32 (float64 input stays float64) with full-precision matmuls (TF32 off
for the call: its 10-bit mantissa would leave a ~1e-3 floor under the distance), and the result is
cast back to the input dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import torch

from .sphere import compute_dtype

SCALE_LIMIT = 1.5  # iterate unscaled when the spectral bound is below this (basin: s < sqrt(3))


def as_matrix(W: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """A parameter as the matrix the Stiefel constraint applies to: (out, in * k * ...).

    Raises for 0-/1-D tensors, which cannot have orthonormal columns.
    """
    if W.ndim < 2:
        who = f"parameter {name!r}" if name else "a tensor"
        raise ValueError(
            f"stiefel constraint: {who} of shape {list(W.shape)} is not a matrix; a vector cannot "
            "be on a Stiefel manifold. Use the sphere constraint for vectors, or leave it "
            "unconstrained (e.g. match ndim: '>=2' in the policy rule)."
        )
    return W.reshape(W.shape[0], -1)


@contextlib.contextmanager
def full_fp32_matmul():
    """Run float32 matmuls at full precision (no TF32) inside the block, then restore."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _gram_distance(A: torch.Tensor) -> torch.Tensor:
    """||A - I||_F / sqrt(k) for a batch of k x k Gram matrices."""
    k = A.size(-1)
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    return (A - eye).norm(dim=(-2, -1)) / math.sqrt(k)


class PolarNS(NamedTuple):
    """Result of :func:`polar_newton_schulz`."""

    polar: torch.Tensor  # the approximate polar factor, shape and dtype of the input
    distance_before: torch.Tensor  # stiefel distance of the input, one per matrix
    steps: int  # iterations actually run (< the maximum when tol stopped it early)


def polar_newton_schulz(
    X: torch.Tensor, steps: int = 5, tol: float | None = None
) -> PolarNS:
    """Cubic Newton-Schulz iteration for the polar factor of ``X`` (..., m, n), batched.

    ``X`` must already be floating point (the iteration runs in its dtype). Runs ``steps``
    iterations, or, with ``tol``, stops as soon as every matrix's Stiefel distance is ``<= tol``
    (one host sync per iteration to read it; the distance comes free from the Gram matrix the
    iteration computes anyway). See the module docstring for the pre-scaling and the behaviour on
    ill-conditioned and rank-deficient inputs.
    """
    if X.ndim < 2:
        raise ValueError(f"polar_newton_schulz needs (..., m, n), got shape {list(X.shape)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"stiefel retraction: steps must be an int >= 0, got {steps!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"stiefel retraction: tol must be > 0 or None, got {tol!r}")
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide form so the Gram matrix is the small side
        X = X.mT
    with full_fp32_matmul():
        A = X @ X.mT
        distance_before = _gram_distance(A)
        bound_sq = torch.minimum(A.abs().sum(-1).amax(-1), A.norm(dim=(-2, -1)))
        scale_sq = torch.where(bound_sq > SCALE_LIMIT**2, 1.0 / bound_sq, torch.ones_like(bound_sq))
        X = X * scale_sq.sqrt()[:, None, None]
        A = A * scale_sq[:, None, None]
        taken = 0
        for i in range(steps):
            if i > 0:
                A = X @ X.mT
            if tol is not None and bool((_gram_distance(A) <= tol).all()):
                break
            X = torch.baddbmm(X, A, X, beta=1.5, alpha=-0.5)
            taken += 1
    if tall:
        X = X.mT
    return PolarNS(X.reshape(shape), distance_before.reshape(shape[:-2]), taken)


def _check_tensor(W) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a tensor or a list of tensors, got {type(W).__name__}")
    if W.ndim < 2:
        as_matrix(W)  # raises with the explanation


def _per_parameter(
    Ws: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor], reshape_back: bool
) -> list[torch.Tensor]:
    """Apply a batched (B, m, n) -> (B, ...) function to parameters grouped by flattened shape."""
    mats = [as_matrix(W, name=f"#{i} of the list") for i, W in enumerate(Ws)]
    groups: dict[tuple, list[int]] = {}
    for i, M in enumerate(mats):
        key = (tuple(M.shape), M.device, compute_dtype(M.dtype))
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (_, _, dtype), idx in groups.items():
        result = fn(torch.stack([mats[i].to(dtype) for i in idx]))
        for j, i in enumerate(idx):
            r = result[j]
            out[i] = r.reshape(Ws[i].shape).to(Ws[i].dtype) if reshape_back else r
    return out  # type: ignore[return-value]


def stiefel_retract(
    W: torch.Tensor | Sequence[torch.Tensor], steps: int = 5, tol: float | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """Nearest matrix with orthonormal columns (tall) or rows (wide), by Newton-Schulz.

    ``W``: a matrix or a stack (..., m, n), or a list of parameters (conv kernels flattened to
    (out, in*k*k); equal shapes batched together). ``steps``: iterations (the maximum when
    ``tol`` is given); ``tol``: stop once every Stiefel distance is ``<= tol``. Returns new
    tensor(s) of the input shape(s) and dtype(s). Agrees with :func:`stiefel_retract_exact` on
    well-conditioned inputs; see the module docstring for ill-conditioned and rank-deficient ones.
    """
    def run(X: torch.Tensor) -> torch.Tensor:
        return polar_newton_schulz(X, steps=steps, tol=tol).polar

    if isinstance(W, (list, tuple)):
        return _per_parameter(W, run, reshape_back=True)
    _check_tensor(W)
    return run(W.to(compute_dtype(W.dtype))).to(W.dtype)


def stiefel_retract_exact(
    W: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor | list[torch.Tensor]:
    """The polar factor ``U V^T`` by SVD (reference). Same conventions as :func:`stiefel_retract`.

    For rank-deficient inputs U V^T uses whatever null-space basis the SVD returns (not unique).
    """
    def run(X: torch.Tensor) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        with full_fp32_matmul():
            return U @ Vh

    if isinstance(W, (list, tuple)):
        return _per_parameter(W, run, reshape_back=True)
    _check_tensor(W)
    return run(W.to(compute_dtype(W.dtype))).to(W.dtype)


def stiefel_distance(
    W: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor | list[torch.Tensor]:
    """``||W^T W - I_n||_F / sqrt(n)`` for tall W, ``||W W^T - I_m||_F / sqrt(m)`` for wide W.

    0 exactly on the manifold; the RMS deviation of the squared singular values from 1
    (sqrt(mean((s_i^2 - 1)^2))). A tensor (..., m, n) gives a tensor (...); a list of parameters
    gives a list of 0-D tensors. Computed in float32 (float64 kept) with full-precision matmuls.
    """
    def run(X: torch.Tensor) -> torch.Tensor:
        small = X.mT @ X if X.size(-2) > X.size(-1) else X @ X.mT
        return _gram_distance(small)

    with full_fp32_matmul():
        if isinstance(W, (list, tuple)):
            return _per_parameter(W, run, reshape_back=False)
        _check_tensor(W)
        X = W.to(compute_dtype(W.dtype))
        return run(X.reshape(-1, *X.shape[-2:])).reshape(X.shape[:-2])
