"""AdamW-SPAM and SPARKLES against float64 references from their formulas; randomness; bf16."""

import io
import math

import numpy as np
import pytest
import torch

from lightning_optlab.optim import AdamWSPAM, ModularOptimizer, SPARKLES
from lightning_optlab.optim.steps import mix_seed, stochastic_round_to_bf16

SHAPES = [(9, 4), (4, 9), (6, 6), (7,), (5, 3, 2, 2)]


def grads_for(step, shapes, spike=False):
    gen = torch.Generator().manual_seed(900 + step)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if spike:  # a few entries 1000x larger: SPAM's spikes
        for g in grads:
            g.view(-1)[:2] *= 1000.0
    return grads


def make_params(shapes, dtype=torch.float64):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


# ----------------------------------------------------------------------------------- SPAM


def np_spam(p0, grads_per_step, lr, b1, b2, eps, wd, theta, interval, warmup, delay):
    p = [x.copy() for x in p0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    k, resets, clipped = 0, 0, 0
    for t, grads in enumerate(grads_per_step, start=1):
        if interval and t > 1 and (t - 1) % interval == 0:
            m = [np.zeros_like(x) for x in p]
            v = [np.zeros_like(x) for x in p]
            k, resets = 0, resets + 1
        k += 1
        scale = 1.0
        if resets and k <= warmup:
            scale = 0.5 * (1 - math.cos(math.pi * k / (warmup + 1)))
        for i, g in enumerate(grads):
            g = g.copy()
            if theta and k > delay:
                spike = g**2 > theta * v[i]
                clipped += int(spike.sum())
                g[spike] = np.sign(g[spike]) * np.sqrt(theta * v[i][spike])
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g**2
            mhat, vhat = m[i] / (1 - b1**k), v[i] / (1 - b2**k)
            p[i] = p[i] * (1 - lr * scale * wd) - lr * scale * mhat / (np.sqrt(vhat) + eps)
    return p, clipped


def test_adamw_spam_matches_reference_through_spikes_resets_and_warmup():
    params = make_params(SHAPES)
    start = [p.detach().numpy().copy() for p in params]
    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, spike_threshold=50.0,
              reset_interval=5, warmup_steps=3, spike_clip_delay=2)
    opt = AdamWSPAM(params, **hp)
    steps = [[g.numpy() for g in grads_for(t, SHAPES, spike=t in (3, 8, 12))] for t in range(14)]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    expected, clipped = np_spam(start, steps, 1e-2, 0.8, 0.95, 1e-8, 0.1, 50.0, 5, 3, 2)
    assert clipped > 0  # the run really exercised the clipping
    assert opt.state[params[0]]["resets"] == 2
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=0, atol=1e-12)


def test_adamw_spam_without_resets_and_clipping_is_torch_adamw():
    ours, ref = make_params(SHAPES, torch.float32), make_params(SHAPES, torch.float32)
    opt = AdamWSPAM(ours, lr=3e-3, weight_decay=0.05, spike_threshold=0, reset_interval=0)
    ref_opt = torch.optim.AdamW(ref, lr=3e-3, weight_decay=0.05)
    for t in range(10):
        for p, q, g in zip(ours, ref, grads_for(t, SHAPES)):
            p.grad, q.grad = g.float(), g.float()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_adamw_spam_defaults():
    g = AdamWSPAM([torch.zeros(2, requires_grad=True)]).param_groups[0]
    assert (g["spike_threshold"], g["reset_interval"], g["warmup_steps"]) == (5000.0, 500, 150)


# ----------------------------------------------------------------------------------- SPARKLES


