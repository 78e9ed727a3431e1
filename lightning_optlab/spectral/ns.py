"""How much Newton-Schulz orthogonalization changes a gradient: the NS transformation figures.

For a gradient (or momentum) matrix ``G`` and ``O = newton_schulz(G, steps)`` (the package's
Muon iteration, in the dtype Muon uses on that device unless ``dtype`` is given):

* ``cosine``: ``<G, O>_F / (||G||_F ||O||_F)``, the cosine of the angle between G and NS(G);
  ``angle_deg`` is that angle in degrees.
* ``information_loss``: ``||G/||G||_F - O/||O||_F||_F``, the relative Frobenius distance after
  matching scales (both brought to unit Frobenius norm). It equals ``sqrt(2 - 2 cosine)``: it is
  the same evidence as the angle on a distance scale (0 = unchanged, sqrt(2) = orthogonal).
* ``orthogonality_error``: ``||O O^T - I||_F / sqrt(r)`` on the small side (r = min(m, n)): how
  far NS(G) is from having all singular values 1. A rank-deficient G keeps zero directions, so
  its error stays near ``sqrt(1 - rank/r)`` however many steps are run.

:func:`ns_benefit` adds the spectrum view used by the component analysis: effective rank of
G, of NS(G), and their ratio (how much more evenly orthogonalization spreads the update).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..optim.newton_schulz import NS_COEFFICIENTS, newton_schulz
from .metrics import effective_rank_of_spectrum, singular_values

DEFAULT_NS_STEPS = (1, 2, 3, 5, 10)


def _frob(X: torch.Tensor) -> torch.Tensor:
    return X.flatten(-2).norm(dim=-1)


def ns_figures(G: torch.Tensor, O: torch.Tensor, eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """Figures comparing ``G`` with its orthogonalized ``O`` (same shape ``(..., m, n)``)."""
    if G.shape != O.shape:
        raise ValueError(f"ns_figures: G has shape {tuple(G.shape)} but O has {tuple(O.shape)}")
    dt = torch.float64 if G.dtype == torch.float64 else torch.float32
    G, O = G.to(dt), O.to(dt)
    g, o = _frob(G).clamp_min(eps), _frob(O).clamp_min(eps)
    cosine = (G * O).flatten(-2).sum(-1) / (g * o)
    loss = _frob(G / g[..., None, None] - O / o[..., None, None])
    small = O if O.size(-2) <= O.size(-1) else O.mT
    r = small.size(-2)
    eye = torch.eye(r, dtype=dt, device=O.device)
    ortho = _frob(small @ small.mT - eye) / math.sqrt(r)
    return {
        "cosine": cosine,
        "angle_deg": torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0))),
        "information_loss": loss,
        "orthogonality_error": ortho,
    }


def ns_transformation(
    G: torch.Tensor,
    steps: Iterable[int] = DEFAULT_NS_STEPS,
    dtype: torch.dtype | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`ns_figures` of ``G`` against ``newton_schulz(G, steps=s)`` for each ``s`` in ``steps``.

    ``G`` may be a stack ``(..., m, n)`` of same-shaped matrices (one batched NS per step count).
    ``dtype`` is the NS compute dtype (default: bf16 on CUDA, fp32 on CPU, as Muon runs it).
    Returns ``{s: {figure: tensor of leading shape}}``.
    """
    steps = list(steps)
    if not steps:
        raise ValueError("ns_transformation: give at least one step count, e.g. steps=(1, 2, 3, 5, 10)")
    bad = [s for s in steps if not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f"ns_transformation: step counts must be integers >= 1, got {bad}")
    return {s: ns_figures(G, newton_schulz(G, steps=s, dtype=dtype)) for s in steps}


def ns_benefit(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Effective rank of ``G`` and of ``NS(G)``, their ratio, and the NS figures (one SVD each).

    Keys: ``effective_rank``, ``ns_effective_rank``, ``benefit_ratio`` (ns / plain; > 1 means
    orthogonalization spreads the update over more directions), ``relative_effective_rank``
    (effective rank / min(m, n)), plus the :func:`ns_figures` keys.
    """
    O = newton_schulz(G, steps=steps, dtype=dtype)
    er = effective_rank_of_spectrum(singular_values(G))
    ner = effective_rank_of_spectrum(singular_values(O))
    out = {
        "effective_rank": er,
        "ns_effective_rank": ner,
        "benefit_ratio": ner / er.clamp_min(1e-12),
        "relative_effective_rank": er / min(G.shape[-2:]),
    }
    out.update(ns_figures(G, O))
    return out


# --- the same figures from the singular values alone -------------------------------------------


def ns_map_of_spectrum(
    s: torch.Tensor, steps: Iterable[int] = DEFAULT_NS_STEPS, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> dict[int, torch.Tensor]:
    """The singular values of ``newton_schulz(G, steps=t)`` for each ``t`` in ``steps``, from those
    of ``G`` (``s``, last dim): ``G`` is normalized by ``||G||_F = sqrt(sum s^2)``, and each quintic
    step maps every singular value by ``x -> a x + b x^3 + c x^5`` (the iteration acts on ``U Sigma
    V^T`` as that polynomial on ``Sigma``). In exact arithmetic, so in float64; Muon's bf16
    iteration differs from it by its rounding."""
    steps = sorted(set(steps))
    if not steps or any(not isinstance(t, int) or t < 0 for t in steps):
        raise ValueError(f"ns_map_of_spectrum: give step counts >= 0, e.g. steps=(1, 2, 3, 5, 10), got {steps}")
    a, b, c = (float(v) for v in coefficients)
    s = s.to(torch.float64)
    x = s / (s * s).sum(-1, keepdim=True).sqrt().clamp_min(1e-300)
    out, done = {}, 0
    for t in steps:
        for _ in range(t - done):
            x2 = x * x
            x = x * (a + x2 * (b + c * x2))
        done = t
        out[t] = x
    return out


def ns_figures_of_spectrum(s: torch.Tensor, o: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`ns_figures` of ``G`` and ``O`` that share singular vectors, from their singular
    values ``s`` and ``o`` (same order, last dim, float64): ``cosine = sum s o / (|s| |o|)``,
    ``information_loss = sqrt(2 - 2 cosine)``, ``orthogonality_error =
    sqrt(sum (o^2 - 1)^2 / r)``."""
    s, o = s.to(torch.float64), o.to(torch.float64)
    cosine = (s * o).sum(-1) / ((s * s).sum(-1).sqrt() * (o * o).sum(-1).sqrt()).clamp_min(1e-300)
    cosine = cosine.clamp(-1.0, 1.0)
    return {
        "cosine": cosine,
        "angle_deg": torch.rad2deg(torch.arccos(cosine)),
        "information_loss": (2 - 2 * cosine).clamp_min(0).sqrt(),
        "orthogonality_error": ((o * o - 1) ** 2).mean(-1).sqrt(),
    }


def ns_benefit_of_spectrum(s: torch.Tensor, steps: int = 5) -> dict[str, torch.Tensor]:
    """:func:`ns_benefit` from the singular values ``s`` of ``G`` (last dim; ``r`` of them)."""
    o = ns_map_of_spectrum(s, (steps,))[steps]
    er = effective_rank_of_spectrum(s.to(torch.float64))
    ner = effective_rank_of_spectrum(o)
    out = {"effective_rank": er, "ns_effective_rank": ner, "benefit_ratio": ner / er.clamp_min(1e-12),
           "relative_effective_rank": er / s.shape[-1]}
    out.update(ns_figures_of_spectrum(s, o))
    return out
