"""Spectral metrics of weight and gradient matrices (plain torch; no lightning import)."""

from .metrics import (
    as_matrix,
    condition_number,
    condition_number_of_spectrum,
    effective_rank,
    effective_rank_of_spectrum,
    gram_of_small_side,
    singular_values,
    singular_values_from_gram,
    singular_values_gram,
    singular_values_grouped,
    singular_values_stacked,
    spectrum_metrics,
    stable_rank,
    stable_rank_of_spectrum,
    topk_concentration,
    topk_concentration_of_spectrum,
)
from .lanczos import estimate_singular_values, sketch_matrices, spectrum_from_sketch
from .ns import DEFAULT_NS_STEPS, ns_benefit, ns_figures, ns_transformation

__all__ = [
    "DEFAULT_NS_STEPS",
    "as_matrix",
    "condition_number",
    "condition_number_of_spectrum",
    "effective_rank",
    "effective_rank_of_spectrum",
    "estimate_singular_values",
    "gram_of_small_side",
    "ns_benefit",
    "ns_figures",
    "ns_transformation",
    "singular_values",
    "singular_values_from_gram",
    "singular_values_gram",
    "singular_values_grouped",
    "singular_values_stacked",
    "sketch_matrices",
    "spectrum_from_sketch",
    "spectrum_metrics",
    "stable_rank",
    "stable_rank_of_spectrum",
    "topk_concentration",
    "topk_concentration_of_spectrum",
]
