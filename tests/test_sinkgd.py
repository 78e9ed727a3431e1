"""SinkGD (paper) and Sinkhorn-tanh SinkGD against numpy references; stateless; edge shapes."""

import math

import numpy as np
import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, SinkGD, SinkhornTanh, optimizer_state_bytes
from lightning_optlab.optim.sinkgd import sinkgd_update, sinkhorn_tanh_update

SHAPES = [(9, 4), (4, 9), (6, 6), (7,), (5, 3, 2, 2), ()]


def grads_for(step, shapes):
    gen = torch.Generator().manual_seed(700 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def make_params(shapes, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def np_sinkgd(g, L):
    g = np.array(g, dtype=np.float64)
    if g.ndim < 2:
        return g / np.sqrt(np.mean(g**2))
    G = g.reshape(g.shape[0], -1)
    m, n = G.shape
    for _ in range(L):
        G = math.sqrt(n) * G / np.linalg.norm(G, axis=1, keepdims=True)
        G = math.sqrt(m) * G / np.linalg.norm(G, axis=0, keepdims=True)
    return G.reshape(g.shape)


def np_sinkhorn_tanh(g, tau, n_iter):
    g = np.array(g, dtype=np.float64)
    if g.ndim == 0:
        for _ in range(n_iter):
            g = np.tanh(g / tau)
        return g
    x = g.reshape(g.shape[0], -1) if g.ndim >= 2 else g
    rms0 = np.sqrt(np.mean(x**2))
    for _ in range(n_iter):
        if x.ndim == 2:
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.linalg.norm(x, axis=0, keepdims=True)
        else:
            x = x / np.abs(x).sum()
        x = np.tanh(x / tau)
    x = x * rms0 / np.sqrt(np.mean(x**2))
    return x.reshape(g.shape)


@pytest.mark.parametrize("L", [1, 5])
def test_sinkgd_matches_numpy_reference_over_steps(L):
    params = make_params(SHAPES)
    ref = [p.detach().numpy().copy() for p in params]
    opt = SinkGD(params, lr=0.01, sinkhorn_iterations=L, weight_decay=0.2)
    for t in range(5):
        for i, (p, g) in enumerate(zip(params, grads_for(t, SHAPES))):
            p.grad = g
            ref[i] = ref[i] * (1 - 0.01 * 0.2) - 0.01 * np_sinkgd(g.numpy(), L)
        opt.step()
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=0, atol=1e-12)


def test_sinkgd_rows_and_columns_reach_unit_rms_norms_and_converge_with_L():
    gen = torch.Generator().manual_seed(0)
    # heavy row/column imbalance so a single pass is visibly off
    G = torch.randn(24, 10, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, 24, dtype=torch.float64)[:, None]
    m, n = G.shape
    errors = []
    for L in (1, 2, 5, 20, 100):
        out = sinkgd_update(G, L)
        cols = out.norm(dim=0)
        torch.testing.assert_close(cols, torch.full_like(cols, math.sqrt(m)))  # columns exact after the last step
        torch.testing.assert_close(out.norm(), torch.tensor(math.sqrt(m * n), dtype=torch.float64))
        errors.append((out.norm(dim=1) - math.sqrt(n)).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-8


def test_sinkgd_and_sinkhorn_tanh_keep_no_state():
    for cls in (SinkGD, SinkhornTanh):
        params = make_params(SHAPES, torch.float32)
        opt = cls(params)
        peak = 0
        for t in range(3):
            for p, g in zip(params, grads_for(t, SHAPES)):
                p.grad = g.float()
            opt.step()
            peak = max(peak, optimizer_state_bytes(opt))
        assert peak == 0
        assert opt.state_dict()["state"] == {}
    model_params = make_params([(6, 4)], torch.float32)
    mod = ModularOptimizer([{"params": model_params, "algorithm": "sinkgd"}])
    model_params[0].grad = torch.ones(6, 4)
    mod.step()
    # ModularOptimizer may keep empty per-parameter dicts, never a tensor
    assert all(not s for s in mod.state_dict()["state"].values()) and optimizer_state_bytes(mod) == 0


@pytest.mark.parametrize("tau, n_iter", [(0.1, 5), (0.05, 10), (0.2, 3)])  # S1, S2, S3 of the ablation
def test_sinkhorn_tanh_matches_numpy_reference_over_steps(tau, n_iter):
    params = make_params(SHAPES)
    ref = [p.detach().numpy().copy() for p in params]
    lr, wd = 3e-3, 0.1
    opt = SinkhornTanh(params, lr=lr, weight_decay=wd, tau=tau, n_iter=n_iter)
    for t in range(4):
        for i, (p, g) in enumerate(zip(params, grads_for(t, SHAPES))):
            p.grad = g
            ref[i] = ref[i] - wd * lr * ref[i]
            ref[i] = ref[i] - lr * np_sinkhorn_tanh(g.numpy(), tau, n_iter)
        opt.step()
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=0, atol=1e-12)


def test_sinkhorn_tanh_defaults_are_the_ablation_notes():
    opt = SinkhornTanh([torch.zeros(2, 2, requires_grad=True)])
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["tau"], g["n_iter"], g["eps"]) == (3e-4, 0.1, 0.1, 5, 1e-8)


