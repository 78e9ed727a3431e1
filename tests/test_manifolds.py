"""Retractions and distances against float64 references written here (SVD, norms)."""

import math

import pytest
import torch

from lightning_optlab.manifolds import (
    polar_newton_schulz,
    predicted_distances,
    sphere_distance,
    sphere_retract,
    stiefel_distance,
    stiefel_retract,
    stiefel_retract_exact,
)
from lightning_optlab.optim.newton_schulz import newton_schulz


def polar64(W):
    """Reference polar factor U V^T in float64."""
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U @ Vh


def with_singular_values(m, n, s, seed=0):
    """A float64 m x n matrix with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.as_tensor(s, dtype=torch.float64)) @ V.T, U, V


def near_manifold(m, n, step=0.05, seed=0):
    """A point of the Stiefel manifold plus one 'optimizer step' of spectral norm ~step."""
    g = torch.Generator().manual_seed(seed)
    Q = polar64(torch.randn(m, n, generator=g, dtype=torch.float64))
    return (Q + step * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))).float()


def dist64(W):
    """sqrt(mean((s^2 - 1)^2)) over the min(m, n) singular values: the Stiefel distance."""
    s = torch.linalg.svdvals(W.double().reshape(W.shape[0], -1))
    return torch.sqrt(((s**2 - 1) ** 2).mean()).item()


# ----------------------------------------------------------------------------- sphere
def test_sphere_rows_get_radius_and_keep_direction():
    torch.manual_seed(0)
    W = torch.randn(10, 7, dtype=torch.float64) * 3
    for radius in (1.0, 2.5):
        R = sphere_retract(W, radius=radius)
        norms = R.norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, radius), atol=1e-12)
        cos = (R * W).sum(1) / (R.norm(dim=1) * W.norm(dim=1))
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-12)
        assert sphere_distance(R, radius).item() < 1e-12


def test_sphere_distance_is_largest_row_norm_deviation():
    W = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.5]])  # norms 5, 1, 0.5
    assert sphere_distance(W).item() == pytest.approx(4.0)
    assert sphere_distance(W, radius=5.0).item() == pytest.approx(4.5)


def test_sphere_zero_row_stays_finite_and_zero():
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    R = sphere_retract(W)
    assert torch.isfinite(R).all()
    assert torch.equal(R[0], torch.zeros(3))
    assert R[1].norm().item() == pytest.approx(1.0, abs=1e-6)


def test_sphere_bf16_and_kernel_dims():
    torch.manual_seed(0)
    W = (torch.randn(64, 32) * 0.1).bfloat16()
    R = sphere_retract(W)
    assert R.dtype == torch.bfloat16
    assert (R.float().norm(dim=1) - 1).abs().max().item() < 1e-2
    K = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    R = sphere_retract(K, dim=(1, 2, 3))
    assert torch.allclose(R.reshape(8, -1).norm(dim=1), torch.ones(8, dtype=torch.float64))


def test_sphere_refuses_scalars_and_bad_radius():
    with pytest.raises(ValueError, match="scalar"):
        sphere_retract(torch.tensor(2.0))
    with pytest.raises(ValueError, match="radius"):
        sphere_retract(torch.randn(3, 3), radius=0.0)


# ----------------------------------------------------------------------------- stiefel distance
@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (12, 12)])
def test_stiefel_distance_matches_singular_value_formula(shape):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64) / 3
    assert stiefel_distance(W).item() == pytest.approx(dist64(W), rel=1e-10)
    Q = polar64(W)
    assert stiefel_distance(Q).item() < 1e-12


def test_stiefel_distance_batched_and_list():
    torch.manual_seed(0)
    stack = torch.randn(3, 6, 4, dtype=torch.float64)
    d = stiefel_distance(stack)
    assert d.shape == (3,)
    for i in range(3):
        assert d[i].item() == pytest.approx(dist64(stack[i]), rel=1e-10)
    kernel = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    (dk,) = stiefel_distance([kernel])
    assert dk.item() == pytest.approx(dist64(kernel.reshape(4, -1)), rel=1e-10)


# ----------------------------------------------------------------------------- stiefel retract
@pytest.mark.parametrize("shape", [(256, 96), (96, 256), (128, 128)])
def test_stiefel_retract_near_manifold_matches_exact(shape):
    W = near_manifold(*shape, step=0.05)
    assert dist64(W) > 1e-2  # genuinely off the manifold
    R = stiefel_retract(W)  # default: to float32's tolerance
    assert R.dtype == torch.float32 and R.shape == W.shape
    assert (R.double() - polar64(W)).abs().max().item() < 1e-3
    assert dist64(R) < 1e-5
    # the library's exact projection agrees with the float64 SVD reference too
    assert (stiefel_retract_exact(W).double() - polar64(W)).abs().max().item() < 1e-5


def test_stiefel_retract_arbitrary_well_conditioned_with_tol():
    W, _, _ = with_singular_values(200, 80, torch.linspace(0.3, 4.0, 80))
    res = polar_newton_schulz(W.float(), steps=40, tol=1e-6)
    assert res.steps < 40  # stopped by tol
    assert (res.polar.double() - polar64(W)).abs().max().item() < 1e-3
    assert res.distance_before.item() == pytest.approx(dist64(W), rel=1e-4)


def test_tall_and_wide_orientation():
    torch.manual_seed(0)
    W = near_manifold(50, 20, step=0.1)
    R = stiefel_retract(W).double()
    assert torch.allclose(R.T @ R, torch.eye(20, dtype=torch.float64), atol=1e-5)  # orthonormal columns
    Rt = stiefel_retract(W.T.contiguous()).double()
    assert torch.allclose(Rt @ Rt.T, torch.eye(20, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    assert torch.allclose(Rt, R.T, atol=1e-6)


def test_muon_quintic_is_not_a_retraction():
    """Why the retraction has its own iteration: Muon's quintic leaves singular values off 1."""
    W = near_manifold(128, 64, step=0.05)
    muon = newton_schulz(W, steps=5, dtype=torch.float32)
    assert dist64(muon) > 5e-2
    assert dist64(stiefel_retract(W)) < 1e-5


