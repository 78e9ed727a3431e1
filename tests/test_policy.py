"""The declarative policy: roles, matching, param groups, and the errors for bad input."""

import re

import pytest
from torch import nn

from conftest import TinyGPT
from lightning_optlab.optim import ModularOptimizer
from lightning_optlab.policy import (
    Policy,
    Rule,
    build_optimizer,
    build_param_groups,
    describe_parameters,
    explain,
)

GPT_POLICY = {
    "rules": [
        {"name": "emb", "match": {"role": "embedding"}, "optimizer": "adamw", "lr": 3e-3, "constraint": "sphere"},
        {"name": "hid", "match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
        {"name": "out", "match": {"role": "output"}, "optimizer": "adamw", "lr": 1e-3, "optional": True},
        {"name": "rest", "match": {"role": ["bias", "norm"]}, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    ]
}


def roles_of(model, **kw):
    return {i.name: i.role for i in describe_parameters(model, **kw)}


def test_mlp_roles_follow_the_three_components(mlp):
    assert roles_of(mlp) == {
        "1.weight": "embedding",
        "1.bias": "bias",
        "3.weight": "hidden",
        "3.bias": "bias",
        "5.weight": "output",
        "5.bias": "bias",
    }


def test_gpt_roles_and_tied_head_claimed_once(tiny_gpt):
    roles = roles_of(tiny_gpt)
    assert roles["wte.weight"] == roles["wpe.weight"] == "embedding"
    assert "lm_head.weight" not in roles  # the tied head is the embedding's tensor, listed once
    assert {roles[f"blocks.{i}.{n}.weight"] for i in range(2) for n in ("qkv", "proj", "fc", "fc_out")} == {"hidden"}
    assert {roles[f"blocks.{i}.{n}.bias"] for i in range(2) for n in ("qkv", "proj", "fc", "fc_out")} == {"bias"}
    assert {roles[f"blocks.{i}.ln{j}.{w}"] for i in range(2) for j in (1, 2) for w in ("weight", "bias")} == {"norm"}
    assert roles["ln_f.weight"] == "norm"

    groups = build_param_groups(tiny_gpt, GPT_POLICY)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})  # claimed once
    trainable = {id(p) for p in tiny_gpt.parameters()}  # parameters() already deduplicates
    assert {id(p) for p in all_params} == trainable
    by_name = {g["name"]: g for g in groups}
    assert "out" not in by_name  # optional rule with nothing to claim is dropped, not an error
    assert by_name["emb"]["param_names"] == ["wte.weight", "wpe.weight"]
    assert by_name["emb"]["params"][0] is tiny_gpt.lm_head.weight


def test_untied_gpt_has_an_output_role():
    model = TinyGPT(tied=False)
    assert roles_of(model)["lm_head.weight"] == "output"
    groups = {g["name"]: g for g in build_param_groups(model, GPT_POLICY)}
    assert groups["out"]["param_names"] == ["lm_head.weight"]


