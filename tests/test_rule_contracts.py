"""What every rule of issue 4 promises: resumable state, finite updates, the NaN/Inf policy,
YAML-style hyperparameters, registry errors, and measured optimizer-state memory."""

import io

import pytest
import torch
import yaml

from lightning_optlab.optim import (
    AdamWSPAM,
    ModularOptimizer,
    Muon,
    SPARKLES,
    SinkGD,
    SinkhornTanh,
    get_rule,
    optimizer_state_bytes,
    resolve_hyperparameters,
)
from lightning_optlab.policy.build import build_param_groups

MATRIX_SHAPES = [(9, 4), (4, 9), (6, 6), (9, 4), (5, 3, 2, 2)]
ALL_SHAPES = MATRIX_SHAPES + [(7,), ()]

RULES = {
    # name: (class, hyperparameters that make every code path run in a few steps)
    "muon": (Muon, dict(lr=0.02, weight_decay=0.01)),
    "sinkgd": (SinkGD, dict(lr=0.01, weight_decay=0.01)),
    "sinkhorn_tanh": (SinkhornTanh, dict(lr=0.01)),
    "adamw_spam": (AdamWSPAM, dict(lr=0.01, reset_interval=3, warmup_steps=2, spike_clip_delay=1, spike_threshold=4.0)),
    "sparkles": (SPARKLES, dict(lr=0.01, stochastic_threshold=1e3, weight_decay=0.01, clip_gradients=True)),
}


def shapes_for(name):
    return MATRIX_SHAPES if get_rule(name).min_ndim >= 2 else ALL_SHAPES


