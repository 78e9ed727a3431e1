"""ModularOptimizer against torch's own optimizers, state dicts, schedulers."""

import copy

import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, available_rules

SHAPES = [(7, 5), (5,), (3, 4, 2, 2), (1,)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float32).requires_grad_() for s in SHAPES]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(step, *param_lists):
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


TORCH_CASES = [
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("sgd", torch.optim.SGD, dict(lr=0.1)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
]


@pytest.mark.parametrize("algorithm, torch_cls, hp", TORCH_CASES)
def test_matches_torch_step_for_step(algorithm, torch_cls, hp):
    ours, ref = make_params(), make_params()
    opt = ModularOptimizer([{"params": ours, "algorithm": algorithm, **hp}])
    ref_opt = torch_cls(ref, **hp)
    for step in range(25):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_only_adamw_groups_match_torch_adamw_with_per_group_hyperparameters():
    ours, ref = make_params(), make_params()
    opt = ModularOptimizer([
        {"params": ours[:2], "algorithm": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        {"params": ours[2:], "algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]},
    ])
    ref_opt = torch.optim.AdamW([
        {"params": ref[:2], "lr": 3e-3, "weight_decay": 0.0},
        {"params": ref[2:], "lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95)},
    ])
    for step in range(30):
        set_grads(step, ours, ref)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mixed_rules_each_group_matches_its_torch_optimizer():
    ours, ref = make_params(), make_params()
    opt = ModularOptimizer([
        {"params": ours[:2], "algorithm": "sgd", "lr": 0.05, "momentum": 0.9},
        {"params": ours[2:], "algorithm": "adamw", "lr": 1e-2},
    ])
    ref_a = torch.optim.SGD(ref[:2], lr=0.05, momentum=0.9)
    ref_b = torch.optim.AdamW(ref[2:], lr=1e-2)
    for step in range(10):
        set_grads(step, ours, ref)
        opt.step()
        ref_a.step()
        ref_b.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["adamw", "adam", "sgd", "rmsprop"])
def test_state_dict_round_trip_continues_like_uninterrupted(algorithm):
    hp = {"momentum": 0.9} if algorithm in ("sgd", "rmsprop") else {}
    full, part = make_params(), make_params()
    opt_full = ModularOptimizer([{"params": full, "algorithm": algorithm, "lr": 1e-2, **hp}])
    opt_part = ModularOptimizer([{"params": part, "algorithm": algorithm, "lr": 1e-2, **hp}])
    for step in range(5):
        set_grads(step, full, part)
        opt_full.step()
        opt_part.step()
    saved = copy.deepcopy(opt_part.state_dict())
    resumed_params = clone(part)
    resumed = ModularOptimizer([{"params": resumed_params, "algorithm": algorithm, "lr": 1e-2, **hp}])
    resumed.load_state_dict(saved)
    for step in range(5, 10):
        set_grads(step, full, resumed_params)
        opt_full.step()
        resumed.step()
    for a, b in zip(full, resumed_params):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_policy():
    params = make_params()
    opt = ModularOptimizer([{"params": params, "algorithm": "adamw"}])
    set_grads(0, params)
    opt.step()
    other = ModularOptimizer([{"params": clone(params), "algorithm": "sgd", "momentum": 0.9}])
    with pytest.raises(ValueError, match="was 'adamw' in the checkpoint but is 'sgd' now"):
        other.load_state_dict(opt.state_dict())
    two = ModularOptimizer([
        {"params": clone(params)[:2], "algorithm": "adamw"},
        {"params": clone(params)[2:], "algorithm": "adamw"},
    ])
    with pytest.raises(ValueError, match="checkpoint has 1 param groups, this optimizer has 2"):
        two.load_state_dict(opt.state_dict())


def test_scheduler_and_metadata_keys_are_carried():
    params = make_params()
    opt = ModularOptimizer([
        {"params": params[:2], "algorithm": "sgd", "lr": 0.1, "name": "a", "role": "hidden", "constraint": None},
        {"params": params[2:], "algorithm": "adamw", "lr": 0.01, "name": "b"},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for step in range(3):
        set_grads(step, params)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 / 8, 0.01 / 8])
    assert opt.param_groups[0]["name"] == "a" and opt.param_groups[0]["role"] == "hidden"
    reloaded = ModularOptimizer([
        {"params": clone(params)[:2], "algorithm": "sgd", "lr": 0.1, "name": "a"},
        {"params": clone(params)[2:], "algorithm": "adamw", "lr": 0.01, "name": "b"},
    ])
    reloaded.load_state_dict(opt.state_dict())
    assert reloaded.param_groups[0]["initial_lr"] == pytest.approx(0.1)


def test_plain_parameters_with_a_default_algorithm():
    params = make_params()
    opt = ModularOptimizer(params, algorithm="sgd", lr=0.5)
    set_grads(0, params)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b - 0.5 * p.grad)


def test_construction_errors():
    params = make_params()
    with pytest.raises(ValueError, match="has no 'algorithm'"):
        ModularOptimizer([{"params": params}])
    with pytest.raises(ValueError, match="without `algorithm`"):
        ModularOptimizer(params, lr=0.1)
    with pytest.raises(ValueError, match=r"param group 0: unknown hyperparameter 'beta1'"):
        ModularOptimizer([{"params": params, "algorithm": "adamw", "beta1": 0.9}])
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        ModularOptimizer([{"params": params, "algorithm": "lion"}])
    assert {"sgd", "adam", "adamw", "rmsprop"} <= set(available_rules())


def test_closure_is_evaluated_with_grad():
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = ModularOptimizer([p], algorithm="sgd", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, -1.6]))