def test_groups_built_as_declared(mlp):
    policy = {
        "rules": [
            {"name": "in", "match": {"role": "embedding"}, "optimizer": "adamw", "lr": 3e-3, "constraint": "sphere",
             "constraint_options": {"radius": 2.0}},
            {"name": "hid", "match": {"role": "hidden"}, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
             "nesterov": True, "lr_scale": 0.5},
            {"name": "rest", "match": {}, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        ]
    }
    groups = build_param_groups(mlp, policy)
    assert [g["name"] for g in groups] == ["in", "hid", "rest"]
    g_in, g_hid, g_rest = groups
    assert g_in["params"] == [mlp[1].weight] and g_in["constraint"] == "sphere"
    assert g_in["constraint_options"] == {"radius": 2.0} and g_in["role"] == "embedding"
    assert g_hid["algorithm"] == "sgd" and g_hid["momentum"] == 0.9 and g_hid["nesterov"] is True
    assert g_hid["lr"] == pytest.approx(0.05)  # lr x lr_scale
    assert g_rest["param_names"] == ["1.bias", "3.bias", "5.weight", "5.bias"]
    assert g_rest["roles"] == ["bias", "bias", "output", "bias"] and g_rest["role"] == "mixed"
    assert g_rest["weight_decay"] == 0.0 and g_rest["betas"] == (0.9, 0.999)  # registry defaults filled
    opt = ModularOptimizer(groups)
    assert [g["algorithm"] for g in opt.param_groups] == ["adamw", "sgd", "adamw"]


def test_first_matching_rule_wins(mlp):
    policy = [
        {"match": {"name": "3.*"}, "optimizer": "sgd", "lr": 0.1},
        {"match": {"role": ["hidden", "bias"]}, "optimizer": "rmsprop"},
        {"match": {}, "optimizer": "adam"},
    ]
    groups = build_param_groups(mlp, policy)
    assert groups[0]["param_names"] == ["3.weight", "3.bias"]
    assert groups[1]["param_names"] == ["1.bias", "5.bias"]
    assert groups[2]["param_names"] == ["1.weight", "5.weight"]


@pytest.mark.parametrize(
    "match, expected",
    [
        ({"name": "*.bias"}, ["1.bias", "3.bias", "5.bias"]),
        ({"name": ["1.*", "5.weight"]}, ["1.weight", "1.bias", "5.weight"]),
        ({"regex": r"^[35]\.weight$"}, ["3.weight", "5.weight"]),
        ({"module": "Linear", "ndim": 1}, ["1.bias", "3.bias", "5.bias"]),
        ({"module": "torch.nn.Linear", "ndim": ">=2"}, ["1.weight", "3.weight", "5.weight"]),
        ({"ndim": [2], "role": "output"}, ["5.weight"]),
    ],
)
def test_match_keys(mlp, match, expected):
    groups = build_param_groups(mlp, [{"match": match, "optimizer": "sgd"}, {"match": {}, "optimizer": "adamw"}])
    assert groups[0]["param_names"] == expected


def test_frozen_parameters_are_skipped(mlp):
    mlp[3].weight.requires_grad_(False)
    groups = build_param_groups(mlp, [{"match": {}, "optimizer": "adamw"}])
    assert "3.weight" not in groups[0]["param_names"] and len(groups[0]["params"]) == 5


def test_role_overrides_win(mlp):
    class WithRoles(nn.Sequential):
        def optlab_roles(self):
            return {"3.*": "norm"}

    model = WithRoles(*mlp)
    assert roles_of(model)["3.weight"] == "norm" and roles_of(model)["3.bias"] == "norm"
    assert roles_of(mlp, roles={"5.weight": "hidden"})["5.weight"] == "hidden"
    with pytest.raises(ValueError, match="'bogus' is not a role"):
        describe_parameters(mlp, roles={"1.*": "bogus"})


def test_policy_round_trips_through_dict_and_yaml(tmp_path, mlp):
    policy = Policy.coerce(GPT_POLICY)
    assert isinstance(policy.rules[1], Rule) and policy.rules[1].hparams == {"momentum": 0.9}
    assert Policy.coerce(policy.to_dict()).to_dict() == policy.to_dict()
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - {match: {role: hidden}, optimizer: sgd, lr: 0.1, momentum: 0.9}\n"
        "  - {match: {}, optimizer: adamw, lr: 1.0e-3, betas: [0.8, 0.99]}\n"
    )
    from_file = Policy.coerce(str(path))
    assert from_file.rules[1].hparams == {"betas": [0.8, 0.99]}
    opt = build_optimizer(mlp, from_file)
    assert opt.param_groups[1]["betas"] == (0.8, 0.99)
    assert "hidden" in explain(mlp, from_file)


# --------------------------------------------------------------------------- bad input


def test_unknown_optimizer_lists_known_ones(mlp):
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'.*Known optimizers: .*adamw.*sgd.*Did you mean 'adamw'"):
        build_param_groups(mlp, [{"match": {}, "optimizer": "adamww"}])


def test_unknown_hyperparameter_names_rule_and_accepted(mlp):
    with pytest.raises(ValueError) as err:
        build_param_groups(mlp, [{"name": "all", "match": {}, "optimizer": "sgd", "lr": 0.1, "momentm": 0.9}])
    msg = str(err.value)
    assert "policy rule #0 (all" in msg and "'momentm'" in msg and "did you mean 'momentum'" in msg
    assert "It accepts:" in msg and "nesterov" in msg


def test_bad_hyperparameter_values(mlp):
    with pytest.raises(ValueError, match=r"rule #0.*lr must be a number >= 0"):
        build_param_groups(mlp, [{"match": {}, "optimizer": "adamw", "lr": -1}])
    with pytest.raises(ValueError, match="betas must be two numbers"):
        build_param_groups(mlp, [{"match": {}, "optimizer": "adamw", "betas": [0.9]}])
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        build_param_groups(mlp, [{"match": {}, "optimizer": "sgd", "nesterov": True}])


def test_rule_that_claims_nothing_is_named_with_suggestions(mlp):
    with pytest.raises(ValueError) as err:
        build_param_groups(mlp, [{"name": "typo", "match": {"name": "3.weigth"}, "optimizer": "sgd"},
                                 {"match": {}, "optimizer": "adamw"}])
    msg = str(err.value)
    assert "policy rule #0 (typo" in msg and "claims no parameter" in msg and "3.weight" in msg


def test_shadowed_rule_names_the_rule_that_took_its_parameters(mlp):
    with pytest.raises(ValueError, match=r"rule #1 .*already claimed by earlier rule\(s\) everything"):
        build_param_groups(mlp, [{"name": "everything", "match": {}, "optimizer": "adamw"},
                                 {"match": {"role": "hidden"}, "optimizer": "sgd"}])