def test_sinkhorn_tanh_restores_the_gradient_rms_and_handles_zero():
    G = torch.randn(12, 7) * 3.0
    out = sinkhorn_tanh_update(G, 0.1, 5)
    torch.testing.assert_close(out.square().mean().sqrt(), G.square().mean().sqrt())
    for shape in [(5, 4), (6,), ()]:
        for fn in (lambda z: sinkhorn_tanh_update(z, 0.1, 5), lambda z: sinkgd_update(z, 5)):
            out = fn(torch.zeros(shape))
            assert torch.isfinite(out).all() and (out == 0).all()


def test_sinkgd_is_scale_invariant_even_at_fp32_extremes():
    G = torch.randn(8, 5)
    base = sinkgd_update(G, 5)
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(sinkgd_update(G * scale, 5), base, rtol=1e-5, atol=1e-5)
    t_base = sinkhorn_tanh_update(G, 0.1, 5)
    big = sinkhorn_tanh_update(G * 1e30, 0.1, 5)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big / 1e30, t_base, rtol=1e-5, atol=1e-6)


def test_sinkgd_on_bf16_weights_runs_in_fp32_and_casts_back():
    p = torch.randn(8, 6, dtype=torch.bfloat16, requires_grad=True)
    start = p.detach().float().clone()
    g = torch.randn(8, 6)
    p.grad = g.bfloat16()
    SinkGD([p], lr=0.01).step()
    expected = (start - 0.01 * torch.from_numpy(np_sinkgd(g.bfloat16().float().numpy(), 5)).float()).bfloat16()
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)


def np_sinkgd_eps(g, L, eps):
    """Float64 SinkGD with the norm floor on the power-of-two prescaled matrix (the rule's definition)."""
    G = np.array(g, dtype=np.float64)
    G = G.reshape(G.shape[0], -1)
    amax = np.abs(G).max()
    G = G * (2.0 ** -np.frexp(amax)[1] if amax > 0 else 1.0)
    m, n = G.shape
    for _ in range(L):
        G = math.sqrt(n) * G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), eps)
        G = math.sqrt(m) * G / np.maximum(np.linalg.norm(G, axis=0, keepdims=True), eps)
    return G.reshape(np.shape(g))


def edge_matrices():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(12, 9, generator=gen)
    zero_rows_cols = base.clone()
    zero_rows_cols[3] = 0
    zero_rows_cols[:, [0, 5]] = 0
    imbalanced = torch.randn(20, 16, generator=gen) * torch.logspace(-12, 0, 20)[:, None]
    return {
        "plain": base,
        "zero rows and columns": zero_rows_cols,
        "huge": base * 1e30,
        "tiny": base * 1e-30,
        "tiny with zero rows and columns": zero_rows_cols * 1e-30,
        "rows spanning 1e-12": imbalanced,
        "conv kernel": torch.randn(6, 3, 2, 2, generator=gen),
        "zero": torch.zeros(5, 7),
    }


@pytest.mark.parametrize("name", list(edge_matrices()))
def test_sinkgd_group_step_matches_float64_reference_on_edge_matrices(name):
    # the group step runs Sinkhorn on scale vectors (matvecs over the squared gradient); its
    # fp32 result must match the float64 alternating normalization to fp32 accuracy
    g = edge_matrices()[name]
    p = torch.zeros(g.shape, requires_grad=True)
    p.grad = g.clone()
    SinkGD([p], lr=1.0, sinkhorn_iterations=5).step()
    expected = -np_sinkgd_eps(g.double().numpy(), 5, 1e-8)
    assert torch.isfinite(p).all()
    np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(expected).max()))
    if name == "zero rows and columns" or name.startswith("tiny with"):
        assert (p.detach()[3] == 0).all() and (p.detach()[:, [0, 5]] == 0).all()


def test_sinkgd_group_step_mixed_shapes_dtypes_and_weight_decay():
    gen = torch.Generator().manual_seed(9)
    shapes = [(8, 5), (8, 5), (5, 8), (4, 3, 3), (7,), ()]
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    params.append(torch.randn(6, 4, generator=gen).bfloat16().requires_grad_())
    start = [p.detach().double().clone() for p in params]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    lr, wd = 0.02, 0.5
    SinkGD(params, lr=lr, sinkhorn_iterations=3, weight_decay=wd).step()
    for p, s, g in zip(params, start, grads):
        expected = s * (1 - lr * wd) - lr * torch.from_numpy(np.asarray(np_sinkgd(g.double().numpy(), 3)))
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p.detach().double(), expected.to(p.dtype).double(), rtol=tol, atol=tol)


def test_sinkgd_matvecs_ignore_a_reduced_float32_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        g = torch.randn(16, 12)
        p = torch.zeros(16, 12, requires_grad=True)
        p.grad = g
        SinkGD([p], lr=1.0).step()
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the step
        np.testing.assert_allclose(p.detach().numpy(), -np_sinkgd(g.double().numpy(), 5), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_float32_matmul_precision(previous)