@pytest.mark.parametrize("algorithm", ["adamw", "adam", "sgd", "rmsprop"])
def test_non_finite_gradient_is_refused_and_changes_nothing(algorithm):
    params = make_params()
    opt = ModularOptimizer([{"params": params, "algorithm": algorithm, "name": "body",
                             "param_names": ["a", "b", "c", "d"]}])
    set_grads(0, params)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    set_grads(1, params)
    params[2].grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in param group 'body' for 'c' \(shape \[3, 4, 2, 2\], NaN\)"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert str(opt.state_dict()) == str(state_before)


def test_stateless_rules_leave_no_state_entries():
    params = [torch.randn(6, 4, requires_grad=True)]
    opt = ModularOptimizer([{"params": params, "algorithm": "sinkgd"}])
    set_grads(0, params)
    opt.step()
    assert opt.state_dict()["state"] == {}


def test_check_finite_off_skips_the_guard():
    params = make_params()
    opt = ModularOptimizer([{"params": params, "algorithm": "sgd", "lr": 0.1}], check_finite=False)
    set_grads(0, params)
    params[0].grad[0, 0] = float("nan")
    opt.step()  # no error: the guard is off, as documented
    assert torch.isnan(params[0][0, 0])


def test_load_state_dict_keeps_integer_state_integer():
    """torch casts loaded state to the parameter's dtype; a bf16 parameter would round an integer
    counter above 256 (sparkles' kick counter, 1001 -> 1000). ModularOptimizer keeps it exact."""
    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = ModularOptimizer([{"params": [p], "algorithm": "sparkles", "lr": 1e-3}])
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert opt.state[p]["kicks"].dtype == torch.int64
    opt.state[p]["kicks"].fill_(1001)
    assert torch.tensor(1001).to(torch.bfloat16).item() != 1001  # what torch's cast alone would do
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = ModularOptimizer([{"params": [q], "algorithm": "sparkles", "lr": 1e-3}])
    opt2.load_state_dict(sd)
    assert opt2.state[q]["kicks"].dtype == torch.int64 and int(opt2.state[q]["kicks"]) == 1001
    assert opt2.state[q]["exp_avg"].dtype == torch.bfloat16  # floating state still follows the parameter
    sd["state"][0]["kicks"].fill_(7)
    assert int(opt2.state[q]["kicks"]) == 1001  # a copy, not a view of the checkpoint


def test_optimizer_state_bytes_by_group_splits_the_total():
    """adamw holds m and v (fp32) plus a step scalar per parameter tensor; sinkgd holds nothing."""
    from lightning_optlab.optim import optimizer_state_bytes, optimizer_state_bytes_by_group

    a, b, c = (torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3))
    opt = ModularOptimizer([{"params": [a, b], "algorithm": "adamw"}, {"params": [c], "algorithm": "sinkgd"}])
    assert optimizer_state_bytes_by_group(opt) == [0, 0]
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes_by_group(opt) == [2 * (16 * 8 + 4), 0]
    assert optimizer_state_bytes(opt) == 2 * (16 * 8 + 4)
