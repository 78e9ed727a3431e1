"""Manifold retractions and distances as plain functions over tensors (no lightning import).

* :func:`sphere_retract` / :func:`sphere_distance`: every row to norm ``radius``.
* :func:`stiefel_retract` (Newton-Schulz, batched) / :func:`stiefel_retract_exact` (SVD) /
  :func:`stiefel_distance`: orthonormal columns (tall) or rows (wide).
* :class:`StiefelRetractor` / :func:`stiefel_retract_`: the same retraction in place, for
  parameters retracted every step (buffers and, on CUDA, a graph built once).

* :func:`find_targets` / :func:`plan_retractions` / :class:`RetractionPlan`: which parameters
  carry which constraint, bucketed, and their retraction (what
  ``lightning_optlab.callbacks.ManifoldRetraction`` runs after every optimizer step).
"""

from .sphere import compute_dtype, sphere_distance, sphere_retract
from .stiefel import (
    BucketResult,
    PolarNS,
    StiefelRetractor,
    as_matrix,
    choose_steps,
    clear_stiefel_cache,
    full_fp32_matmul,
    group_by_shape,
    polar_newton_schulz,
    polar_newton_schulz_buckets,
    predicted_distances,
    release_retractors,
    retractor_for,
    stiefel_distance,
    stiefel_retract,
    stiefel_retract_,
    stiefel_retract_exact,
)

from .plan import (  # noqa: E402  (after stiefel: the plan builds on it)
    CONSTRAINTS,
    RetractionPlan,
    find_targets,
    plan_retractions,
)

__all__ = [
    "BucketResult",
    "CONSTRAINTS",
    "RetractionPlan",
    "find_targets",
    "plan_retractions",
    "PolarNS",
    "StiefelRetractor",
    "as_matrix",
    "choose_steps",
    "clear_stiefel_cache",
    "compute_dtype",
    "full_fp32_matmul",
    "group_by_shape",
    "polar_newton_schulz",
    "polar_newton_schulz_buckets",
    "predicted_distances",
    "release_retractors",
    "retractor_for",
    "sphere_distance",
    "sphere_retract",
    "stiefel_distance",
    "stiefel_retract",
    "stiefel_retract_",
    "stiefel_retract_exact",
]