def test_batched_stack_equals_one_at_a_time():
    stack = torch.stack([near_manifold(40, 24, seed=s) for s in range(4)])
    R = stiefel_retract(stack, steps=5)
    assert R.shape == stack.shape
    for i in range(4):
        assert torch.allclose(R[i], stiefel_retract(stack[i], steps=5), atol=1e-6)
    # to tolerance, the stack runs until its slowest matrix is there
    assert all(dist64(r) <= 1e-5 for r in stiefel_retract(stack))


def test_list_groups_shapes_and_flattens_kernels():
    torch.manual_seed(0)
    a, b = near_manifold(30, 10, seed=1), near_manifold(30, 10, seed=2)
    c = near_manifold(10, 30, seed=3).double()
    kernel = polar64(torch.randn(16, 27)).reshape(16, 3, 3, 3).float() + 0.01 * torch.randn(16, 3, 3, 3)
    out = stiefel_retract([a, b, c, kernel.bfloat16()])
    assert [o.shape for o in out] == [a.shape, b.shape, c.shape, kernel.shape]
    assert [o.dtype for o in out] == [torch.float32, torch.float32, torch.float64, torch.bfloat16]
    for o, x in zip(out[:3], (a, b, c)):
        assert (o.double() - polar64(x)).abs().max().item() < 1e-3
    assert dist64(out[3].float()) < 2e-2  # bf16 kernel, flattened to (16, 27)
    assert (out[3].double().reshape(16, -1) - polar64(kernel.bfloat16().reshape(16, -1))).abs().max() < 2e-2
    exact = stiefel_retract_exact([kernel])[0]
    assert exact.shape == kernel.shape and dist64(exact) < 1e-5


def test_vectors_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"shape \[7\].*vector"):
        stiefel_retract(torch.randn(7))
    with pytest.raises(ValueError, match="#1 of the list"):
        stiefel_retract([torch.randn(3, 3), torch.randn(3)])


