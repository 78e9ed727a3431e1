"""The contract every registered update rule keeps, as plain functions of the rule's name.

``tests/test_rule_contracts.py`` runs them over ``available_rules()``; a rule defined in one
file outside the package runs the same checks (``tests/test_one_file_rule.py``). Each rule's
``example`` hyperparameters make every code path run within the few steps used here.
"""

from __future__ import annotations

import io

import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, get_rule, standalone_optimizer

MATRIX_SHAPES = [(9, 4), (4, 9), (6, 6), (9, 4), (5, 3, 2, 2)]
ALL_SHAPES = MATRIX_SHAPES + [(7,), ()]


def shapes_for(name):
    return MATRIX_SHAPES if get_rule(name).min_ndim >= 2 else ALL_SHAPES


def make_params(shapes, dtype=torch.float32, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(40 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def make_optimizer(name, params, modular, names=None):
    hp = dict(get_rule(name).example)
    if modular:
        group = {"params": params, "algorithm": name, **hp}
        if names is not None:
            group.update(param_names=names, name="hidden")
        return ModularOptimizer([group])
    cls = standalone_optimizer(name)
    return cls(list(zip(names, params)) if names is not None else params, **hp)


def snapshot_state(opt):
    return {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
            for k, v in opt.state.items()}


def assert_state_equal(opt, before):
    assert set(opt.state) <= set(before) or all(not v for k, v in opt.state.items() if k not in before)
    for k, v in opt.state.items():
        for kk, vv in v.items():
            if torch.is_tensor(vv):
                assert torch.equal(vv, before[k][kk]), kk
            else:
                assert vv == before[k][kk], kk


def check_resume_bitwise(name, modular, dtype):
    """4 steps, save, 5 more == load the save into a fresh optimizer and run the same 5."""
    shapes = shapes_for(name)
    params = make_params(shapes, dtype)
    opt = make_optimizer(name, params, modular)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    for t in range(4, 9):  # crosses a SPAM reset; SPARKLES kicks every step (huge threshold)
        set_grads(params, t)
        opt.step()

    resumed = make_params(shapes, dtype)
    opt2 = make_optimizer(name, resumed, modular)
    buf.seek(0)
    saved = torch.load(buf)
    for p, s in zip(resumed, saved["params"]):
        p.data.copy_(s)
    opt2.load_state_dict(saved["opt"])
    for t in range(4, 9):
        set_grads(resumed, t)
        opt2.step()
    for p, q in zip(params, resumed):
        assert p.dtype == dtype and q.dtype == dtype
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def check_finite_updates(name, scale):
    """Three steps with every gradient scaled by ``scale`` leave every weight finite; returns
    the starting weights and the parameters."""
    params = make_params(shapes_for(name))
    opt = make_optimizer(name, params, modular=True)
    start = [p.detach().clone() for p in params]
    for t in range(3):
        set_grads(params, t)
        for p in params:
            p.grad.mul_(scale)
        opt.step()
        for p in params:
            assert torch.isfinite(p).all(), f"{name}: non-finite weight after a gradient scaled by {scale}"
    return start, params


def check_nan_refusal(name, modular, bad):
    """A NaN/Inf in one gradient raises naming the parameter; no weight and no state changes."""
    params = make_params(shapes_for(name))
    names = [f"layer{i}.weight" for i in range(len(params))]
    opt = make_optimizer(name, params, modular, names=names)
    set_grads(params, 0)
    opt.step()
    before, state_before = [p.detach().clone() for p in params], snapshot_state(opt)
    set_grads(params, 1)
    params[2].grad.view(-1)[3] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient.*'layer2\.weight'"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert_state_equal(opt, state_before)


def check_missing_grads_and_zero_grad(name, modular):
    """A parameter without a gradient is not touched (weight and state), the others step as
    they would alone; after ``zero_grad()`` a step changes nothing."""
    params = make_params(shapes_for(name))
    alone = make_params(shapes_for(name))
    opt, ref = make_optimizer(name, params, modular), make_optimizer(name, [alone[0], *alone[2:]], modular)
    skipped = params[1].detach().clone()
    for t in range(3):
        set_grads(params, t)
        params[1].grad = None
        set_grads(alone, t)
        opt.step()
        ref.step()
    assert torch.equal(params[1].detach(), skipped) and not opt.state.get(params[1])
    for p, q in zip([params[0], *params[2:]], [alone[0], *alone[2:]]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before, state_before = [p.detach().clone() for p in params], snapshot_state(opt)
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert_state_equal(opt, state_before)


def check_add_param_group(name, modular):
    """A group added after the first steps trains with the rule, and the two-group optimizer
    resumes bitwise."""
    shapes = shapes_for(name)
    first, second = make_params(shapes), make_params(shapes, seed=5)
    opt = make_optimizer(name, first, modular)
    set_grads(first, 0)
    opt.step()
    # a ModularOptimizer mixes rules, so a new group names its own; a standalone class has one
    extra = {"algorithm": name} if modular else {}
    opt.add_param_group({"params": second, "lr": get_rule(name).example.get("lr", 0.01) / 2, **extra})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["algorithm"] == get_rule(name).name
    start = [p.detach().clone() for p in second]
    for t in range(1, 3):
        set_grads(first, t)
        set_grads(second, t + 10)
        opt.step()
    assert any(not torch.equal(p.detach(), s) for p, s in zip(second, start))
    buf = io.BytesIO()  # through bytes, as a checkpoint: load_state_dict would share tensors
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    restored_first = [p.detach().clone().requires_grad_() for p in first]
    restored_second = [p.detach().clone().requires_grad_() for p in second]
    opt2 = make_optimizer(name, restored_first, modular)
    opt2.add_param_group({"params": restored_second, "lr": opt.param_groups[1]["lr"], **extra})
    opt2.load_state_dict(state)
    for t in range(3, 5):
        for ps, qs, off in ((first, restored_first, 0), (second, restored_second, 10)):
            set_grads(ps, t + off)
            set_grads(qs, t + off)
        opt.step()
        opt2.step()
    for p, q in zip(first + second, restored_first + restored_second):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