def np_sparkles(p0, grads_per_step, lr, b1, b2, eps, wd, alpha_c, alpha_n, channels, gamma, clip, clip_exp, decouple):
    p = [x.copy() for x in p0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.copy()
            axes = tuple(range(1, g.ndim))
            if g.size > 1:
                g = g - alpha_c * (g.mean(axis=axes, keepdims=True) if g.ndim >= 2 else g.mean())
            if g.ndim >= 2 and channels and all(g.shape[d] > 1 for d in axes):
                s = g.std(axis=axes, keepdims=True, ddof=1)
            elif g.size > 2:
                s = g.std(ddof=1)
            else:
                s = None
            if s is not None:
                g = (1 - alpha_n) * g + alpha_n * g / (s + eps)
            m[i] = b1 * m[i] + (1 - b1) * g
            g = g + gamma * m[i]
            v[i] = b2 * v[i] + (1 - b2) * g**2
            eta = lr / (1 - b1**t)
            if wd and not decouple:
                g = g + wd * p[i]
            d = g / (np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps)
            if clip:
                d = np.clip(d, -(t**clip_exp), t**clip_exp)
            if decouple:
                p[i] = p[i] * (1 - eta * wd)
            p[i] = p[i] - eta * d
    return p


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the README defaults
        dict(weight_decay=0.1, decouple_weight_decay=True, normalize_channels=False),
        dict(weight_decay=0.05, clip_gradients=True, clip_exponent=0.25, centralization=1.0, normalization=0.0),
    ],
)
def test_sparkles_matches_reference(options):
    params = make_params(SHAPES + [(2,), ()])
    shapes = [tuple(p.shape) for p in params]
    start = [p.detach().numpy().copy() for p in params]
    hp = dict(lr=1e-2, stochastic_threshold=0.0, **options)
    opt = SPARKLES(params, **hp)
    g = opt.param_groups[0]
    steps = [[x.numpy() for x in grads_for(t, shapes)] for t in range(6)]
    for grads in steps:
        for p, x in zip(params, grads):
            p.grad = torch.from_numpy(x.copy())
        opt.step()
    expected = np_sparkles(
        start, steps, 1e-2, *g["betas"], g["eps"], g["weight_decay"], g["centralization"], g["normalization"],
        g["normalize_channels"], g["amp_fac"], g["clip_gradients"], g["clip_exponent"], g["decouple_weight_decay"],
    )
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=0, atol=1e-12)


def test_sparkles_defaults_are_the_readme_table():
    g = SPARKLES([torch.zeros(2, requires_grad=True)]).param_groups[0]
    assert g["lr"] == 1e-3 and tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-8
    assert (g["centralization"], g["normalization"], g["amp_fac"], g["stochastic_threshold"]) == (0.5, 0.5, 2.0, 1e-6)
    assert g["normalize_channels"] and not g["clip_gradients"] and not g["decouple_weight_decay"]
    assert g["weight_decay"] == 0.0 and g["clip_exponent"] == 0.25


def _run_constant_gradient(seed, steps=4, threshold=1e-6, state=None):
    torch.manual_seed(123)  # the global RNG must not matter
    p = torch.linspace(-1, 1, 24, dtype=torch.float32).reshape(6, 4).requires_grad_()
    opt = SPARKLES([p], lr=1e-2, seed=seed, stochastic_threshold=threshold)
    g = torch.linspace(0.5, -0.3, 24).reshape(6, 4)
    for _ in range(steps):
        p.grad = g.clone()  # the gradient does not change: a stall from step 2 on
        opt.step()
    return p.detach().clone(), opt


def test_sparkles_kick_fires_on_stalls_and_is_seeded():
    with_kick, opt = _run_constant_gradient(seed=7)
    kicks = opt.state[opt.param_groups[0]["params"][0]]["kicks"]
    # a 0-d int64 device tensor: the stall decision stays on the device (no host sync per step)
    assert kicks.dtype == torch.int64 and kicks.ndim == 0 and int(kicks) == 3  # steps 2, 3, 4
    again, _ = _run_constant_gradient(seed=7)
    other, _ = _run_constant_gradient(seed=8)
    without, _ = _run_constant_gradient(seed=7, threshold=0.0)
    torch.testing.assert_close(with_kick, again, rtol=0, atol=0)
    assert not torch.equal(with_kick, other)
    # the kick is N(0, eta_t^2) per coordinate per stalled step, eta_t = lr / (1 - 0.9^t), t = 2, 3, 4
    expected_std = math.sqrt(sum((1e-2 / (1 - 0.9**t)) ** 2 for t in (2, 3, 4)))
    diff = (with_kick - without).flatten()
    assert 0.5 * expected_std < diff.std().item() < 1.5 * expected_std