def test_dtypes_bf16_and_float64():
    W = near_manifold(64, 32)
    R16 = stiefel_retract(W.bfloat16())
    assert R16.dtype == torch.bfloat16 and dist64(R16.float()) < 2e-2
    R64 = stiefel_retract(W.double())
    assert R64.dtype == torch.float64 and dist64(R64) < 1e-12


def test_ill_conditioned_follows_the_scalar_iteration():
    """Each singular value follows s <- 1.5 s - 0.5 s^3 (after pre-scaling): small ones lag."""
    s = torch.logspace(0, -3, 40, dtype=torch.float64)  # condition number 1e3
    W, U, V = with_singular_values(60, 40, s, seed=3)
    res = polar_newton_schulz(W, steps=5)
    got = torch.linalg.svdvals(res.polar)
    # reference: the documented pre-scaling (by 1/bound only when the spectral bound
    # sqrt(min(Gershgorin, Frobenius of the Gram)) exceeds 1.5), then the scalar cubic map
    A = W.T @ W
    bound_sq = min(A.abs().sum(1).max().item(), A.norm().item())
    c = 1 / math.sqrt(bound_sq) if bound_sq > 1.5**2 else 1.0
    ref = s * c
    for _ in range(5):
        ref = 1.5 * ref - 0.5 * ref**3
    assert torch.allclose(got.sort().values, ref.sort().values, atol=1e-10)
    assert ref.min().item() < 0.1  # the smallest directions are far from 1: not on the manifold
    assert dist64(res.polar) > 0.1
    # with enough iterations (tol) it reaches the exact polar factor
    res = polar_newton_schulz(W.float(), steps=60, tol=1e-6)
    assert res.steps < 60
    assert (res.polar.double() - polar64(W)).abs().max().item() < 1e-3


def test_rank_deficient_creates_no_null_space_directions():
    nonzero = torch.linspace(0.7, 1.3, 6)
    W, U, V = with_singular_values(40, 24, torch.cat([nonzero, torch.zeros(18)]), seed=5)
    R = stiefel_retract(W.float(), steps=5).double()  # a truncated iteration, asked for
    s = torch.linalg.svdvals(R)
    assert (s[:6] - 1).abs().max().item() < 1e-3
    assert s[6:].max().item() < 1e-5  # zero singular values stay (numerically) zero
    Ur, Vr = U[:, :6], V[:, :6]
    # stays inside W's column and row spaces: no new directions
    assert ((torch.eye(40, dtype=torch.float64) - Ur @ Ur.T) @ R).abs().max().item() < 1e-5
    assert (R @ (torch.eye(24, dtype=torch.float64) - Vr @ Vr.T)).abs().max().item() < 1e-5
    # the partial isometry U_r V_r^T, at distance sqrt(#zeros / k) from the manifold
    assert (R - Ur @ Vr.T).abs().max().item() < 1e-3
    assert stiefel_distance(R).item() == pytest.approx(math.sqrt(18 / 24), abs=1e-3)
    Z = stiefel_retract(torch.zeros(5, 3), steps=5)
    assert torch.equal(Z, torch.zeros(5, 3))


def test_default_retraction_reaches_the_manifold_from_a_far_start_or_says_it_did_not():
    torch.manual_seed(0)
    W = torch.randn(64, 32)  # singular values spread over ~[2, 14]: far from 1
    assert dist64(stiefel_retract(W, steps=5)) > 1e-2  # five fixed iterations are not enough
    R = stiefel_retract(W)
    assert dist64(R) <= 1e-5
    assert (R.double() - polar64(W)).abs().max().item() < 1e-4
    assert dist64(stiefel_retract(W.double())) <= 1e-10
    # rank 6 of 24: the zero singular values stay zero, so the manifold is out of reach
    W, _, _ = with_singular_values(40, 24, torch.cat([torch.ones(6), torch.zeros(18)]), seed=5)
    with pytest.raises(ValueError, match=r"Stiefel distance of 0\.866.*stiefel_retract_exact"):
        stiefel_retract(W.float())
    with pytest.raises(ValueError, match="stiefel_retract_exact"):
        stiefel_retract([torch.randn(8, 4), torch.zeros(5, 3)])


