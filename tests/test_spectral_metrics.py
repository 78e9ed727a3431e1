"""Spectral metric functions against numpy float64 references."""

import math

import numpy as np
import pytest
import torch

from lightning_optlab.optim.newton_schulz import newton_schulz
from lightning_optlab.spectral import (
    as_matrix,
    condition_number,
    effective_rank,
    ns_benefit,
    ns_transformation,
    singular_values,
    singular_values_grouped,
    spectrum_metrics,
    stable_rank,
    topk_concentration,
)


def np_effective_rank(A):
    s = np.linalg.svd(A, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def np_stable_rank(A):
    return float(np.linalg.norm(A, "fro") ** 2 / np.linalg.norm(A, 2) ** 2)


def np_topk(A, k, power=1.0):
    s = np.sort(np.linalg.svd(A, compute_uv=False))[::-1] ** power
    return float(s[:k].sum() / s.sum())


def matrices():
    g = np.random.default_rng(0)
    rand = g.standard_normal((20, 12))
    low = g.standard_normal((20, 3)) @ g.standard_normal((3, 12))
    wide = g.standard_normal((7, 30))
    ill = g.standard_normal((10, 10)) @ np.diag(np.logspace(0, -4, 10)) @ g.standard_normal((10, 10))
    return {"random": rand, "low_rank": low, "wide": wide, "ill": ill, "identity": np.eye(9)}


@pytest.mark.parametrize("kind", ["random", "low_rank", "wide", "ill", "identity"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_metrics_match_numpy(kind, dtype):
    A = matrices()[kind]
    W = torch.tensor(A, dtype=dtype)
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    assert effective_rank(W).item() == pytest.approx(np_effective_rank(A), rel=rtol)
    assert stable_rank(W).item() == pytest.approx(np_stable_rank(A), rel=rtol)
    for k in (1, 3):
        assert topk_concentration(W, k).item() == pytest.approx(np_topk(A, k), rel=rtol)
    assert topk_concentration(W, 2, power=2).item() == pytest.approx(np_topk(A, 2, 2), rel=rtol)
    if kind != "low_rank":  # numerically singular: numpy and torch both give huge, unequal values
        assert condition_number(W).item() == pytest.approx(np.linalg.cond(A), rel=1e-6 if dtype == torch.float64 else 5e-2)


def test_identity_and_rank_one_effective_rank():
    for n in (1, 5, 64):
        assert effective_rank(torch.eye(n, dtype=torch.float64)).item() == pytest.approx(n, rel=1e-12)
        assert stable_rank(torch.eye(n)).item() == pytest.approx(n, rel=1e-6)
        assert condition_number(torch.eye(n)).item() == pytest.approx(1.0)
    u, v = torch.randn(30, 1, dtype=torch.float64), torch.randn(1, 17, dtype=torch.float64)
    R1 = u @ v
    assert effective_rank(R1).item() == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(R1).item() == pytest.approx(1.0, rel=1e-9)
    assert topk_concentration(R1, 1).item() == pytest.approx(1.0, abs=1e-9)
    # a rank-1 matrix is singular: condition number far beyond any well-conditioned one
    assert condition_number(R1).item() > 1e10


def test_zero_matrix_is_finite_where_defined():
    Z = torch.zeros(4, 6)
    assert effective_rank(Z).item() == 0.0
    assert stable_rank(Z).item() == 0.0
    assert topk_concentration(Z, 2).item() == 0.0
    assert math.isnan(condition_number(Z).item())


def test_batched_and_grouped_svd_match_one_by_one():
    torch.manual_seed(0)
    stack = torch.randn(5, 8, 6)
    s = singular_values(stack)
    for i in range(5):
        ref = np.linalg.svd(stack[i].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(s[i].numpy(), ref, rtol=1e-5)
    m = spectrum_metrics(s, k=2)
    for i in range(5):
        A = stack[i].double().numpy()
        assert m["effective_rank"][i].item() == pytest.approx(np_effective_rank(A), rel=1e-5)
        assert m["spectral_norm"][i].item() == pytest.approx(np.linalg.norm(A, 2), rel=1e-5)
    mats = [torch.randn(8, 6), torch.randn(3, 4), torch.randn(8, 6), torch.randn(4, 2, 3, 3)]
    out = singular_values_grouped(mats)
    for M, sv in zip(mats, out):
        ref = np.linalg.svd(as_matrix(M).double().numpy(), compute_uv=False)
        np.testing.assert_allclose(sv.numpy(), ref, rtol=1e-5)
    assert out[3].shape == (4,)  # conv kernel flattened to (out, in*kh*kw)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="biases"):
        as_matrix(torch.zeros(5))
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_concentration(torch.eye(3), 0)
    with pytest.raises(ValueError, match="steps=\\(1, 2, 3, 5, 10\\)"):
        ns_transformation(torch.eye(3), steps=[])
    with pytest.raises(ValueError, match=">= 1"):
        ns_transformation(torch.eye(3), steps=[0])


def test_ns_transformation_against_float64_formulas():
    torch.manual_seed(1)
    G = torch.randn(3, 12, 20, dtype=torch.float64)
    G[1] = torch.randn(12, 2, dtype=torch.float64) @ torch.randn(2, 20, dtype=torch.float64)  # rank 2
    figs = ns_transformation(G, steps=(1, 2, 3, 5, 10), dtype=torch.float64)
    assert sorted(figs) == [1, 2, 3, 5, 10]
    for s, f in figs.items():
        for i in range(3):
            A = G[i].numpy()
            O = newton_schulz(G[i], steps=s, dtype=torch.float64).numpy()
            cos = (A * O).sum() / (np.linalg.norm(A) * np.linalg.norm(O))
            loss = np.linalg.norm(A / np.linalg.norm(A) - O / np.linalg.norm(O))
            ortho = np.linalg.norm(O @ O.T - np.eye(12)) / math.sqrt(12)
            assert f["cosine"][i].item() == pytest.approx(cos, rel=1e-10)
            assert f["angle_deg"][i].item() == pytest.approx(math.degrees(math.acos(min(cos, 1.0))), rel=1e-8)
            assert f["information_loss"][i].item() == pytest.approx(loss, rel=1e-9)
            assert f["orthogonality_error"][i].item() == pytest.approx(ortho, rel=1e-9)
    # full-rank G: more steps -> closer to orthogonal; rank-2 G cannot get there
    assert figs[10]["orthogonality_error"][0] < figs[1]["orthogonality_error"][0]
    assert figs[10]["orthogonality_error"][1].item() == pytest.approx(math.sqrt(1 - 2 / 12), rel=0.05)


def test_ns_benefit_of_low_rank_and_identity():
    torch.manual_seed(2)
    spread = torch.randn(16, 1) @ torch.randn(1, 24) + 0.05 * torch.randn(16, 24)
    b = ns_benefit(spread, steps=5, dtype=torch.float32)
    O = newton_schulz(spread, steps=5, dtype=torch.float32)
    assert b["effective_rank"].item() == pytest.approx(np_effective_rank(spread.double().numpy()), rel=1e-4)
    assert b["ns_effective_rank"].item() == pytest.approx(np_effective_rank(O.double().numpy()), rel=1e-4)
    assert b["benefit_ratio"].item() > 2  # NS spreads a dominated spectrum
    I = torch.eye(8)
    bi = ns_benefit(I, steps=5, dtype=torch.float32)
    assert bi["benefit_ratio"].item() == pytest.approx(1.0, rel=1e-4)  # already orthogonal
    assert bi["information_loss"].item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["random", "low_rank", "wide", "ill", "identity"])
def test_gram_singular_values_against_float64_svd(kind):
    """The Gram path (eigvalsh of the small side's Gram matrix) vs float64 SVD: float64 Gram is
    accurate to ~1e-7 of sigma_max; float32 Gram to ~1e-3 of sigma_max (documented floors)."""
    from lightning_optlab.spectral import singular_values_gram

    A = matrices()[kind]
    ref = np.linalg.svd(A, compute_uv=False)
    for dtype, floor in ((torch.float64, 1e-7), (torch.float32, 2e-3)):
        s = singular_values_gram(torch.tensor(A, dtype=torch.float32), dtype=dtype).double().numpy()
        assert s.dtype == np.float64 and s.shape == ref.shape
        assert np.all(np.diff(s) <= 0)  # descending
        # float32 input rounding (~6e-8 relative) plus the Gram floor
        err = np.abs(s - ref)
        assert np.all(err <= floor * ref[0] + 1e-6 * ref), (dtype, (err / ref[0]).max())
        p = s / s.sum()
        er = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
        # float32: the zero singular values of the low-rank matrix come back as noise ~1e-3 sigma_max
        # and add a little entropy (0.2% here), as the docstring warns
        assert er == pytest.approx(np_effective_rank(A), rel=5e-3 if dtype == torch.float32 else 1e-6)


def test_gram_condition_number_exact_below_the_floor_only():
    from lightning_optlab.spectral import condition_number_of_spectrum, singular_values_gram

    g = np.random.default_rng(3)
    U, _ = np.linalg.qr(g.standard_normal((40, 40)))
    V, _ = np.linalg.qr(g.standard_normal((60, 40)))
    for cond, rel in ((1e2, 1e-6), (1e5, 1e-3)):
        A = U @ np.diag(np.logspace(0, -np.log10(cond), 40)) @ V.T
        s = singular_values_gram(torch.tensor(A), dtype=torch.float64)
        assert condition_number_of_spectrum(s).item() == pytest.approx(cond, rel=rel)
    # far beyond the float32 floor (~1e3): the float32 Gram cannot see the small singular values
    A = U @ np.diag(np.logspace(0, -6, 40)) @ V.T
    s32 = singular_values_gram(torch.tensor(A, dtype=torch.float32), dtype=torch.float32)
    assert condition_number_of_spectrum(s32).item() < 1e5 or math.isinf(condition_number_of_spectrum(s32).item())


def test_grouped_gram_matches_grouped_svd():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(12, 30, generator=g), torch.randn(12, 30, generator=g), torch.randn(30, 12, generator=g),
            torch.randn(4, 3, 2, 2, generator=g)]
    a = singular_values_grouped(mats, method="svd")
    b = singular_values_grouped(mats, method="gram")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="method must be one of svd, gram"):
        singular_values_grouped(mats, method="eig")


@pytest.mark.parametrize("kind", ["random", "low_rank", "wide", "ill", "identity"])
def test_gram_of_small_side_and_singular_values_from_gram(kind):
    """The two halves of the Gram path (what SpectralMonitor's 'gram_host' splits between the
    device and the CPU): the k x k Gram of the small side against numpy, and its spectrum against
    a float64 SVD, decomposed in float64 and (float64 Gram rounded) in float32 with their floors."""
    from lightning_optlab.spectral import gram_of_small_side, singular_values_from_gram

    A = matrices()[kind]
    G = gram_of_small_side(torch.tensor(A, dtype=torch.float32), torch.float64)
    A32 = A.astype(np.float32).astype(np.float64)
    ref_G = A32 @ A32.T if A.shape[0] <= A.shape[1] else A32.T @ A32
    assert G.dtype == torch.float64 and G.shape == (min(A.shape),) * 2
    np.testing.assert_allclose(G.numpy(), ref_G, rtol=1e-12, atol=1e-12 * np.abs(ref_G).max())
    ref = np.linalg.svd(A, compute_uv=False)
    for dtype, floor in ((None, 1e-7), (torch.float32, 2e-3)):
        s = singular_values_from_gram(G, dtype)
        assert s.dtype == (dtype or torch.float64)
        s = s.double().numpy()
        assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
        err = np.abs(s - ref)
        assert np.all(err <= floor * ref[0] + 1e-6 * ref), (dtype, (err / ref[0]).max())


def test_gram_of_a_nonfinite_matrix_is_nonfinite_and_batches_agree():
    from lightning_optlab.spectral import gram_of_small_side, singular_values_from_gram, singular_values_gram

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 6, 9, generator=g)
    W[1, 4, 7] = float("inf")
    W[2, 0, 0] = float("nan")
    for M in (W, W.mT):  # wide and tall: the diagonal covers every entry either way
        finite = torch.isfinite(gram_of_small_side(M)).flatten(1).all(1)
        assert finite.tolist() == [True, False, False]
    s = singular_values_from_gram(gram_of_small_side(W[:1]))
    torch.testing.assert_close(s.float(), singular_values_gram(W[0])[None], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"square Gram matrices \(\.\.\., k, k\)"):
        singular_values_from_gram(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="gram_of_small_side needs a matrix"):
        gram_of_small_side(torch.zeros(3))
