"""Orthogonalization of gradient matrices: Muon's quintic Newton-Schulz iteration, batched.

``newton_schulz(G)`` maps a matrix (or a stack of same-shaped matrices, leading dims batched) to
an approximation of its polar factor U V^T. Muon's coefficients (3.4445, -4.7750, 2.0315) are
tuned for speed, not for a fixed point at 1: singular values end up in roughly [0.7, 1.2],
which is what Muon wants and not what a Stiefel retraction wants (see ``manifolds``).
``polar_exact`` is the SVD reference.
"""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (tensor cores), fp32 elsewhere: bf16 matmuls on CPU are emulated and ~50x slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor of ``G`` (shape ``(..., m, n)``) by the quintic iteration.

    The input is scaled by its Frobenius norm (an upper bound of the spectral norm, so every
    singular value starts in (0, 1]; an exact power-of-two prescale first keeps that norm finite
    for any finite input); tall matrices are transposed so the Gram products are
    the small side. Returns a tensor of ``dtype`` (default: :func:`ns_dtype` of the device).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = coefficients
    X = G.to(dtype or ns_dtype(G.device))
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # Scale by an exact power of two first (max entry in [0.5, 1)): the normalized result is
    # unchanged, but the Frobenius norm of a huge gradient can no longer overflow to inf.
    amax = X.abs().amax(dim=(-2, -1), keepdim=True).float()
    X = X * torch.ldexp(torch.ones_like(amax), -torch.frexp(amax).exponent).to(X.dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else b * A + c * (A @ A)
        X = torch.baddbmm(X, B, X, beta=a) if X.ndim == 3 else a * X + B @ X
    return X.mT if transposed else X


def polar_exact(G: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U V^T by SVD (float64-capable reference)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh
