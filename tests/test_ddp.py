"""A 2-process CPU DDP fit (gloo) through Lightning ends with identical parameters on both ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_optlab.models import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_fit.py"


def run_ddp(tmp_path, policy=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LOCAL_RANK", None)
    args = [sys.executable, str(SCRIPT), str(tmp_path)] + ([json.dumps(policy)] if policy else [])
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def test_ddp_gloo_fit_gives_identical_parameters(tmp_path):
    r0, r1 = run_ddp(tmp_path)
    assert r0["backend"] == r1["backend"] == "gloo" and r0["world"] == 2
    assert r0["steps"] == r1["steps"] == 8
    torch.manual_seed(0)
    init = MLPClassifier(policy=[{"match": {}, "optimizer": "sgd"}], hidden_sizes=(32, 32)).state_dict()
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    assert any(not torch.equal(r0["state"][k], init[k]) for k in init)  # training did move them


def test_ddp_gloo_fit_with_muon_split_gives_identical_parameters(tmp_path):
    policy = {"rules": [
        {"match": {"role": "hidden"}, "optimizer": "muon", "lr": 0.02},
        {"match": {}, "optimizer": "adamw", "lr": 3e-3},
    ]}
    r0, r1 = run_ddp(tmp_path, policy)
    assert r0["steps"] == r1["steps"] == 8
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
