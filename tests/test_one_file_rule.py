"""A rule added from one file (tests/toy_rules/lion.py, no package file edited) registers,
validates, trains, resumes and keeps the whole rule contract. Run in a fresh interpreter so the
toy rule never joins the registry of the other tests."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import math, sys
    import pytest, torch
    sys.path[:0] = ["{tests}", "{tests}/toy_rules"]
    import lion  # the one file
    import rule_contract as contract
    from lightning_optlab import Policy, available_rules, build_optimizer
    from lightning_optlab.optim import standalone_optimizer

    assert "lion" in available_rules() and standalone_optimizer("lion") is lion.Lion

    # validates through the policy, naming the rule and the key
    for bad, message in (({{"betas": [0.9, 1.5]}}, "betas must be two numbers"),
                         ({{"beta": 0.9}}, "unknown hyperparameter 'beta'"),
                         ({{"lr": float("nan")}}, "lr must be a finite number")):
        with pytest.raises(ValueError, match=r"policy rule #0 \\(rule0_lion.*" + message):
            Policy.coerce([{{"match": {{}}, "optimizer": "lion", **bad}}])

    # trains a model through a policy and matches the float64 formula
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ref = {{n: p.detach().double().clone() for n, p in model.named_parameters()}}
    moments = {{n: torch.zeros_like(p) for n, p in ref.items()}}
    opt = build_optimizer(model, "rules:\\n  - {{match: {{}}, optimizer: lion, lr: 3e-3, betas: [0.9, 0.99], weight_decay: 0.1}}")
    x = torch.randn(256, 8)
    y = x @ torch.linspace(-0.5, 0.5, 8)[:, None]
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        for n, p in model.named_parameters():
            g = p.grad.double()
            c = 0.9 * moments[n] + 0.1 * g
            ref[n] = ref[n] * (1 - 3e-3 * 0.1) - 3e-3 * torch.sign(c)
            moments[n] = 0.99 * moments[n] + 0.01 * g
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    for n, p in model.named_parameters():
        assert (p.double() - ref[n]).abs().max().item() < 1e-5, n

    # the contract every built-in rule keeps: resume, NaN refusal, missing grads, add_param_group
    for modular in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            contract.check_resume_bitwise("lion", modular, dtype)
        contract.check_nan_refusal("lion", modular, float("nan"))
        contract.check_missing_grads_and_zero_grad("lion", modular)
        contract.check_add_param_group("lion", modular)
    for scale in (0.0, 1e-30, 1e30):
        contract.check_finite_updates("lion", scale)
    print("lion ok")
    """
)


def test_a_rule_from_one_file_registers_validates_trains_and_resumes():
    code = SCRIPT.format(tests=ROOT / "tests")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("lion ok")
