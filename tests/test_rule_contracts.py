"""What every registered rule promises (parametrized over ``available_rules()``, torch's rules
included): resumable state, finite updates, the NaN/Inf policy, zero_grad and missing gradients,
add_param_group, dtypes; YAML-style hyperparameters, registry errors, measured state memory.
The checks live in ``tests/rule_contract.py`` so a rule added from one file runs them too
(``tests/test_one_file_rule.py``)."""

import pytest
import torch
import yaml

from lightning_optlab.optim import (
    AdamWSPAM,
    ModularOptimizer,
    Muon,
    SinkGD,
    SinkhornTanh,
    SPARKLES,
    available_rules,
    get_rule,
    optimizer_state_bytes,
    resolve_hyperparameters,
    standalone_optimizer,
)
from lightning_optlab.policy.build import build_param_groups
from rule_contract import (
    MATRIX_SHAPES,
    check_add_param_group,
    check_finite_updates,
    check_missing_grads_and_zero_grad,
    check_nan_refusal,
    check_resume_bitwise,
    make_params,
    set_grads,
)

RULES = available_rules()
MODES = [(name, modular) for name in RULES for modular in (False, True)
         if modular or standalone_optimizer(name) is not None]
MODE_IDS = [f"{name}-{'modular' if modular else 'standalone'}" for name, modular in MODES]


def test_the_contract_covers_every_registered_rule():
    assert {"adam", "adamw", "sgd", "rmsprop", "muon", "sinkgd", "sinkhorn_tanh", "adamw_spam", "sparkles"} <= set(RULES)
    assert standalone_optimizer("muon") is Muon and standalone_optimizer("adamw") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,modular", MODES, ids=MODE_IDS)
def test_state_dict_round_trip_equals_uninterrupted_run(name, modular, dtype):
    check_resume_bitwise(name, modular, dtype)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12, 1e12, 1e30])
@pytest.mark.parametrize("name", RULES)
def test_zero_tiny_and_huge_gradients_give_finite_updates(name, scale):
    check_finite_updates(name, scale)


@pytest.mark.parametrize("name", ["muon", "sinkgd", "sinkhorn_tanh", "adamw_spam", "adamw"])
def test_decoupled_weight_decay_alone_shrinks_every_weight(name):
    """With a zero gradient only the decay acts. Rules that put the decay into the gradient
    (adam, sgd, rmsprop: L2, which their normalization can amplify) or kick the weights
    (sparkles) are not expected to do this."""
    start, params = check_finite_updates(name, 0.0)
    for p, s in zip(params, start):
        assert (p.detach().abs() <= s.abs() + 1e-7).all()
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,modular", MODES, ids=MODE_IDS)
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(name, modular, bad):
    check_nan_refusal(name, modular, bad)


@pytest.mark.parametrize("name,modular", MODES, ids=MODE_IDS)
def test_missing_gradients_are_skipped_and_zero_grad_clears(name, modular):
    check_missing_grads_and_zero_grad(name, modular)


@pytest.mark.parametrize("name,modular", MODES, ids=MODE_IDS)
def test_add_param_group_trains_and_resumes(name, modular):
    check_add_param_group(name, modular)


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
