"""The fast paths (Muon's graph step, the stateless rules' graph step, the in-place Stiefel
retractor) run their stacked buffers and bodies on CPU too, where CapturedStep runs the body
eagerly; here they are compared with the plain steps every CPU run uses. On CUDA the same
comparisons run captured (tests/test_muon_cuda_graph.py, tests/test_sinkgd_cuda_graph.py)."""

import copy

import pytest
import torch

from lightning_optlab.optim import ModularOptimizer, cuda_graph

SHAPES = [(24, 16), (24, 16), (16, 24), (12, 12), (8, 4, 3, 3)]
RULES = {
    "muon": dict(lr=0.02, weight_decay=0.1, momentum=0.9),
    "sinkgd": dict(lr=0.02, weight_decay=0.1, sinkhorn_iterations=5),
    "sinkhorn_tanh": dict(lr=0.02, weight_decay=0.1, tau=0.1, n_iter=5),
}


@pytest.fixture
def fast_paths_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "FAST_PATH_DEVICES", ("cuda", "cpu"))


def make(rule, fast, views=None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    group = {"params": params, "algorithm": rule, **RULES[rule], "cuda_graph": "auto" if fast else False}
    if views:
        group["matrix_views"] = views
    return params, ModularOptimizer([group])


def run(opt, params, steps, lrs):
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (step % 3 - 1)
        opt.param_groups[0]["lr"] = lrs[step]
        opt.step()


@pytest.mark.parametrize("views", [None, ["out_in", "in_out", "out_in", "out_in*3", "out_in"]], ids=["stored", "views"])
@pytest.mark.parametrize("rule", list(RULES))
def test_fast_path_step_equals_plain_step(rule, views, fast_paths_on_cpu):
    if views and rule != "muon":
        views = [v.split("*")[0] for v in views]  # block splits are Muon's
    lrs = [0.02, 0.02, 0.01, 0.01, 0.005, 0.005]
    plain_p, plain = make(rule, fast=False, views=views)
    fast_p, fast = make(rule, fast=True, views=views)
    run(plain, plain_p, range(6), lrs)
    run(fast, fast_p, range(6), lrs)
    runtime = fast.param_groups[0].get("_runtime", {})
    assert any(v is not None for v in runtime.values()), "the fast path did not run"
    assert not plain.param_groups[0].get("_runtime")
    for a, b in zip(plain_p, fast_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if rule == "muon":  # the momentum buffers are views of the stacks, and save as plain state
        for a, b in zip(plain_p, fast_p):
            torch.testing.assert_close(fast.state[b]["momentum_buffer"], plain.state[a]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)


def test_muon_fast_path_resumes_from_a_plain_checkpoint(fast_paths_on_cpu):
    lrs = [0.02] * 6
    plain_p, plain = make("muon", fast=False)
    run(plain, plain_p, range(3), lrs)
    fast_p, fast = make("muon", fast=True)
    with torch.no_grad():
        for a, b in zip(plain_p, fast_p):
            b.copy_(a)
    fast.load_state_dict(copy.deepcopy(plain.state_dict()))  # as from a checkpoint file
    run(plain, plain_p, range(3, 6), lrs)
    run(fast, fast_p, range(3, 6), lrs)
    for a, b in zip(plain_p, fast_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_stiefel_retractor_with_bucket_branches_equals_one_bucket_at_a_time():
    from lightning_optlab.manifolds import StiefelRetractor, stiefel_distance

    gen = torch.Generator().manual_seed(1)
    Ws = [torch.linalg.qr(torch.randn(m, n, generator=gen))[0] + 0.02 * torch.randn(m, n, generator=gen)
          for m, n in ((40, 16), (40, 16), (30, 12))]
    together = [W.clone() for W in Ws]
    StiefelRetractor([together[:2], together[2:]], tol=1e-4)()
    for W, t in zip(Ws, together):
        alone = W.clone()
        StiefelRetractor([[alone]], tol=1e-4)()
        torch.testing.assert_close(t, alone, rtol=0, atol=1e-6)
        assert stiefel_distance(t) <= 1e-4