def test_sparkles_kick_is_unbiased():
    finals = torch.stack([_run_constant_gradient(seed=s, steps=2)[0] for s in range(200)])
    without, _ = _run_constant_gradient(seed=0, steps=2, threshold=0.0)
    # one kick of std eta = lr / (1 - 0.9^2) ~ 0.053 per coordinate; mean over 200 seeds ~ 0.0037 std
    assert (finals.mean(0) - without).abs().max().item() < 0.02
    assert finals.std(0).mean().item() > 0.03


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((20000,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    gen = torch.Generator().manual_seed(0)
    r = stochastic_round_to_bf16(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - (1.0 + 2**-9)) < 2e-4
    assert abs((r > 1).float().mean().item() - 0.25) < 0.02
    y = torch.tensor([-3.0, 0.0, 1.5, -0.0])  # exactly representable: unchanged
    assert torch.equal(stochastic_round_to_bf16(y, gen).float(), y)


def test_stochastic_rounding_lets_tiny_bf16_updates_accumulate():
    def run(rounding):
        p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
        opt = SPARKLES([p], lr=1e-4, centralization=0.0, normalization=0.0, amp_fac=0.0,
                       stochastic_threshold=0.0, stochastic_rounding=rounding)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.float().mean().item()

    # each step moves ~1e-4 (adaptive step of a constant gradient), under half a bf16 ulp at 1.0 (2^-8)
    assert run(False) == 1.0
    assert run(True) < 1.0 - 50 * 1e-4 * 0.5


def test_sparkles_trains_a_full_bf16_model():
    torch.manual_seed(0)
    X = torch.randn(256, 10)
    y = (X[:, 0] + X[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).to(torch.bfloat16)
    opt = SPARKLES(model.parameters(), lr=3e-3)
    Xb = X.to(torch.bfloat16)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(Xb).float(), y)
        loss.backward()
        opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    acc = (model(Xb).argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_sparkles_randomness_survives_a_state_dict_round_trip_in_bf16():
    def fresh():
        p = torch.linspace(-1, 1, 24).reshape(6, 4).to(torch.bfloat16).requires_grad_()
        return p, ModularOptimizer([{"params": [p], "algorithm": "sparkles", "lr": 1e-2, "seed": 3}])

    g = torch.linspace(0.5, -0.3, 24).reshape(6, 4).to(torch.bfloat16)
    p, opt = fresh()
    for t in range(6):
        p.grad = g.clone()  # constant: kicks from step 2, and bf16 stochastic rounding every step
        opt.step()
        if t == 2:
            buf = io.BytesIO()
            torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, buf)
    q, opt2 = fresh()
    buf.seek(0)
    saved = torch.load(buf)
    q.data.copy_(saved["p"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(3):
        q.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert opt2.state[q]["kicks"].dtype == torch.int64  # load_state_dict cast it to bf16; the step undoes that
    assert int(opt2.state[q]["kicks"]) == int(opt.state[p]["kicks"]) == 5


# ------------------------------------------------------------ SPARKLES, batched (issue 8)


def ref_sparkles_kicks(p0, schedule, lr, b1, b2, eps, alpha_c, alpha_n, gamma, threshold, seed):
    """float64 SPARKLES with stalls and kicks, one parameter at a time; ``schedule[k][i]`` is the
    gradient of parameter i at call k, or None (no gradient: the parameter does not step).

    The kick noise follows the documented streams: one N(0, 1) fp32 draw per call, seeded by
    ``mix_seed(seed, slot, t)`` of the first stepping parameter, laid out bucket after bucket
    (same-shaped parameters with the same normalization case, in order of first appearance).
    """
    n = len(p0)
    p = [x.clone() for x in p0]
    m = [torch.zeros_like(x) for x in p0]
    v = [torch.zeros_like(x) for x in p0]
    prev = [torch.zeros_like(x) for x in p0]
    steps, kicks = [0] * n, [0] * n

    def bucket_key(x):
        kind = "matrix" if x.ndim >= 2 else ("vector" if x.ndim == 1 else "scalar")
        work = (x.shape[0], x[0].numel()) if x.ndim >= 2 else (max(x.numel(), 1),)
        if x.ndim >= 2 and all(d > 1 for d in x.shape[1:]):
            mode = "channel"
        else:
            mode = "global" if x.numel() > 2 else None
        return kind, work, mode, x.numel() > 1

    for grads in schedule:
        stepping = [i for i in range(n) if grads[i] is not None]
        first = stepping[0]
        buckets = {}
        for i in stepping:
            buckets.setdefault(bucket_key(grads[i]), []).append(i)
        xi, offset = {}, 0
        if threshold > 0 and any(steps[i] >= 1 for i in stepping):
            gen = torch.Generator().manual_seed(mix_seed(seed, first, steps[first] + 1))
            total = sum(grads[i].numel() for i in stepping)
            noise = torch.randn(total, generator=gen, dtype=torch.float32).double()
            for idx in buckets.values():
                for i in idx:
                    xi[i] = noise[offset : offset + grads[i].numel()].reshape(grads[i].shape)
                    offset += grads[i].numel()
        for i in stepping:
            t = steps[i] = steps[i] + 1
            g = grads[i].clone()
            stalled = t >= 2 and threshold > 0 and float((g - prev[i]).norm()) < threshold
            prev[i] = grads[i].clone()
            dims = tuple(range(1, g.ndim))
            if g.numel() > 1:
                g = g - alpha_c * (g.mean(dim=dims, keepdim=True) if g.ndim >= 2 else g.mean())
            mode = bucket_key(g)[2]
            if mode is not None:
                s = g.std(dim=dims, keepdim=True) if mode == "channel" else g.std()
                g = (1 - alpha_n) * g + alpha_n * g / (s + eps)
            m[i] = b1 * m[i] + (1 - b1) * g
            g = g + gamma * m[i]
            v[i] = b2 * v[i] + (1 - b2) * g**2
            d = g / (v[i].sqrt() / math.sqrt(1 - b2**t) + eps)
            if stalled:
                d = d + xi[i]
                kicks[i] += 1
            p[i] = p[i] - lr / (1 - b1**t) * d
    return p, kicks


# 1-D, 2-D tall and wide (two of the same shape: one stack), 4-D conv (channel-wise std), a conv
# with a size-1 dim (global std: its own bucket), a 1-element vector and a scalar
MIXED_SHAPES = [(9, 4), (4, 9), (7,), (9, 4), (5, 3, 2, 2), (5, 1, 2, 2), (1,), ()]


def mixed_schedule(shapes, calls=6):
    """Gradients with stalls on some parameters only, and one parameter skipping a call."""
    schedule, last = [], [None] * len(shapes)
    for k in range(calls):
        fresh = grads_for(k, shapes)
        grads = []
        for i, g in enumerate(fresh):
            repeat = (i == 1 and k in (2, 3, 4)) or (i == 4 and k == 3) or (i == 7 and k == 1) or (i == 2 and k == 5)
            grads.append(last[i].clone() if repeat else g)
        grads[0] = None if k == 3 else (last[0].clone() if k == 4 else grads[0])  # skips, then repeats
        for i, g in enumerate(grads):
            if g is not None:
                last[i] = g
        schedule.append(grads)
    return schedule


@pytest.mark.parametrize("modular", [False, True], ids=["standalone", "modular"])
def test_sparkles_batched_step_matches_per_parameter_reference_with_kicks(modular):
    params = make_params(MIXED_SHAPES)
    start = [p.detach().clone() for p in params]
    hp = dict(lr=1e-2, stochastic_threshold=1e-6, seed=11)
    opt = ModularOptimizer([{"params": params, "algorithm": "sparkles", **hp}]) if modular else SPARKLES(params, **hp)
    schedule = mixed_schedule(MIXED_SHAPES)
    for grads in schedule:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    expected, kicks = ref_sparkles_kicks(start, schedule, 1e-2, 0.9, 0.999, 1e-8, 0.5, 0.5, 2.0, 1e-6, 11)
    assert kicks == [1, 3, 1, 0, 1, 0, 0, 1]  # the run kicked some parameters and not others
    assert [int(opt.state[p]["kicks"]) for p in params] == kicks
    assert [opt.state[p]["step"] for p in params] == [5, 6, 6, 6, 6, 6, 6, 6]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_sparkles_mixed_shapes_resume_equals_uninterrupted_run_with_kicks():
    def run(schedule, params, opt):
        for grads in schedule:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.dtype)
            opt.step()

    schedule = mixed_schedule(MIXED_SHAPES)
    params = make_params(MIXED_SHAPES, torch.bfloat16)
    opt = SPARKLES(params, lr=1e-2, seed=5)
    run(schedule[:3], params, opt)
    buf = io.BytesIO()
    torch.save({"p": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    run(schedule[3:], params, opt)
    resumed = make_params(MIXED_SHAPES, torch.bfloat16)
    opt2 = SPARKLES(resumed, lr=1e-2, seed=5)
    buf.seek(0)
    saved = torch.load(buf)
    for p, s in zip(resumed, saved["p"]):
        p.data.copy_(s)
    opt2.load_state_dict(saved["opt"])
    run(schedule[3:], resumed, opt2)
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert [int(opt2.state[q]["kicks"]) for q in resumed] == [int(opt.state[p]["kicks"]) for p in params]
    assert sum(int(opt.state[p]["kicks"]) for p in params) >= 5


def test_stochastic_rounding_is_the_bit_formula_with_the_same_draw():
    """Against numpy: add the 16 random low bits the generator draws, truncate; infinities and
    NaNs (including a NaN whose payload sits in the low bits alone) stay what they are."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=gen) * torch.logspace(-30, 30, 5000)
    x[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -0.0, 1.0])
    payload_nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, payload_nan])
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(9))
    bits = (x.numpy().view(np.uint32).astype(np.uint64) + noise.numpy().astype(np.uint64)) & 0xFFFF0000
    expected = torch.from_numpy((bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32)).to(torch.bfloat16)
    expected[x.isnan()] = float("nan")
    before = x.clone()
    got = stochastic_round_to_bf16(x, torch.Generator().manual_seed(9))
    assert got.dtype == torch.bfloat16 and got[-1].isnan() and got[0] == float("inf") and got[1] == -float("inf")
    assert torch.equal(got.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(got[ok], expected[ok])
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))  # the input is left alone