def make_params(shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(40 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def make_optimizer(name, params, modular):
    cls, hp = RULES[name]
    if modular:
        return ModularOptimizer([{"params": params, "algorithm": name, **hp}])
    return cls(params, **hp)


@pytest.mark.parametrize("modular", [False, True], ids=["standalone", "modular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(RULES))
def test_state_dict_round_trip_equals_uninterrupted_run(name, dtype, modular):
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
        assert p.dtype == dtype
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12, 1e12, 1e30])
@pytest.mark.parametrize("name", sorted(RULES))
def test_zero_tiny_and_huge_gradients_give_finite_updates(name, scale):
    params = make_params(shapes_for(name))
    opt = make_optimizer(name, params, modular=False)
    start = [p.detach().clone() for p in params]
    for t in range(3):
        set_grads(params, t)
        for p in params:
            p.grad.mul_(scale)
        opt.step()
        for p in params:
            assert torch.isfinite(p).all(), f"{name}: non-finite weight after a gradient scaled by {scale}"
    if scale == 0.0 and name != "sparkles":  # weight decay only: every weight shrinks, none grows
        for p, s in zip(params, start):
            assert (p.detach().abs() <= s.abs() + 1e-7).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("modular", [False, True], ids=["standalone", "modular"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(name, modular, bad):
    shapes = shapes_for(name)
    params = make_params(shapes)
    names = [f"layer{i}.weight" for i in range(len(params))]
    cls, hp = RULES[name]
    if modular:
        opt = ModularOptimizer([{"params": params, "param_names": names, "algorithm": name, "name": "hidden", **hp}])
    else:
        opt = cls(list(zip(names, params)), **hp)
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in opt.state.items()}
    set_grads(params, 1)
    params[2].grad.view(-1)[3] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient.*'layer2\.weight'"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for k, v in opt.state.items():
        for kk, vv in v.items():
            if torch.is_tensor(vv):
                assert torch.equal(vv, state_before[k][kk])
            else:
                assert vv == state_before[k][kk]


YAML_POLICY = """
rules:
  - {match: {name: "0.weight"}, optimizer: muon, lr: 0.02, ns_steps: 3, ns_coefficients: [3.4445, -4.775, 2.0315],
     adjust_lr_fn: match_rms_adamw, nesterov: false, ns_dtype: float32}
  - {match: {name: "2.weight"}, optimizer: sparkles, betas: [0.9, 0.99], decouple_weight_decay: true, weight_decay: 0.01, seed: 5}
  - {match: {name: "4.weight"}, optimizer: adamw_spam, betas: [0.9, 0.95], reset_interval: 100, warmup_steps: 10}
  - {match: {name: "6.weight"}, optimizer: sinkhorn_tanh, tau: 0.2, n_iter: 3}
  - {match: {name: "8.weight"}, optimizer: sinkgd, sinkhorn_iterations: 4, lr: 0.001}
  - {match: {name: "0.bias"}, optimizer: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.0001}
  - {match: {name: "2.bias"}, optimizer: rmsprop, lr: 0.001, alpha: 0.9, momentum: 0.5, centered: true}
  - {match: {name: "4.bias"}, optimizer: adam, lr: 0.001, betas: [0.8, 0.9], amsgrad: true}
  - {match: {}, optimizer: adamw, lr: 0.003, betas: [0.9, 0.95], weight_decay: 0.0}
"""


def test_every_rule_accepts_its_hyperparameters_as_yaml_gives_them():
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        layers += [torch.nn.Linear(6, 6), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    groups = build_param_groups(model, yaml.safe_load(YAML_POLICY))
    opt = ModularOptimizer(groups)
    algorithms = [g["algorithm"] for g in opt.param_groups]
    assert algorithms == ["muon", "sparkles", "adamw_spam", "sinkhorn_tanh", "sinkgd", "sgd", "rmsprop", "adam", "adamw"]
    x = torch.randn(16, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    muon_group = opt.param_groups[0]
    assert muon_group["ns_steps"] == 3 and muon_group["adjust_lr_fn"] == "match_rms_adamw"


def test_registry_refuses_unknown_and_bad_hyperparameters_naming_the_rule():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'ns_step' \(did you mean 'ns_steps'\?\) for optimizer 'muon'"):
        resolve_hyperparameters("muon", {"ns_step": 3})
    with pytest.raises(ValueError, match=r"'n_iter' for optimizer 'sinkgd'.*sinkhorn_iterations"):
        resolve_hyperparameters("sinkgd", {"n_iter": 3})  # sinkgd's is sinkhorn_iterations
    with pytest.raises(ValueError, match=r"optimizer 'muon': adjust_lr_fn must be one of"):
        resolve_hyperparameters("muon", {"adjust_lr_fn": "rms"})
    with pytest.raises(ValueError, match=r"optimizer 'sinkhorn_tanh': tau must be a number > 0"):
        resolve_hyperparameters("sinkhorn_tanh", {"tau": 0})
    with pytest.raises(ValueError, match=r"optimizer 'sparkles': centralization must be in \[0, 1\]"):
        resolve_hyperparameters("sparkles", {"centralization": 2})
    with pytest.raises(ValueError, match=r"optimizer 'adamw_spam': reset_interval must be an integer"):
        resolve_hyperparameters("adamw_spam", {"reset_interval": 1.5})
    with pytest.raises(ValueError, match=r"ns_dtype must be 'auto'"):
        resolve_hyperparameters("muon", {"ns_dtype": "int8"})
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"SinkGD param group 0: unknown hyperparameter 'tau'.*'sinkgd'"):
        SinkGD([{"params": [p], "tau": 0.1}])
    assert get_rule("spam").name == "adamw_spam"
    assert get_rule("sinkgd").stateless and get_rule("sinkhorn_tanh").stateless


def _peak_state_bytes(opt, params, steps=3):
    peak = 0
    for t in range(steps):
        set_grads(params, t)
        opt.step()
        peak = max(peak, optimizer_state_bytes(opt))
    return peak


@pytest.mark.parametrize(
    "make, per_value, per_tensor",
    [
        (lambda ps: ModularOptimizer([{"params": ps, "algorithm": "sinkgd"}]), 0, 0),
        (lambda ps: SinkhornTanh(ps), 0, 0),
        (lambda ps: ModularOptimizer([{"params": ps, "algorithm": "adamw"}]), 8, 4),  # m, v + step scalar
        (lambda ps: torch.optim.AdamW(ps), 8, 4),
        (lambda ps: Muon(ps), 4, 0),  # momentum buffer
        (lambda ps: AdamWSPAM(ps), 8, 4),
        (lambda ps: SPARKLES(ps), 12, 8),  # m, v, previous gradient; the 0-d int64 kick counter
    ],
)
def test_peak_optimizer_state_bytes_per_parameter(make, per_value, per_tensor):
    params = make_params(MATRIX_SHAPES)
    numel = sum(p.numel() for p in params)
    peak = _peak_state_bytes(make(params), params)
    assert peak == per_value * numel + per_tensor * len(params)
