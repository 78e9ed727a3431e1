"""Muon: against torch.optim.Muon, a float64 reference written from the formulas, batching."""

import math

import numpy as np
import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, Muon
from lightning_optlab.optim.newton_schulz import orthogonalize
from lightning_optlab.optim.newton_schulz import newton_schulz

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES = [(9, 4), (4, 9), (6, 6), (9, 4), (5, 3, 2, 2)]  # tall, wide, square, repeat, conv


def grads_for(step, shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(500 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def ref_newton_schulz(G, steps):
    """Quintic NS in float64 numpy: X <- a X + (b A + c A^2) X, A = X X^T, from the wide side."""
    X = np.array(G, dtype=np.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(np.linalg.norm(X), 1e-7)
    for _ in range(steps):
        Am = X @ X.T
        X = A * X + (B * Am + C * Am @ Am) @ X
    return X.T if tall else X


def ref_muon(params, grads_per_step, lr, momentum, nesterov, wd, ns_steps, adjust):
    ps = [p.detach().double().numpy().copy() for p in params]
    bufs = [np.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double().numpy()
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            d = (1 - momentum) * g + momentum * bufs[i] if nesterov else bufs[i]
            rows = d.shape[0]
            cols = d.size // rows
            O = ref_newton_schulz(d.reshape(rows, cols), ns_steps).reshape(d.shape)
            scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
            ps[i] = ps[i] * (1 - lr * wd) - lr * scale * O
    return ps


@pytest.mark.parametrize("ns_steps", [5, 3])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_float64_reference(ns_steps, adjust, nesterov):
    params = make_params(SHAPES, torch.float64)
    ref_start = [p.detach().clone() for p in params]
    hp = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, ns_steps=ns_steps, adjust_lr_fn=adjust)
    opt = Muon(params, ns_dtype="float64", **hp)
    steps = [grads_for(t, SHAPES, torch.float64) for t in range(6)]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    expected = ref_muon(ref_start, steps, 0.05, 0.9, nesterov, 0.1, ns_steps, adjust)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=0, atol=1e-10)


def test_muon_in_bf16_tracks_the_float64_reference_like_torch_optim_muon():
    """bf16 Newton-Schulz is an approximation; ours folds ``a X`` into the small product (one
    matmul without an epilogue read, see quintic_iterations), torch.optim.Muon keeps it in the
    epilogue. Both must stay within a few percent of the float64 iteration over 8 steps, and
    the float32 momentum buffers must agree exactly."""
    shapes = [(12, 5), (5, 12), (8, 8), (12, 5), (64, 256)]
    hp = dict(lr=0.03, momentum=0.95, nesterov=True, weight_decay=0.05, ns_steps=5, eps=1e-7)
    for adjust in ("original", "match_rms_adamw"):
        ours, ref = make_params(shapes), make_params(shapes)
        opt = Muon(ours, ns_dtype="bfloat16", adjust_lr_fn=adjust, ns_coefficients=(A, B, C), **hp)
        ref_opt = torch.optim.Muon(ref, adjust_lr_fn=adjust, ns_coefficients=(A, B, C), **hp)
        start = [p.detach().clone() for p in ours]
        steps = [grads_for(t, shapes) for t in range(8)]
        for grads in steps:
            for p, q, g in zip(ours, ref, grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        exact = ref_muon(start, steps, hp["lr"], hp["momentum"], True, hp["weight_decay"], 5, adjust)
        for p, q, e, s in zip(ours, ref, exact, start):
            e = torch.from_numpy(e)
            moved = (e - s.double()).norm()
            ours_err = float((p.detach().double() - e).norm() / moved)
            torch_err = float((q.detach().double() - e).norm() / moved)
            assert torch_err < 0.02, torch_err  # bf16 rounding of torch's own iteration
            assert ours_err < 0.05, (tuple(p.shape), ours_err, torch_err)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=0, atol=1e-6
            )


def test_batched_orthogonalization_equals_per_matrix():
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(s, generator=gen) for s in [(16, 6), (6, 16), (16, 6), (16, 6), (6, 16), (7, 7)]]
    batched = orthogonalize(mats, steps=5, dtype=torch.float32)
    for m, o in zip(mats, batched):
        single = newton_schulz(m, steps=5, dtype=torch.float32)
        torch.testing.assert_close(o, single, rtol=0, atol=2e-5)


def test_same_shaped_matrices_go_through_one_stacked_call(monkeypatch):
    import lightning_optlab.optim.muon as muon_module

    calls = []
    real = muon_module.newton_schulz_

    def spy(X, **kw):
        calls.append(tuple(X.shape))
        return real(X, **kw)

    monkeypatch.setattr(muon_module, "newton_schulz_", spy)
    params = make_params([(8, 4), (8, 4), (8, 4), (4, 8), (3, 2, 2, 2)])
    opt = Muon(params)
    for p, g in zip(params, grads_for(0, [tuple(p.shape) for p in params])):
        p.grad = g
    opt.step()
    assert sorted(calls) == sorted([(3, 8, 4), (1, 4, 8), (1, 3, 8)])


def test_group_step_equals_one_group_per_matrix():
    shapes = [(10, 4), (10, 4), (10, 4), (4, 10)]
    together, apart = make_params(shapes), make_params(shapes)
    opt1 = Muon(together, ns_dtype="float32")
    opt2 = Muon([{"params": [p]} for p in apart], ns_dtype="float32")
    for t in range(4):
        for p, q, g in zip(together, apart, grads_for(t, shapes)):
            p.grad, q.grad = g.clone(), g.clone()
        opt1.step()
        opt2.step()
    for p, q in zip(together, apart):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_muon_update_is_nearly_orthogonal_and_scaled_by_shape():
    p = torch.zeros(32, 8, requires_grad=True)
    p.grad = torch.randn(32, 8)
    Muon([p], lr=1.0, momentum=0.0, nesterov=False, ns_dtype="float32").step()
    update = -p.detach() / math.sqrt(32 / 8)
    sv = torch.linalg.svdvals(update)
    assert 0.6 < sv.min() and sv.max() < 1.25  # the quintic's band around 1
    q = torch.zeros(8, 32, requires_grad=True)
    q.grad = torch.randn(8, 32)
    Muon([q], lr=1.0, momentum=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw").step()
    rms = q.detach().square().mean().sqrt().item()
    # 0.2 * sqrt(max) makes the update RMS ~0.2 (AdamW's typical RMS) whatever the shape
    assert 0.12 < rms < 0.25


def test_muon_refuses_vectors_and_scalars_with_a_routing_hint():
    bias = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match=r"'fc.bias'.*Route 0-/1-D"):
        Muon([("fc.weight", torch.zeros(5, 3, requires_grad=True)), ("fc.bias", bias)])
    with pytest.raises(ValueError, match=r"muon.*at least 2 dimensions.*Route 0-/1-D"):
        ModularOptimizer([{"params": [bias], "algorithm": "muon", "param_names": ["fc.bias"]}])


def test_muon_on_bf16_weights_updates_in_fp32_and_keeps_dtype():
    p = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    ref = p.detach().float().clone().requires_grad_()
    opt, ref_opt = Muon([p], ns_dtype="float32"), Muon([ref], ns_dtype="float32")
    for t in range(3):
        g = torch.randn(16, 8)
        p.grad, ref.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        ref_opt.step()
        ref.data.copy_(ref.data.bfloat16().float())  # the bf16 weight is the fp32 result rounded once
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    torch.testing.assert_close(p.float(), ref.detach(), rtol=0, atol=0.02)