def test_tf32_setting_is_restored():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        stiefel_retract(near_manifold(8, 4))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_bad_steps_and_tol():
    with pytest.raises(ValueError, match="steps"):
        stiefel_retract(torch.randn(4, 4), steps=-1)
    with pytest.raises(ValueError, match="tol"):
        stiefel_retract(torch.randn(4, 4), tol=0.0)


# ----------------------------------------------------------------------------- adaptive step count
@pytest.mark.parametrize("precision", ["fp32", "mixed"])  # mixed: bf16 operands, emulated on CPU
def test_predict_near_manifold_takes_one_or_two_steps(precision):
    for shape in [(256, 96), (96, 96)]:
        for step, expected in [(0.01, {1}), (0.05, {1, 2})]:
            W = near_manifold(*shape, step=step)
            res = polar_newton_schulz(W, steps=5, tol=5e-4, schedule="predict", precision=precision)
            assert res.steps in expected, (shape, step, res.steps)
            assert res.distance_before.item() == pytest.approx(dist64(W), rel=1e-3)
            assert dist64(res.polar) <= 5e-4
            assert (res.polar.double() - polar64(W)).abs().max().item() < 1e-3


def test_predict_far_input_runs_more_steps_and_reaches_tol():
    near = polar_newton_schulz(near_manifold(128, 64, step=0.02), tol=1e-4, schedule="predict")
    far = polar_newton_schulz(near_manifold(128, 64, step=0.4), tol=1e-4, schedule="predict", steps=8)
    assert near.steps == 1 and far.steps > near.steps
    assert dist64(far.polar) <= 1e-4
    # too far for the bound (a singular value near 0): falls back to checking every iteration
    W, _, _ = with_singular_values(60, 40, torch.linspace(0.05, 1.2, 40))
    res = polar_newton_schulz(W.float(), steps=30, tol=1e-4, schedule="predict")
    assert 5 < res.steps < 30 and dist64(res.polar) <= 1e-4


def corrected_step64(X):
    """One step X <- X + (E/2 + 3E^2/8) X, E = I - X X^T (wide X), in float64."""
    E = torch.eye(X.shape[0], dtype=torch.float64) - X @ X.T
    return X + (0.5 * E + 0.375 * E @ E) @ X


@pytest.mark.parametrize("spread", ["uniform", "outlier", "one_sided"])
def test_predicted_distances_bound_the_float64_iteration(spread):
    """The bound from (d, mean e^4, mean e^8) is never below the distance actually reached."""
    k, m = 48, 96
    g = torch.Generator().manual_seed(1)
    for scale in (0.02, 0.1, 0.3):
        if spread == "uniform":
            lam = 1 + scale * (2 * torch.rand(k, generator=g, dtype=torch.float64) - 1)
        elif spread == "outlier":
            lam = 1 + 0.1 * scale * torch.randn(k, generator=g, dtype=torch.float64)
            lam[0] = 1 + 2 * scale
        else:
            lam = 1 - scale * torch.rand(k, generator=g, dtype=torch.float64)
        X = with_singular_values(k, m, lam.sqrt(), seed=2)[0]
        e = 1 - lam
        bounds = predicted_distances(
            e.pow(2).mean().sqrt().item(), e.pow(4).mean().item(), e.pow(8).mean().item(), k, 3)
        for t in range(1, 4):
            X = corrected_step64(X)
            assert dist64(X) <= bounds[t] * (1 + 1e-9) + 1e-14, (scale, t)
        assert bounds[1] < 5 * dist64(corrected_step64(with_singular_values(k, m, lam.sqrt(), seed=2)[0])) + 1e-12


