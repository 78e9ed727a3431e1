"""Spectral figures of weight and gradient matrices, as plain functions over tensors.

Every function accepts a matrix ``(m, n)`` or a stack ``(..., m, n)`` and returns one value per
matrix (leading dims kept). Tensors with more than two dimensions that are *parameters*
(conv kernels ``(out, in, kh, kw)``) are flattened to ``(out, in*kh*kw)`` by
:func:`as_matrix` first; the metric functions themselves treat leading dims as a batch.

The ``*_of_spectrum`` variants take singular values (last dim, any order) so that one SVD
serves all figures: ``spectrum_metrics(singular_values(W))``.

Definitions (``s`` = singular values, ``r = min(m, n)`` of them):

* effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p = s / sum(s)`` and ``H`` the
  Shannon entropy; it is ``r`` for ``I`` (all equal) and ``1`` for a rank-1 matrix. A zero
  matrix has effective rank 0 (the entropy is undefined; 0 keeps averages finite).
* stable rank: ``||W||_F^2 / ||W||_2^2 = sum(s^2) / max(s)^2`` (0 for a zero matrix).
* condition number: ``max(s) / min(s)`` over the ``r`` singular values; ``inf`` when the
  smallest is exactly zero, ``nan`` for a zero matrix.
* top-k concentration: ``sum of the k largest s^power / sum(s^power)``; ``power=1`` is the share
  of the singular values (the default), ``power=2`` the share of the energy (explained variance).
"""

from __future__ import annotations

from typing import Sequence

import torch


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A parameter as a matrix: 2-D unchanged, ``(out, *rest)`` flattened to ``(out, prod(rest))``."""
    if t.ndim < 2:
        raise ValueError(
            f"spectral metrics need a matrix, got a tensor of shape {tuple(t.shape)}; "
            "leave 0-/1-D parameters (biases, norms) out of spectral monitoring"
        )
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def _float(t: torch.Tensor) -> torch.Tensor:
    # SVD needs float32/float64; half precision inputs are upcast, float64 is kept.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values of ``W`` (``(..., m, n)``), descending, in float32 (float64 kept)."""
    if W.ndim < 2:
        raise ValueError(f"singular_values needs a matrix, got shape {tuple(W.shape)}")
    return torch.linalg.svdvals(_float(W))


SV_METHODS = ("svd", "gram")


