"""Hypersphere constraint: every row (embedding vector, or fan-in vector of an output unit) has
norm ``radius``.

The retraction is the metric projection onto the product of spheres, ``w <- radius * w / ||w||``.
It is computed in float32 (float64 stays float64) and cast back, so bf16/fp16 weights are
normalised from an exact-enough norm and only rounded once.
"""

from __future__ import annotations

import torch

SPHERE_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision weights, float64 kept: the precision the retractions run in."""
    if not dtype.is_floating_point:
        raise TypeError(f"manifold retractions need a floating-point tensor, got dtype {dtype}")
    return torch.promote_types(dtype, torch.float32)


def _check(W: torch.Tensor, radius: float) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(W).__name__}")
    if W.ndim == 0:
        raise ValueError(
            "sphere constraint: a scalar (0-D tensor) has no vector to normalise; apply the "
            "sphere constraint to vectors, matrices or kernels"
        )
    if not radius > 0:
        raise ValueError(f"sphere constraint: radius must be > 0, got {radius!r}")


def sphere_retract(
    W: torch.Tensor,
    radius: float = 1.0,
    dim: int | tuple[int, ...] = -1,
    eps: float = SPHERE_EPS,
) -> torch.Tensor:
    """``W`` with every slice along ``dim`` rescaled to norm ``radius``.

    ``dim=-1`` (default) normalises each row: for ``nn.Embedding`` (vocab, d) each embedding vector,
    for ``nn.Linear`` (out, in) each output unit's fan-in vector, for a 1-D tensor the vector itself.
    For a conv kernel (out, in, kh, kw) pass ``dim=(1, 2, 3)`` to normalise each filter
    (``ManifoldRetraction`` does this by default for kernels).

    A zero row stays exactly zero (it has no direction to keep): the divisor is clamped to ``eps``,
    so the result is always finite, never NaN. A row with norm below ``eps`` is scaled by
    ``radius / eps`` and so ends up shorter than ``radius``. Returns a new tensor of ``W``'s dtype.
    """
    _check(W, radius)
    X = W.to(compute_dtype(W.dtype))
    norms = torch.linalg.vector_norm(X, dim=dim, keepdim=True)
    return (X * (radius / norms.clamp_min(eps))).to(W.dtype)


def sphere_distance(
    W: torch.Tensor, radius: float = 1.0, dim: int | tuple[int, ...] = -1
) -> torch.Tensor:
    """Largest deviation of a row norm from ``radius``: ``max_i | ||w_i|| - radius |`` (0-D tensor).

    Absolute, in the units of the weights; 0 exactly on the manifold. Computed in float32/64.
    """
    _check(W, radius)
    norms = torch.linalg.vector_norm(W.to(compute_dtype(W.dtype)), dim=dim)
    return (norms - radius).abs().amax()
