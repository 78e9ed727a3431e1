"""SinkGD (paper) and Sinkhorn-tanh SinkGD against numpy references; stateless; edge shapes."""

import math

import numpy as np
import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, SinkGD, SinkhornTanh, optimizer_state_bytes
from lightning_optlab.optim.functional import sinkgd_update, sinkhorn_tanh_update

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