def singular_values_gram(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``W`` (``(..., m, n)``) as square roots of the eigenvalues of the Gram
    matrix of its small side (``W W^T`` or ``W^T W``), formed and decomposed in ``dtype``;
    descending, returned in float32 (float64 input: float64).

    Why: on a GPU ``eigvalsh`` of a k x k Gram matrix is far cheaper than ``svdvals`` of the
    k x n matrix, and the Gram product runs on matrix units. Precision: the eigenvalues carry an
    absolute error of about ``c * eps(dtype) * sigma_max^2`` (c ~ 10), so a singular value is
    accurate to relative precision only while ``sigma >> sqrt(c * eps(dtype)) * sigma_max``:
    ~5e-8 sigma_max in float64 (the default), ~1e-3 sigma_max in float32. Below that it is noise
    (negative eigenvalues are clamped to 0). Effective rank, stable rank, top-k concentration and
    the spectral norm depend on the large singular values and are barely affected; the condition
    number sigma_max / sigma_min is exact up to ~1 / that floor (~2e7 in float64, ~1e3 in float32)
    and beyond it only says "at least about that" (possibly ``inf``).
    """
    if W.ndim < 2:
        raise ValueError(f"singular_values_gram needs a matrix, got shape {tuple(W.shape)}")
    out_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    return singular_values_from_gram(gram_of_small_side(W, dtype)).to(out_dtype)


def gram_of_small_side(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Gram matrix of the small side of ``W`` (``(..., m, n)``): ``W W^T`` if ``m <= n``,
    else ``W^T W``, i.e. ``(..., k, k)`` with ``k = min(m, n)``, formed in ``dtype``.

    Its eigenvalues are the squared singular values of ``W``. Its diagonal holds the squared
    norms of the rows (or columns) of ``W``, so in float64 (which cannot overflow on float32 /
    bfloat16 / float16 data) the Gram is finite exactly when ``W`` is.
    """
    if W.ndim < 2:
        raise ValueError(f"gram_of_small_side needs a matrix, got shape {tuple(W.shape)}")
    X = W.to(dtype)
    return X @ X.mT if X.size(-2) <= X.size(-1) else X.mT @ X


def singular_values_from_gram(G: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Singular values (descending) from Gram matrices ``G`` (``(..., k, k)``, symmetric PSD, as
    :func:`gram_of_small_side` forms them): ``sqrt(max(eigvalsh(G), 0))``, decomposed in ``dtype``
    (default: ``G``'s) and returned in that dtype.

    Precision as in :func:`singular_values_gram`: the floor is set by the dtype of the
    decomposition. A float64 Gram rounded to float32 for ``eigvalsh`` has the float32 floor
    (~1e-3 sigma_max): rounding ``G`` and the float32 decomposition both perturb the eigenvalues
    by ~``eps(float32) * sigma_max^2``; forming the Gram in float64 first does not lower it.
    """
    if G.ndim < 2 or G.size(-1) != G.size(-2):
        raise ValueError(f"singular_values_from_gram needs square Gram matrices (..., k, k), got shape {tuple(G.shape)}")
    lam = torch.linalg.eigvalsh(G if dtype is None else G.to(dtype))
    return lam.flip(-1).clamp_min(0).sqrt()


def singular_values_stacked(
    W: torch.Tensor, method: str = "svd", gram_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Singular values of a stack of same-shaped matrices ``(..., m, n)``, descending, by
    ``method`` (see :func:`singular_values_grouped`)."""
    if method not in SV_METHODS:
        raise ValueError(f"singular values: method must be one of {', '.join(SV_METHODS)}, got {method!r}")
    W = _float(W)
    return torch.linalg.svdvals(W) if method == "svd" else singular_values_gram(W, gram_dtype)


def singular_values_grouped(
    matrices: Sequence[torch.Tensor], method: str = "svd", gram_dtype: torch.dtype = torch.float64
) -> list[torch.Tensor]:
    """Singular values of many matrices, one batched call per distinct shape (and dtype).

    ``method``: ``"svd"`` (``torch.linalg.svdvals``, float32; float64 kept) or ``"gram"``
    (:func:`singular_values_gram` in ``gram_dtype``). Parameters with more than two dims are
    flattened by :func:`as_matrix`. Returns a list aligned with ``matrices``.
    """
    if method not in SV_METHODS:
        raise ValueError(f"singular values: method must be one of {', '.join(SV_METHODS)}, got {method!r}")
    mats = [as_matrix(m) for m in matrices]
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for idx in by_shape.values():
        s = singular_values_stacked(torch.stack([mats[i] for i in idx]), method, gram_dtype)
        for j, i in enumerate(idx):
            out[i] = s[j]
    return out  # type: ignore[return-value]


# --- figures of a spectrum ---------------------------------------------------------------


def effective_rank_of_spectrum(s: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli effective rank of singular values ``s`` (last dim)."""
    s = s.abs()
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    # 0 * log 0 = 0 by continuity
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank_of_spectrum(s: torch.Tensor) -> torch.Tensor:
    """``sum(s^2) / max(s)^2`` (0 for a zero spectrum)."""
    top = s.abs().amax(-1)
    fro2 = (s * s).sum(-1)
    return torch.where(top > 0, fro2 / (top * top).clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(fro2))


def condition_number_of_spectrum(s: torch.Tensor) -> torch.Tensor:
    """``max(s) / min(s)``: ``inf`` if the smallest is 0, ``nan`` if all are 0."""
    s = s.abs()
    return s.amax(-1) / s.amin(-1)


def topk_concentration_of_spectrum(s: torch.Tensor, k: int = 1, power: float = 1.0) -> torch.Tensor:
    """Share of ``sum(s^power)`` held by the ``k`` largest singular values (0 for a zero spectrum)."""
    if k < 1:
        raise ValueError(f"topk_concentration: k must be >= 1, got {k}")
    sp = s.abs() ** power
    top = sp.topk(min(k, sp.shape[-1]), dim=-1).values.sum(-1)
    total = sp.sum(-1)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(total))


def spectrum_metrics(s: torch.Tensor, k: int = 1, power: float = 1.0) -> dict[str, torch.Tensor]:
    """All scalar figures of singular values ``s`` (one SVD, many figures).

    Keys: ``effective_rank``, ``stable_rank``, ``condition_number``, ``topk_concentration``,
    ``spectral_norm`` (the largest singular value; the only scale-dependent one).
    """
    return {
        "effective_rank": effective_rank_of_spectrum(s),
        "stable_rank": stable_rank_of_spectrum(s),
        "condition_number": condition_number_of_spectrum(s),
        "topk_concentration": topk_concentration_of_spectrum(s, k, power),
        "spectral_norm": s.abs().amax(-1),
    }


# --- figures of a matrix -----------------------------------------------------------------


def effective_rank(W: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli effective rank of ``W`` (``(..., m, n)``)."""
    return effective_rank_of_spectrum(singular_values(W))


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """``||W||_F^2 / ||W||_2^2`` of ``W`` (``(..., m, n)``)."""
    return stable_rank_of_spectrum(singular_values(W))


def condition_number(W: torch.Tensor) -> torch.Tensor:
    """``sigma_max / sigma_min`` of ``W`` over its ``min(m, n)`` singular values."""
    return condition_number_of_spectrum(singular_values(W))


def topk_concentration(W: torch.Tensor, k: int = 1, power: float = 1.0) -> torch.Tensor:
    """Share of the spectrum of ``W`` in its ``k`` largest singular values (see module docstring)."""
    return topk_concentration_of_spectrum(singular_values(W), k, power)
