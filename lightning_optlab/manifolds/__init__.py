"""Manifold retractions and distances as plain functions over tensors (no lightning import).

* :func:`sphere_retract` / :func:`sphere_distance`: every row to norm ``radius``.
* :func:`stiefel_retract` (Newton-Schulz, batched) / :func:`stiefel_retract_exact` (SVD) /
  :func:`stiefel_distance`: orthonormal columns (tall) or rows (wide).

``lightning_optlab.callbacks.ManifoldRetraction`` applies them after every optimizer step.
"""

from .sphere import compute_dtype, sphere_distance, sphere_retract
from .stiefel import (
    PolarNS,
    as_matrix,
    choose_steps,
    full_fp32_matmul,
    polar_newton_schulz,
    polar_newton_schulz_buckets,
    predicted_distances,
    stiefel_distance,
    stiefel_retract,
    stiefel_retract_exact,
)

__all__ = [
    "PolarNS",
    "as_matrix",
    "choose_steps",
    "compute_dtype",
    "full_fp32_matmul",
    "polar_newton_schulz",
    "polar_newton_schulz_buckets",
    "predicted_distances",
    "sphere_distance",
    "sphere_retract",
    "stiefel_distance",
    "stiefel_retract",
    "stiefel_retract_exact",
]
