"""Gram Newton-Schulz and per-step coefficient schedules against float64 references: the plain
quintic iteration (equal in exact arithmetic), the exact polar factor, and torch.optim.Muon."""

import pytest
import torch

from lightning_optlab.optim.newton_schulz import (
    NS_COEFFICIENTS,
    coefficient_schedule,
    frobenius_normalize_,
    gram_quintic_iterations,
    newton_schulz,
    polar_exact,
    quintic_iterations,
)


def _matrix(m, n, seed, decay=0.0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) if decay else torch.rand(k, generator=g, dtype=torch.float64) + 0.01
    return (U * s) @ V.T


# Muon's fast triple, then the classic quintic (1.875, -1.25, 0.375), which converges to 1
SCHEDULE = [(3.4445, -4.7750, 2.0315)] * 3 + [(1.875, -1.25, 0.375)] * 2


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32), (3, 8, 40), (2, 40, 8)])
@pytest.mark.parametrize("restart", [None, 1, 2, 3])
@pytest.mark.parametrize("coefficients", [NS_COEFFICIENTS, SCHEDULE])
def test_gram_iteration_equals_the_plain_one_in_float64(shape, restart, coefficients):
    X = torch.stack([_matrix(*shape[-2:], seed=i) for i in range(shape[0] if len(shape) == 3 else 1)])
    X = X if len(shape) == 3 else X[0]
    X = frobenius_normalize_(X.clone())
    ref = quintic_iterations(X, 5, coefficients)
    got = gram_quintic_iterations(X, 5, coefficients, restart=restart)
    assert got.shape == X.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-11)


def test_a_per_step_schedule_is_applied_step_by_step():
    """One step of a schedule is one step of the plain iteration with that step's triple."""
    X = frobenius_normalize_(_matrix(20, 30, 0).clone())
    expected = X
    for triple in SCHEDULE:
        expected = quintic_iterations(expected, 1, triple)
    torch.testing.assert_close(quintic_iterations(X, 5, SCHEDULE), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"one \(a, b, c\) per step \(5 of them\)"):
        coefficient_schedule(SCHEDULE[:4], 5)


@pytest.mark.parametrize("shape", [(128, 512), (512, 128)])
def test_gram_iteration_in_float32_is_as_close_to_the_polar_factor_as_the_plain_one(shape):
    """In float32 (the CPU's Newton-Schulz dtype) the Gram form with its restart lands as close to
    the exact polar factor as the plain iteration (same singular-value band, same distance)."""
    W = _matrix(*shape, seed=3)
    polar = polar_exact(W)
    plain = newton_schulz(W.float(), steps=5).double()
    gram = newton_schulz(W.float(), steps=5, method="gram").double()
    d_plain = float((plain - polar).norm() / polar.norm())
    d_gram = float((gram - polar).norm() / polar.norm())
    assert d_gram <= d_plain * 1.05 + 1e-4, (d_gram, d_plain)
    torch.testing.assert_close(gram, plain, rtol=0, atol=2e-4)


@pytest.mark.parametrize("ns_method", ["gram", "auto"])
def test_muon_rule_with_the_gram_form_and_a_schedule_steps_as_the_plain_one(ns_method):
    """The muon rule in float64 Newton-Schulz: ns_method='gram'/'auto' and a per-step schedule
    give the plain iteration's weights over several steps (equal in exact arithmetic)."""
    from lightning_optlab.optim.muon import Muon

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 96, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(64, 16, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(32, 32, dtype=torch.float64))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Muon(params, lr=0.05, ns_dtype="float64", ns_method=ns_method, ns_coefficients=SCHEDULE)
    plain = Muon(twins, lr=0.05, ns_dtype="float64", ns_method="plain", ns_coefficients=SCHEDULE)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        ours.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_muon_rule_refuses_bad_methods_and_schedules():
    from lightning_optlab.policy import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    for bad, match in (({"ns_method": "fast"}, "ns_method must be one of plain, gram, auto"),
                       ({"ns_coefficients": SCHEDULE[:2]}, r"one such triple per step \(5 for ns_steps: 5\)")):
        with pytest.raises(ValueError, match=match):
            build_optimizer(model, {"rules": [{"match": {}, "optimizer": "muon", **bad}]})


def test_minimax_quintic_equioscillates_and_is_optimal_on_its_interval():
    """The Remez result: |1 - p| reaches its maximum E at 4 points with alternating signs (the
    Chebyshev alternation theorem's certificate of optimality for 3 coefficients), and no
    perturbation of the coefficients lowers the max error."""
    from lightning_optlab.optim.newton_schulz import minimax_quintic

    for lo, hi in ((1e-3, 1.0), (0.3, 1.7), (0.9, 1.1)):
        (a, b, c), E = minimax_quintic(lo, hi)
        x = torch.linspace(lo, hi, 200001, dtype=torch.float64)
        err = 1 - (a * x + b * x ** 3 + c * x ** 5)
        assert float(err.abs().max()) == pytest.approx(E, rel=1e-6)
        near = x[(err.abs() > E * (1 - 1e-3))]
        signs = torch.sign(err[(err.abs() > E * (1 - 1e-3))])
        # at least 4 alternations of sign among the points where the maximum is reached
        changes = int((signs[1:] != signs[:-1]).sum())
        assert changes >= 3 and near.numel() >= 4
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            da, db, dc = (torch.randn(3, generator=g, dtype=torch.float64) * 1e-3 * max(abs(a), 1)).tolist()
            worse = 1 - ((a + da) * x + (b + db) * x ** 3 + (c + dc) * x ** 5)
            assert float(worse.abs().max()) >= E * (1 - 1e-9)


def test_polar_express_schedule_lands_closer_to_one_than_muons_triple():
    """Five steps of the schedule map every singular value in [1e-3, 1] into [1 - E, 1 + E] with E
    below 0.13, where Muon's fixed triple leaves them in [0.47, 1.20]; the plain iteration with it
    named is the iteration with the schedule spelled out."""
    from lightning_optlab.optim.newton_schulz import polar_express_schedule

    sched = polar_express_schedule(5)
    x = torch.logspace(-3, 0, 20001, dtype=torch.float64)
    pe, muon = x.clone(), x.clone()
    for (a, b, c) in sched:
        pe = a * pe + b * pe ** 3 + c * pe ** 5
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        muon = a * muon + b * muon ** 3 + c * muon ** 5
    assert float((pe - 1).abs().max()) < 0.13
    assert float((pe - 1).abs().max()) < float((muon - 1).abs().max())
    X = frobenius_normalize_(_matrix(40, 120, 5, decay=0.05).clone())
    torch.testing.assert_close(quintic_iterations(X, 5, "polar_express"), quintic_iterations(X, 5, list(sched)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="the named schedule is 'polar_express'"):
        coefficient_schedule("polar", 5)