def test_predict_over_a_list_of_shapes_and_dtypes():
    torch.manual_seed(0)
    params = [near_manifold(64, 32, step=0.05, seed=s) for s in range(3)] + [
        near_manifold(32, 80, step=0.05, seed=7), near_manifold(48, 48, step=0.05, seed=8).bfloat16()]
    out = stiefel_retract(params, tol=5e-4, schedule="predict")
    assert [o.dtype for o in out] == [p.dtype for p in params]
    for o, p in zip(out[:4], params[:4]):
        assert dist64(o) <= 5e-4
        assert (o.double() - polar64(p)).abs().max().item() < 1e-3
    assert dist64(out[4].float()) <= 2e-2  # bf16 storage rounding


def test_predict_bf16_loose_target_uses_bf16_gram():
    W = near_manifold(128, 64, step=0.05).bfloat16()
    res = polar_newton_schulz(W.float(), tol=1e-2, schedule="predict", precision="mixed")
    assert res.steps == 1
    assert dist64(res.polar.bfloat16().float()) <= 2e-2


def test_schedule_and_precision_errors():
    with pytest.raises(ValueError, match="schedule='predict' stops at a tolerance; give tol"):
        stiefel_retract(torch.randn(4, 4), schedule="predict")
    with pytest.raises(ValueError, match="schedule must be one of fixed, check, predict"):
        stiefel_retract(torch.randn(4, 4), schedule="adaptive", tol=1e-3)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, mixed"):
        stiefel_retract(torch.randn(4, 4), precision="bf16")


def test_mixed_precision_fixed_schedule_keeps_float32_accuracy():
    W = near_manifold(128, 64, step=0.05)
    R = stiefel_retract(W, steps=3, precision="mixed")
    assert dist64(R) < 1e-4 and (R.double() - polar64(W)).abs().max().item() < 1e-3


# ----------------------------------------------------------------------------- in place (StiefelRetractor)
from lightning_optlab.manifolds import StiefelRetractor, choose_steps, stiefel_retract_  # noqa: E402
from lightning_optlab.manifolds.stiefel import GRAM_FLOOR, UPDATE_REL_FLOOR, _Bucket  # noqa: E402


