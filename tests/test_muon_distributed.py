"""Muon under a process group: the Newton-Schulz work is split across ranks (gloo, CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_optlab.optim.newton_schulz as ns_module
from lightning_optlab.optim import Muon

SHAPES = [(8, 6), (8, 6), (8, 6), (5, 7), (5, 7), (4, 3, 3, 3)]


def make_params_and_grads(steps=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    return params, grads


def run_steps(params, grads, **kw):
    params = [p.clone().requires_grad_() for p in params]
    opt = Muon(params, lr=0.05, weight_decay=0.1, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        orthogonalized = []
        original = ns_module.newton_schulz

        def counting(stack, **kw):
            orthogonalized.append(stack.shape[0])
            return original(stack, **kw)

        ns_module.newton_schulz = counting
        params, grads = make_params_and_grads()
        result = run_steps(params, grads)
        torch.save({"params": result, "per_call": orthogonalized}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ns_work_is_split_across_ranks_and_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # identical bits on every rank
    # three shape buckets per step (3x(8,6), 2x(5,7), 1x(4,27)): each rank takes ceil(B/2)
    assert r0["per_call"] == r1["per_call"] == [2, 1, 1] * 3
    params, grads = make_params_and_grads()
    reference = run_steps(params, grads, ns_split=False)  # one process does all the work
    for a, ref in zip(r0["params"], reference):
        torch.testing.assert_close(a, ref, rtol=0, atol=1e-6)


def test_split_needs_a_process_group_when_forced():
    params, grads = make_params_and_grads(1)
    with pytest.raises(RuntimeError, match="ns_split=True needs an initialized"):
        run_steps(params, grads, ns_split=True)
    with pytest.raises(ValueError, match="ns_split must be 'auto', true or false"):
        Muon([torch.zeros(3, 3, requires_grad=True)], ns_split="sometimes")


def test_sharded_parameters_are_refused_by_rules_that_do_not_gather():
    """A rule that declares no sharded path (``UpdateRule.sharding`` left at "refuse", as a user's
    one-file rule) refuses a sharded parameter when its group is checked; Muon and SPARKLES
    gather, so they build (real FSDP2 DTensors: tests/test_fsdp2.py)."""
    from lightning_optlab.optim import SPARKLES
    from lightning_optlab.optim.registry import UpdateRule
    from lightning_optlab.optim.sharded import check_sharding

    class DTensor(torch.Tensor):  # stands in for torch.distributed.tensor.DTensor by type name
        def to_local(self):
            return self

    p = torch.zeros(4, 4).as_subclass(DTensor).requires_grad_()
    whole_only = UpdateRule(name="lion", step=lambda *a: None, defaults={"lr": 1e-4})  # not registered
    with pytest.raises(ValueError, match="optimizer 'lion' needs whole tensors .* sharded \\(DTensor, FSDP2\\)"):
        check_sharding(whole_only, [p], ["w"], "policy rule #0")
    SPARKLES([p])  # builds: its step gathers whole tensors and state
    Muon([p])  # builds: its step gathers whole matrices