def test_unclaimed_parameters_are_named(mlp):
    with pytest.raises(ValueError) as err:
        build_param_groups(mlp, [{"match": {"role": "hidden"}, "optimizer": "sgd"}])
    msg = str(err.value)
    assert "5 trainable parameter(s) unclaimed" in msg
    for name in ("1.weight", "1.bias", "3.bias", "5.weight", "5.bias"):
        assert name in msg
    assert "catch-all" in msg


def test_constraint_that_does_not_fit_the_shape(mlp):
    with pytest.raises(ValueError, match=r"rule #0 .*constraint 'stiefel' on 1.bias of shape \[32\]"):
        build_param_groups(mlp, [{"match": {"name": "1.*"}, "optimizer": "adamw", "constraint": "stiefel"},
                                 {"match": {}, "optimizer": "adamw"}])
    with pytest.raises(ValueError, match="unknown constraint 'oblique'"):
        build_param_groups(mlp, [{"match": {}, "optimizer": "adamw", "constraint": "oblique"}])


def test_optimizer_that_needs_matrices_refuses_vectors(mlp):
    from lightning_optlab.optim.registry import UpdateRule, get_rule, register_rule

    try:
        get_rule("test_matrix_only")
    except ValueError:
        register_rule(UpdateRule("test_matrix_only", step=lambda *a: None, defaults={"lr": 0.1}, min_ndim=2))
    with pytest.raises(ValueError, match=r"claims 1.bias of shape \[32\].*needs at least 2 dimensions.*Route 0-/1-D"):
        build_param_groups(mlp, [{"match": {"module": "Linear"}, "optimizer": "test_matrix_only"}])


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"rules": [{"match": {"rol": "hidden"}, "optimizer": "sgd"}]}, r"unknown match key\(s\) \['rol'\]"),
        ({"rules": [{"match": {"role": "hiden"}, "optimizer": "sgd"}]}, "unknown role 'hiden'"),
        ({"rules": [{"match": {"regex": "("}, "optimizer": "sgd"}]}, "invalid regex"),
        ({"rules": [{"match": {"ndim": "two"}, "optimizer": "sgd"}]}, "ndim must be an int"),
        ({"rules": [{"match": {"module": "nn.Nope"}, "optimizer": "sgd"}]}, "cannot be imported"),
        ({"rules": [{"match": {}}]}, "missing 'optimizer'"),
        ({"rules": ["adamw"]}, "expected a mapping"),
        ({"rules": []}, "policy has no rules"),
        ({"rule": []}, r"unknown key\(s\) \['rule'\]"),
        ({"rules": [{"name": "a", "match": {}, "optimizer": "sgd"}, {"name": "a", "match": {}, "optimizer": "sgd"}]},
         "must be unique"),
        ({"rules": [{"match": {}, "optimizer": "sgd", "lr_scale": 0}]}, "lr_scale must be a positive number"),
        (42, "policy must be a Policy"),
    ],
)
def test_malformed_policies_are_refused(policy, message):
    with pytest.raises(ValueError, match=message):
        Policy.coerce(policy)


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {match: {role: hidden}, optimizer: sgd\n  - {match: {}, optimizer: adamw}\n")
    with pytest.raises(ValueError, match=re.escape(f"policy file '{bad}' is not valid YAML at line")):
        Policy.coerce(str(bad))
    with pytest.raises(ValueError, match="policy YAML text is not valid YAML"):
        Policy.from_yaml("rules: [\n  {match: {}, optimizer: adamw\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Policy.coerce(str(tmp_path / "missing.yaml"))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ValueError, match="expected {rules: \\[...\\]}"):
        Policy.coerce(scalar)


@pytest.mark.parametrize("key,value,message", [
    ("lr", float("nan"), "lr must be a finite number"),
    ("lr", float("inf"), "lr must be a finite number"),
    ("lr", True, "lr must be a number, not true/false"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number"),
    ("betas", [0.9, float("nan")], "betas must be 2 finite numbers"),
    ("eps", False, "eps must be a number, not true/false"),
])
def test_non_finite_and_bool_hyperparameters_are_refused_naming_rule_and_key(key, value, message):
    rule = {"name": "heads", "match": {}, "optimizer": "adamw", key: value}
    with pytest.raises(ValueError, match=r"policy rule #0 \(heads.*" + re.escape(message)):
        Policy.coerce([rule])


def test_muon_without_newton_schulz_is_refused_with_what_it_means():
    with pytest.raises(ValueError, match=r"rule #0.*ns_steps.*got 0: with no Newton-Schulz iteration"):
        Policy.coerce([{"match": {}, "optimizer": "muon", "ns_steps": 0}])
