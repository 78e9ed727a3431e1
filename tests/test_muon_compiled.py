"""The torch.compile path of Muon (the CUDA default) computes what the eager path computes."""

import pytest
import torch

from lightning_optlab.optim import Muon
from lightning_optlab.optim.functional import use_compiled_muon

SHAPES = [(8, 6), (8, 6), (12, 5), (4, 3, 2, 2)]


def run(compile_setting, nesterov):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    opt = Muon(params, lr=0.05, weight_decay=0.1, nesterov=nesterov, compile=compile_setting)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
def test_compiled_step_equals_eager_step(nesterov):
    for eager, compiled in zip(run(False, nesterov), run(True, nesterov)):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_auto_compiles_on_cuda_only():
    assert use_compiled_muon("auto", torch.device("cuda")) is True
    assert use_compiled_muon("auto", torch.device("cpu")) is False
    assert use_compiled_muon(True, torch.device("cpu")) is True