@pytest.mark.parametrize("precision", ["fp32", "mixed"])  # mixed: bf16 products emulated on CPU
def test_in_place_matches_exact_on_all_shapes_and_leaves_the_rest_alone(precision):
    """Tall, wide, square and conv parameters, all views of ONE flat buffer: each is retracted in
    place to within tol of the float64 polar factor, the buffer's other entries are untouched,
    and the storage is the same (no copy back)."""
    shapes = [(96, 40), (96, 40), (40, 96), (48, 48), (16, 3, 3, 3)]
    g = torch.Generator().manual_seed(0)
    sizes = [math.prod(s) for s in shapes]
    flat = torch.randn(sum(sizes) + 50, generator=g)
    params, at = [], 0
    for s, n in zip(shapes, sizes):
        m = s[0]
        start = near_manifold(m, n // m, step=0.05, seed=at).reshape(s)
        flat[at:at + n] = start.reshape(-1)
        params.append(flat[at:at + n].view(s))
        at += n
    rest = flat[at:].clone()
    before = [p.clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    results = stiefel_retract_(params, steps=5, tol=5e-4, precision=precision)
    assert len(results) == 4  # buckets: 96x40 (two), 40x96, 48x48, 16x27
    assert torch.equal(flat[at:], rest) and [p.data_ptr() for p in params] == ptrs
    for p, b in zip(params, before):
        assert dist64(p) <= 5e-4
        assert (p.double() - polar64(b.reshape(b.shape[0], -1)).reshape(b.shape)).abs().max().item() < 1e-3
    d = torch.cat([r.distance_before for r in results])
    ref = [dist64(b) for b in before]
    order = [0, 1, 2, 3, 4]  # group_by_shape keeps first-appearance order
    assert d.tolist() == pytest.approx([ref[i] for i in order], rel=1e-3)
    assert all(1 <= r.steps <= 2 and not r.fallback for r in results)  # as the out-of-place path


def test_in_place_batched_equals_one_by_one_and_the_out_of_place_path():
    params = [near_manifold(64, 24, step=0.05, seed=s) for s in range(4)]
    together = [p.clone() for p in params]
    StiefelRetractor([together], tol=5e-4)()
    for p, t in zip(params, together):
        alone = p.clone()
        StiefelRetractor([[alone]], tol=5e-4)()
        assert torch.allclose(alone, t, atol=1e-6)
        # the out-of-place predict path runs the same iteration (one step here)
        assert torch.allclose(stiefel_retract(p, tol=5e-4, schedule="predict"), t, atol=1e-6)


def test_speculation_counts_cover_zero_one_many_and_fallback():
    tol = 1e-3
    Q = polar64(torch.randn(80, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    cases = {
        # already within tol: one step is applied, proven harmless by the t = 1 bound
        "zero": (Q + 1e-5 * torch.randn(80, 32, dtype=torch.float64)).float(),
        "one": near_manifold(80, 32, step=0.05, seed=1),
        "many": near_manifold(80, 32, step=0.3, seed=2),
        "far": with_singular_values(80, 32, torch.linspace(0.05, 1.2, 32), seed=4)[0].float(),
    }
    for name, W in cases.items():
        X = W.clone()
        (res,) = StiefelRetractor([[X]], steps=30, tol=tol)()
        assert dist64(X) <= tol, name
        assert (X.double() - polar64(W)).abs().max().item() < 2e-3, name
        if name in ("zero", "one"):
            assert res.steps == 1 and not res.fallback
        if name == "zero":
            assert dist64(W) <= tol  # without speculation nothing would have run
        if name == "many":
            assert res.steps > 1 and not res.fallback
            # continued from the speculative iterate: the float64 corrected iteration, res.steps times
            assert (X.double() - corrected_iteration64(W, res.steps)).abs().max().item() < 1e-4
            # the proven bound is conservative by at most one step here
            needed = next(t for t in range(1, 30) if dist64(corrected_iteration64(W, t)) <= tol)
            assert needed <= res.steps <= needed + 1
        if name == "far":
            assert res.fallback and res.steps > 5


def corrected_iteration64(W, steps):
    """X <- X + (E/2 + 3 E^2 / 8) X with E = I - X X^T (wide form), in float64: the reference."""
    X = W.double()
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    eye = torch.eye(X.shape[0], dtype=torch.float64)
    for _ in range(steps):
        E = eye - X @ X.T
        X = X + (E / 2 + 3 * E @ E / 8) @ X
    return X.T if tall else X


@pytest.mark.parametrize("low", [False, True])
def test_undo_restores_the_input(low):
    """The speculative iteration's undo (far-off fallback, or t = 0 not proven safe): exact copy
    in fp32 mode, the same product subtracted in bf16 mode (two float32 roundings)."""
    W = near_manifold(64, 40, step=0.3)
    X = W.clone()
    b = _Bucket([X], tol=1e-3, precision="mixed" if low else "fp32")
    b.measure(torch.empty(1, 3), apply=True)
    assert (X - W).abs().max() > 1e-3  # the iteration ran
    b.undo_first()
    if low:
        assert (X - W).abs().max().item() <= 4 * 2.0**-24 * (W.abs().max().item() + 1)
    else:
        assert torch.equal(X, W)


def test_bound_is_monotone_so_the_bucket_worst_case_decides_soundly():
    """If the t = 1 criterion holds at the componentwise maximum of (d, m4, m8) over a bucket,
    it holds for every matrix of the bucket (what the in-place retractor relies on)."""
    g = torch.Generator().manual_seed(0)
    k, tol = 64, 1e-3
    for _ in range(200):
        stats = []
        for _ in range(4):
            lam = 1 + 0.06 * torch.rand(1, generator=g).item() * torch.randn(k, generator=g, dtype=torch.float64)
            e = 1 - lam
            stats.append((e.pow(2).mean().sqrt().item(), e.pow(4).mean().item(), e.pow(8).mean().item()))
        worst = [max(s[i] for s in stats) for i in range(3)]
        bounds = predicted_distances(*worst, k, 1)
        if bounds[1] + GRAM_FLOOR["split"] + UPDATE_REL_FLOOR[True] * bounds[0] <= tol:
            for d, m4, m8 in stats:
                c = choose_steps(d, m4, m8, k, tol, 5, GRAM_FLOOR["split"], UPDATE_REL_FLOOR[True])
                assert c is not None and c <= 1
                b = predicted_distances(d, m4, m8, k, 1)
                assert b[1] <= bounds[1] and b[0] <= bounds[0]


def test_in_place_bf16_and_noncontiguous_kernels():
    W = near_manifold(64, 32, step=0.05)
    X = W.bfloat16()
    (res,) = stiefel_retract_([X], tol=1e-2)
    assert X.dtype == torch.bfloat16 and dist64(X.float()) <= 2e-2 and res.steps == 1
    K = (polar64(torch.randn(16, 27)).reshape(16, 3, 3, 3).float() + 0.01 * torch.randn(16, 3, 3, 3))
    K = K.contiguous(memory_format=torch.channels_last)  # its (16, 27) matrix is not a view
    ref = polar64(K.reshape(16, -1))
    ptr = K.data_ptr()
    StiefelRetractor([[K]], tol=5e-4)()
    assert K.data_ptr() == ptr and K.is_contiguous(memory_format=torch.channels_last)
    assert (K.reshape(16, -1).double() - ref).abs().max().item() < 1e-3 and dist64(K) <= 5e-4


def test_in_place_storage_change_rebuilds_and_errors():
    X = near_manifold(32, 16)
    r = StiefelRetractor([[X]], tol=5e-4)
    r()
    X.data = near_manifold(32, 16, seed=5)  # new storage: the retractor notices and rebuilds
    r()
    assert dist64(X) <= 5e-4
    with pytest.raises(ValueError, match="cuda_graph must be"):
        StiefelRetractor([[X]], cuda_graph="yes")
    with pytest.raises(ValueError, match="one flattened shape"):
        StiefelRetractor([[X, torch.randn(16, 32)]])
    with pytest.raises(ValueError, match="vector"):
        stiefel_retract_([torch.randn(5)])


@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_bucket_statistics_and_update_match_float64(low, shape):
    """measure(): the statistics (d^2, mean e^4, mean e^8) of E = I - X X^T (small side) from
    the halved residual and one reduction, and the update P = E/2 + 3E^2/8, against float64
    formulas from the eigenvalues; the split Gram is float32-grade even with bf16 products."""
    Ws = [near_manifold(*shape, step=0.1, seed=s) for s in range(3)]
    Xs = [W.clone() for W in Ws]
    b = _Bucket(Xs, tol=1e-3, precision="mixed" if low else "fp32")
    stats = torch.empty(3, 3)
    b.measure(stats, apply=False)
    for j, W in enumerate(Ws):
        X = W.double() if shape[0] < shape[1] else W.double().T
        k = X.shape[0]
        E = torch.eye(k, dtype=torch.float64) - X @ X.T
        e = torch.linalg.eigvalsh(E)
        ref = torch.stack([e.pow(2).mean(), e.pow(4).mean(), e.pow(8).mean()])
        # d^2 from float32 E: ~1e-6 relative; the moments from bf16 products: within 2^-5
        assert abs(stats[j, 0].item() - ref[0].item()) <= 1e-4 * ref[0].item()
        rel = 2.0**-6 if low else 1e-5
        assert torch.allclose(stats[j, 1:].double(), ref[1:], rtol=rel, atol=0)
        P = E / 2 + 3 * E @ E / 8
        err = (b.P[j].double() - P).abs().max().item()
        # bf16 P: one rounding (2^-9 relative) on top of the float32-grade E; fp32: E's own error
        assert err <= (2.0**-8 * P.abs().max().item() if low else 0.0) + 1e-6
        # the Gram itself: E/2 in W[0] vs float64; split: ~1e-5 (the dropped L L^T and the
        # rounding of L, ~2^-18 each), against ~1e-3 for one bf16 product
        assert (b.W[0, j].double() - E / 2).abs().max().item() <= (1e-5 if low else 1e-6)
    assert all(torch.equal(X, W) for X, W in zip(Xs, Ws))  # apply=False leaves X alone


def test_retraction_plan_without_lightning_puts_a_policy_model_on_its_manifolds():
    """The planner the callback runs, used as a plain function: the policy's constraints found in
    the param groups, bucketed by shape, retracted to the float64 polar factor / unit rows."""
    from lightning_optlab.manifolds import find_targets, plan_retractions
    from lightning_optlab.manifolds import stiefel as stiefel_module
    from lightning_optlab.policy import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    opt = build_optimizer(model, [
        {"name": "input", "match": {"role": "embedding"}, "optimizer": "adamw", "constraint": "sphere"},
        {"name": "hidden", "match": {"role": "hidden"}, "optimizer": "sgd", "constraint": "stiefel",
         "constraint_options": {"tol": 1e-4, "steps": 10}},
        {"name": "rest", "match": {}, "optimizer": "adamw"},
    ])
    targets = find_targets(model, [opt], None, {"steps": 5, "tol": "auto", "schedule": "predict", "precision": "auto"})
    assert [(t.name, t.constraint) for t in targets] == [("0.weight", "sphere"), ("2.weight", "stiefel"), ("4.weight", "stiefel")]
    plan = plan_retractions(targets)
    assert [(job.constraint, len(job.targets)) for job in plan.jobs] == [("sphere", 1), ("stiefel", 2)]
    hidden = [model[2].weight, model[4].weight]
    for W in hidden:  # one optimizer-step-sized move off the manifold
        W.data.copy_(polar64(W.detach()).float() + 0.02 * torch.randn_like(W))
    expected = [polar64(W.detach()) for W in hidden]
    metrics = plan.retract(measure=True)
    assert metrics["manifold/stiefel_distance_before/hidden"] > 1e-2
    for W, P in zip(hidden, expected):
        assert dist64(W.detach()) <= 1e-4 and (W.detach().double() - P).abs().max() < 1e-4
    rows = model[0].weight.detach().double().norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    after = plan.distances_after()
    assert after["manifold/stiefel_distance_after/hidden"] <= 1e-4
    assert any(id(hidden[0]) in b for k in stiefel_module._RETRACTORS for b in k[0])
    plan.release()
    assert not any(id(hidden[0]) in b for k in stiefel_module._RETRACTORS for b in k[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_in_place_retractor_graph_equals_eager_on_cuda():
    """Warm-up, capture, replays: the captured retraction (bucket branches on their own streams)
    gives the eager one's result every call, and really replays a graph."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(96, 32), (96, 32), (64, 48), (48, 64)]
    base = [torch.linalg.qr(torch.randn(m, n, generator=gen))[0] if m >= n else
            torch.linalg.qr(torch.randn(n, m, generator=gen))[0].T.contiguous() for m, n in shapes]
    graph_ps = [b.cuda() for b in base]
    eager_ps = [b.cuda() for b in base]
    by_shape = lambda ps: [ps[:2], ps[2:3], ps[3:]]
    graph = StiefelRetractor(by_shape(graph_ps), steps=5, tol=1e-3, cuda_graph="auto")
    eager = StiefelRetractor(by_shape(eager_ps), steps=5, tol=1e-3, cuda_graph=False)
    for step in range(5):
        noise = torch.Generator().manual_seed(10 + step)
        for a, b in zip(graph_ps, eager_ps):
            d = (0.03 * torch.randn(a.shape, generator=noise)).cuda()
            a.add_(d)
            b.add_(d)
        rg, re_ = graph(), eager()
        assert [r.steps for r in rg] == [r.steps for r in re_]
        for a, b in zip(graph_ps, eager_ps):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert stiefel_distance(a).item() <= 1e-3
    assert graph.uses_graph and not eager.uses_graph
